"""The defence plugin interface: every place a defence may act, each a no-op by default.

A defence is one object per process (client actor, coordinator, attacker),
built from the scenario. Where it acts:

- **model**: :meth:`Defence.build` changes the freshly built model in place (the
  latent defence swaps ``SplitNet.latent``). Every process builds through it,
  so the weight layout the clients share is the same everywhere.
- **local training** (client actor, :func:`simfl.core.training.train_client`):
  :meth:`training_module`, :meth:`batches`, :meth:`optimizer` and :meth:`objective`
  (extra loss terms), then :meth:`share` (transform the update a client shares)
  and :meth:`account` (per-client state such as DP steps, logged per round).
- **what an attacked client shares in the gradient view**: :meth:`shared_gradient`.
- **server side** (coordinator): :meth:`server_setup`, :meth:`server_round` after
  each aggregation, and :meth:`broadcast`, sent to the clients with the weights.
- **attackers**: :meth:`naive_view` (an attacker unaware of the defence) and
  :meth:`disclosure` (an adaptive one, given the round's broadcast).

A defence is a plugin: its module defines its config (a :class:`PluginConfig`
with typed knobs and defaults) and registers the class with it in
:data:`DEFENCES`. It declares what it logs, per client (:attr:`Defence.client_figures`,
with how the cohort is aggregated) and per round (:attr:`Defence.round_figures`),
so the run tables are built from the declarations and an undeclared figure is
an error, never a silent drop. Everything a defence logs comes back as flat
``{name: float}`` dicts, which the coordinator writes to Parquet and TensorBoard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from simfl.core.models import SplitNet
from simfl.core.plugins import PluginConfig, Registry
from simfl.core.training import PlainTraining
from simfl.core.weights import FlatWeights, flat_gradient
from simfl.data import Dataset
from simfl.privacy.disclosure import Disclosure


@dataclass(frozen=True)
class SearchKnob:
    """The knob a defence declares as trading utility for privacy monotonically: what a study's search moves.

    A study's ``search:`` finds, per seed, the value of ``name`` at which the
    defence reaches the target utility (bisection between ``low`` and ``high``,
    in log space when ``log``), so defences are compared at one, matched
    utility rather than interpolated along a grid. ``falls``: utility falls as
    the knob grows (more noise, more pruning). ``tied``: other knobs set in
    proportion, ``{knob: ratio}`` (BiDO moves a2 with a1).
    """

    name: str
    low: float
    high: float
    falls: bool = True
    log: bool = True
    tied: dict[str, float] = field(default_factory=dict)

    def settings(self, value: float) -> dict[str, float]:
        """The knob values for one point of the search: the knob and its tied knobs."""
        return {self.name: value, **{k: ratio * value for k, ratio in self.tied.items()}}


class NoDefenceConfig(PluginConfig):
    """``none``: plain training, the reference arm."""

    kind: Literal["none"] = "none"


DEFENCES: Registry[type[Defence]] = Registry("defence", default="none")


@DEFENCES.register(NoDefenceConfig)
class Defence(PlainTraining):
    """No defence: plain cross-entropy training. Subclasses override what they change."""

    kind: ClassVar[str]
    config_class: ClassVar[type[PluginConfig]]
    # Figures a client reports from training (``account``/``objective`` terms), each with its cohort
    # aggregates per round: "mean" keeps the name, "max"/"min" add a suffix (dp_epsilon -> dp_epsilon_max).
    client_figures: ClassVar[dict[str, tuple[str, ...]]] = {}
    # Figures the server step reports each round (``server_round``).
    round_figures: ClassVar[tuple[str, ...]] = ()
    # The knob a study's search moves to reach a target utility; None: nothing to tune (no defence).
    search_knob: ClassVar[SearchKnob | None] = None

    def __init__(self, cfg: PluginConfig, shape: tuple[int, int, int], seed: int) -> None:
        """``shape``: (channels, image size, classes) of the data; ``seed``: the scenario's seed."""
        self.cfg = cfg
        self.shape = shape
        self.seed = seed

    @classmethod
    def round_columns(cls) -> tuple[str, ...]:
        """The rounds-table columns this defence fills: its client figures' aggregates, then its round figures."""
        aggregated = [name if agg == "mean" else f"{name}_{agg}"
                      for name, aggs in cls.client_figures.items() for agg in aggs]
        return (*aggregated, *cls.round_figures)

    @classmethod
    def naive_is_exact(cls, attacks: Any) -> bool:
        """Whether an attacker unaware of the defence already computes exactly what the victim did.

        ``attacks``: the scenario's attacks section (view, batch size). Then the
        naive attacker is also the adaptive one; no defence: always.
        """
        return True

    # ------------------------------------------------------------ model

    def build(self, model: SplitNet) -> SplitNet:
        """Change the model in place (before ``FlatWeights`` binds it); must not draw random numbers."""
        return model

    # ------------------------------------------------------------ client side

    def receive(self, broadcast: dict[str, Any], device: torch.device) -> None:
        """Take the coordinator's round broadcast (once per round per client actor)."""

    def shared_gradient(
        self, model: nn.Module, flat: FlatWeights, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
        state: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Gradient-view observation: the gradient of the client's own training objective on (x, y).

        Over ALL ``flat`` entries (zero on buffers), taken at the weights ``flat`` holds,
        in train mode, with the defence's randomness drawn from ``generator`` and
        the client's ``state`` (its own local parameters, where a defence keeps some).
        """
        model.train()
        self.begin(model, flat, generator, state if state is not None else {})
        module = self.training_module(model)
        return flat_gradient(self.objective(model, module, x, y)[0], model, flat)

    # ------------------------------------------------------------ server side

    def server_setup(self, dataset: Dataset, model: SplitNet) -> None:
        """In the coordinator, once: whatever the server side needs (data it holds, its own modules)."""

    def server_round(self, round_: int, model: SplitNet, client_rows: list[dict]) -> dict[str, float]:
        """In the coordinator after aggregation, ``model`` holding the new global weights; returns what to log."""
        return {}

    def broadcast(self) -> dict[str, Any]:
        """What the clients receive with the global weights (plain tensors and numbers)."""
        return {}

    def server_state(self) -> dict[str, Any]:
        """Server-side state a checkpoint keeps (plain tensors and numbers)."""
        return {}

    def load_server_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`server_state` saved (on resume)."""
        pass

    # ------------------------------------------------------------ attackers

    def naive_view(self) -> Disclosure | None:
        """How an attacker unaware of the defence runs the model; None: the shared model as it is (eval mode)."""
        return None

    def disclosure(self, context: dict[str, Any] | None = None) -> Disclosure | None:
        """What an adaptive attacker is told; None: nothing to adapt to (the naive attacker is exact).

        ``context`` is the round's :meth:`broadcast`, public to the server that
        runs the attack (e.g. the decoder clients used in their privacy term).
        """
        return None


def round_columns() -> tuple[str, ...]:
    """Every registered defence's rounds-table columns, each once, in registration order."""
    return tuple(dict.fromkeys(c for plugin in DEFENCES.plugins.values() for c in plugin.round_columns()))


def client_columns() -> tuple[str, ...]:
    """Every registered defence's clients-table columns, each once, in registration order."""
    return tuple(dict.fromkeys(c for plugin in DEFENCES.plugins.values() for c in plugin.client_figures))
