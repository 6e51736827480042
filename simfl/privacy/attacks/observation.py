"""What one victim client shares, and helpers that produce it exactly as the victim would.

Threat model: the attacker sees one client's shared vector plus the global
weights the client started from and the local hyperparameters. The private
images never enter an ``Observation``; they are kept elsewhere, only to score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from simfl.core.training import to_input
from simfl.core.weights import FlatWeights, flat_gradient

View = Literal["gradient", "update"]


class GradientSharer(Protocol):
    """What a defended client computes for the gradient view (``simfl.privacy.defences.Defence.shared_gradient``)."""

    def shared_gradient(
        self, model: nn.Module, flat: FlatWeights, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
        state: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """The gradient the client would share for the batch (x, y), over all ``flat`` entries."""
        ...


def chw_shape(images: torch.Tensor) -> tuple[int, int, int]:
    """(C, H, W) of a batch of images (B, C, H, W)."""
    channels, height, width = images.shape[1:]
    return channels, height, width


@dataclass(frozen=True)
class Observation:
    """One victim's shared vector and what the attacker knows about how it was made.

    ``weights`` and ``shared`` are both laid out over ALL ``FlatWeights`` entries
    (parameters and float buffers), so ``flat.as_dict`` names either one; attacks
    match only the trainable entries.

    - view "gradient": ``shared`` is the gradient of one batch of ``batch_size``
      images at ``weights`` (zero on buffer entries).
    - view "update": ``shared`` is local − global after ``local_steps`` steps of
      ``torch.optim.SGD`` with ``lr``, ``momentum`` and ``weight_decay`` (no
      dampening, no Nesterov; fresh momentum buffer) over ``batch_size`` local
      samples, taking fixed sequential batches of ``local_batch_size`` (see
      ``local_batches``). The attacker assumes exactly this schedule; a victim
      that shuffles its batches is only approximately modelled.
    """

    weights: torch.Tensor
    shared: torch.Tensor
    view: View
    batch_size: int
    image_shape: tuple[int, int, int]
    labels: torch.Tensor | None = None  # None: the attacker must recover them
    lr: float | None = None
    local_steps: int = 1
    local_batch_size: int | None = None
    momentum: float = 0.0  # update view: SGD momentum of the local steps
    weight_decay: float = 0.0  # update view: SGD (L2) weight decay of the local steps

    def __post_init__(self) -> None:
        if self.view not in ("gradient", "update"):
            raise ValueError(f"unknown view {self.view!r}")
        if self.weights.shape != self.shared.shape or self.weights.dim() != 1:
            raise ValueError("weights and shared must be flat vectors of the same length")
        if self.labels is not None and self.labels.shape != (self.batch_size,):
            raise ValueError(f"labels must have shape ({self.batch_size},)")
        if self.view == "update" and (not self.lr or self.lr <= 0 or not self.local_batch_size or self.local_steps < 1):
            raise ValueError("update view needs lr > 0, local_steps >= 1 and local_batch_size")
        if self.momentum < 0 or self.weight_decay < 0:
            raise ValueError("momentum and weight_decay must be >= 0")


def local_batches(n: int, batch_size: int, steps: int) -> list[torch.Tensor]:
    """Sample indices of each local step: fixed-size sequential batches wrapping around ``n``.

    Victim simulation and attacker share this one schedule, so the attacker's
    differentiable replay uses the same samples at each step.
    """
    b = min(batch_size, n)
    return [(torch.arange(b) + s * b) % n for s in range(steps)]


def _float_input(x: torch.Tensor) -> torch.Tensor:
    """Accept shard format (uint8 NHWC) or model input (float NCHW in [0, 1])."""
    return to_input(x) if x.dtype == torch.uint8 else x


def _trainable_grad(model: nn.Module, flat: FlatWeights, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return flat_gradient(F.cross_entropy(model(x), y), model, flat)  # the victim's loss: mean CE, as in train_client


def observe_gradient(
    model: nn.Module,
    flat: FlatWeights,
    global_weights: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    defence: GradientSharer | None = None,
    generator: torch.Generator | None = None,
    state: dict[str, Any] | None = None,
) -> Observation:
    """The victim shares the gradient of its batch at the global weights (model left at them).

    With a ``defence``, the gradient of the defended client's own objective (its
    randomness from ``generator``, its own ``state``); without, of plain mean cross-entropy.
    """
    x = _float_input(x).to(flat.vector.device)
    y = y.to(flat.vector.device)
    flat.load(global_weights)
    model.train()
    if defence is None:
        shared = _trainable_grad(model, flat, x, y)
    else:
        shared = defence.shared_gradient(model, flat, x, y, generator or torch.Generator(), state)
    return Observation(
        weights=global_weights.detach().clone(),
        shared=shared.detach(),
        view="gradient",
        batch_size=len(y),
        image_shape=chw_shape(x),
        labels=y.detach().clone(),
    )


def observe_update(
    model: nn.Module,
    flat: FlatWeights,
    global_weights: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    local_steps: int,
    local_batch_size: int,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> Observation:
    """The victim shares local − global after SGD on ``local_batches`` (model left at local weights).

    Steps follow ``torch.optim.SGD`` (dampening 0, no Nesterov) on the trainable
    entries: d = g + weight_decay·θ; v = d on the first step, else
    momentum·v + d; θ −= lr·v.
    """
    x = _float_input(x).to(flat.vector.device)
    y = y.to(flat.vector.device)
    flat.load(global_weights)
    model.train()
    mask = flat.trainable
    velocity = None
    for idx in local_batches(len(y), local_batch_size, local_steps):
        step = _trainable_grad(model, flat, x[idx], y[idx])
        if weight_decay:
            step[mask] += weight_decay * flat.vector[mask]
        if momentum and velocity is not None:
            step = momentum * velocity + step
        velocity = step
        flat.vector.sub_(lr * velocity)
    shared = flat.vector - global_weights.to(flat.vector.device)
    return Observation(
        weights=global_weights.detach().clone(),
        shared=shared.detach().clone(),
        view="update",
        batch_size=len(y),
        image_shape=chw_shape(x),
        labels=y.detach().clone(),
        lr=lr,
        local_steps=local_steps,
        local_batch_size=local_batch_size,
        momentum=momentum,
        weight_decay=weight_decay,
    )
