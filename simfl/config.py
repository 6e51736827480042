"""Scenario schema: strict, validated once, then passed around as plain models.

Every scenario key lives here, so that a typo or an out-of-range value is caught
before a run directory or a Ray actor exists, and reported with its key path.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from simfl.errors import UserError


class Strict(BaseModel):
    """Base for every section: unknown keys and mistyped values are errors; immutable once validated."""

    # strict: a YAML typo such as `held_out: "yes"` or `rounds: true` is an error, not a silent 1.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _kind_shorthand(value: Any) -> Any:
    """Allow ``label_skew: iid`` as shorthand for ``label_skew: {kind: iid}``."""
    return {"kind": value} if isinstance(value, str) else value


# Safe as a directory name and inside a Ray actor name.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"

# ---------------------------------------------------------------- data


class SyntheticConfig(Strict):
    """Sizes of the embedded offline dataset; the train split is sized to the partition."""

    num_classes: int = Field(8, ge=2, le=64)
    val_size: PositiveInt = 2000
    test_size: PositiveInt = 2000


class DataConfig(Strict):
    name: str = "synthetic"
    root: str = "~/.simfl/data"
    size: PositiveInt = 28
    download: bool = True
    synthetic: SyntheticConfig = SyntheticConfig()

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from simfl.data import DATASETS

        v = v.lower()
        if v not in DATASETS:
            raise ValueError(f"unknown dataset {v!r}; choose one of: {', '.join(sorted(DATASETS))}")
        return v

    @model_validator(mode="after")
    def _size_fits(self) -> DataConfig:
        # Checked by value, not by presence, so the resolved scenario a run saves reloads.
        if self.synthetic != SyntheticConfig() and self.name != "synthetic":
            raise ValueError(f"synthetic: only applies to name: synthetic, not {self.name}")
        if self.name == "cifar10" and self.size != 32:
            raise ValueError("size: CIFAR-10 images are 32 px; set data.size: 32")
        if self.name not in ("synthetic", "cifar10") and self.size not in (28, 64, 128, 224):
            raise ValueError(f"size: MedMNIST comes in 28, 64, 128 or 224 px, not {self.size}")
        if self.name == "synthetic" and not 8 <= self.size <= 256:
            raise ValueError(f"size: synthetic images must be 8..256 px, not {self.size}")
        return self

    @property
    def root_path(self) -> Path:
        return Path(self.root).expanduser()


# ---------------------------------------------------------------- populations


class LabelSkew(Strict):
    """How a client's label mix departs from the dataset's."""

    kind: Literal["iid", "dirichlet", "shards"] = "iid"
    alpha: PositiveFloat | None = None
    classes: PositiveInt | None = None

    _shorthand = model_validator(mode="before")(_kind_shorthand)

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

    _shorthand = model_validator(mode="before")(_kind_shorthand)

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

    _shorthand = model_validator(mode="before")(_kind_shorthand)

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


# ---------------------------------------------------------------- attacks


class AttackMethodConfig(Strict):
    """One registered attack (``simfl.attacks.ATTACKS``); unset options take the attack's defaults."""

    kind: Literal["dlg", "idlg", "ig"] = "ig"
    iterations: PositiveInt | None = None
    lr: PositiveFloat | None = None
    tv_weight: NonNegativeFloat | None = None  # ig only
    restarts: PositiveInt | None = None  # ig only

    _shorthand = model_validator(mode="before")(_kind_shorthand)

    @model_validator(mode="after")
    def _options(self) -> AttackMethodConfig:
        if self.kind != "ig":
            extra = [k for k in ("tv_weight", "restarts") if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"{', '.join(extra)} only apply to kind: ig, not {self.kind}")
        return self

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(exclude={"kind"}).items() if v is not None}


class AttackPoolConfig(Strict):
    """The attacker actors, and what happens when they fall behind training."""

    actors: PositiveInt = 1
    cpus_per_actor: float = Field(1.0, ge=0.01)
    gpus_per_actor: float = Field(0.0, ge=0.0, le=8.0)
    max_pending: PositiveInt = 4  # attack jobs queued or running over the whole pool
    when_full: Literal["wait", "drop"] = "wait"  # wait: training pauses; drop: the job is counted, not run


