"""Deep Leakage from Gradients (Zhu et al. 2019) and iDLG (Zhao et al. 2020), batched over victims.

DLG minimises ||simulated − observed||² over dummy images (and, when labels
are unknown, soft labels: softmax of learnable logits) with L-BFGS. iDLG first
recovers labels analytically (``labels.py``) and keeps them fixed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt
from torch import nn
from torch.func import grad_and_value, vmap

from simfl.core.weights import FlatWeights
from simfl.privacy.attacks.base import ATTACKS, AttackConfig, AttackResult
from simfl.privacy.attacks.functional import (
    AttackBase,
    attacker_module,
    draw,
    stack,
    victim_generators,
    victim_simulator,
)
from simfl.privacy.attacks.labels import batch_labels
from simfl.privacy.attacks.lbfgs import batched_lbfgs
from simfl.privacy.attacks.observation import Observation
from simfl.privacy.disclosure import LossFn, ModelWrapper


class DLGConfig(AttackConfig):
    """``dlg``: Deep Leakage from Gradients (Zhu et al. 2019), L-BFGS on the L2 gradient mismatch.

    Labels not given are learned jointly (soft labels).
    """

    kind: Literal["dlg"] = "dlg"
    iterations: PositiveInt = Field(300, description="L-BFGS iterations (one objective evaluation each)")
    lr: PositiveFloat = Field(1.0, description="L-BFGS step size")


class IDLGConfig(AttackConfig):
    """``idlg``: DLG with the labels recovered analytically first and kept fixed."""

    kind: Literal["idlg"] = "idlg"
    iterations: PositiveInt = Field(300, description="L-BFGS iterations (one objective evaluation each)")
    lr: PositiveFloat = Field(1.0, description="L-BFGS step size")


@ATTACKS.register(DLGConfig)
@dataclass
class DLG(AttackBase):
    """DLG; ``iterations`` counts L-BFGS iterations, one objective evaluation each."""

    iterations: int = 300
    lr: float = 1.0
    history_size: int = 100
    loss_fn: LossFn = F.cross_entropy
    model_wrapper: ModelWrapper | None = None
    clip_norm: float | None = None  # adaptive to DP-SGD: simulate per-sample clipping
    analytic_labels: bool = False  # iDLG: labels recovered from the head's gradient, not learned

    def __call__(
        self, model: nn.Module, flat: FlatWeights, observations: Sequence[Observation], seeds: Sequence[int]
    ) -> AttackResult:
        """Reconstruct every victim's batch; ``seeds[v]`` alone determines victim v's initialisation."""
        start = time.perf_counter()
        stacked = stack(observations, flat)
        known = [o.labels is not None for o in observations]
        if not self.analytic_labels and any(known) != all(known):
            raise ValueError("DLG batches victims that all have, or all lack, labels")
        learn = not self.analytic_labels and not all(known)
        device = flat.vector.device
        generators = victim_generators(seeds, stacked.victims)
        batch, shape = stacked.batch_size, stacked.image_shape
        n_pixels = batch * int(torch.Size(shape).numel())
        parts = [draw(generators, (n_pixels,), device)]
        with attacker_module(model, self.model_wrapper) as module:
            num_classes = int(module.get_submodule("head").weight.shape[0])  # type: ignore[index]
            simulate = victim_simulator(module, flat, stacked, self.loss_fn, self.clip_norm)
            if learn:
                parts.append(draw(generators, (batch * num_classes,), device, normal=True))
                labels = None
            else:
                labels = batch_labels(flat, observations, device)

            def objective(
                z: torch.Tensor, w: torch.Tensor, sgd: torch.Tensor, target: torch.Tensor, y: torch.Tensor | None
            ) -> torch.Tensor:
                x = z[:n_pixels].reshape(batch, *shape)
                t = y if y is not None else z[n_pixels:].reshape(batch, num_classes).softmax(-1)
                return (simulate(w, sgd, x, t) - target).pow(2).sum()

            weights, weight_dim = stacked.weight_arg
            in_dims = (0, weight_dim, 0, 0, 0 if labels is not None else None)
            value_and_grad = vmap(grad_and_value(objective), in_dims=in_dims)

            def fn(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                g, f = value_and_grad(z, weights, stacked.sgd, stacked.target, labels)
                return f.detach(), g.detach()

            z, _, iterations = batched_lbfgs(fn, torch.cat(parts, 1), self.iterations, self.lr, self.history_size)
            # Report images in the box the data lives in, and the objective they achieve.
            z[:, :n_pixels] = z[:, :n_pixels].clamp(0.0, 1.0)
            final, _ = fn(z)
        images = z[:, :n_pixels].reshape(stacked.victims, batch, *shape)
        if learn:
            labels = z[:, n_pixels:].reshape(stacked.victims, batch, num_classes).argmax(-1)
        assert labels is not None  # recovered, or learned above
        return AttackResult(images, labels, final, iterations.cpu(), time.perf_counter() - start)

    def objective_at(
        self, model: nn.Module, flat: FlatWeights, observations: Sequence[Observation], images: torch.Tensor
    ) -> torch.Tensor:
        """(V,) the L2 gradient mismatch at ``images`` with the analytic labels (the true images' own score)."""
        stacked = stack(observations, flat)
        device = flat.vector.device
        labels = batch_labels(flat, observations, device)
        with attacker_module(model, self.model_wrapper) as module:
            simulate = victim_simulator(module, flat, stacked, self.loss_fn, self.clip_norm)

            def mismatch(x: torch.Tensor, w: torch.Tensor, sgd: torch.Tensor, target: torch.Tensor,
                         y: torch.Tensor) -> torch.Tensor:
                return (simulate(w, sgd, x, y) - target).pow(2).sum()

            weights, weight_dim = stacked.weight_arg
            value = vmap(mismatch, in_dims=(0, weight_dim, 0, 0, 0))
            return value(images.to(device), weights, stacked.sgd, stacked.target, labels).detach().cpu()


@ATTACKS.register(IDLGConfig)
@dataclass
class IDLG(DLG):
    """DLG with labels recovered analytically and fixed (iDLG for B = 1, LLG for B > 1)."""

    analytic_labels: bool = True
