"""The defence plugin interface: every place a defence may act, each a no-op by default.

A defence is one object per process (client actor, coordinator, attacker),
built from the scenario. Where it acts:

- **model**: :meth:`Defence.build` changes the freshly built model in place (the
  latent defence swaps ``SplitNet.latent``). Every process builds through it,
  so the weight layout the clients share is the same everywhere.
- **local training** (client actor, :func:`simfl.training.train_client`):
  :meth:`training_module`, :meth:`batches`, :meth:`optimizer` and :meth:`objective`
  (extra loss terms), then :meth:`share` (transform the update a client shares)
  and :meth:`account` (per-client state such as DP steps, logged per round).
- **what an attacked client shares in the gradient view**: :meth:`shared_gradient`.
- **server side** (coordinator): :meth:`server_setup`, :meth:`server_round` after
  each aggregation, and :meth:`broadcast`, sent to the clients with the weights.
- **attackers**: :meth:`naive_view` (an attacker unaware of the defence) and
  :meth:`disclosure` (an adaptive one, given the round's broadcast).

Everything a defence logs comes back as flat ``{name: float}`` dicts, which the
coordinator writes to Parquet and TensorBoard.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from simfl.attacks.adaptive import Disclosure
from simfl.config import DefenceConfig, TrainingConfig
from simfl.data import Dataset
from simfl.models import SplitNet
from simfl.weights import FlatWeights


class Defence:
    """No defence: plain cross-entropy training. Subclasses override what they change."""

    kind = "none"

    def __init__(self, cfg: DefenceConfig, shape: tuple[int, int, int], seed: int) -> None:
        """``shape``: (channels, image size, classes) of the data; ``seed``: the scenario's seed."""
        self.cfg = cfg
        self.shape = shape
        self.seed = seed

    # ------------------------------------------------------------ model

    def build(self, model: SplitNet) -> SplitNet:
        """Change the model in place (before ``FlatWeights`` binds it); must not draw random numbers."""
        return model

    # ------------------------------------------------------------ client side

    def receive(self, broadcast: dict[str, Any], device: torch.device) -> None:
        """Take the coordinator's round broadcast (once per round per client actor)."""

    def training_module(self, model: SplitNet) -> nn.Module:
        """The module local training calls (DP-SGD wraps it once per process)."""
        return model

    def begin(self, model: SplitNet, generator: torch.Generator) -> None:
        """Before one client's local training; ``generator`` is that client's (seed, client, round) RNG."""

    def batches(self, n: int, cfg: TrainingConfig, generator: torch.Generator) -> list[torch.Tensor]:
        from simfl.training import batch_order

        return batch_order(n, cfg, generator)

    def optimizer(
        self, model: SplitNet, cfg: TrainingConfig, generator: torch.Generator, n: int
    ) -> torch.optim.Optimizer:
        from simfl.training import make_optimizer

        return make_optimizer(model, cfg)

    def objective(
        self, model: SplitNet, module: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(objective to minimise, cross-entropy, logits, detached terms to log) for one batch."""
        logits = module(x)
        ce = F.cross_entropy(logits, y)
        return ce, ce, logits, {}

    def empty_step(self, model: SplitNet, optimizer: torch.optim.Optimizer) -> None:
        """A local step whose (sampled) batch is empty: by default, none."""

    def share(self, delta: torch.Tensor) -> torch.Tensor:
        """The update the client sends, from its true local − global delta."""
        return delta

    def account(self, state: dict[str, Any], n: int, steps: int) -> dict[str, float]:
        """After a client trained ``steps`` steps on ``n`` samples: update its state, return what to log."""
        return {}

    def shared_gradient(
        self, model: SplitNet, flat: FlatWeights, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Gradient-view observation: the gradient of the client's own training objective on (x, y).

        Over ALL ``flat`` entries (zero on buffers), taken at the weights ``flat`` holds,
        in train mode, with the defence's randomness drawn from ``generator``.
        """
        model.train()
        self.begin(model, generator)
        module = self.training_module(model)
        from simfl.attacks.observation import flat_gradient

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
