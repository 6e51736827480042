"""The adaptive-attacker hook: a defence tells the attacker how it works.

A defence judged only against an attacker who ignores it proves little
(PRECODE looked perfect until the attack modelled its stochastic layer).
So every defence can publish a :class:`Disclosure`: the module the victim
really differentiates (e.g. the model with the defence's latent layer in
place) and the loss it really uses. :func:`adapt` hands both to any attack.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from simfl.attacks.dlg import DLG
from simfl.attacks.functional import LossFn, ModelWrapper
from simfl.attacks.inverting import InvertingGradients


@dataclass(frozen=True)
class Disclosure:
    """What a defence discloses; None fields leave the attack's own choice in place."""

    model_wrapper: ModelWrapper | None = None  # must keep the model's parameter names
    loss_fn: LossFn | None = None
    clip_norm: float | None = None  # DP-SGD: the victim clipped each sample's gradient to this norm


def adapt(attack: DLG | InvertingGradients, disclosure: Disclosure | None) -> DLG | InvertingGradients:
    """The same attack, made aware of the defence (unchanged when nothing is disclosed)."""
    if disclosure is None:
        return attack
    fields = (f.name for f in dataclasses.fields(disclosure))
    changes = {name: getattr(disclosure, name) for name in fields if getattr(disclosure, name) is not None}
    return dataclasses.replace(attack, **changes)
