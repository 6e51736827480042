"""A defence module that raises on import, after registering a defence (which must not stay registered)."""

from __future__ import annotations

from typing import Literal

from simfl.core.plugins import PluginConfig
from simfl.privacy.defences.base import DEFENCES, Defence


class HalfLoadedConfig(PluginConfig):
    """``half_loaded``: registered, then its module fails."""

    kind: Literal["half_loaded"] = "half_loaded"


@DEFENCES.register(HalfLoadedConfig)
class HalfLoaded(Defence):
    """A plain defence whose module never finishes importing."""


raise RuntimeError("the broken plugin fails on import\nsecond line, not shown")
