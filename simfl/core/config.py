"""Scenario sections that no plugin extends: populations, model, training, evaluation, resources, output.

Pure pydantic models (strict, frozen; see :mod:`simfl.core.validation`), imported by
every layer. The plugin-aware parts (the scenario itself, its ``defence`` and
``attacks``) are in :mod:`simfl.engine.scenario`, which builds them from the registries.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import (
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from simfl.core.validation import NAME_PATTERN, Strict, kind_shorthand

# ---------------------------------------------------------------- populations


class LabelSkew(Strict):
    """How a client's label mix departs from the dataset's."""

    kind: Literal["iid", "dirichlet", "shards"] = Field(
        "iid", description="`iid`: the dataset's label mix; `dirichlet`: each client's mix ~ Dir(alpha·1); "
                           "`shards`: `classes` distinct classes per client, equally likely")
    alpha: PositiveFloat | None = Field(
        None, description="Dirichlet concentration (kind: dirichlet, required there); smaller is more skewed")
    classes: PositiveInt | None = Field(None, description="classes per client (kind: shards, required there)")

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

    mean: PositiveFloat = Field(
        50.0, description="mean samples per client: round(mean·exp(sigma·z − sigma²/2)), z ~ N(0, 1) per client")
    sigma: NonNegativeFloat = Field(0.0, description="log-normal spread of the sizes; 0: every client gets `mean`")
    min: PositiveInt = Field(2, description="fewest samples a client gets (sizes are clipped)")
    max: PositiveInt | None = Field(None, description="most samples a client gets; unset: no cap")

    @model_validator(mode="after")
    def _bounds(self) -> QuantitySkew:
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self


class ShiftConfig(Strict):
    """Acquisition shift of a population: its mean device, and how much each client's device varies."""

    # Lax here only, so that Python callers may pass a tuple as well as a YAML list.
    color: list[PositiveFloat] = Field(default_factory=lambda: [1.0, 1.0, 1.0], min_length=3, max_length=3,
                                       strict=False,
                                       description="the device's gain per channel (R, G, B); grayscale: their mean")
    color_jitter: NonNegativeFloat = Field(0.0, description="per-client spread (std) of the log gains")
    brightness: float = Field(0.0, ge=-1.0, le=1.0, description="offset added on the [0, 1] scale (−1 to 1)")
    contrast: PositiveFloat = Field(1.0, description="contrast factor about each image's own mean")
    jitter: NonNegativeFloat = Field(0.0, description="per-client spread (std) of brightness and of log contrast")
    blur: NonNegativeFloat = Field(0.0, le=5.0, description="Gaussian blur σ in px (0 to 5)")
    noise: NonNegativeFloat = Field(0.0, le=1.0, description="Gaussian pixel noise σ on the [0, 1] scale (0 to 1)")
    downsample: PositiveInt = Field(
        1, le=8, description="resolution loss: area-averaged down by this factor, then blown back up (1 to 8)")

    @property
    def is_identity(self) -> bool:
        """Whether the shift leaves images unchanged (all knobs at their defaults)."""
        return self == ShiftConfig()


