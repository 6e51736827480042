"""Gradient pruning: each client shares only the largest-magnitude entries of what it sends (top-k sparsification).

The defence of Zhu et al., "Deep Leakage from Gradients" (NeurIPS 2019, §5
"Defense Strategies", gradient compression and sparsification): entries of
small magnitude are set to zero before sharing. It acts on what a client
shares in both views: the update (local − global, :meth:`Pruning.share`) and
the gradient (:meth:`Pruning.shared_gradient`); local training itself is plain.

**Per tensor, not global.** In every parameter tensor (a layer's weight, its
bias) of ``n`` entries, the ``floor(fraction · n)`` of smallest magnitude are
zeroed and the ``n − floor(fraction · n)`` largest kept (at least one, as
``fraction < 1``). This is how the implementations that evaluate this defence
against gradient inversion prune: GradAttack's ``GradPruneDefense`` (Huang et
al., NeurIPS 2021) thresholds each parameter's gradient at its own
``prune_ratio`` quantile, the compression defence in Soteria's released code
(Sun et al., CVPR 2021) and the code built on it at each parameter gradient's
own percentile, and DLG's reference for sparsification, Deep
Gradient Compression (Lin et al., ICLR 2018), selects its top-k per layer.
breaching (Geiping et al.) has no pruning defence to follow (its users only
add noise and clip). Per tensor also keeps the defence meaningful: layers'
gradients differ in scale by orders of magnitude, so a global top-k would
empty whole layers (a small-gradient layer's update would vanish from
training) while leaving others untouched.

Exact counts and deterministic ties: entries are ranked by a stable sort of
their magnitudes, so among equal magnitudes the one earlier in the tensor is
kept; the result depends on the values alone (no randomness, no quantile
interpolation that could zero more or fewer entries than stated).

Only parameter entries are pruned: the float buffers (BatchNorm running
statistics) that the update view also carries pass unchanged; they are not
gradients (and are zero in the gradient view).

Attackers. The naive attacker matches a dense simulated gradient against the
sparse observation, so it is not exact (:meth:`Pruning.naive_is_exact`). The
standard adaptive attack masks its simulated gradient to the observed support
(the entries not exactly zero in what the victim shared). The attacks'
:class:`~simfl.privacy.disclosure.Disclosure` has no field to ask for that (it tells
the victim's module, loss, clipping and sharing computation, none of which can
see the observation), so :meth:`Pruning.disclosure` is None for now: every
attack runs naive against pruning. (``Disclosure.shared_gradient`` would let
the learned attack ``lti`` train on pruned shares, but disclosing only that
would also rerun every optimisation attack as "adaptive", identical to its
naive run: it belongs with the support mask.)
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from simfl.core.models import SplitNet
from simfl.core.plugins import PluginConfig
from simfl.core.weights import FlatWeights
from simfl.privacy.defences.base import DEFENCES, Defence, SearchKnob

# (offset, numel) of each parameter tensor in the flat vector, in FlatWeights order.
Segments = list[tuple[int, int]]


def parameter_segments(model: nn.Module) -> Segments:
    """Where each parameter tensor lies in ``FlatWeights(model)``'s vector, without binding the model.

    Walks the model exactly as :class:`~simfl.core.weights.FlatWeights` does (each
    module's own parameters, then its float buffers, which take room but are not
    parameters), so a defence knows the layout from :meth:`Defence.build` on.
    """
    segments: Segments = []
    offset = 0
    for _, module in model.named_modules():
        for _, param in module.named_parameters(recurse=False):
            if param.numel() > 0:
                segments.append((offset, param.numel()))
            offset += param.numel()
        for _, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.is_floating_point():
                offset += buf.numel()
    return segments


def flat_segments(flat: FlatWeights) -> Segments:
    """(offset, numel) of each parameter tensor of ``flat`` (its trainable entries), in layout order."""
    trainable = flat.trainable.cpu()
    return [(offset, shape.numel()) for _, offset, shape in flat.layout
            if shape.numel() > 0 and bool(trainable[offset])]


def segment_mask(segments: Segments, length: int, device: torch.device) -> torch.Tensor:
    """(length,) bool: True on the entries of ``segments`` (the parameters), False on buffers."""
    mask = torch.zeros(length, dtype=torch.bool)
    for offset, n in segments:
        mask[offset : offset + n] = True
    return mask.to(device)


def pruned_count(n: int, fraction: float) -> int:
    """How many of a tensor's ``n`` entries are zeroed: floor(fraction · n), robust to float rounding (0.29·100)."""
    return math.floor(round(fraction * n, 6))


def prune(vector: torch.Tensor, segments: Segments, fraction: float) -> torch.Tensor:
    """A copy of ``vector`` with, in each segment, the floor(fraction · n) smallest-magnitude entries set to 0.

    Entries are ranked by a stable descending sort of their magnitudes: exactly
    n − floor(fraction · n) are kept, and among equal magnitudes the earlier entry wins.
    Entries outside every segment (buffers) are left as they are.
    """
    out = vector.clone()
    for offset, n in segments:
        drop = pruned_count(n, fraction)
        if drop == 0:
            continue
        segment = out[offset : offset + n]
        order = torch.sort(segment.abs(), descending=True, stable=True).indices
        segment[order[n - drop :]] = 0.0
    return out


