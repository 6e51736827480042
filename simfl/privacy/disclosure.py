"""What a defence tells an attacker about how it works, and the types that describe it.

A defence judged only against an attacker who ignores it proves little
(PRECODE looked perfect until the attack modelled its stochastic layer).
So every defence can publish a :class:`Disclosure` and every attack can be
adapted to one. Both sides import this leaf module, not each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# (logits, targets) -> scalar; targets are class indices (B,) or probabilities (B, K).
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Returns the module the attacker differentiates; it must keep the model's
# parameter names (e.g. a copy with a defence's module swapped in).
ModelWrapper = Callable[[nn.Module], nn.Module]
# (model, flat weights, images (B, C, H, W), labels (B,), generator) -> the flat gradient a victim would share.
SharedGradient = Callable[[nn.Module, Any, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Disclosure:
    """What a defence discloses; None fields leave the attack's own choice in place."""

    model_wrapper: ModelWrapper | None = None  # must keep the model's parameter names
    loss_fn: LossFn | None = None
    clip_norm: float | None = None  # DP-SGD: the victim clipped each sample's gradient to this norm
    # The victim's gradient-view share computed by the defence's own code (on the server's data, learned
    # attacks train on exactly what victims send): (model, flat, x, y, generator) -> flat gradient.
    shared_gradient: SharedGradient | None = None
    # The defence's own inversion network, where it trains one (the latent defence's decoder D: z′ → x).
    decoder: nn.Module | None = None
    # False for a naive attacker's view of the model (e.g. the noise layer switched off): it does not know the defence.
    knows_defence: bool = True
