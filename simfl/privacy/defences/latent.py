"""Learnable latent perturbation trained by minimax against a decoder (arXiv 2503.16542).

Our reading of the method (the full text is not available to us):

- **Model path.** The encoder gives z; the classifier head sees
  z' = z + μ + σ ⊙ ε, ε ~ N(0, I) drawn by reparameterisation, with σ learnable
  per latent unit. σ = σ_max · tanh(softplus(ρ) / σ_max): softplus(ρ) well below
  the cap, never above it, and still differentiable there (a hard clamp would
  freeze ρ at the cap). μ is an optional learnable shift. The layer lives in
  the model, so ρ and μ are trained and aggregated like any weight.
- **Adversary.** A decoder D reconstructs x from z'. Clients minimise
  CE − λ · MSE(D(z'), x) with D frozen; D minimises MSE(D(z'), x).
- **Who trains D.** D's gradient contains the images, so clients never
  compute it: the coordinator trains D each round on server-held data (the
  validation split, disjoint from every client) against the new global
  encoder and noise, then broadcasts D's weights, which clients use only
  inside their privacy term. D is not part of the model: it is never in a
  client's update.
- **λ.** Fixed, or (``train_accuracy_target``) a dual variable the coordinator moves
  by ``dual_lr`` · (cohort training accuracy − target) each round, kept ≥ 0:
  more privacy while accuracy is above the target, less below. Beyond the paper.

In eval mode the layer is deterministic (z + μ), so evaluation and attacks
see a fixed model; noise is drawn only in training, from the client's
(seed, client, round) generator.
"""

from __future__ import annotations

import copy
import math
from functools import partial
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator
from torch import nn

from simfl.core.config import TrainingConfig
from simfl.core.models import SplitNet
from simfl.core.plugins import PluginConfig
from simfl.core.seeding import torch_generator
from simfl.core.training import make_optimizer, to_input
from simfl.core.weights import FlatWeights
from simfl.data import Dataset
from simfl.privacy.decoders import Decoder, seeded_decoder
from simfl.privacy.defences.base import DEFENCES, Defence, SearchKnob
from simfl.privacy.disclosure import Disclosure

# Validation images the coordinator keeps aside to measure D (never trained on).
DECODER_HELD_OUT = 256


class LatentNoise(nn.Module):
    """z → z + μ + σ ⊙ ε. Modes: ``sample`` (noise in train mode only), ``off`` (identity: a naive attacker's view).

    ``draws`` (K, D), when set, makes the layer output all K perturbed copies of
    the batch, (K·B, D) in draw-major order: an adaptive attacker's expectation
    over the noise. Plain attributes, not buffers: the shared weight layout is ρ (and μ) only.
    """

    def __init__(self, dim: int, sigma_init: float, sigma_max: float, mean_shift: bool) -> None:
        super().__init__()
        self.sigma_max = sigma_max
        # Invert σ = σ_max·tanh(softplus(ρ)/σ_max) at σ_init.
        soft = sigma_max * math.atanh(sigma_init / sigma_max)
        self.rho = nn.Parameter(torch.full((dim,), math.log(math.expm1(soft))))
        self.shift = nn.Parameter(torch.zeros(dim)) if mean_shift else None
        self.mode = "sample"
        self.generator: torch.Generator | None = None
        self.draws: torch.Tensor | None = None

    def sigma(self) -> torch.Tensor:
        """σ per latent unit, in (0, σ_max)."""
        return self.sigma_max * torch.tanh(F.softplus(self.rho) / self.sigma_max)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z' for the current mode: z when ``off``; else z + μ, plus σ ⊙ ε in training or for each of ``draws``."""
        if self.mode == "off":
            return z
        mean = z + self.shift if self.shift is not None else z
        if self.draws is not None:
            noisy = mean.unsqueeze(0) + self.sigma() * self.draws.to(z.device).unsqueeze(1)
            return noisy.reshape(-1, z.shape[-1])
        if not self.training:
            return mean
        eps = torch.randn(z.shape, generator=self.generator).to(z.device)
        return mean + self.sigma() * eps


