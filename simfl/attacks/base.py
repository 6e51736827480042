"""The attack contract, and the registry every attack joins where it is defined.

An attack takes what victims shared (``Observation``s, never their images) and
returns reconstructions (:class:`AttackResult`), batched across victims; it can
be adapted to a defence's :class:`~simfl.disclosure.Disclosure`. Its config
(:class:`AttackConfig` subclass, in its own module) is what a scenario's
``attacks.methods`` entry validates to; :func:`build_attack` makes the attack from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from simfl.attacks.observation import Observation
from simfl.disclosure import Disclosure
from simfl.plugins import PluginConfig, Registry
from simfl.weights import FlatWeights


@dataclass
class AttackResult:
    """What an attack returns for V victims of batch size B."""

    images: torch.Tensor  # (V, B, C, H, W) in [0, 1]
    labels: torch.Tensor  # (V, B) the attacker's labels (given, recovered or learned)
    objective: torch.Tensor  # (V,) the attack's objective at the returned images
    iterations: torch.Tensor  # (V,) iterations each victim's optimisation ran
    seconds: float


class Attack(Protocol):
    """What every attack is: a batched reconstruction that can be told how a defence works."""

    def __call__(
        self, model: nn.Module, flat: FlatWeights, observations: Sequence[Observation], seeds: Sequence[int]
    ) -> AttackResult:
        """Reconstruct every victim's batch; ``seeds[v]`` alone determines victim v's randomness."""
        ...

    def adapted(self, disclosure: Disclosure) -> Attack:
        """The same attack, aware of the defence: the module, loss and clipping the victim really used."""
        ...


class AttackConfig(PluginConfig):
    """Base of every attack's config (``attacks.methods`` entries): its ``kind`` and options."""


ATTACKS: Registry[type[Attack]] = Registry("attack")


def build_attack(cfg: PluginConfig) -> Attack:
    """The attack a scenario's ``attacks.methods`` entry describes."""
    return ATTACKS[cfg.kind](**cfg.knobs())


def get_attack(kind: str, **options: object) -> Attack:
    """An attack by name with options checked by its config (``get_attack("ig", iterations=2000)``)."""
    if kind not in ATTACKS.configs:
        raise KeyError(f"unknown attack {kind!r}; known: {sorted(ATTACKS.configs)}")
    return build_attack(ATTACKS.configs[kind](kind=kind, **options))


def adapt(attack: Attack, disclosure: Disclosure | None) -> Attack:
    """The attack made aware of the defence (unchanged when nothing is disclosed)."""
    return attack if disclosure is None else attack.adapted(disclosure)
