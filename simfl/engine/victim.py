"""What a sampled victim shares in the engine, and the private images kept aside to score it.

The client actor calls :func:`capture` for the round's victims. The returned
``Observation`` is exactly what the attacker gets; the private images travel
separately and are only ever compared with reconstructions after the attack.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from simfl.core.config import TrainingConfig
from simfl.core.seeding import torch_generator
from simfl.core.training import LocalResult, to_input
from simfl.core.weights import FlatWeights
from simfl.engine.scenario import AttacksConfig
from simfl.privacy.attacks.observation import GradientSharer, Observation, chw_shape, observe_gradient


@dataclass(frozen=True)
class Victim:
    """One attacked client in one round: what it shared, and (for scoring only) what it had."""

    round: int
    client_id: int
    observation: Observation
    private: torch.Tensor  # (B, H, W, C) uint8, the private originals as stored (a quarter of float32)
    labels: torch.Tensor  # (B,) the true labels

    @property
    def images(self) -> torch.Tensor:
        """The private originals as the model sees them: (B, C, H, W) float in [0, 1]."""
        return to_input(self.private)

    @property
    def group(self) -> tuple:
        """Victims with equal keys can be stacked into one batched attack."""
        o = self.observation
        return (o.view, o.batch_size, o.local_steps, o.local_batch_size)


def capture(
    model: nn.Module,
    flat: FlatWeights,
    global_weights: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: AttacksConfig,
    training: TrainingConfig,
    local: LocalResult,
    seed: int,
    client: int,
    round_: int,
    defence: GradientSharer | None = None,
    state: dict | None = None,
) -> Victim:
    """The victim's shared vector under ``cfg.view``; ``local`` is its real training this round.

    - gradient: the gradient of ``cfg.batch_size`` of its images (chosen from
      (seed, client, round)) at the global weights, in train mode as the client
      computes it, through the defence (its loss terms, noise or DP processing:
      what is attacked is what a defended client would share).
    - update: the update it really shared (``local.delta``), with the local SGD
      hyperparameters. The victim shuffles its batches with a seed the attacker
      does not know, so the attacker's replay (fixed sequential batches) is only
      exact for one local step.
    """
    if cfg.view == "gradient":
        gen = torch_generator(seed, "attack-batch", client, round_)
        pick = torch.randperm(len(y), generator=gen)[: cfg.batch_size]
        private, labels = x[pick], y[pick]
        images = to_input(private)
        with batch_statistics(model) as stats:
            obs = observe_gradient(model, flat, global_weights, images.to(flat.vector.device), labels, defence, gen,
                                   state)
        if cfg.bn_stats == "batch" and stats:
            obs = _with_batch_statistics(obs, flat, stats)
    else:
        private, labels = x, y
        images = to_input(private)
        opt = training.optimizer
        obs = Observation(
            weights=global_weights.detach().cpu().clone(),
            shared=local.delta.detach().cpu().clone(),
            view="update",
            batch_size=len(y),
            image_shape=chw_shape(images),
            labels=y.clone(),
            lr=opt.lr,
            local_steps=local.steps,
            local_batch_size=min(training.batch_size, len(y)),
            momentum=opt.momentum,
            weight_decay=opt.weight_decay,
        )
    if cfg.labels == "recovered":
        obs = replace(obs, labels=None)
    # Everything the coordinator receives is on the CPU: it holds no GPU (and may have none to unpickle onto).
    obs = replace(obs, weights=obs.weights.cpu(), shared=obs.shared.cpu(),
                  labels=None if obs.labels is None else obs.labels.cpu())
    return Victim(round_, client, obs, private.cpu().clone(), labels.cpu())


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Record each BatchNorm layer's batch mean and (biased) variance during a train-mode forward."""
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):

            def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor, name: str = name) -> None:
                if mod.training:
                    x = inputs[0].detach()
                    dims = [d for d in range(x.dim()) if d != 1]
                    stats[name] = (x.mean(dims), x.var(dims, unbiased=False))

            handles.append(module.register_forward_hook(hook))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def _with_batch_statistics(
    obs: Observation, flat: FlatWeights, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> Observation:
    """The attacker told the victim's BatchNorm batch statistics: they replace the running ones.

    The attack runs the model in eval mode, so it then normalises with exactly
    the statistics the victim's forward pass used (treated as constants).
    """
    weights = obs.weights.clone()
    named = flat.as_dict(weights)
    for name, (mean, var) in stats.items():
        named[f"{name}.running_mean"].copy_(mean)
        named[f"{name}.running_var"].copy_(var)
    return replace(obs, weights=weights)


def victim_state(victim: Victim) -> dict:
    """Plain tensors and scalars (``torch.load(weights_only=True)`` reads them back).

    Tensors are not copied, so victims sharing one weights tensor are saved once.
    """
    state = {f.name: getattr(victim, f.name) for f in fields(victim)}
    state["observation"] = {f.name: getattr(victim.observation, f.name) for f in fields(victim.observation)}
    return state


def victim_from_state(state: dict) -> Victim:
    """The :class:`Victim` that :func:`victim_state` saved."""
    return Victim(**{**state, "observation": Observation(**state["observation"])})