class SharedEntriesDefence(Defence):
    """A defence that transforms the parameter entries a client shares (pruning, Gaussian noise).

    It needs to know where the parameter tensors lie in the flat shared vector
    (buffers such as BatchNorm statistics pass through untouched): learned in
    :meth:`build`, then re-read from the flat weights a client works on. A
    naive attacker, who matches the untransformed gradient, is never exact.
    """

    def __init__(self, cfg: PluginConfig, shape: tuple[int, int, int], seed: int) -> None:
        super().__init__(cfg, shape, seed)
        self._segments: Segments | None = None  # parameter tensors in the flat vector (from build, then flat)
        self._flat: FlatWeights | None = None  # the flat weights the segments were read from
        self._figures: dict[str, float] = {}

    @classmethod
    def naive_is_exact(cls, attacks: Any) -> bool:
        """Never (for any knob above 0): a naive attacker matches the untransformed gradient."""
        return False

    def build(self, model: SplitNet) -> SplitNet:
        """Learn where the parameter tensors lie in the shared vector; the model is untouched."""
        self._segments = parameter_segments(model)
        return model

    def _bind(self, flat: FlatWeights) -> None:
        """Read the parameter tensors' places from the flat weights themselves (authoritative)."""
        if self._flat is not flat:
            self._segments = flat_segments(flat)
            self._flat = flat

    def _layout(self) -> Segments:
        if self._segments is None:
            raise RuntimeError(f"{self.kind}: the weight layout is unknown; build the model with this defence first")
        return self._segments

    def account(self, state: dict[str, Any], n: int, steps: int) -> dict[str, float]:
        """The figures :meth:`share` recorded for this client's update (then forgotten)."""
        figures, self._figures = self._figures, {}
        return figures


class PruningConfig(PluginConfig):
    """``pruning``: each client zeroes the smallest-magnitude entries of every parameter tensor it shares."""

    kind: Literal["pruning"] = "pruning"
    fraction: float = Field(
        0.9, ge=0.0, lt=1.0, allow_inf_nan=False,
        description="share of each parameter tensor's entries zeroed in what a client shares (smallest magnitudes; "
        "0: none)",
    )


@DEFENCES.register(PruningConfig)
class Pruning(SharedEntriesDefence):
    """Top-k sparsification of what a client shares, per parameter tensor (see the module docstring).

    Logged per client (``share``): ``prune_sparsity``, the share of parameter
    entries that are zero in the shared update (``fraction`` rounded down per
    tensor, plus entries that were zero already), and ``prune_kept_norm``,
    ‖pruned update‖ / ‖update‖ over the parameters (1 for a zero update): how
    much of the update survives.
    """

    client_figures: ClassVar[dict[str, tuple[str, ...]]] = {
        "prune_sparsity": ("mean",), "prune_kept_norm": ("mean", "min"),
    }
    # Utility falls as more is pruned. Linear bisection over [0, 0.99]: 0 is no defence (the undefended
    # utility), 0.99 keeps 1% of each tensor, with no error feedback (residual accumulation, as in Deep
    # Gradient Compression) to recover what is dropped; on a measured default-convnet update it keeps
    # about half the update's norm (updates are heavy-tailed), 90% pruning keeps 90%. Beyond 0.99 a linear
    # search would spend its probes on the last percent; where 0.99 still holds the target utility the
    # search reports the bracket end (a study may widen it). The knob stays below 1 (nothing shared).
    search_knob: ClassVar[SearchKnob | None] = SearchKnob("fraction", 0.0, 0.99, falls=True, log=False)

    def __init__(self, cfg: PruningConfig, shape: tuple[int, int, int], seed: int) -> None:
        super().__init__(cfg, shape, seed)
        self.fraction = float(cfg.fraction)

    # ------------------------------------------------------------ client side

    def begin(self, model: nn.Module, flat: FlatWeights, generator: torch.Generator, state: dict[str, Any]) -> None:
        """Before a client's work: the layout of ``flat``, whose update :meth:`share` prunes."""
        self._bind(flat)

    def share(self, delta: torch.Tensor) -> torch.Tensor:
        """The update with each parameter tensor's smallest-magnitude entries zeroed; logs sparsity and kept norm."""
        segments = self._layout()
        pruned = prune(delta, segments, self.fraction)
        mask = segment_mask(segments, len(delta), delta.device)
        before, after = delta[mask], pruned[mask]
        norm = float(before.norm())
        self._figures = {
            "prune_sparsity": float((after == 0).sum()) / max(after.numel(), 1),
            "prune_kept_norm": float(after.norm()) / norm if norm > 0 else 1.0,
        }
        return pruned

    def shared_gradient(
        self, model: nn.Module, flat: FlatWeights, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
        state: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """The gradient of the client's objective on (x, y), pruned per parameter tensor as :meth:`share` prunes."""
        self._bind(flat)
        return prune(super().shared_gradient(model, flat, x, y, generator, state), self._layout(), self.fraction)