class AttacksConfig(Strict):
    """Who is attacked, when, what the attacker sees and knows, and with which attacks.

    The attacker is the server (or an eavesdropper): it sees exactly what a
    sampled victim shares that round. ``view: gradient`` is the gradient of one
    batch of ``batch_size`` of the victim's images at the global weights (as in
    FedSGD); ``view: update`` is the victim's real FedAvg update, with its local
    hyperparameters known.

    ``held_out_victims``: held-out clients probed per attacked round. Each is
    attacked as if it had joined the round (it computes what it would share,
    from the round's global weights and defence broadcast), but its update is
    not aggregated and its state is left as it was: the attack metrics on
    populations the defence was never trained on.
    """

    methods: list[AttackMethodConfig] = Field(default_factory=lambda: [AttackMethodConfig()], min_length=1)
    view: Literal["gradient", "update"] = "gradient"
    batch_size: PositiveInt = 1
    labels: Literal["known", "recovered"] = "recovered"
    bn_stats: Literal["running", "batch"] = "running"
    victims: PositiveInt | None = None
    victim_fraction: float | None = Field(None, gt=0.0, le=1.0)
    rounds: list[PositiveInt] | None = None
    every: PositiveInt = 1
    held_out_victims: NonNegativeInt = 0  # held-out clients probed per attacked round
    victims_per_job: PositiveInt = 16
    pool: AttackPoolConfig = AttackPoolConfig()

    @model_validator(mode="after")
    def _choices(self) -> AttacksConfig:
        if self.victims is not None and self.victim_fraction is not None:
            raise ValueError("set victims or victim_fraction, not both")
        if self.rounds is not None and self.every != 1:
            raise ValueError("set rounds or every, not both")
        kinds = [m.kind for m in self.methods]
        if len(set(kinds)) != len(kinds):
            raise ValueError("methods: each attack kind may appear once")
        if self.view == "update" and self.batch_size != 1:
            raise ValueError("batch_size: only applies to view: gradient (an update covers all the victim's samples)")
        if self.view == "update" and self.bn_stats == "batch":
            raise ValueError("bn_stats: batch only applies to view: gradient (an update spans many batches)")
        return self

    def attacked(self, round_: int) -> bool:
        return round_ in self.rounds if self.rounds is not None else round_ % self.every == 0

    def victim_count(self, cohort: int) -> int:
        if self.victim_fraction is not None:
            return max(1, min(cohort, math.ceil(self.victim_fraction * cohort)))
        return min(cohort, self.victims or 1)


# ---------------------------------------------------------------- defences


class DefenceConfig(Strict):
    """The run's defence (``simfl.defences``) and its knobs; a knob of another kind is an error.

    - ``none``: plain training, the reference arm.
    - ``latent``: learnable Gaussian noise on the latent (σ = softplus(ρ), soft-capped
      at ``sigma_max``), trained by minimax against a decoder the coordinator trains
      on server-held data; λ fixed, or adapted so client accuracy holds ``utility_target``.
    - ``dpsgd``: Opacus DP-SGD in each client's local training (Poisson sampling,
      per-sample clipping to ``max_grad_norm``, Gaussian noise), ε accounted per client.
    - ``bido``: BiDO-HSIC: ``a1``·HSIC(X, Z) − ``a2``·HSIC(Y, Z) over hidden layers added to the loss.
    """

    kind: Literal["none", "latent", "dpsgd", "bido"] = "none"
    # latent
    sigma_init: PositiveFloat | None = None
    sigma_max: PositiveFloat | None = None
    sigma_lr: PositiveFloat | None = None
    mean_shift: bool | None = None
    lam: NonNegativeFloat | None = None
    utility_target: float | None = Field(None, gt=0.0, lt=1.0)
    dual_lr: PositiveFloat | None = None
    decoder_steps: PositiveInt | None = None
    decoder_lr: PositiveFloat | None = None
    decoder_batch: PositiveInt | None = None
    adaptive_samples: PositiveInt | None = None
    # dpsgd
    noise_multiplier: NonNegativeFloat | None = None
    max_grad_norm: PositiveFloat | None = None
    delta: float | None = Field(None, gt=0.0, lt=1.0)
    accountant: Literal["rdp", "prv"] | None = None
    # bido
    a1: NonNegativeFloat | None = None
    a2: NonNegativeFloat | None = None
    kernel_sigma: PositiveFloat | None = None
    layers: Literal["latent", "all"] | None = None

    _shorthand = model_validator(mode="before")(_kind_shorthand)

    KNOBS: ClassVar[dict[str, dict[str, Any]]] = {
        "none": {},
        "latent": {"sigma_init": 0.1, "sigma_max": 2.0, "sigma_lr": 1.0, "mean_shift": False, "lam": 0.5, "utility_target": None,
                   "dual_lr": 1.0, "decoder_steps": 20, "decoder_lr": 1e-3, "decoder_batch": 64,
                   "adaptive_samples": 8},
        "dpsgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, "accountant": "rdp"},
        "bido": {"a1": 0.05, "a2": 0.5, "kernel_sigma": 5.0, "layers": "all"},
    }

    @model_validator(mode="after")
    def _knobs(self) -> DefenceConfig:
        mine = self.KNOBS[self.kind]
        extra = [k for k in type(self).model_fields if k != "kind" and k not in mine and getattr(self, k) is not None]
        if extra:
            raise ValueError(f"{', '.join(extra)} do not apply to kind: {self.kind}")
        if self.kind == "latent" and self.get("adaptive_samples") % 2 and self.get("adaptive_samples") > 1:
            raise ValueError("adaptive_samples: 1 (the expected latent) or an even number (±ε pairs)")
        if self.kind == "latent" and self.get("sigma_init") >= self.get("sigma_max"):
            raise ValueError(f"sigma_init ({self.get('sigma_init')}) must be below sigma_max ({self.get('sigma_max')})")
        if self.kind != "latent" or self.utility_target is None:
            if self.dual_lr is not None:
                raise ValueError("dual_lr only applies with utility_target (λ adapted as a dual variable)")
        return self

    def get(self, knob: str) -> Any:
        """The knob's value, with the kind's default when unset."""
        value = getattr(self, knob)
        return self.KNOBS[self.kind][knob] if value is None else value

    def knobs(self) -> dict[str, Any]:
        """Every knob of this kind, defaults filled in (what the run logs)."""
        return {k: self.get(k) for k in self.KNOBS[self.kind]}


