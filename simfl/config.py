"""Scenario sections that no plugin extends: populations, model, training, evaluation, resources, output.

Pure pydantic models (strict, frozen; see :mod:`simfl.validation`), imported by
every layer. The plugin-aware parts (the scenario itself, its ``defence`` and
``attacks``) are in :mod:`simfl.scenario`, which builds them from the registries.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import (
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    model_validator,
)

from simfl.validation import NAME_PATTERN, Strict, kind_shorthand

# ---------------------------------------------------------------- populations


class LabelSkew(Strict):
    """How a client's label mix departs from the dataset's."""

    kind: Literal["iid", "dirichlet", "shards"] = "iid"
    alpha: PositiveFloat | None = None
    classes: PositiveInt | None = None

    _shorthand = model_validator(mode="before")(kind_shorthand)

    @model_validator(mode="after")
    def _params(self) -> LabelSkew:
        if self.kind == "dirichlet" and self.alpha is None:
            raise ValueError("dirichlet label skew needs alpha (> 0)")
        if self.kind == "shards" and self.classes is None:
            raise ValueError("shards label skew needs classes (classes per client)")
        if self.kind != "dirichlet" and self.alpha is not None:
            raise ValueError(f"alpha only applies to kind: dirichlet, not {self.kind}")
        if self.kind != "shards" and self.classes is not None:
            raise ValueError(f"classes only applies to kind: shards, not {self.kind}")
        return self


class QuantitySkew(Strict):
    """Samples per client: log-normal around ``mean`` (sigma 0 gives equal sizes), clipped."""

    mean: PositiveFloat = 50.0
    sigma: NonNegativeFloat = 0.0
    min: PositiveInt = 2
    max: PositiveInt | None = None

    @model_validator(mode="after")
    def _bounds(self) -> QuantitySkew:
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self


class ShiftConfig(Strict):
    """Acquisition shift of a population: its mean device, and how much each client's device varies."""

    # Lax here only, so that Python callers may pass a tuple as well as a YAML list.
    color: list[PositiveFloat] = Field(default_factory=lambda: [1.0, 1.0, 1.0], min_length=3, max_length=3,
                                       strict=False)
    color_jitter: NonNegativeFloat = 0.0
    brightness: float = Field(0.0, ge=-1.0, le=1.0)
    contrast: PositiveFloat = 1.0
    jitter: NonNegativeFloat = 0.0
    blur: NonNegativeFloat = Field(0.0, le=5.0)
    noise: NonNegativeFloat = Field(0.0, le=1.0)
    downsample: PositiveInt = Field(1, le=8)

    @property
    def is_identity(self) -> bool:
        return self == ShiftConfig()


