"""What a defence tells an attacker about how it works, and the types that describe it.

A defence judged only against an attacker who ignores it proves little
(PRECODE looked perfect until the attack modelled its stochastic layer).
So every defence can publish a :class:`Disclosure` and every attack can be
adapted to one. Both sides import this leaf module, not each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# (logits, targets) -> scalar; targets are class indices (B,) or probabilities (B, K).
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Returns the module the attacker differentiates; it must keep the model's
# parameter names (e.g. a copy with a defence's module swapped in).
ModelWrapper = Callable[[nn.Module], nn.Module]


@dataclass(frozen=True)
class Disclosure:
    """What a defence discloses; None fields leave the attack's own choice in place."""

    model_wrapper: ModelWrapper | None = None  # must keep the model's parameter names
    loss_fn: LossFn | None = None
    clip_norm: float | None = None  # DP-SGD: the victim clipped each sample's gradient to this norm
