"""simfl: federated-learning privacy simulation on Ray.

Pure logic (data, partition, models, training, metrics) lives here and never
imports Ray; the Ray actors live in the top-level ``actors`` package.
"""

__version__ = "0.1.0"
