"""The scenario: every section, the plugin-chosen ``defence`` and ``attacks``, arms, and loading.

Strict and validated once (before a run directory or a Ray actor exists), then
passed around as plain frozen models. The ``defence`` and each
``attacks.methods`` entry are unions of the registered plugins' own configs
(``simfl.core.plugins``), so this module lists no plugin's knobs. Every failure is
one line naming its key path (``simfl.core.validation``).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import yaml
from pydantic import (
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from simfl.core.config import (
    AttackPoolConfig,
    CheckpointConfig,
    EvaluationConfig,
    ModelConfig,
    OutputConfig,
    PopulationConfig,
    ResourcesConfig,
    TrainingConfig,
)
from simfl.core.errors import UserError
from simfl.core.plugins import PluginConfig
from simfl.core.validation import NAME_PATTERN, Strict, format_validation_error
from simfl.data import DataConfig, site_names
from simfl.data.sites import expand_from_sites
from simfl.privacy.attacks import ATTACKS, AttackConfig
from simfl.privacy.defences import DEFENCES, NoDefenceConfig

if TYPE_CHECKING:  # for type checkers, the registered configs' bases; at run time, their discriminated unions
    AttackMethod = AttackConfig
    DefenceChoice = PluginConfig
else:
    AttackMethod = ATTACKS.config_type()
    DefenceChoice = DEFENCES.config_type()

# ---------------------------------------------------------------- attacks


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

    methods: list[AttackMethod] = Field(
        default_factory=lambda: [cast(AttackConfig, ATTACKS.configs["ig"].model_validate({}))], min_length=1,
        description="the attacks, each a kind or `{kind: ..., options}`, each kind at most once; see the attack "
                    "kinds below")
    view: Literal["gradient", "update"] = Field(
        "gradient", description="what the attacker observes. `gradient`: the gradient of one batch of `batch_size` "
        "of the victim's images (drawn from (seed, client, round)) at the global weights, as shared in FedSGD. "
        "`update`: the victim's real FedAvg update of the round, its lr, momentum, weight decay, batch size and "
        "step count known (local SGD only, not FedProx)")
    batch_size: PositiveInt = Field(1, description="images in the observed gradient (view: gradient only)")
    labels: Literal["known", "recovered"] = Field(
        "recovered", description="`known`: the attacker is given the labels; `recovered`: iDLG (batch of 1) or "
                                 "bias-gradient counting (larger batches)")
    bn_stats: Literal["running", "batch"] = Field(
        "running", description="BatchNorm models. `running`: the attacker runs the model in eval mode with the "
        "running statistics in the shared weights. `batch`: it is also told the victim's batch statistics and "
        "normalises with them (view: gradient, model.norm: batch). The number of samples is always known")
    victims: PositiveInt | None = Field(
        None, description="clients attacked per attacked round, drawn from (seed, round) among the cohort "
                          "(unset, without victim_fraction: 1); at most the cohort size")
    victim_fraction: float | None = Field(
        None, gt=0.0, le=1.0, description="victims as a share of the cohort, rounded up (instead of victims)")
    rounds: list[PositiveInt] | None = Field(
        None, description="the attacked rounds (instead of every), each at most training.rounds")
    every: PositiveInt = Field(1, description="attack every k-th round")
    held_out_victims: NonNegativeInt = Field(
        0, description="held-out clients probed per attacked round, drawn from (seed, round); needs a population "
        "with held_out: true. Each is attacked like a victim (naive and adaptive; its `attacks` rows carry its "
        "population) on exactly what it would share had it joined the round: the gradient view at the round's "
        "weights, or its real local update, under the round's defence. It is never aggregated, gets no `clients` "
        "row and its state (participation, DP accountant) is left unchanged, so training is bit-identical to a run "
        "without probes. Counted in `rounds.attack_victims`; the generalization gap in attack metrics is measured "
        "on these")
    victims_per_job: PositiveInt = Field(16, description="victims stacked into one batched attack job")
    record: bool = Field(
        False, description="save each attack job (the victims' shares and private originals, the round's defence "
        "broadcast) under `attack_jobs/` instead of attacking it; training is bit-identical. Resumed with "
        "`record: false` (its `scenario.yaml` changed), the finished run attacks every recorded job without "
        "training again, as a study does with the probe its search keeps")
    pool: AttackPoolConfig = Field(
        AttackPoolConfig(), description="the attacker actors, and what happens when they fall behind training")

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
        """Whether round ``round_`` is attacked (listed in ``rounds``, else every ``every``-th)."""
        return round_ in self.rounds if self.rounds is not None else round_ % self.every == 0

    def victim_count(self, cohort: int) -> int:
        """Victims per attacked round: ``victim_fraction`` of the cohort (at least one), else ``victims``."""
        if self.victim_fraction is not None:
            return max(1, min(cohort, math.ceil(self.victim_fraction * cohort)))
        return min(cohort, self.victims or 1)


# ---------------------------------------------------------------- the scenario


class Scenario(Strict):
    """A whole scenario; `scripts/scenario_reference.py` makes the docs' reference from its fields."""

    name: str = Field("scenario", pattern=NAME_PATTERN, description="run name prefix (letters, digits, `_.-`); "
                      "a scenario file's defaults to its file name")
    seed: int = Field(0, ge=0, lt=2**32, description="the seed of everything (0 to 2³² − 1)")
    data: DataConfig = Field(DataConfig(), description="the dataset, where its files live, and its image size")
    populations: list[PopulationConfig] = Field(
        min_length=1, description="groups of clients (sites), each with its label skew, sizes and acquisition "
        "shift; at least one, and at least one that trains. Or, for data with sites, `{from_sites: true, "
        "held_out: [site, ...], <population keys>}`: one population per site, named after it, each with those "
        "keys (`clients` per site, `label_skew`, `quantity`, `shift`)")
    model: ModelConfig = Field(ModelConfig(), description="the shared model: encoder → latent → linear head")
    training: TrainingConfig = Field(TrainingConfig(), description="rounds, cohorts, local training and the FL "
                                     "algorithm")
    evaluation: EvaluationConfig = Field(EvaluationConfig(), description="when the global model is evaluated, and "
                                         "on which clients' data")
    resources: ResourcesConfig = Field(ResourcesConfig(), description="Ray resources of the client actors and the "
                                       "coordinator")
    output: OutputConfig = Field(OutputConfig(), description="where the run directory goes")
    checkpoint: CheckpointConfig = Field(CheckpointConfig(), description="checkpoints, from which `--resume` "
                                         "continues a killed run")
    attacks: AttacksConfig | None = Field(None, description="gradient-inversion attacks run beside training; "
                                          "omit it for none")
    defence: DefenceChoice = Field(
        default_factory=NoDefenceConfig, description="the defence: a kind, or `{kind: ..., knobs}`; see the defence "
                                                     "kinds below")
    # Validated arm by arm in ``parse_scenario``.
    arms: dict[str, dict[str, Any]] | None = Field(
        None, description="`{arm name: patch}`: one run per arm, each this scenario with the patch deep-merged "
        "(mappings merge key by key, anything else replaces), e.g. `{dp: {defence: {kind: dpsgd, noise_multiplier: "
        "0.5}}}`; same data, clients and attacks. Every arm is validated before anything runs; errors name "
        "`arms.<arm>.<key>`")

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
        cohort = self.training.cohort_size(sum(p.clients for p in self.populations if not p.held_out))
        if a.victims is not None and a.victims > cohort:
            raise ValueError(f"attacks.victims: {a.victims} victims per round, but a round's cohort has only {cohort} "
                             "clients (training.clients_per_round or fraction); victims come from the cohort")
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
    def _plugins_fit(self) -> Scenario:
        # Each plugin checks itself against the rest of the scenario (e.g. DP-SGD and BatchNorm statistics).
        self.defence.check(self)
        for method in self.attacks.methods if self.attacks is not None else []:
            method.check(self)
        return self

    @property
    def live_attacks(self) -> AttacksConfig | None:
        """The attacks, where attacker actors run them beside training (not recorded for later: ``record``)."""
        return self.attacks if self.attacks is not None and not self.attacks.record else None

    def demand(self, client_actors: int) -> tuple[float, float]:
        """CPUs and GPUs a run's actors hold: ``client_actors`` client actors, the coordinator, live attackers."""
        res = self.resources
        cpus = client_actors * res.cpus_per_actor + res.coordinator_cpus
        gpus = client_actors * res.gpus_per_actor
        if (attacks := self.live_attacks) is not None:
            cpus += attacks.pool.actors * attacks.pool.cpus_per_actor
            gpus += attacks.pool.actors * attacks.pool.gpus_per_actor
        return cpus, gpus

    @property
    def num_clients(self) -> int:
        """Clients over all populations."""
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
        raise UserError(f"--set {key}: value is not valid YAML ({getattr(exc, 'problem', None) or exc})") from None


