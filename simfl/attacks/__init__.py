"""Gradient-inversion attacks, pure torch (no Ray), batched across victims.

Every attack follows :class:`~simfl.attacks.base.Attack`: it receives what
victims shared (``Observation``) and never their images. Each registers itself
in its module; importing this package registers them all (one line each).
"""

from __future__ import annotations

from simfl.attacks import dlg, inverting, learned, lti, priors  # noqa: F401  (registers the attacks)
from simfl.attacks.base import ATTACKS, Attack, AttackConfig, AttackResult, adapt, build_attack, get_attack
from simfl.attacks.dlg import DLG, IDLG
from simfl.attacks.inverting import InvertingGradients
from simfl.attacks.labels import recover_labels
from simfl.attacks.observation import Observation, observe_gradient, observe_update

__all__ = [
    "ATTACKS",
    "DLG",
    "IDLG",
    "Attack",
    "AttackConfig",
    "AttackResult",
    "InvertingGradients",
    "Observation",
    "adapt",
    "build_attack",
    "get_attack",
    "observe_gradient",
    "observe_update",
    "recover_labels",
]
