"""Learned feature inversion: decoders the server trains on its own data, applied to what the gradient gives away.

At batch size 1 the shared gradient hands over the inputs of the model's
linear layers exactly (:mod:`simfl.privacy.attacks.analytic`). These attacks turn
them into images with a :class:`~simfl.privacy.decoders.Decoder` fitted, for the
victims' round, on the server's auxiliary data (the validation split, never a
client's) passed through the same global model:

- ``feature_decoder``: from the input of the earliest linear layer (the
  ConvNet's pooled features; before the latent defence's noise layer, so the
  noise never touches them). Naive and adaptive are the same attack here.
- ``latent_decoder``: from the head's input. Naive: z′ read off the head,
  decoded as if it were the model's deterministic latent. Adaptive against the
  latent defence: where the victim's noise is read off exactly (``mean_shift``),
  the clean latent z = z′ − μ − σ ⊙ ε by a decoder fitted on clean latents;
  otherwise z′ by a decoder fitted on the server's latents noised as the
  victims' are (the defence as the victim runs it).
- ``server_decoder``: the latent defence's own decoder D, which the server
  trains and broadcasts each round, applied to z′ (adaptive only: it exists
  only under that defence).

They train per attacked round (one decoder per distinct global weights) and
are deterministic given the scenario's seed. They work at batch size 1 (the
scenario refuses larger gradient batches for them).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt
from torch import nn
from torch.func import functional_call

from simfl.core.seeding import torch_generator
from simfl.core.weights import FlatWeights
from simfl.privacy.attacks.analytic import Recovered, linear_layers, recover
from simfl.privacy.attacks.base import ATTACKS, AttackConfig, AttackResult, AuxData
from simfl.privacy.attacks.functional import AttackBase, PerRound
from simfl.privacy.attacks.labels import batch_labels
from simfl.privacy.attacks.observation import Observation
from simfl.privacy.decoders import Decoder, decode, fit_decoder

# Server images passed through the model per forward when extracting their features.
_CHUNK = 256


class _DecoderConfig(AttackConfig):
    """Options every learned decoder attack shares: how long and how fast its decoder trains."""

    steps: PositiveInt = Field(600, description="Adam steps fitting the decoder on the server's data, per round")
    lr: PositiveFloat = Field(1e-3, description="the decoder's Adam learning rate")
    batch: PositiveInt = Field(64, description="server images per decoder step")

    def check(self, scenario: Any) -> None:
        """Feature inversion reads one sample's layer inputs: batch size 1."""
        if scenario.attacks is not None and scenario.attacks.batch_size != 1:
            raise ValueError(f"attacks.methods: {self.kind} needs attacks.batch_size: 1 "
                             f"(layer inputs are read off one sample's gradient)")


class FeatureDecoderConfig(_DecoderConfig):
    """``feature_decoder``: decode the earliest linear layer's input, read off the gradient."""

    kind: Literal["feature_decoder"] = "feature_decoder"


class LatentDecoderConfig(_DecoderConfig):
    """``latent_decoder``: decode the head's input (adaptive: the clean latent, the latent defence's noise removed)."""

    kind: Literal["latent_decoder"] = "latent_decoder"


class ServerDecoderConfig(AttackConfig):
    """``server_decoder``: the latent defence's own decoder D applied to the z′ read off the gradient."""

    kind: Literal["server_decoder"] = "server_decoder"

    def check(self, scenario: Any) -> None:
        """D decodes one sample's z′: batch size 1."""
        if scenario.attacks is not None and scenario.attacks.batch_size != 1:
            raise ValueError("attacks.methods: server_decoder needs attacks.batch_size: 1")


def layer_inputs(model: nn.Module, flat: FlatWeights, weights: torch.Tensor, images: torch.Tensor,
                 layer: str, noise: torch.Generator | None = None) -> torch.Tensor:
    """(N, D) the input of ``layer`` (a module path) for each image, the model at ``weights`` in eval mode.

    ``noise``: the model's ``latent`` layer runs in training mode, drawing its
    noise from this generator (the latent defence's ``LatentNoise`` reads it),
    so the features are noisy as a victim's are.
    """
    captured: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0].detach().flatten(1)))
    was = model.training
    model.eval()
    latent = model.get_submodule("latent")
    before = getattr(latent, "generator", None)  # put back after: no generator outlives this call on the model
    if noise is not None:
        latent.train()
        setattr(latent, "generator", noise)  # noqa: B010  (a plain attribute the noise layer reads)
    try:
        named = flat.as_dict(weights.to(flat.vector.device))
        with torch.no_grad():
            for start in range(0, len(images), _CHUNK):
                functional_call(model, named, (images[start : start + _CHUNK],))
    finally:
        handle.remove()
        model.train(was)
        if noise is not None:
            setattr(latent, "generator", before)  # noqa: B010
    return torch.cat(captured)


