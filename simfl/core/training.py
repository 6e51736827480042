"""One client's local training and the evaluation loop, free of Ray.

Both work on uint8 NHWC tensors (how shards are stored) and convert one batch
at a time, so a shard costs a quarter of its float32 size in memory.

:func:`train_client` runs any :class:`LocalTraining`: the hooks a defence may
change (module, batches, optimiser, objective, what is shared, per-client
state). :class:`PlainTraining` is plain cross-entropy SGD, every hook at its
default; defences subclass it (``simfl.privacy.defences``), so this module knows
nothing of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from simfl.core.config import TrainingConfig
from simfl.core.weights import FlatWeights


def to_input(x: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """uint8 NHWC → float NCHW in [0, 1]: the range attacks and defences clamp to."""
    if device is not None:
        x = x.to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).float().div_(255.0)


@dataclass
class LocalResult:
    """What one client's local training produced."""

    delta: torch.Tensor  # what the client shares: local minus global weights (as the defence transforms it)
    samples: int
    steps: int
    loss: float
    accuracy: float
    time_s: float
    defence: dict[str, float] = field(default_factory=dict)  # the defence's per-client figures (means over steps)


def make_optimizer(model: nn.Module, cfg: TrainingConfig, groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """The local optimiser over ``model``'s parameters, or over ``groups`` (per-group options override)."""
    opt = cfg.optimizer
    params = groups if groups is not None else model.parameters()
    if opt.kind == "adam":
        return torch.optim.Adam(params, lr=opt.lr, weight_decay=opt.weight_decay)
    return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)


