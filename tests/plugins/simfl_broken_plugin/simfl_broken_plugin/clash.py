"""An attack registered under a kind simfl already has (``ig``)."""

from __future__ import annotations

from typing import Literal

from simfl.privacy.attacks.base import ATTACKS, AttackConfig
from simfl.privacy.attacks.inverting import InvertingGradients


class ClashConfig(AttackConfig):
    """``ig`` again: taken by simfl's Inverting Gradients."""

    kind: Literal["ig"] = "ig"


@ATTACKS.register(ClashConfig)
class Clash(InvertingGradients):
    """Inverting Gradients under a name that is already taken."""
