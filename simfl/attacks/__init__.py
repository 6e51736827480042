"""Gradient-inversion attacks, pure torch (no Ray), batched across victims.

Every attack is a callable ``attack(model, flat, observations, seeds) -> AttackResult``:
it receives what victims shared (``Observation``) and never their images.
"""

from __future__ import annotations

from collections.abc import Callable

from simfl.attacks.dlg import DLG, IDLG
from simfl.attacks.functional import AttackResult
from simfl.attacks.inverting import InvertingGradients
from simfl.attacks.labels import recover_labels
from simfl.attacks.observation import Observation, observe_gradient, observe_update

Attack = DLG | InvertingGradients

ATTACKS: dict[str, Callable[..., Attack]] = {"dlg": DLG, "idlg": IDLG, "ig": InvertingGradients}


def get_attack(name: str, **config: object) -> Attack:
    """Build a registered attack from its config (e.g. ``get_attack("ig", iterations=2000)``)."""
    if name not in ATTACKS:
        raise KeyError(f"unknown attack {name!r}; known: {sorted(ATTACKS)}")
    return ATTACKS[name](**config)


__all__ = [
    "ATTACKS",
    "DLG",
    "IDLG",
    "Attack",
    "AttackResult",
    "InvertingGradients",
    "Observation",
    "get_attack",
    "observe_gradient",
    "observe_update",
    "recover_labels",
]
