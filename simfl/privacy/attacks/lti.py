"""Learning to Invert (Wu et al., NeurIPS 2023): a network from shared gradients to images, trained by the server.

The server computes, on its own auxiliary data (the validation split, never a
client's), exactly what a victim would share for each of its images at the
round's global weights: the plain gradient for a naive attacker; for an
adaptive one the defence's own ``shared_gradient`` (DP-SGD's clipping and
noise, the latent defence's noise and privacy term, BiDO's terms), so noise
and clipping are in its training data. A fixed random projection (a count
sketch: each gradient entry added, with a random sign, to one of ``sketch``
buckets; it keeps inner products in expectation and costs no P × sketch
matrix) shrinks each gradient; an MLP learns sketch → images. It needs no
per-victim optimisation and works for any defence and any batch size (it
outputs all B images of a batch, trained on random batches of B server images).

Gradient view only: an update is many local steps on unknown batches.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt
from torch import nn

from simfl.core.seeding import torch_generator
from simfl.core.weights import FlatWeights, flat_gradient
from simfl.privacy.attacks.base import ATTACKS, AttackConfig, AttackResult, AuxData
from simfl.privacy.attacks.functional import AttackBase, PerRound
from simfl.privacy.attacks.labels import batch_labels
from simfl.privacy.attacks.observation import Observation
from simfl.privacy.disclosure import ModelWrapper, SharedGradient


class LearningToInvertConfig(AttackConfig):
    """``lti``: an MLP from a sketch of the shared gradient to the images, trained on simulated server shares."""

    kind: Literal["lti"] = "lti"
    samples: PositiveInt = Field(600, description="server batches whose shares are simulated to train on, per round")
    steps: PositiveInt = Field(800, description="Adam steps training the inversion network, per round")
    lr: PositiveFloat = Field(1e-3, description="the inversion network's Adam learning rate")
    batch: PositiveInt = Field(64, description="training examples per step")
    sketch: PositiveInt = Field(1024, description="size of the random projection (count sketch) of a gradient")
    hidden: PositiveInt = Field(512, description="width of the network's two hidden layers")

    def check(self, scenario: Any) -> None:
        """Shares are simulated as gradients."""
        if scenario.attacks is not None and scenario.attacks.view != "gradient":
            raise ValueError("attacks.methods: lti needs attacks.view: gradient (it simulates victims' gradients)")


def plain_share(model: nn.Module, flat: FlatWeights, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
    """What an undefended client shares in the gradient view: its mean cross-entropy's gradient."""
    model.train()
    return flat_gradient(F.cross_entropy(model(x), y), model, flat)


class CountSketch:
    """A fixed random projection of vectors of length ``n`` to ``size`` buckets: y[h(i)] += s(i)·v[i]."""

    def __init__(self, n: int, size: int, seed: int, device: torch.device) -> None:
        gen = torch_generator(seed, "lti-sketch")
        self.bucket = torch.randint(0, size, (n,), generator=gen).to(device)
        self.sign = (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).float().to(device)
        self.size = size

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """(..., n) → (..., size)."""
        out = torch.zeros(*v.shape[:-1], self.size, dtype=v.dtype, device=v.device)
        return out.index_add_(-1, self.bucket, v * self.sign)


def inversion_network(inputs: int, hidden: int, outputs: int, seed: int) -> nn.Module:
    """The MLP sketch → images in [0, 1], initialised from (seed) alone (the global RNG left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(torch_generator(seed, "lti-network").initial_seed())
        return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                             nn.Linear(hidden, outputs), nn.Sigmoid())


@ATTACKS.register(LearningToInvertConfig)
@dataclass
class LearningToInvert(AttackBase):
    """Train per round on simulated shares of the server's data, then map each victim's share to its images."""

    samples: int = 600
    steps: int = 800
    lr: float = 1e-3
    batch: int = 64
    sketch: int = 1024
    hidden: int = 512
    aux: AuxData | None = None
    shared_gradient: SharedGradient | None = None  # the defence's own (adaptive); None: plain gradients (naive)
    # The module a plain share is computed on: a naive attacker's view of the victim's (the latent defence's
    # noise layer switched off). Never the defended module as it stands: its noise layer would draw from
    # whatever generator an earlier attack or job left on it, and the naive attacker does not know of it.
    model_wrapper: ModelWrapper | None = None
    informed: bool = False  # set by adapting: the attacker knows the defence (its wrapper is not a naive view then)

    def applies(self) -> bool:
        """It needs the server's data."""
        return self.aux is not None

    def __call__(
        self, model: nn.Module, flat: FlatWeights, observations: Sequence[Observation], seeds: Sequence[int]
    ) -> AttackResult:
        """One network per distinct global weights (one per round in the engine), applied to every victim."""
        assert self.aux is not None, "lti needs the server's data (build_attack(..., aux))"
        start = time.perf_counter()
        device = flat.vector.device
        sketch = CountSketch(int(flat.trainable.sum()), self.sketch, self.aux.seed, device)
        trained = PerRound(lambda obs: self._train(model, flat, obs, sketch))
        images = []
        for obs in observations:
            network, mean, std = trained(obs)
            s = sketch(obs.shared.to(device)[flat.trainable])
            with torch.no_grad():
                images.append(network(((s - mean) / std).unsqueeze(0)).view(obs.batch_size, *obs.image_shape))
        labels = batch_labels(flat, observations)
        steps = torch.full((len(observations),), self.steps, dtype=torch.long)
        nan = torch.full((len(observations),), float("nan"))
        return AttackResult(torch.stack(images), labels, nan, steps, time.perf_counter() - start)

    def _train(self, model: nn.Module, flat: FlatWeights, obs: Observation, sketch: CountSketch
               ) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        """Simulate ``samples`` shares of server batches at the victims' weights; fit the network to invert them."""
        assert self.aux is not None
        device = flat.vector.device
        flat.load(obs.weights.to(device))
        if self.shared_gradient is not None:  # adaptive: the defence computes the share on the defended module
            share, module = self.shared_gradient, model
        else:  # naive: the plain gradient of the module as the attacker believes the victim ran it
            wrapper = self.model_wrapper if not self.informed else None
            share, module = plain_share, wrapper(model) if wrapper is not None else model
        aux_x, aux_y = self.aux.inputs(device), self.aux.labels.to(device)
        gen = torch_generator(self.aux.seed, "lti-batches")
        inputs, targets = [], []
        for _ in range(self.samples):
            idx = torch.randperm(len(aux_y), generator=gen)[: obs.batch_size].to(device)
            flat.load(obs.weights.to(device))  # a defence's share may move the weights (e.g. a client's own noise)
            shared = share(module, flat, aux_x[idx], aux_y[idx], gen)
            inputs.append(sketch(shared[flat.trainable].detach()))
            targets.append(aux_x[idx].flatten())
        flat.load(obs.weights.to(device))
        x, t = torch.stack(inputs), torch.stack(targets)
        mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
        x = (x - mean) / std
        network = inversion_network(self.sketch, self.hidden, t.shape[1], self.aux.seed).to(device)
        optimizer = torch.optim.Adam(network.parameters(), lr=self.lr)
        order = torch_generator(self.aux.seed, "lti-steps")
        for _ in range(self.steps):
            pick = torch.randint(0, len(x), (min(self.batch, len(x)),), generator=order).to(device)
            loss = F.mse_loss(network(x[pick]), t[pick])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return network.eval().requires_grad_(False), mean, std
