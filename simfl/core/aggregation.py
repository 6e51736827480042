"""Server side of FedAvg, FedProx, FedAdam and FedYogi on flat weight vectors.

FedAdam and FedYogi follow Reddi et al., "Adaptive Federated Optimization"
(ICLR 2021), Algorithm 2: no bias correction and an adaptivity constant tau.
torch.optim.Adam differs on both counts and has no Yogi, hence this small module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from simfl.core.config import AlgorithmConfig


def weighted_mean(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Sample-weighted mean, summed in the order given.

    Callers pass updates sorted by client id: a fixed summation order makes the
    result bit-identical whichever actors produced the updates.
    """
    if not deltas:
        raise ValueError("no client updates to aggregate")
    total = float(sum(weights))
    out = torch.zeros_like(deltas[0], dtype=torch.float64)
    for delta, weight in zip(deltas, weights, strict=True):
        out.add_(delta.double(), alpha=weight / total)
    return out.float()


class ServerOptimizer:
    """Applies the mean client update to the global weights; holds FedAdam/FedYogi moments."""

    def __init__(self, cfg: AlgorithmConfig, trainable: torch.Tensor) -> None:
        self.kind = cfg.kind
        self.trainable = trainable
        self.hp = cfg.server
        n = int(trainable.sum())
        self.m = torch.zeros(n)
        self.v = torch.full((n,), self.hp["tau"] ** 2)

    def step(self, weights: torch.Tensor, mean_delta: torch.Tensor) -> torch.Tensor:
        """Return new global weights. Float buffers (BatchNorm statistics) are always plainly averaged."""
        new = weights + mean_delta
        if self.kind in ("fedavg", "fedprox"):
            return new
        b1, b2, lr, tau = self.hp["beta1"], self.hp["beta2"], self.hp["server_lr"], self.hp["tau"]
        d = mean_delta[self.trainable]
        self.m.mul_(b1).add_(d, alpha=1 - b1)
        d2 = d * d
        if self.kind == "fedadam":
            self.v.mul_(b2).add_(d2, alpha=1 - b2)
        else:  # fedyogi
            self.v.sub_((1 - b2) * d2 * torch.sign(self.v - d2))
        new[self.trainable] = weights[self.trainable] + lr * self.m / (self.v.sqrt() + tau)
        return new

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The FedAdam/FedYogi moment estimates (copies), for a checkpoint."""
        return {"m": self.m.clone(), "v": self.v.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the moment estimates of :meth:`state_dict`."""
        self.m.copy_(state["m"])
        self.v.copy_(state["v"])