# Overrides as the command line gives them (``--set`` strings) or as Python does (``{"training.rounds": 3}``).
Overrides = str | Sequence[str] | Mapping[str, Any]


def override_items(overrides: Overrides | None) -> list[tuple[str, Any]]:
    """``(key path, value)`` pairs from ``--set`` strings (values parsed as YAML) or a key-path mapping."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    return [parse_override(item) for item in ([overrides] if isinstance(overrides, str) else overrides)]


def apply_overrides(raw: dict[str, Any], overrides: Overrides | None) -> dict[str, Any]:
    """Apply overrides to a raw scenario mapping (see :func:`override_items`)."""
    return set_keys(raw, override_items(overrides))


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


def parse_scenario(raw: Any, overrides: Overrides | None = None, name: str | None = None) -> Scenario:
    """Validate a scenario mapping after the overrides; ``name`` is the default name.

    Raises :class:`~simfl.core.errors.UserError` with one line naming the key to fix.
    """
    if not isinstance(raw, dict):
        raise UserError("scenario: the file must hold a YAML mapping at the top level")
    raw = apply_overrides(raw, overrides)
    if name is not None:
        raw.setdefault("name", name)
    try:
        raw = expand_populations(raw)
    except UserError as exc:
        raise UserError(f"scenario: {str(exc).removeprefix('scenario: ')}") from None
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


def expand_populations(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw scenario with ``populations: {from_sites: ...}`` written out as one population per site of its data.

    Done before validation (the sites come from the data: a manifest's site column, camelyon17's hospitals),
    so that the saved scenario lists every population.
    """
    if not isinstance(raw.get("populations"), dict):
        return raw
    try:
        cfg = DataConfig.model_validate(raw.get("data", {}))
    except ValidationError as exc:
        raise UserError(f"scenario: data.{format_validation_error(exc)}") from None
    return {**raw, "populations": expand_from_sites(raw["populations"], site_names(cfg))}


def load_scenario(path: str | Path, overrides: Overrides | None = None) -> Scenario:
    """Read, override and validate a scenario file; every failure is a one-line UserError."""
    return parse_scenario(read_scenario_file(path), overrides, name=Path(path).stem)


def read_scenario_file(path: str | Path) -> Any:
    """A scenario file's YAML as it stands (validated by :func:`parse_scenario`); one-line UserError if unreadable."""
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
        problem = getattr(exc, "problem", None) or exc
        raise UserError(f"scenario file {path}{where}: not valid YAML ({problem})") from None
    return raw


def scenario_to_yaml(scenario: Scenario) -> str:
    """The scenario as YAML with every key, defaults included, in declaration order."""
    return yaml.safe_dump(scenario.model_dump(mode="json"), sort_keys=False)