class PopulationConfig(Strict):
    """A group of clients (a site) with its own label skew, sizes and acquisition device."""

    name: str = Field(pattern=NAME_PATTERN, description="unique name (letters, digits, `_.-`; not `global`), "
                      "the `population` of its rows in the run tables")
    clients: PositiveInt = Field(description="number of clients")
    label_skew: LabelSkew = Field(LabelSkew(), description="how a client's label mix departs from the dataset's; "
                                  "`label_skew: iid` is shorthand for `{kind: iid}`")
    quantity: QuantitySkew = Field(QuantitySkew(), description="samples per client: log-normal, clipped")
    shift: ShiftConfig = Field(ShiftConfig(), description="acquisition shift: the population's mean device and how "
                               "much each client's varies (default: none)")
    held_out: bool = Field(False, description="never trains; evaluated on its shifted test set and its clients' "
                           "local validation data, probed by `attacks.held_out_victims`")
    site: list[str] | None = Field(
        None, min_length=1, description="real sites (hospitals, scanners) of a dataset with sites (`folder` with a "
        "manifest's `site` column, `camelyon17`): a name or a list. The population's clients are drawn from these "
        "sites' training images only (label and quantity skew apply inside them) and it is tested on their test "
        "images; with `held_out: true`, a real held-out hospital. Populations without `site` draw from the sites "
        "no population names. Populations naming the same sites share them without overlap; partly overlapping "
        "site lists are refused")

    @field_validator("site", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @field_validator("site")
    @classmethod
    def _distinct(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"a site is named twice: {v}")
        return sorted(v) if v is not None else None


# ---------------------------------------------------------------- model and training


class ModelConfig(Strict):
    """The shared model: encoder → latent → linear head."""

    arch: Literal["convnet", "lenet", "resnet18"] = Field("convnet", description="`convnet`, `lenet` or `resnet18`")
    norm: Literal["batch", "group", "none"] = Field(
        "group", description="normalisation layers: `batch`, `group` or `none` (resnet18 needs one)")
    latent_dim: PositiveInt | None = Field(
        None, description="width of the latent; unset: the arch's own (convnet 128, lenet 84, resnet18 512)")
    width: PositiveInt = Field(32, description="base channel count (arch: convnet only)")

    @model_validator(mode="after")
    def _norm(self) -> ModelConfig:
        if self.width != ModelConfig.model_fields["width"].default and self.arch != "convnet":
            raise ValueError(f"width: only applies to arch: convnet, not {self.arch}")
        if self.arch == "resnet18" and self.norm == "none":
            raise ValueError("norm: resnet18 needs a norm layer (batch or group)")
        return self


class OptimizerConfig(Strict):
    """The clients' local optimiser."""

    kind: Literal["sgd", "adam"] = Field("sgd", description="`sgd` or `adam`")
    lr: PositiveFloat = Field(0.05, description="local learning rate")
    momentum: NonNegativeFloat = Field(0.0, description="SGD momentum (kind: sgd only)")
    weight_decay: NonNegativeFloat = Field(0.0, description="L2 weight decay")

    _shorthand = model_validator(mode="before")(kind_shorthand)

    @model_validator(mode="after")
    def _momentum(self) -> OptimizerConfig:
        if self.kind == "adam" and self.momentum != 0:
            raise ValueError("momentum: only applies to kind: sgd (Adam has its own moments)")
        return self


# Reddi et al. (2021): the server optimiser settings an unset key takes.
SERVER_DEFAULTS: dict[str, float] = {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}


class AlgorithmConfig(Strict):
    """Client side (FedProx's proximal term) and server side (FedAdam/FedYogi) of the FL algorithm."""

    kind: Literal["fedavg", "fedprox", "fedadam", "fedyogi"] = Field(
        "fedavg", description="`fedavg`; `fedprox` (proximal term in local training); `fedadam`, `fedyogi` "
                              "(adaptive server optimiser, Reddi et al. 2021)")
    mu: NonNegativeFloat | None = Field(None, description="proximal weight μ (kind: fedprox, required there)")
    server_lr: PositiveFloat | None = Field(
        None, description=f"server learning rate (fedadam/fedyogi; unset: {SERVER_DEFAULTS['server_lr']:g})")
    beta1: float | None = Field(
        None, ge=0.0, lt=1.0, description=f"first-moment decay (fedadam/fedyogi; unset: {SERVER_DEFAULTS['beta1']:g})")
    beta2: float | None = Field(
        None, ge=0.0, lt=1.0, description=f"second-moment decay (fedadam/fedyogi; unset: {SERVER_DEFAULTS['beta2']:g})")
    tau: PositiveFloat | None = Field(
        None, description=f"adaptivity τ: the server step is server_lr·m/(√v + τ) (fedadam/fedyogi; "
                          f"unset: {SERVER_DEFAULTS['tau']:g})")

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
        return {key: default if getattr(self, key) is None else getattr(self, key)
                for key, default in SERVER_DEFAULTS.items()}


class TrainingConfig(Strict):
    """Rounds, cohorts, local training and the FL algorithm."""

    rounds: PositiveInt = Field(5, description="communication rounds")
    clients_per_round: PositiveInt | None = Field(
        None, description="clients sampled per round from those that train (unset, without fraction: 10)")
    fraction: float | None = Field(
        None, gt=0.0, le=1.0, description="clients per round as a share of those that train, rounded up "
                                          "(instead of clients_per_round)")
    local_epochs: PositiveInt = Field(1, description="local epochs per round")
    local_steps: PositiveInt | None = Field(None, description="local batches per round (instead of local_epochs)")
    batch_size: PositiveInt = Field(32, description="local batch size")
    optimizer: OptimizerConfig = Field(OptimizerConfig(), description="the local optimiser; `optimizer: adam` is "
                                       "shorthand for `{kind: adam}`")
    algorithm: AlgorithmConfig = Field(AlgorithmConfig(), description="the FL algorithm; `algorithm: fedavg` is "
                                       "shorthand for `{kind: fedavg}`")

    @model_validator(mode="after")
    def _one_cohort_size(self) -> TrainingConfig:
        if self.clients_per_round is not None and self.fraction is not None:
            raise ValueError("set clients_per_round or fraction, not both")
        if self.local_steps is not None and self.local_epochs != 1:
            raise ValueError("set local_epochs or local_steps, not both")
        return self

    def cohort_size(self, eligible: int) -> int:
        """Clients per round out of ``eligible``: ``fraction`` of them (at least one), else ``clients_per_round``."""
        if self.fraction is not None:
            return max(1, min(eligible, math.ceil(self.fraction * eligible)))
        return min(eligible, self.clients_per_round or 10)


class EvaluationConfig(Strict):
    """When the global model is evaluated, and on which clients' data."""

    every: PositiveInt = Field(1, description="evaluate every k-th round (and the last)")
    local_val_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="share of each client's data kept back as its local validation set")
    local_clients: PositiveInt | Literal["all"] = Field(
        100, description="clients whose local validation set is evaluated per evaluated round, drawn from "
                         "(seed, round): a number or `all`")
    batch_size: PositiveInt = Field(512, description="evaluation batch size")