class PopulationConfig(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    clients: PositiveInt
    label_skew: LabelSkew = LabelSkew()
    quantity: QuantitySkew = QuantitySkew()
    shift: ShiftConfig = ShiftConfig()
    held_out: bool = False


# ---------------------------------------------------------------- model and training


class ModelConfig(Strict):
    arch: Literal["convnet", "lenet", "resnet18"] = "convnet"
    norm: Literal["batch", "group", "none"] = "group"
    latent_dim: PositiveInt | None = None
    width: PositiveInt = 32

    @model_validator(mode="after")
    def _norm(self) -> ModelConfig:
        if self.width != ModelConfig.model_fields["width"].default and self.arch != "convnet":
            raise ValueError(f"width: only applies to arch: convnet, not {self.arch}")
        if self.arch == "resnet18" and self.norm == "none":
            raise ValueError("norm: resnet18 needs a norm layer (batch or group)")
        return self


class OptimizerConfig(Strict):
    kind: Literal["sgd", "adam"] = "sgd"
    lr: PositiveFloat = 0.05
    momentum: NonNegativeFloat = 0.0
    weight_decay: NonNegativeFloat = 0.0

    _shorthand = model_validator(mode="before")(kind_shorthand)

    @model_validator(mode="after")
    def _momentum(self) -> OptimizerConfig:
        if self.kind == "adam" and self.momentum != 0:
            raise ValueError("momentum: only applies to kind: sgd (Adam has its own moments)")
        return self


class AlgorithmConfig(Strict):
    """Client side (FedProx's proximal term) and server side (FedAdam/FedYogi) of the FL algorithm."""

    kind: Literal["fedavg", "fedprox", "fedadam", "fedyogi"] = "fedavg"
    mu: NonNegativeFloat | None = None
    server_lr: PositiveFloat | None = None
    beta1: float | None = Field(None, ge=0.0, lt=1.0)
    beta2: float | None = Field(None, ge=0.0, lt=1.0)
    tau: PositiveFloat | None = None

    _shorthand = model_validator(mode="before")(kind_shorthand)

    @model_validator(mode="after")
    def _params(self) -> AlgorithmConfig:
        adaptive = ("server_lr", "beta1", "beta2", "tau")
        if self.kind == "fedprox" and self.mu is None:
            raise ValueError("fedprox needs mu (proximal weight, >= 0)")
        if self.kind != "fedprox" and self.mu is not None:
            raise ValueError(f"mu only applies to kind: fedprox, not {self.kind}")
        if self.kind not in ("fedadam", "fedyogi"):
            extra = [k for k in adaptive if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"{', '.join(extra)} only apply to fedadam/fedyogi, not {self.kind}")
        return self

    @property
    def server(self) -> dict[str, float]:
        """Server optimiser settings with Reddi et al. (2021) defaults filled in."""
        return {
            "server_lr": self.server_lr if self.server_lr is not None else 0.01,
            "beta1": self.beta1 if self.beta1 is not None else 0.9,
            "beta2": self.beta2 if self.beta2 is not None else 0.99,
            "tau": self.tau if self.tau is not None else 1e-3,
        }


class TrainingConfig(Strict):
    rounds: PositiveInt = 5
    clients_per_round: PositiveInt | None = None
    fraction: float | None = Field(None, gt=0.0, le=1.0)
    local_epochs: PositiveInt = 1
    local_steps: PositiveInt | None = None
    batch_size: PositiveInt = 32
    optimizer: OptimizerConfig = OptimizerConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()

    @model_validator(mode="after")
    def _one_cohort_size(self) -> TrainingConfig:
        if self.clients_per_round is not None and self.fraction is not None:
            raise ValueError("set clients_per_round or fraction, not both")
        if self.local_steps is not None and self.local_epochs != 1:
            raise ValueError("set local_epochs or local_steps, not both")
        return self

    def cohort_size(self, eligible: int) -> int:
        if self.fraction is not None:
            return max(1, min(eligible, math.ceil(self.fraction * eligible)))
        return min(eligible, self.clients_per_round or 10)


class EvaluationConfig(Strict):
    every: PositiveInt = 1
    local_val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    local_clients: PositiveInt | Literal["all"] = 100
    batch_size: PositiveInt = 512


class ResourcesConfig(Strict):
    client_actors: PositiveInt | Literal["auto"] = "auto"
    cpus_per_actor: float = Field(1.0, ge=0.01)
    gpus_per_actor: float = Field(0.0, ge=0.0, le=8.0)
    coordinator_cpus: NonNegativeFloat = 0.0


class OutputConfig(Strict):
    dir: str = "runs"
    name: str | None = Field(None, pattern=NAME_PATTERN)
    flush_seconds: PositiveFloat = 10.0


class CheckpointConfig(Strict):
    every: int = Field(1, ge=0)
    keep: PositiveInt = 2


class AttackPoolConfig(Strict):
    """The attacker actors, and what happens when they fall behind training."""

    actors: PositiveInt = 1
    cpus_per_actor: float = Field(1.0, ge=0.01)
    gpus_per_actor: float = Field(0.0, ge=0.0, le=8.0)
    max_pending: PositiveInt = 4  # attack jobs queued or running over the whole pool
    when_full: Literal["wait", "drop"] = "wait"  # wait: training pauses; drop: the job is counted, not run
