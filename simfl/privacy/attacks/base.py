"""The attack contract, and the registry every attack joins where it is defined.

An attack takes what victims shared (``Observation``s, never their images) and
returns reconstructions (:class:`AttackResult`), batched across victims; it can
be adapted to a defence's :class:`~simfl.privacy.disclosure.Disclosure`. Its config
(:class:`AttackConfig` subclass, in its own module) is what a scenario's
``attacks.methods`` entry validates to; :func:`build_attack` makes the attack from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from simfl.core.plugins import PluginConfig, Registry
from simfl.core.weights import FlatWeights
from simfl.privacy.attacks.observation import Observation
from simfl.privacy.disclosure import Disclosure


@dataclass
class AttackResult:
    """What an attack returns for V victims of batch size B."""

    images: torch.Tensor  # (V, B, C, H, W) in [0, 1]
    labels: torch.Tensor  # (V, B) the attacker's labels (given, recovered or learned)
    objective: torch.Tensor  # (V,) the attack's objective at the returned images
    iterations: torch.Tensor  # (V,) iterations each victim's optimisation ran
    seconds: float


@dataclass(frozen=True)
class AuxData:
    """What the attacking server holds besides the victims' shares: data disjoint from every client's.

    The validation split (server-held: it trains the attack evaluator and the
    latent defence's decoder too), as uint8 NHWC images with their labels, and
    the scenario's seed, from which a learned attack seeds its training.
    """

    images: torch.Tensor
    labels: torch.Tensor
    seed: int = 0

    def inputs(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The images as model inputs: (N, C, H, W) float in [0, 1]."""
        return self.images.to(device).permute(0, 3, 1, 2).float().div(255.0)


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

    def applies(self) -> bool:
        """Whether it can run as it stands (an attack on a defence's own part needs that defence)."""
        ...

    def objective_at(
        self, model: nn.Module, flat: FlatWeights, observations: Sequence[Observation], images: torch.Tensor
    ) -> torch.Tensor:
        """(V,) its objective at given images: at the true ones, the check that the found ones converged."""
        ...


class AttackConfig(PluginConfig):
    """Base of every attack's config (``attacks.methods`` entries): its ``kind`` and options."""


ATTACKS: Registry[type[Attack]] = Registry("attack")


def build_attack(cfg: PluginConfig, aux: AuxData | None = None) -> Attack:
    """The attack a scenario's ``attacks.methods`` entry describes; learned attacks also get the server's data."""
    cls = ATTACKS[cfg.kind]
    extra = {"aux": aux} if aux is not None and "aux" in getattr(cls, "__dataclass_fields__", {}) else {}
    return cls(**cfg.knobs(), **extra)


def get_attack(kind: str, **options: object) -> Attack:
    """An attack by name with options checked by its config (``get_attack("ig", iterations=2000)``)."""
    if kind not in ATTACKS.configs:
        raise KeyError(f"unknown attack {kind!r}; known: {sorted(ATTACKS.configs)}")
    return build_attack(ATTACKS.configs[kind](kind=kind, **options))


def adapt(attack: Attack, disclosure: Disclosure | None) -> Attack:
    """The attack made aware of the defence (unchanged when nothing is disclosed)."""
    return attack if disclosure is None else attack.adapted(disclosure)
