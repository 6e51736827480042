"""Optimisation attacks with priors from what the gradient gives away: feature matching, and a decoded start.

Both are Inverting Gradients (cosine gradient matching, total variation, Adam
on signed gradients, the box constraint; :mod:`simfl.privacy.attacks.inverting`) with
one more piece of knowledge:

- ``feature_match``: the input of the earliest linear layer is read off the
  gradient exactly (:mod:`simfl.privacy.attacks.analytic`), so the objective also asks
  the dummy image's features to equal it, ‖φ(x) − φ*‖² / ‖φ*‖². For the
  ConvNet that pins 16·width numbers of the image's pooled representation,
  before any noise the latent defence adds.
- ``decoded_ig`` (in the spirit of GIAS and GGL): the server's feature decoder
  (``feature_decoder``, :mod:`simfl.privacy.attacks.learned`) gives a first image;
  Inverting Gradients starts from it and is held near it by a prior term
  ``prior_weight`` · mean((x − x_dec)²). Whether this beats the decoder alone
  and IG alone is what the attacks table shows side by side.

Batch size 1 (the recovered features are one sample's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt
from torch import nn
from torch.func import functional_call

from simfl.core.weights import FlatWeights
from simfl.privacy.attacks.analytic import linear_layers, recover
from simfl.privacy.attacks.base import ATTACKS, AttackConfig, AuxData
from simfl.privacy.attacks.functional import Stacked, total_variation, victim_simulator
from simfl.privacy.attacks.inverting import InvertingGradients
from simfl.privacy.attacks.learned import FeatureDecoder
from simfl.privacy.attacks.observation import Observation


def _batch_one(kind: str, scenario: Any) -> None:
    if scenario.attacks is not None and scenario.attacks.batch_size != 1:
        raise ValueError(f"attacks.methods: {kind} needs attacks.batch_size: 1 (it uses one sample's features)")


class FeatureMatchingConfig(AttackConfig):
    """``feature_match``: Inverting Gradients plus matching the earliest linear layer's input read off the gradient."""

    kind: Literal["feature_match"] = "feature_match"
    iterations: PositiveInt = Field(1000, description="Adam iterations per restart")
    lr: PositiveFloat = Field(0.1, description="Adam learning rate (x0.1 at 3/8, 5/8 and 7/8 of the iterations)")
    tv_weight: NonNegativeFloat = Field(0.1, description="weight of the total-variation image prior")
    feature_weight: NonNegativeFloat = Field(1.0, description="weight of ‖φ(x) − φ*‖² / ‖φ*‖², the feature match")
    grad_weight: NonNegativeFloat = Field(1.0, description="weight of 1 − cos(simulated, observed gradient)")
    restarts: PositiveInt = Field(1, description="random restarts; the best by final objective is kept")

    def check(self, scenario: Any) -> None:
        """One sample's features: batch size 1."""
        _batch_one(self.kind, scenario)


class DecodedIGConfig(AttackConfig):
    """``decoded_ig``: Inverting Gradients started from the feature decoder's image and held near it."""

    kind: Literal["decoded_ig"] = "decoded_ig"
    iterations: PositiveInt = Field(1000, description="Adam iterations")
    lr: PositiveFloat = Field(0.03, description="Adam learning rate (smaller: it starts near an image already)")
    tv_weight: NonNegativeFloat = Field(0.1, description="weight of the total-variation image prior")
    prior_weight: NonNegativeFloat = Field(1.0, description="weight of mean((x − x_decoded)²), the decoder prior")
    decoder_steps: PositiveInt = Field(600, description="Adam steps fitting the feature decoder, per round")

    def check(self, scenario: Any) -> None:
        """The decoder reads one sample's features: batch size 1."""
        _batch_one(self.kind, scenario)


def _features(module: nn.Module, layer: str) -> Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]:
    """φ(params, x): the input of ``layer`` when ``module`` runs on x with ``params`` (works under vmap and grad)."""
    seen: list[torch.Tensor] = []
    target = module.get_submodule(layer)

    def features(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        handle = target.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
        try:
            functional_call(module, params, (x,))
        finally:
            handle.remove()
        return seen.pop().flatten()

    return features


@ATTACKS.register(FeatureMatchingConfig)
@dataclass
class FeatureMatching(InvertingGradients):
    """IG whose objective also matches the earliest linear layer's input, recovered exactly from the gradient."""

    iterations: int = 1000
    feature_weight: float = 1.0
    grad_weight: float = 1.0

    def _extra(self, model: nn.Module, flat: FlatWeights, observations: Sequence[Observation]
               ) -> tuple[torch.Tensor, ...]:
        layer = linear_layers(model)[0]
        return (torch.stack([recover(model, flat, o).inputs[layer].float() for o in observations])
                .to(flat.vector.device),)

    def _objective(self, module: nn.Module, flat: FlatWeights, stacked: Stacked) -> Callable[..., torch.Tensor]:
        simulate = victim_simulator(module, flat, stacked, self.loss_fn, self.clip_norm)
        features = _features(module, linear_layers(module)[0])

        def objective(x: torch.Tensor, w: torch.Tensor, sgd: torch.Tensor, target: torch.Tensor, y: torch.Tensor,
                      recovered: torch.Tensor) -> torch.Tensor:
            g = simulate(w, sgd, x, y)
            cosine = (g * target).sum() / (g.norm() * target.norm()).clamp_min(1e-12)
            mismatch = (features(flat.as_dict(w), x) - recovered).pow(2).sum() / recovered.pow(2).sum().clamp_min(1e-12)
            return self.grad_weight * (1.0 - cosine) + self.feature_weight * mismatch + \
                self.tv_weight * total_variation(x)

        return objective


@ATTACKS.register(DecodedIGConfig)
@dataclass
class DecodedIG(InvertingGradients):
    """IG from the feature decoder's image, with a prior term holding it near that image."""

    iterations: int = 1000
    lr: float = 0.03
    prior_weight: float = 1.0
    decoder_steps: int = 600
    aux: AuxData | None = None

    def applies(self) -> bool:
        """The decoder needs the server's data."""
        return self.aux is not None

    def _extra(self, model: nn.Module, flat: FlatWeights, observations: Sequence[Observation]
               ) -> tuple[torch.Tensor, ...]:
        decoder = FeatureDecoder(steps=self.decoder_steps, aux=self.aux)
        decoded = decoder(model, flat, observations, [0] * len(observations)).images
        return (decoded.to(flat.vector.device),)

    def _start(self, restart: int, extra: tuple[torch.Tensor, ...], generators: list[torch.Generator],
               shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The first restart starts at the decoded image; any further ones at noise."""
        return extra[0].clone() if restart == 0 else super()._start(restart, extra, generators, shape, device)

    def _objective(self, module: nn.Module, flat: FlatWeights, stacked: Stacked) -> Callable[..., torch.Tensor]:
        ig = super()._objective(module, flat, stacked)

        def objective(x: torch.Tensor, w: torch.Tensor, sgd: torch.Tensor, target: torch.Tensor, y: torch.Tensor,
                      decoded: torch.Tensor) -> torch.Tensor:
            return ig(x, w, sgd, target, y) + self.prior_weight * (x - decoded).pow(2).mean()

        return objective