class Scenario(Strict):
    name: str = Field("scenario", pattern=NAME_PATTERN)
    seed: int = Field(0, ge=0, lt=2**32)
    data: DataConfig = DataConfig()
    populations: list[PopulationConfig] = Field(min_length=1)
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    resources: ResourcesConfig = ResourcesConfig()
    output: OutputConfig = OutputConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    attacks: AttacksConfig | None = None
    defence: DefenceConfig = DefenceConfig()
    # Arm name -> a patch of this scenario (nested mapping, deep-merged): one run per arm,
    # same data, clients and attacks. Validated arm by arm in ``parse_scenario``.
    arms: dict[str, dict[str, Any]] | None = None

    @field_validator("arms")
    @classmethod
    def _arm_names(cls, arms: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]] | None:
        if arms is not None:
            if not arms:
                raise ValueError("arms: give at least one arm, or leave arms out")
            bad = [n for n in arms if not re.fullmatch(NAME_PATTERN, n)]
            if bad:
                raise ValueError(f"arm name {bad[0]!r} must match {NAME_PATTERN}")
        return arms

    @field_validator("populations")
    @classmethod
    def _populations(cls, populations: list[PopulationConfig]) -> list[PopulationConfig]:
        # A field validator, so that errors are reported under the `populations` key path.
        names = [p.name for p in populations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"population names must be unique; repeated: {', '.join(dupes)}")
        if "global" in names:
            raise ValueError("population name 'global' is reserved for the unshifted test split")
        if all(p.held_out for p in populations):
            raise ValueError("every population is held_out; at least one must train")
        return populations

    @model_validator(mode="after")
    def _attack_fits(self) -> Scenario:
        a = self.attacks
        if a is None:
            return self
        if a.rounds is not None and max(a.rounds) > self.training.rounds:
            raise ValueError(f"attacks.rounds: round {max(a.rounds)} is past training.rounds ({self.training.rounds})")
        if a.bn_stats == "batch" and self.model.norm != "batch":
            raise ValueError(f"attacks.bn_stats: batch needs model.norm: batch (not {self.model.norm})")
        if a.held_out_victims and not any(p.held_out for p in self.populations):
            raise ValueError(f"attacks.held_out_victims: {a.held_out_victims} held-out clients to probe, but no "
                             "population is held_out: true")
        return self

    @model_validator(mode="after")
    def _attack_replay(self) -> Scenario:
        # The update view replays the victim's local SGD; other local optimisers it cannot model.
        if self.attacks is not None and self.attacks.view == "update":
            if self.training.optimizer.kind != "sgd":
                raise ValueError("attacks.view: update replays local SGD; training.optimizer.kind is "
                                 f"{self.training.optimizer.kind}")
            if self.training.algorithm.kind == "fedprox":
                raise ValueError("attacks.view: update does not model FedProx's proximal term")
        return self

    @model_validator(mode="after")
    def _defence_fits(self) -> Scenario:
        d = self.defence
        if d.kind == "dpsgd":
            # The model factory swaps BatchNorm for GroupNorm under DP-SGD (see DPSGD.build).
            if self.attacks is not None and self.attacks.bn_stats == "batch":
                raise ValueError("attacks.bn_stats: batch needs BatchNorm, which defence: dpsgd replaces by GroupNorm")
            if self.training.algorithm.kind == "fedprox":
                raise ValueError("defence: dpsgd clips the loss gradient only; FedProx's term is not supported")
        return self

    @property
    def num_clients(self) -> int:
        return sum(p.clients for p in self.populations)

    def arm_scenarios(self) -> dict[str, Scenario]:
        """One scenario per arm (``arms`` resolved and removed); ``{name: self}`` without arms."""
        if self.arms is None:
            return {self.name: self}
        base = self.model_dump(mode="json", exclude={"arms"})
        return {
            name: Scenario.model_validate(deep_merge(deep_merge(base, {"name": f"{self.name}.{name}"}), patch))
            for name, patch in self.arms.items()
        }


