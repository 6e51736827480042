"""The ground floor: what every other part of simfl stands on.

Configs and their strict validation, the plugin registry, errors, seeding
from (seed, purpose, keys), flat weights, models, local training,
aggregation, checkpoints and resources. Nothing here knows about datasets,
attacks, Ray or studies, so each piece is testable alone.
"""
