"""Pieces every attack shares: stacking victims, replaying the victim functionally, the result.

Attacks are batched across victims: V observations from different clients are
stacked into (V, P) weight vectors and reconstructed in one optimisation that
is ``torch.func.vmap``-ed over victims. Every per-victim quantity below is a
function of that victim's slice only, so a victim's result does not depend on
who else is in the batch.

Attacks run the model in eval mode with the running statistics found in
``weights``: vmap cannot do BatchNorm's in-place running-stat updates. With
GroupNorm (the default) train and eval mode coincide; models with BatchNorm
leak differently in train mode, where the victim normalised with batch statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad

from simfl.attacks.observation import Observation, View, local_batches
from simfl.weights import FlatWeights

# (logits, targets) -> scalar; targets are class indices (B,) or probabilities (B, K).
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Returns the module the attacker differentiates; it must keep the model's
# parameter names (e.g. a copy with a defence's module swapped in).
ModelWrapper = Callable[[nn.Module], nn.Module]


@dataclass
class AttackResult:
    images: torch.Tensor  # (V, B, C, H, W) in [0, 1]
    labels: torch.Tensor  # (V, B) the attacker's labels (given, recovered or learned)
    objective: torch.Tensor  # (V,) the attack's objective at the returned images
    iterations: int
    seconds: float


@dataclass
class Stacked:
    """V observations with equal shapes, stacked along a leading victim dimension."""

    weights: torch.Tensor  # (V, P)
    target: torch.Tensor  # (V, Pt) observed pseudo-gradient over trainable entries
    lr: torch.Tensor  # (V,)
    view: View
    batch_size: int
    image_shape: tuple[int, int, int]
    local_steps: int
    local_batch_size: int

    @property
    def victims(self) -> int:
        return self.weights.shape[0]


def stack(observations: Sequence[Observation], flat: FlatWeights) -> Stacked:
    """Stack victims; the observed update becomes −update / lr, a sum of step gradients.

    Dividing by lr puts both views on the gradient's scale, so objectives and
    tolerances mean the same for either view and for victims with different lr.
    """
    if not observations:
        raise ValueError("no observations")
    first = observations[0]
    shape_keys = ("view", "batch_size", "image_shape", "local_steps", "local_batch_size")
    for obs in observations:
        for key in shape_keys:
            if getattr(obs, key) != getattr(first, key):
                raise ValueError(f"victims batched together must share {key}")
    device = flat.vector.device
    mask = flat.trainable
    weights = torch.stack([o.weights.to(device) for o in observations])
    shared = torch.stack([o.shared.to(device) for o in observations])[:, mask]
    lr = torch.tensor([o.lr or 1.0 for o in observations], device=device)
    target = shared if first.view == "gradient" else -shared / lr[:, None]
    return Stacked(
        weights=weights,
        target=target,
        lr=lr,
        view=first.view,
        batch_size=first.batch_size,
        image_shape=first.image_shape,
        local_steps=first.local_steps,
        local_batch_size=first.local_batch_size or first.batch_size,
    )


Simulator = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def victim_simulator(module: nn.Module, flat: FlatWeights, stacked: Stacked, loss_fn: LossFn) -> Simulator:
    """``simulate(weights, lr, images, targets)``: one victim's pseudo-gradient on dummy data.

    Gradient view: the loss gradient over trainable entries. Update view: the
    victim's SGD steps replayed differentiably, returned as (start − end) / lr,
    i.e. the sum of step gradients; matches ``stack``'s target. Written for ONE
    victim; callers vmap it over the stacked victims.
    """
    index = flat.trainable.nonzero().squeeze(1)
    params: list[tuple[str, int, torch.Size]] = []  # (name, offset in the trainable vector, shape)
    at = 0
    for name, offset, shape in flat.layout:
        if shape.numel() and bool(flat.trainable[offset]):
            params.append((name, at, shape))
            at += shape.numel()
    batches = local_batches(stacked.batch_size, stacked.local_batch_size, stacked.local_steps)
    batches = [b.to(flat.vector.device) for b in batches]

    def loss_at(theta: torch.Tensor, w: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Differentiate the trainable entries only: buffers (BatchNorm's running
        # statistics) stay constants read from w, as they are for the victim.
        named = flat.as_dict(w)
        named.update({name: theta[at : at + shape.numel()].reshape(shape) for name, at, shape in params})
        return loss_fn(functional_call(module, named, (x,)), t)

    grad_theta = grad(loss_at)

    def simulate(w: torch.Tensor, lr: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        theta = w.index_select(0, index)
        if stacked.view == "gradient":
            return grad_theta(theta, w, x, t)
        total = torch.zeros_like(theta)
        for idx in batches:  # plain SGD on the parameters
            total = total + grad_theta(theta - lr * total, w, x.index_select(0, idx), t.index_select(0, idx))
        return total

    return simulate


@contextmanager
def attacker_module(model: nn.Module, wrapper: ModelWrapper | None) -> Iterator[nn.Module]:
    """The module to differentiate, in eval mode for the duration of the attack."""
    module = wrapper(model) if wrapper is not None else model
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def victim_generators(seeds: Sequence[int], victims: int) -> list[torch.Generator]:
    """One RNG per victim, so a victim's init noise is the same alone or batched."""
    if len(seeds) != victims:
        raise ValueError(f"need one seed per victim ({victims}), got {len(seeds)}")
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def draw(
    generators: Sequence[torch.Generator], shape: Sequence[int], device: torch.device, normal: bool = False
) -> torch.Tensor:
    """Stack one draw per victim generator: uniform in [0, 1) (images) or standard normal."""
    sample = torch.randn if normal else torch.rand
    return torch.stack([sample(*shape, generator=g) for g in generators]).to(device)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (Geiping et al.'s image prior)."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy

