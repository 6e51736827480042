"""Defences against gradient inversion, as plugins chosen by ``defence.kind`` in the scenario.

``base.Defence`` lists every place a defence may act; each defence overrides
only what it changes. Pure torch (and Opacus): no Ray, testable alone.
"""

from __future__ import annotations

from simfl.config import DefenceConfig
from simfl.defences.base import Defence
from simfl.defences.bido import BiDO
from simfl.defences.dpsgd import DPSGD
from simfl.defences.latent import LatentDefence
from simfl.models import SplitNet, build_model

DEFENCES: dict[str, type[Defence]] = {"none": Defence, "latent": LatentDefence, "dpsgd": DPSGD, "bido": BiDO}


def make_defence(cfg: DefenceConfig, shape: tuple[int, int, int], seed: int) -> Defence:
    """The configured defence for data of ``shape`` = (channels, image size, classes)."""
    return DEFENCES[cfg.kind](cfg, shape, seed)


def defended_model(scenario, shape: tuple[int, int, int]) -> tuple[SplitNet, Defence]:
    """The scenario's model with its defence built in: how every process makes the shared model."""
    defence = make_defence(scenario.defence, shape, scenario.seed)
    model = defence.build(build_model(scenario.model, *shape))
    return model, defence


__all__ = ["DEFENCES", "BiDO", "DPSGD", "Defence", "LatentDefence", "defended_model", "make_defence"]
