"""One client's local training and the evaluation loop, free of Ray.

Both work on uint8 NHWC tensors (how shards are stored) and convert one batch
at a time, so a shard costs a quarter of its float32 size in memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from simfl.config import TrainingConfig
from simfl.weights import FlatWeights


def to_input(x: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """uint8 NHWC → float NCHW in [0, 1]: the range attacks and defences clamp to."""
    if device is not None:
        x = x.to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).float().div_(255.0)


@dataclass
class LocalResult:
    delta: torch.Tensor  # local minus global weights, flat float32
    samples: int
    steps: int
    loss: float
    accuracy: float
    time_s: float


def make_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    opt = cfg.optimizer
    if opt.kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)


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


def train_client(
    model: nn.Module,
    flat: FlatWeights,
    global_weights: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainingConfig,
    generator: torch.Generator,
) -> LocalResult:
    """Train from the global weights on one client's data; return the update it shares."""
    start = time.perf_counter()
    device = flat.vector.device
    flat.load(global_weights)
    model.train()
    optimizer = make_optimizer(model, cfg)
    mu = cfg.algorithm.mu if cfg.algorithm.kind == "fedprox" else 0.0
    anchor = global_weights.to(device)[flat.trainable] if mu else None
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = 0
    seen = 0
    batches = batch_order(len(y), cfg, generator)
    for idx in batches:
        xb = to_input(x[idx], device)
        yb = y[idx].to(device)
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        objective = loss
        if anchor is not None:
            # FedProx: mu/2 * ||w - w_global||^2 over trainable parameters only.
            current = torch.cat([p.reshape(-1) for p in model.parameters()])
            objective = loss + 0.5 * mu * (current - anchor).pow(2).sum()
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        loss_sum += loss.detach().double().cpu() * len(idx)
        correct += int((logits.argmax(1) == yb).sum())
        seen += len(idx)
    delta = (flat.vector - global_weights.to(device)).detach().cpu()
    return LocalResult(
        delta=delta,
        samples=len(y),
        steps=len(batches),
        loss=float(loss_sum) / max(seen, 1),
        accuracy=correct / max(seen, 1),
        time_s=time.perf_counter() - start,
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, int, int]:
    """Summed cross-entropy, correct count and sample count, so callers can pool across shards."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = 0.0
    correct = 0
    for start in range(0, len(y), batch_size):
        xb = to_input(x[start : start + batch_size], device)
        yb = y[start : start + batch_size].to(device)
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return loss_sum, correct, len(y)