# ---------------------------------------------------------------- loading


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b.c=value`` as (key path, value parsed as YAML: ``3``, ``true``, ``[1, 2]``)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise UserError(f"--set {item!r}: expected KEY.PATH=VALUE")
    try:
        return key, yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"--set {key}: value is not valid YAML ({exc.problem})") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (see :func:`parse_override`)."""
    return set_keys(raw, [parse_override(item) for item in overrides])


def set_keys(raw: dict[str, Any], items: list[tuple[str, Any]]) -> dict[str, Any]:
    """A copy of ``raw`` with each ``(a.b.c, value)`` set; list items by index (``populations.0.clients``)."""
    raw = copy.deepcopy(raw)
    for key, value in items:
        parts = key.split(".")
        node: Any = raw
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise UserError(f"--set {key}: {where} is not an index of a list of {len(node)}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    child = node.get(part)
                    if isinstance(child, str):  # shorthand such as `algorithm: fedavg`
                        child = {"kind": child}
                    elif child is not None and not isinstance(child, (dict, list)):
                        raise UserError(f"--set {key}: {where} is not a mapping")
                    node[part] = child if isinstance(child, (dict, list)) else {}
                    node = node[part]
            else:
                raise UserError(f"--set {key}: {'.'.join(parts[:depth])} is not a mapping")
    return raw


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``patch`` laid over it: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _key_path(loc: tuple) -> str:
    """The YAML key path of an error, without pydantic's union-branch labels such as ``constrained-int``."""
    keys = [str(p) for p in loc if not (isinstance(p, str) and ("-" in p or "[" in p))]
    return ".".join(keys) or "(top level)"


def format_validation_error(exc: ValidationError) -> str:
    """One line: the first failing key path, what is wrong, and the offending value."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    path = _key_path(first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required key is missing"
    elif "input" in first and not isinstance(first["input"], (dict, list)):
        msg += f" (got {first['input']!r})"
    # A union (e.g. `auto` or a number) fails once per branch: count keys, not branches.
    others = {_key_path(e["loc"]) for e in errors} - {path}
    more = f" (+{len(others)} more)" if others else ""
    return f"{path}: {msg}{more}"


def parse_scenario(raw: Any, overrides: list[str] | None = None, name: str | None = None) -> Scenario:
    if not isinstance(raw, dict):
        raise UserError("scenario: the file must hold a YAML mapping at the top level")
    raw = apply_overrides(raw, overrides or [])
    if name is not None:
        raw.setdefault("name", name)
    try:
        scenario = Scenario.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"scenario: {format_validation_error(exc)}") from None
    for arm, patch in (scenario.arms or {}).items():
        if "arms" in patch:
            raise UserError(f"scenario: arms.{arm}.arms: arms do not nest")
        try:
            Scenario.model_validate(deep_merge(scenario.model_dump(mode="json", exclude={"arms"}), patch))
        except ValidationError as exc:
            raise UserError(f"scenario: arms.{arm}.{format_validation_error(exc)}") from None
    return scenario


def load_scenario(path: str | Path, overrides: list[str] | None = None) -> Scenario:
    """Read, override and validate a scenario file; every failure is a one-line UserError."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"scenario file {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"scenario file {path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return parse_scenario(raw, overrides, name=path.stem)


def scenario_to_yaml(scenario: Scenario) -> str:
    return yaml.safe_dump(scenario.model_dump(mode="json"), sort_keys=False)
