"""Defences against gradient inversion, as plugins chosen by ``defence.kind`` in the scenario.

``base.Defence`` lists every place a defence may act; each defence overrides
only what it changes, and registers itself with its config in its own module.
Importing this package registers them all (one line each), then the
installed third-party defences (entry point group ``simfl.defences``,
docs/guides/plugins.md). Pure torch (and Opacus): no Ray, testable alone.
"""

from __future__ import annotations

from simfl.core.config import ModelConfig
from simfl.core.models import SplitNet, build_model
from simfl.core.plugins import PluginConfig
from simfl.privacy.defences import bido, dpsgd, gaussian, latent, pruning  # noqa: F401  (registers the defences)
from simfl.privacy.defences.base import DEFENCES, Defence, NoDefenceConfig
from simfl.privacy.defences.bido import BiDO
from simfl.privacy.defences.dpsgd import DPSGD
from simfl.privacy.defences.gaussian import GaussianNoise
from simfl.privacy.defences.latent import LatentDefence
from simfl.privacy.defences.pruning import Pruning


def make_defence(cfg: PluginConfig, shape: tuple[int, int, int], seed: int) -> Defence:
    """The configured defence for data of ``shape`` = (channels, image size, classes)."""
    return DEFENCES[cfg.kind](cfg, shape, seed)


def defended_model(
    model: ModelConfig, defence: PluginConfig, seed: int, shape: tuple[int, int, int]
) -> tuple[SplitNet, Defence]:
    """The model with its defence built in: how every process makes the shared model.

    Weights are initialised from torch's global RNG (seed it first); the defence draws none.
    """
    built = make_defence(defence, shape, seed)
    return built.build(build_model(model, *shape)), built


__all__ = [
    "DEFENCES", "BiDO", "DPSGD", "Defence", "GaussianNoise", "LatentDefence", "NoDefenceConfig", "Pruning",
    "defended_model", "make_defence",
]

# Installed third-party defences, after the built-ins, so every scenario union sees them.
DEFENCES.load_entry_points("simfl.defences")