def noise_layer(model: nn.Module) -> LatentNoise:
    """The model's latent noise layer (:meth:`LatentDefence.build` put it in the latent slot)."""
    layer = model.latent
    assert isinstance(layer, LatentNoise), f"not a latent-defended model: its latent layer is {type(layer).__name__}"
    return layer


def latent_off(model: nn.Module) -> nn.Module:
    """Naive attacker: the architecture without the defence (the latent layer an identity)."""
    module = copy.deepcopy(model)
    noise_layer(module).mode = "off"
    return module


class KnownVictim(nn.Module):
    """The victim's whole computation as an adaptive attacker models it, for ``functional_call``.

    Every forward runs the latent layer over fixed noise ``draws`` (an average
    over the noise) and, when the round's decoder is known, appends each copy's
    reconstruction error MSE(D(z'), x) as a last column, so the loss can
    subtract λ times it exactly as the victim did. Parameter names are the
    model's (``model.``-free): the decoder is a constant, not a shared weight.
    """

    def __init__(self, model: SplitNet, draws: torch.Tensor, decoder: Decoder | None) -> None:
        super().__init__()
        latent = noise_layer(model)
        self.encoder, self.latent, self.head = model.encoder, latent, model.head
        latent.draws = draws
        self.copies = len(draws)
        self.decoder = [decoder]  # in a list: not a submodule, so never among the differentiated weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, with each copy's reconstruction error as a last column when the decoder is known."""
        perturbed = self.latent(self.encoder(x))
        logits = self.head(perturbed)
        decoder = self.decoder[0]
        if decoder is None:
            return logits
        target = x.repeat(self.copies, *([1] * (x.dim() - 1)))
        error = (decoder(perturbed) - target).pow(2).flatten(1).mean(1, keepdim=True)
        return torch.cat([logits, error], dim=1)


def known_victim(model: SplitNet, draws: torch.Tensor, decoder: Decoder | None) -> nn.Module:
    """Adaptive attacker's module (a ``Disclosure.model_wrapper``): a copy of ``model`` as the victim ran it."""
    device = next(model.parameters()).device
    return KnownVictim(copy.deepcopy(model), draws, decoder.to(device) if decoder is not None else None)


def known_objective(out: torch.Tensor, targets: torch.Tensor, copies: int, lam: float | None) -> torch.Tensor:
    """The victim's objective averaged over the noise copies: CE − λ·MSE(D(z'), x) (CE alone without D)."""
    targets = targets.repeat(copies, *([1] * (targets.dim() - 1)))
    if lam is None:
        return F.cross_entropy(out, targets)
    return F.cross_entropy(out[:, :-1], targets) - lam * out[:, -1].mean()