CPUS_PER_ACTOR = "CPUs reserved per actor (fractions allowed)"
GPUS_PER_ACTOR = "GPUs per actor; a fraction shares a GPU (0.25: four actors per GPU)"


class ResourcesConfig(Strict):
    """Ray resources of the client actors and the coordinator."""

    client_actors: PositiveInt | Literal["auto"] = Field(
        "auto", description="actors that train the clients: a number, or `auto` (as many as the cluster's CPUs "
                            "and GPUs fit, at most one per client)")
    cpus_per_actor: float = Field(1.0, ge=0.01, description=CPUS_PER_ACTOR)
    gpus_per_actor: float = Field(0.0, ge=0.0, le=8.0, description=GPUS_PER_ACTOR)
    coordinator_cpus: NonNegativeFloat = Field(0.0, description="CPUs reserved for the coordinator actor")


class OutputConfig(Strict):
    """Where the run directory goes."""

    dir: str = Field("runs", description="the folder run directories are made in (`~` expanded)")
    name: str | None = Field(None, pattern=NAME_PATTERN, description="the run directory's name; unset: "
                             "`<scenario name>-<time>`; suffixed -1, -2… if it exists")
    flush_seconds: PositiveFloat = Field(10.0, description="seconds between writes of the run tables to disk")


class CheckpointConfig(Strict):
    """Checkpoints, from which `--resume` continues a killed run."""

    every: int = Field(1, ge=0, description="checkpoint every k rounds and at the last (0: only the last)")
    keep: PositiveInt = Field(2, description="how many of the newest checkpoints are kept")


class AttackPoolConfig(Strict):
    """The attacker actors, and what happens when they fall behind training."""

    actors: PositiveInt = Field(1, description="attacker actors")
    cpus_per_actor: float = Field(1.0, ge=0.01, description=CPUS_PER_ACTOR)
    gpus_per_actor: float = Field(0.0, ge=0.0, le=8.0, description=GPUS_PER_ACTOR)
    max_pending: PositiveInt = Field(4, description="attack jobs queued or running over the whole pool")
    when_full: Literal["wait", "drop"] = Field(
        "wait", description="with max_pending jobs pending, `wait`: training pauses until a job finishes; `drop`: "
                            "the victims are not attacked, and are counted in `rounds.attack_victims_dropped`")
