"""Gradient-inversion attacks, pure torch (no Ray), batched across victims.

Every attack follows :class:`~simfl.privacy.attacks.base.Attack`: it receives what
victims shared (``Observation``) and never their images. Each registers itself
in its module; importing this package registers them all (one line each),
then the installed third-party attacks (entry point group ``simfl.attacks``,
docs/guides/plugins.md).
"""

from __future__ import annotations

from simfl.privacy.attacks import dlg, inverting, learned, lti, priors  # noqa: F401  (registers the attacks)
from simfl.privacy.attacks.base import ATTACKS, Attack, AttackConfig, AttackResult, adapt, build_attack, get_attack
from simfl.privacy.attacks.dlg import DLG, IDLG
from simfl.privacy.attacks.inverting import InvertingGradients
from simfl.privacy.attacks.labels import recover_labels
from simfl.privacy.attacks.observation import Observation, observe_gradient, observe_update

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

# Installed third-party attacks, after the built-ins, so every scenario union sees them.
ATTACKS.load_entry_points("simfl.attacks")