def batch_order(n: int, cfg: TrainingConfig, generator: torch.Generator) -> list[torch.Tensor]:
    """Index batches for local training: ``local_epochs`` shuffled passes, or ``local_steps`` batches."""
    batches: list[torch.Tensor] = []
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.batch_size):
            batches.append(perm[start : start + cfg.batch_size])
            if cfg.local_steps is not None and len(batches) == cfg.local_steps:
                return batches
        if cfg.local_steps is None and len(batches) >= cfg.local_epochs * -(-n // cfg.batch_size):
            return batches


class LocalTraining(Protocol):
    """What :func:`train_client` asks of a client's training recipe (a defence, or :class:`PlainTraining`)."""

    def training_module(self, model: nn.Module) -> nn.Module:
        """The module local training calls."""
        ...

    def batches(self, n: int, cfg: TrainingConfig, generator: torch.Generator) -> list[torch.Tensor]:
        """The local steps' batches, as index tensors into the client's ``n`` samples."""
        ...

    def optimizer(
        self, model: nn.Module, cfg: TrainingConfig, generator: torch.Generator, n: int
    ) -> torch.optim.Optimizer:
        """The client's optimiser for this local training."""
        ...

    def begin(self, model: nn.Module, flat: FlatWeights, generator: torch.Generator, state: dict[str, Any]) -> None:
        """Before one client's work at the weights ``flat`` holds; its (seed, client, round) RNG and its state."""
        ...

    def objective(
        self, model: nn.Module, module: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(objective to minimise, cross-entropy, logits, detached terms to log) for one batch."""
        ...

    def empty_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """A local step whose (sampled) batch is empty."""
        ...

    def share(self, delta: torch.Tensor) -> torch.Tensor:
        """The update the client sends, from its true local − global delta."""
        ...

    def account(self, state: dict[str, Any], n: int, steps: int) -> dict[str, float]:
        """After a client trained ``steps`` steps on ``n`` samples: update its state, return what to log."""
        ...


class PlainTraining:
    """Plain local training: mean cross-entropy, shuffled batches, the configured optimiser, the true update."""

    def training_module(self, model: nn.Module) -> nn.Module:
        """The module local training calls (DP-SGD wraps it once per process)."""
        return model

    def batches(self, n: int, cfg: TrainingConfig, generator: torch.Generator) -> list[torch.Tensor]:
        """Shuffled batch index order for ``n`` samples (:func:`batch_order`)."""
        return batch_order(n, cfg, generator)

    def optimizer(
        self, model: nn.Module, cfg: TrainingConfig, generator: torch.Generator, n: int
    ) -> torch.optim.Optimizer:
        """The configured optimiser over the model's parameters."""
        return make_optimizer(model, cfg)

    def begin(self, model: nn.Module, flat: FlatWeights, generator: torch.Generator, state: dict[str, Any]) -> None:
        """Before one client's work at the weights ``flat`` holds; its (seed, client, round) RNG and its state."""

    def objective(
        self, model: nn.Module, module: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(objective to minimise, cross-entropy, logits, detached terms to log) for one batch."""
        logits = module(x)
        ce = F.cross_entropy(logits, y)
        return ce, ce, logits, {}

    def empty_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """A local step whose (sampled) batch is empty: by default, none."""

    def share(self, delta: torch.Tensor) -> torch.Tensor:
        """The update the client sends, from its true local − global delta."""
        return delta

    def account(self, state: dict[str, Any], n: int, steps: int) -> dict[str, float]:
        """After a client trained ``steps`` steps on ``n`` samples: update its state, return what to log."""
        return {}


def train_client(
    model: nn.Module,
    flat: FlatWeights,
    global_weights: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainingConfig,
    generator: torch.Generator,
    defence: LocalTraining | None = None,
    state: dict | None = None,
) -> LocalResult:
    """Train from the global weights on one client's data; return the update it shares.

    ``defence`` (plain training by default) decides the module, batches,
    optimiser and objective, and transforms the shared update; all its
    randomness comes from ``generator``. ``state`` is the client's persistent
    state, which the defence may update.
    """
    defence = defence or PlainTraining()
    start = time.perf_counter()
    device = flat.vector.device
    flat.load(global_weights)
    model.train()
    module = defence.training_module(model)
    batches = defence.batches(len(y), cfg, generator)
    optimizer = defence.optimizer(model, cfg, generator, len(y))
    state = state if state is not None else {}
    defence.begin(model, flat, generator, state)
    mu = cfg.algorithm.mu if cfg.algorithm.kind == "fedprox" else 0.0
    assert mu is not None  # AlgorithmConfig requires mu for fedprox
    anchor = global_weights.to(device)[flat.trainable] if mu else None
    # Running sums stay on the device: one host sync per client, not several per step.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    terms: dict[str, torch.Tensor] = {}
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    for idx in batches:
        if len(idx) == 0:  # a Poisson-sampled (DP) batch can be empty
            defence.empty_step(model, optimizer)
            continue
        xb = to_input(x[idx], device)
        yb = y[idx].to(device)
        objective, loss, logits, logged = defence.objective(model, module, xb, yb)
        if anchor is not None:
            # FedProx: mu/2 * ||w - w_global||^2 over trainable parameters only.
            current = torch.cat([p.reshape(-1) for p in model.parameters()])
            objective = objective + 0.5 * mu * (current - anchor).pow(2).sum()
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        loss_sum += loss.detach().double() * len(idx)
        for name, value in logged.items():
            terms[name] = terms.get(name, 0.0) + value.double() * len(idx)
        correct += (logits.argmax(1) == yb).sum()
        seen += len(idx)
    delta = defence.share((flat.vector - global_weights.to(device)).detach()).cpu()
    figures = {name: float(total) / max(seen, 1) for name, total in terms.items()}
    figures.update(defence.account(state, len(y), len(batches)))
    return LocalResult(
        delta=delta,
        samples=len(y),
        steps=len(batches),
        loss=float(loss_sum) / max(seen, 1),
        accuracy=int(correct) / max(seen, 1),
        time_s=time.perf_counter() - start,
        defence=figures,
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, int, int]:
    """Summed cross-entropy, correct count and sample count, so callers can pool across shards."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, len(y), batch_size):
        xb = to_input(x[start : start + batch_size], device)
        yb = y[start : start + batch_size].to(device)
        logits = model(xb)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
        correct += (logits.argmax(1) == yb).sum()
    return float(loss_sum), int(correct), len(y)
