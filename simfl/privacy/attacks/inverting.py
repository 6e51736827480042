"""Inverting Gradients (Geiping et al. 2020), batched over victims.

Objective per victim: 1 − cos(simulated, observed) + tv_weight · TV(images),
minimised with Adam (lr 0.1, ×0.1 at 3/8, 5/8, 7/8 of the iterations) on
signed gradients, images clamped to [0, 1] after every step, best of
``restarts`` by final objective. Labels are given or recovered analytically.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt
from torch import nn
from torch.func import grad, vmap

from simfl.core.weights import FlatWeights
from simfl.privacy.attacks.base import ATTACKS, AttackConfig, AttackResult
from simfl.privacy.attacks.functional import (
    AttackBase,
    Stacked,
    attacker_module,
    draw,
    stack,
    total_variation,
    victim_generators,
    victim_simulator,
)
from simfl.privacy.attacks.labels import batch_labels
from simfl.privacy.attacks.observation import Observation
from simfl.privacy.disclosure import LossFn, ModelWrapper


class InvertingGradientsConfig(AttackConfig):
    """``ig``: Inverting Gradients (Geiping et al. 2020): cosine gradient mismatch plus a TV prior, by Adam.

    Its defaults are the paper's reference configuration (4800 iterations, TV 0.1, one restart).
    """

    kind: Literal["ig"] = "ig"
    iterations: PositiveInt = Field(4800, description="Adam iterations per restart")
    lr: PositiveFloat = Field(0.1, description="Adam learning rate (x0.1 at 3/8, 5/8 and 7/8 of the iterations)")
    tv_weight: NonNegativeFloat = Field(0.1, description="weight of the total-variation image prior")
    restarts: PositiveInt = Field(1, description="random restarts; the best by final objective is kept")


@ATTACKS.register(InvertingGradientsConfig)
@dataclass
class InvertingGradients(AttackBase):
    """Defaults follow the paper's reference configuration (4800 iterations, TV 0.1, 1 restart)."""

    iterations: int = 4800
    lr: float = 0.1
    tv_weight: float = 0.1
    restarts: int = 1
    signed: bool = True
    loss_fn: LossFn = F.cross_entropy
    model_wrapper: ModelWrapper | None = None
    clip_norm: float | None = None  # adaptive to DP-SGD: simulate per-sample clipping

    def __call__(
        self, model: nn.Module, flat: FlatWeights, observations: Sequence[Observation], seeds: Sequence[int]
    ) -> AttackResult:
        """Reconstruct every victim's batch; ``seeds[v]`` alone determines victim v's restarts."""
        start = time.perf_counter()
        stacked = stack(observations, flat)
        device = flat.vector.device
        generators = victim_generators(seeds, stacked.victims)
        labels = batch_labels(flat, observations, device)
        shape = (stacked.batch_size, *stacked.image_shape)
        extra = self._extra(model, flat, observations)
        with attacker_module(model, self.model_wrapper) as module:
            objective = self._objective(module, flat, stacked)
            weights, weight_dim = stacked.weight_arg
            args = (weights, stacked.sgd, stacked.target, labels, *extra)
            in_dims = (0, weight_dim, 0, 0, 0, *[0] * len(extra))
            gradient, value = vmap(grad(objective), in_dims=in_dims), vmap(objective, in_dims=in_dims)
            best_x = torch.zeros(stacked.victims, *shape, device=device)
            best_f = torch.full((stacked.victims,), torch.inf, device=device)
            for restart in range(self.restarts):
                x = self._optimise(self._start(restart, extra, generators, shape, device), gradient, args)
                f = value(x, *args).detach()
                better = f < best_f
                best_x = torch.where(better.view(-1, *[1] * len(shape)), x, best_x)
                best_f = torch.where(better, f, best_f)
        iterations = torch.full((stacked.victims,), self.iterations * self.restarts, dtype=torch.long)
        return AttackResult(best_x, labels, best_f, iterations, time.perf_counter() - start)

    def _extra(self, model: nn.Module, flat: FlatWeights, observations: Sequence[Observation]
               ) -> tuple[torch.Tensor, ...]:
        """Per-victim tensors (V, ...) the objective takes after the labels; none for plain Inverting Gradients."""
        return ()

    def _start(self, restart: int, extra: tuple[torch.Tensor, ...], generators: list[torch.Generator],
               shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Each restart's starting images: uniform noise from each victim's generator."""
        return draw(generators, shape, device)

    def _objective(self, module: nn.Module, flat: FlatWeights, stacked: Stacked) -> Callable[..., torch.Tensor]:
        """One victim's objective(x, weights, sgd, target, labels): 1 − cos(simulated, observed) + TV."""
        simulate = victim_simulator(module, flat, stacked, self.loss_fn, self.clip_norm)

        def objective(
            x: torch.Tensor, w: torch.Tensor, sgd: torch.Tensor, target: torch.Tensor, y: torch.Tensor
        ) -> torch.Tensor:
            g = simulate(w, sgd, x, y)
            cosine = (g * target).sum() / (g.norm() * target.norm()).clamp_min(1e-12)
            return 1.0 - cosine + self.tv_weight * total_variation(x)

        return objective

    def objective_at(
        self, model: nn.Module, flat: FlatWeights, observations: Sequence[Observation], images: torch.Tensor
    ) -> torch.Tensor:
        """(V,) the objective at ``images`` (the victims' true ones: a found image should score about as low)."""
        stacked = stack(observations, flat)
        device = flat.vector.device
        labels = batch_labels(flat, observations, device)
        extra = self._extra(model, flat, observations)
        with attacker_module(model, self.model_wrapper) as module:
            objective = self._objective(module, flat, stacked)
            weights, weight_dim = stacked.weight_arg
            value = vmap(objective, in_dims=(0, weight_dim, 0, 0, 0, *[0] * len(extra)))
            return value(images.to(device), weights, stacked.sgd, stacked.target, labels, *extra).detach().cpu()

    def _optimise(
        self, x: torch.Tensor, gradient: Callable[..., torch.Tensor], args: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        # Adam is elementwise: each pixel's moments and step depend only on its own
        # gradient history, and the gradient of Σ_v objective_v w.r.t. victim v's
        # pixels is objective_v's own. So one Adam over the stacked (V, ...) images
        # makes exactly the per-victim updates; the lr schedule is shared by design.
        x = x.clone()
        optimizer = torch.optim.Adam([x], lr=self.lr)
        milestones = [int(self.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        for _ in range(self.iterations):
            g = gradient(x, *args).detach()
            x.grad = g.sign() if self.signed else g
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                x.clamp_(0.0, 1.0)
        return x.detach()