def antithetic_draws(samples: int, dim: int, seed: int) -> torch.Tensor:
    """K noise draws for the adaptive attacker: ε = 0 alone for K = 1, else ±ε pairs (mean exactly 0)."""
    if samples == 1:
        return torch.zeros(1, dim)
    half = torch.randn(-(-samples // 2), dim, generator=torch_generator(seed, "adaptive-latent-draws"))
    return torch.cat([half, -half])[:samples]


DUAL_LR_DEFAULT = 1.0


class LatentConfig(PluginConfig):
    """``latent``: learnable Gaussian noise on the latent, trained by minimax against a server-trained decoder."""

    kind: Literal["latent"] = "latent"
    sigma_init: PositiveFloat = Field(0.1, description="initial noise scale σ of every latent unit")
    sigma_max: PositiveFloat = Field(2.0, description="soft cap on σ (σ = σ_max·tanh(softplus(ρ)/σ_max))")
    sigma_lr: PositiveFloat = Field(1.0, description="clients' learning rate for the noise parameters ρ (and μ)")
    mean_shift: bool = Field(False, description="also learn a latent shift μ")
    lam: NonNegativeFloat = Field(
        0.5, description="λ: weight of the privacy term −λ·MSE(D(z'), x) (initial λ with train_accuracy_target)"
    )
    train_accuracy_target: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="cohort training accuracy to hold by adapting λ as a dual variable; unset: λ fixed",
    )
    dual_lr: PositiveFloat = Field(
        DUAL_LR_DEFAULT, description="step of λ's dual update (with train_accuracy_target)"
    )
    decoder_steps: PositiveInt = Field(20, description="server's decoder Adam steps per round")
    decoder_lr: PositiveFloat = Field(1e-3, description="server's decoder learning rate (Adam)")
    decoder_batch: PositiveInt = Field(64, description="server images per decoder step")
    adaptive_samples: PositiveInt = Field(
        8, description="noise draws the adaptive attacker averages over: 1 (ε = 0) or an even number (±ε pairs)"
    )
    shared_noise: bool = Field(
        True, description="true: ρ (and μ) are weights of the shared model, aggregated like any other (our reading "
        "of the paper); false: each client keeps its own, never sent (zero in every update and shared gradient)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> LatentConfig:
        if self.adaptive_samples % 2 and self.adaptive_samples > 1:
            raise ValueError("adaptive_samples: 1 (the expected latent) or an even number (±ε pairs)")
        if self.sigma_init >= self.sigma_max:
            raise ValueError(f"sigma_init ({self.sigma_init}) must be below sigma_max ({self.sigma_max})")
        # By value, not presence: a saved scenario lists every knob and must reload.
        if self.train_accuracy_target is None and self.dual_lr != DUAL_LR_DEFAULT:
            raise ValueError("dual_lr only applies with train_accuracy_target (λ adapted as a dual variable)")
        return self


@DEFENCES.register(LatentConfig)
class LatentDefence(Defence):
    """``latent``: learnable latent noise trained against a decoder (see the module docstring)."""

    client_figures: ClassVar[dict[str, tuple[str, ...]]] = {"decoder_mse": ("mean",)}
    round_figures: ClassVar[tuple[str, ...]] = ("lam", "sigma_mean", "sigma_min", "sigma_max", "decoder_mse_server")
    # λ, not σ_max: with σ_init far below the cap, σ barely moves whatever the cap (0.100 -> 0.099 for caps
    # 0.5 and 4 in a probe), while λ weighs the privacy term the clients descend, so utility falls as it grows.
    search_knob: ClassVar[SearchKnob | None] = SearchKnob("lam", 0.01, 30.0, falls=True, log=True)

    def __init__(self, cfg: LatentConfig, shape: tuple[int, int, int], seed: int) -> None:
        super().__init__(cfg, shape, seed)
        self.cfg: LatentConfig = cfg
        self.lam = float(cfg.lam)
        self.decoder: Decoder | None = None
        self.decoder_flat: FlatWeights | None = None
        # shared_noise false: the flat entries of ρ (and μ), never sent, and the current client's weights.
        self._local: torch.Tensor | None = None
        self._flat: FlatWeights | None = None

    @classmethod
    def naive_is_exact(cls, attacks: Any) -> bool:
        """Never: a naive attacker drops the noise layer and the privacy term."""
        return False

    def build(self, model: SplitNet) -> SplitNet:
        """Put the learnable noise layer in the model's latent slot."""
        k = self.cfg
        model.latent = LatentNoise(model.latent_dim, k.sigma_init, k.sigma_max, k.mean_shift)
        self.latent_dim = model.latent_dim
        return model

    def _decoder(self, device: torch.device) -> Decoder:
        """D, initialised from (seed): the same start in the coordinator and every client actor."""
        if self.decoder is None:
            self.decoder = seeded_decoder(self.latent_dim, self.shape[0], self.shape[1], self.seed, "decoder-init")
            self.decoder = self.decoder.to(device)
            self.decoder_flat = FlatWeights(self.decoder)
        return self.decoder

    def _decoder_weights(self) -> FlatWeights:
        """D's weights as one vector; D exists from ``server_setup`` (coordinator) or the first ``receive``."""
        assert self.decoder_flat is not None, "latent defence: no decoder yet"
        return self.decoder_flat

    # ------------------------------------------------------------ client side

    def receive(self, broadcast: dict[str, Any], device: torch.device) -> None:
        """Load the round's decoder (frozen, eval mode) and λ."""
        decoder = self._decoder(device)
        decoder.requires_grad_(False)  # clients never compute D's gradient
        decoder.eval()
        self._decoder_weights().load(broadcast["decoder"].to(device))
        self.lam = float(broadcast["lam"])

    def begin(self, model: nn.Module, flat: FlatWeights, generator: torch.Generator, state: dict[str, Any]) -> None:
        """Draw the latent noise from the client's generator; with local noise, start from the client's own ρ (μ)."""
        noise_layer(model).generator = generator
        if self.cfg.shared_noise:
            return
        if self._local is None:
            names = [name.startswith("latent.") for name, _, shape in flat.layout for _ in range(shape.numel())]
            self._local = torch.tensor(names, dtype=torch.bool, device=flat.vector.device)
        self._flat = flat
        own = state.get("latent_noise")
        if own is not None:  # a client that trained before: its own noise parameters, not the (never updated) global
            flat.vector[self._local] = own.to(flat.vector.device)

    def share(self, delta: torch.Tensor) -> torch.Tensor:
        """With local noise, the noise parameters' change is never sent."""
        if self._local is not None:
            delta = delta.clone()
            delta[self._local.to(delta.device)] = 0.0
        return delta

    def account(self, state: dict[str, Any], n: int, steps: int) -> dict[str, float]:
        """With local noise, the client keeps its trained ρ (μ) for the next round it takes part in."""
        if self._local is not None and self._flat is not None:
            state["latent_noise"] = self._flat.vector[self._local].detach().cpu().clone()
        return {}

    def shared_gradient(
        self, model: nn.Module, flat: FlatWeights, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
        state: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """The gradient of the client's objective; with local noise, without the noise parameters' entries."""
        return self.share(super().shared_gradient(model, flat, x, y, generator, state))

    def optimizer(
        self, model: nn.Module, cfg: TrainingConfig, generator: torch.Generator, n: int
    ) -> torch.optim.Optimizer:
        """The client's optimiser, with the noise parameters at their own learning rate ``sigma_lr``.

        ρ's gradient is an average over the noise draws and is orders of magnitude
        smaller than the weights'; at the weights' learning rate σ would not move
        within a run, and the knob would be a constant.
        """
        noise = list(noise_layer(model).parameters())
        rest = [p for p in model.parameters() if all(p is not q for q in noise)]
        return make_optimizer(model, cfg, [{"params": rest},
                                           {"params": noise, "lr": self.cfg.sigma_lr, "weight_decay": 0.0}])

    def objective(
        self, model: nn.Module, module: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """CE − λ·MSE(D(z'), x) with D frozen; logs the reconstruction error."""
        if self.decoder is None:
            raise RuntimeError("latent defence: no decoder received from the coordinator yet")
        assert isinstance(model, SplitNet)  # the model build() made
        perturbed = model.features(x)
        logits = model.head(perturbed)
        ce = F.cross_entropy(logits, y)
        reconstruction = F.mse_loss(self.decoder(perturbed), x)
        objective = ce - self.lam * reconstruction
        return objective, ce, logits, {"decoder_mse": reconstruction.detach()}

    # ------------------------------------------------------------ server side

    def server_setup(self, dataset: Dataset, model: SplitNet) -> None:
        """D and its optimiser in the coordinator; D's training data are the validation split (server-held)."""
        device = next(model.parameters()).device
        decoder = self._decoder(device)
        decoder.requires_grad_(True)
        self.decoder_optimizer = torch.optim.Adam(decoder.parameters(), lr=self.cfg.decoder_lr)
        images = torch.from_numpy(np.array(dataset.val_x))
        held = min(DECODER_HELD_OUT, len(images) // 4)
        self.aux_train, self.aux_held = images[held:], images[:held]
        self.round = 0
        self._train_decoder(model, 0)  # round 1's clients already face a decoder fitted to the initial model

    def _perturbed(self, model: SplitNet, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """z' from the global model: encoder in eval mode (no BatchNorm update), noise drawn as in training."""
        was = model.training
        model.eval()
        model.latent.train()
        noise_layer(model).generator = generator
        try:
            with torch.no_grad():
                return model.features(x)
        finally:
            model.train(was)

    def _train_decoder(self, model: SplitNet, round_: int) -> dict[str, float]:
        device = next(model.parameters()).device
        gen = torch_generator(self.seed, "decoder-train", round_)
        batch = min(self.cfg.decoder_batch, len(self.aux_train))
        decoder = self.decoder
        assert decoder is not None  # made in server_setup
        decoder.train()
        for _ in range(self.cfg.decoder_steps):
            idx = torch.randperm(len(self.aux_train), generator=gen)[:batch]
            x = to_input(self.aux_train[idx], device)
            loss = F.mse_loss(decoder(self._perturbed(model, x, gen)), x)
            self.decoder_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.decoder_optimizer.step()
        decoder.eval()
        x = to_input(self.aux_held, device)
        held_gen = torch_generator(self.seed, "decoder-held")  # the same noise every round: comparable figures
        with torch.no_grad():
            mse = float(F.mse_loss(decoder(self._perturbed(model, x, held_gen)), x))
            sigma = noise_layer(model).sigma()
        return {"decoder_mse_server": mse, "sigma_mean": float(sigma.mean()), "sigma_min": float(sigma.min()),
                "sigma_max": float(sigma.max())}

    def server_round(self, round_: int, model: SplitNet, client_rows: list[dict]) -> dict[str, float]:
        """Move λ towards the utility target (when set), then train D one round on the new global model."""
        target = self.cfg.train_accuracy_target
        if target is not None and client_rows:
            n = sum(row["samples"] for row in client_rows)
            accuracy = sum(row["accuracy"] * row["samples"] for row in client_rows) / n
            self.lam = max(0.0, self.lam + self.cfg.dual_lr * (accuracy - target))
        figures = self._train_decoder(model, round_)
        figures["lam"] = self.lam
        return figures

    def broadcast(self) -> dict[str, Any]:
        """D's weights and λ, for the clients' privacy term."""
        return {"decoder": self._decoder_weights().snapshot().cpu(), "lam": self.lam}

    def server_state(self) -> dict[str, Any]:
        """D's weights, its optimiser state and λ."""
        return {"decoder": self._decoder_weights().snapshot().cpu(), "optimizer": self.decoder_optimizer.state_dict(),
                "lam": self.lam}

    def load_server_state(self, state: dict[str, Any]) -> None:
        """Restore D, its optimiser and λ from :meth:`server_state`."""
        self._decoder_weights().load(state["decoder"])
        self.decoder_optimizer.load_state_dict(state["optimizer"])
        self.lam = float(state["lam"])

    # ------------------------------------------------------------ attackers

    def disclosure(self, context: dict[str, Any] | None = None) -> Disclosure:
        """The noise layer averaged over fixed draws and, given the round's broadcast, the privacy term.

        The server trained and broadcast D and λ itself, so an adaptive attacker
        simulates the victim's full objective CE − λ·MSE(D(z'), x) on its dummy images,
        has D itself (an inversion network z′ → x), and, once this defence has
        :meth:`receive`-d the round's broadcast, computes what a victim shares on its own data.
        """
        samples = self.cfg.adaptive_samples
        draws = antithetic_draws(samples, self.latent_dim, self.seed)
        decoder, lam = None, None
        if context:
            decoder = copy.deepcopy(self._decoder(torch.device("cpu"))).requires_grad_(False).eval()
            FlatWeights(decoder).load(context["decoder"])
            lam = float(context["lam"])
        return Disclosure(model_wrapper=partial(known_victim, draws=draws, decoder=decoder),
                          loss_fn=partial(known_objective, copies=samples, lam=lam), decoder=decoder,
                          shared_gradient=self.shared_gradient if self.decoder is not None else None)

    def naive_view(self) -> Disclosure:
        """The model with the noise layer switched off (an identity)."""
        return Disclosure(model_wrapper=latent_off, knows_defence=False)
