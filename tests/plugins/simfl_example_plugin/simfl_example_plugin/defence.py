"""``round_update``: each client rounds every parameter entry it shares to a multiple of ``step`` (quantisation).

A defence in a package of its own: importing this module registers it in
simfl's defence registry, and the entry point in this package's pyproject
makes simfl import it. It reuses simfl's helper for defences that transform
the parameter entries a client shares (buffers pass unchanged).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from simfl.core.plugins import PluginConfig
from simfl.core.weights import FlatWeights
from simfl.privacy.defences.base import DEFENCES
from simfl.privacy.defences.pruning import SharedEntriesDefence, segment_mask


class RoundUpdateConfig(PluginConfig):
    """``round_update``: each client rounds every parameter entry it shares to the nearest multiple of ``step``."""

    kind: Literal["round_update"] = "round_update"
    step: float = Field(1e-4, gt=0.0, allow_inf_nan=False,
                        description="quantisation step: every shared parameter entry becomes a multiple of it")


def round_entries(vector: torch.Tensor, mask: torch.Tensor, step: float) -> torch.Tensor:
    """A copy of ``vector`` with the entries ``mask`` selects rounded to the nearest multiple of ``step``."""
    out = vector.clone()
    out[mask] = torch.round(vector[mask] / step) * step
    return out


@DEFENCES.register(RoundUpdateConfig)
class RoundUpdate(SharedEntriesDefence):
    """Quantised sharing; logs ``round_zeroed``, the share of parameter entries rounded to zero."""

    client_figures: ClassVar[dict[str, tuple[str, ...]]] = {"round_zeroed": ("mean",)}

    def __init__(self, cfg: RoundUpdateConfig, shape: tuple[int, int, int], seed: int) -> None:
        super().__init__(cfg, shape, seed)
        self.step = float(cfg.step)

    def begin(self, model: nn.Module, flat: FlatWeights, generator: torch.Generator, state: dict[str, Any]) -> None:
        """Before a client's work: the layout of ``flat``, whose update :meth:`share` rounds."""
        self._bind(flat)

    def share(self, delta: torch.Tensor) -> torch.Tensor:
        """The update with every parameter entry rounded; logs the share of entries that became zero."""
        mask = segment_mask(self._layout(), len(delta), delta.device)
        rounded = round_entries(delta, mask, self.step)
        self._figures = {"round_zeroed": float((rounded[mask] == 0).sum()) / max(int(mask.sum()), 1)}
        return rounded

    def shared_gradient(
        self, model: nn.Module, flat: FlatWeights, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
        state: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """The gradient of the client's objective on (x, y), rounded as :meth:`share` rounds the update."""
        self._bind(flat)
        gradient = super().shared_gradient(model, flat, x, y, generator, state)
        return round_entries(gradient, segment_mask(self._layout(), len(gradient), gradient.device), self.step)