@dataclass
class _LearnedDecoder(AttackBase):
    """Fit a decoder per round on the server's data, then decode each victim's recovered vector."""

    steps: int = 600
    lr: float = 1e-3
    batch: int = 64
    aux: AuxData | None = None
    informed: bool = False  # set by adapting: the attacker knows the defence

    def _source(self, model: nn.Module, recovered: Recovered) -> tuple[str, torch.Tensor, bool]:
        """(the layer whose input the server's images give, the victim's recovered vector, draw noise as victims do)."""
        raise NotImplementedError

    def applies(self) -> bool:
        """It needs the server's data."""
        return self.aux is not None

    def __call__(
        self, model: nn.Module, flat: FlatWeights, observations: Sequence[Observation], seeds: Sequence[int]
    ) -> AttackResult:
        """Decode every victim's recovered vector with the decoder of its round's weights."""
        assert self.aux is not None, f"{type(self).__name__} needs the server's data (build_attack(..., aux))"
        start = time.perf_counter()
        device = flat.vector.device
        aux_x = self.aux.inputs(device)
        aux = self.aux

        def fit(obs: Observation, layer: str, noisy: bool) -> tuple[Decoder, torch.Tensor]:
            noise = torch_generator(aux.seed, "attack-latent-noise") if noisy else None
            features = layer_inputs(model, flat, obs.weights, aux_x, layer, noise)
            decoder = fit_decoder(features, aux_x, self.steps, self.lr, self.batch, aux.seed,
                                  f"attack-{type(self).__name__}")
            return decoder, features.mean(0)

        per_source: dict[tuple[str, bool], PerRound[tuple[Decoder, torch.Tensor]]] = {}
        images = []
        for obs in observations:
            layer, vector, noisy = self._source(model, recover(model, flat, obs))
            fitted = per_source.setdefault((layer, noisy), PerRound(functools.partial(fit, layer=layer, noisy=noisy)))
            decoder, typical = fitted(obs)
            # Nothing to read where the layer's bias gradient vanished (e.g. every unit dead): the server's average.
            vector = vector.float().to(device) if torch.isfinite(vector).all() else typical
            images.append(decode(decoder, vector.unsqueeze(0)))
        labels = batch_labels(flat, observations)
        steps = torch.full((len(observations),), self.steps, dtype=torch.long)
        nan = torch.full((len(observations),), float("nan"))
        return AttackResult(torch.stack(images), labels, nan, steps, time.perf_counter() - start)


@ATTACKS.register(FeatureDecoderConfig)
@dataclass
class FeatureDecoder(_LearnedDecoder):
    """Decode the earliest linear layer's input (noise-free under the latent defence)."""

    def _source(self, model: nn.Module, recovered: Recovered) -> tuple[str, torch.Tensor, bool]:
        return (*recovered.deepest_features(linear_layers(model)), False)


@ATTACKS.register(LatentDecoderConfig)
@dataclass
class LatentDecoder(_LearnedDecoder):
    """Decode the head's input z′; the adaptive attacker knows the latent defence's noise (see the module docstring).

    Naive: z′ as if the latent were deterministic. Adaptive, where the noise is
    read off exactly (the defence's ``mean_shift`` shares ∂L/∂μ = ∂L/∂z′): the
    clean latent, by a decoder fitted on clean latents. Otherwise (λ > 0 makes
    the read-off ε an estimate): z′, by a decoder fitted on the server's
    latents noised as victims noise theirs, which learns to see through it.
    """

    def _source(self, model: nn.Module, recovered: Recovered) -> tuple[str, torch.Tensor, bool]:
        if not self.informed or recovered.noise is None:
            return "head", recovered.latent, False
        if getattr(model.get_submodule("latent"), "shift", None) is not None and recovered.clean_latent is not None:
            return "latent", recovered.clean_latent, False  # the noise layer's input: the encoder's clean latent
        return "head", recovered.latent, True


@ATTACKS.register(ServerDecoderConfig)
@dataclass
class ServerDecoder(AttackBase):
    """The latent defence's decoder D (disclosed with the round's broadcast) on the recovered z′."""

    decoder: nn.Module | None = None

    def applies(self) -> bool:
        """Only where the defence trains a decoder, and the attacker was told it."""
        return self.decoder is not None

    def __call__(
        self, model: nn.Module, flat: FlatWeights, observations: Sequence[Observation], seeds: Sequence[int]
    ) -> AttackResult:
        """D(z′) for every victim."""
        assert self.decoder is not None, "server_decoder runs only against a defence that discloses its decoder"
        start = time.perf_counter()
        device = flat.vector.device
        decoder = self.decoder.to(device).eval()
        with torch.no_grad():
            images = torch.stack([decoder(recover(model, flat, o).latent.float().to(device).unsqueeze(0))
                                  for o in observations])
        labels = batch_labels(flat, observations)
        nan = torch.full((len(observations),), float("nan"))
        return AttackResult(images, labels, nan, torch.zeros(len(observations), dtype=torch.long),
                            time.perf_counter() - start)
