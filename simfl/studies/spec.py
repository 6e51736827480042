"""What a study is, with no Ray and nothing run: its schema, its grid of cells, the cells it has started.

A study is a base scenario and a grid. Each axis of the grid is either a
scenario key with a list of values (``seed: [0, 1]``, ``training.local_steps:
[1, 5]``), named patches (``defence: {dp_1: {defence: {kind: dpsgd, ...}}}``),
or ``leave_one_population_out``. Every combination is a cell, with its own
validated scenario. Kept apart from the runner (:mod:`simfl.study`) so that a
report (:mod:`simfl.studies.report`) reads a study directory without importing what
runs one.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pandas as pd
import yaml
from pydantic import BaseModel, Field, PositiveInt, ValidationError, field_validator, model_validator

from simfl.core.errors import UserError
from simfl.core.validation import NAME_PATTERN, Strict, format_validation_error
from simfl.engine.scenario import Scenario, deep_merge, expand_populations, parse_scenario, set_keys
from simfl.results.analysis import cell_entry, cells_frame

LEAVE_ONE_OUT = "leave_one_population_out"
CELL_SEPARATOR = "__"
# In a cell started as a copy of its kept probe (simfl.studies.probes.seed_cell): which probe, and when.
SEEDED_FROM = "seeded_from.json"


class ComparisonConfig(Strict):
    """How defences are compared: privacy at a matched utility, the proposed defence against the best baseline."""

    target_accuracy: float = Field(0.9, gt=0.0, lt=1.0)
    # client_val: the final global model on the training clients' local validation splits
    # (the paper's "client classification accuracy"); test: the global test split.
    utility: Literal["client_val", "test"] = "client_val"
    proposed: str = "latent"
    baselines: list[str] = Field(default_factory=lambda: ["dpsgd", "bido"], min_length=1)
    # The baseline paired differences are taken against, fixed before looking; unset: the rule in
    # simfl.studies.matched (lowest worst-case attacker accuracy among the baselines reaching the target).
    best_baseline: str | None = None


class KnobRange(Strict):
    """A study's own bracket for a searched defence's knob (default: what the defence declares)."""

    low: float | None = None
    high: float | None = None


class SearchConfig(Strict):
    """Defences compared at the target utility found by search (:mod:`simfl.studies.search`), not along a grid.

    ``levels`` join the grid axis ``axis`` like its named levels (``{name: patch}``),
    each expanded over the grid's other axes (seeds, contexts). Per cell, the
    defence's declared monotone knob is searched until the utility is within
    ``tolerance`` of ``comparison.target_accuracy``, in probe runs that record
    their attack jobs instead of attacking (under ``<study>/search``); then the
    cell at the found setting is its kept probe resumed with attacks, which
    attack the recorded jobs (no second training). ``tune``: per level, key paths and values tried
    jointly (e.g. DP-SGD's clipping norm and learning rate), each combination
    searched on the first seed; the combination that reaches the target at the
    most private knob value is used for every seed.
    """

    axis: str = "defence"
    levels: dict[str, dict[str, Any]] = Field(min_length=1)
    knobs: dict[str, KnobRange] = Field(default_factory=dict)
    tune: dict[str, dict[str, list[Any]]] = Field(default_factory=dict)
    budget: PositiveInt = Field(6, ge=2, description="probe runs per search (cell, tuned combination)")
    tolerance: float = Field(0.01, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _known_levels(self) -> SearchConfig:
        for section in ("knobs", "tune"):
            unknown = sorted(set(getattr(self, section)) - set(self.levels))
            if unknown:
                raise ValueError(f"{section}: {unknown[0]!r} is not one of search.levels ({', '.join(self.levels)})")
        for level in self.levels:
            if not re.fullmatch(NAME_PATTERN, level):
                raise ValueError(f"levels: level name {level!r} must match {NAME_PATTERN}")
        for level, keys in self.tune.items():
            for key, values in keys.items():
                if not values:
                    raise ValueError(f"tune.{level}.{key}: give at least one value")
        return self


class StudyOutput(Strict):
    """Where a new study directory goes: ``dir/<name or study name>-<time>``."""

    dir: str = "runs"
    name: str | None = Field(None, pattern=NAME_PATTERN)


class StudyConfig(Strict):
    """A study file: a base scenario, keys set in every cell, the grid, and how defences are compared."""

    name: str = Field("study", pattern=NAME_PATTERN)
    base: str | None = None  # scenario file, relative to the study file
    scenario: dict[str, Any] | None = None  # or the scenario inline
    # Patch files (KEY.PATH: value mappings, e.g. simfl.calibrate's calibrated.yaml), relative to the study
    # file, laid over the base in order before ``set`` (so the study's own set wins).
    include: list[str] = Field(default_factory=list)
    set: dict[str, Any] = Field(default_factory=dict)  # KEY.PATH: value, laid over the base
    grid: dict[str, list[Any] | dict[str, dict[str, Any]] | Literal["leave_one_population_out"]] = Field(min_length=1)
    search: SearchConfig | None = None
    comparison: ComparisonConfig = ComparisonConfig()
    # Cells running at once; auto: as many as the cluster's CPUs and GPUs hold.
    concurrency: PositiveInt | Literal["auto"] = "auto"
    output: StudyOutput = StudyOutput()

    @model_validator(mode="after")
    def _one_base(self) -> StudyConfig:
        if (self.base is None) == (self.scenario is None):
            raise ValueError("give base (a scenario file) or scenario (inline), not both or neither")
        return self

    @field_validator("grid")
    @classmethod
    def _axes(cls, grid: dict) -> dict:
        for axis, levels in grid.items():
            if not levels:
                raise ValueError(f"{axis}: an axis needs at least one value")
            if isinstance(levels, dict):
                bad = [n for n in levels if not re.fullmatch(NAME_PATTERN, n)]
                if bad:
                    raise ValueError(f"{axis}: level name {bad[0]!r} must match {NAME_PATTERN}")
        return grid


class Cell:
    """One combination of the grid's levels: its name, its label on each axis, and its scenario.

    ``searched``: the search level whose knob is still to be found (its scenario holds the
    defence's defaults until then), or None for a plain grid cell.
    """

    def __init__(self, labels: dict[str, str], scenario: Scenario, searched: str | None = None) -> None:
        self.labels = labels
        self.scenario = scenario
        self.searched = searched
        self.name = CELL_SEPARATOR.join(labels.values())


def load_study(path: str | Path) -> tuple[StudyConfig, dict[str, Any]]:
    """The validated study and its base scenario as a raw mapping (its file read relative to the study)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UserError(f"study file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"study file {path}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"study file {path}: the file must hold a YAML mapping at the top level")
    raw.setdefault("name", path.stem)
    try:
        study = StudyConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"study: {format_validation_error(exc)}") from None
    if study.base is not None:
        base_path = (path.parent / study.base) if not Path(study.base).is_absolute() else Path(study.base)
        base = _yaml_mapping(base_path, "study: base", "scenario file", "a YAML mapping at the top level")
    else:
        assert study.scenario is not None  # StudyConfig requires base or scenario
        base = dict(study.scenario)
    if study.include:
        # Laid into the base here, so a study saved with its base inlined needs no file outside its directory.
        for entry in study.include:
            base = include_patch(base, path.parent, entry)
        study = study.model_copy(update={"include": []})
    return study, base


def _yaml_mapping(path: Path, where: str, noun: str, shape: str) -> dict[str, Any]:
    """A YAML file holding a mapping; a missing file, bad YAML or another shape is one line starting ``where``."""
    if not path.is_file():
        raise UserError(f"{where}: no {noun} at {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{where}: {path} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: {path} must hold {shape}")
    return data


def read_patch(path: Path, where: str) -> dict[str, Any]:
    """A patch file: a YAML mapping of ``KEY.PATH: value`` (the format of a study's ``set:``)."""
    patch = _yaml_mapping(path, where, "patch file", "a mapping of KEY.PATH: value")
    for key in patch:
        if not isinstance(key, str) or not all(key.split(".")):
            raise UserError(f"{where}: {key!r} is not a KEY.PATH (dotted scenario keys, e.g. training.local_epochs)")
        unknown = unknown_key(key)
        if unknown is not None:
            raise UserError(f"{where}: {key}: {unknown} is not a scenario key")
    return patch


def include_patch(base: dict[str, Any], folder: Path, entry: str) -> dict[str, Any]:
    """``base`` with the patch file ``entry`` (relative to ``folder``) laid over it; errors name the file and key."""
    where = f"study: include: {entry}"
    path = Path(entry) if Path(entry).is_absolute() else folder / entry
    patch = read_patch(path, where)
    try:
        return set_keys(base, list(patch.items()))
    except UserError as exc:
        raise UserError(f"{where}: {str(exc).removeprefix('--set ')}") from None


def unknown_key(key: str) -> str | None:
    """The first part of a key path that names no scenario field, or None.

    Checked down through the scenario's sections; a plugin's knobs (under ``defence``
    or an attack) and list items are left to the validation of each cell.
    """
    model: type[BaseModel] = Scenario
    parts = key.split(".")
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return ".".join(parts[: depth + 1])
        ann = field.annotation
        options = [a for a in (get_args(ann) if get_origin(ann) is not None else (ann,))
                   if isinstance(a, type) and a is not type(None)]
        if len(options) != 1 or not issubclass(options[0], BaseModel) or get_origin(ann) is list:
            return None
        model = options[0]
    return None


def _label(key: str, value: Any) -> str:
    """A directory-safe label for a key path's value: ``seed-0``, ``local_steps-5``, ``alpha-0.3``."""
    text = value if isinstance(value, str) else json.dumps(value)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{key.split('.')[-1]}-{text}").strip("_")


def _levels(axis: str, spec: Any, base: dict[str, Any]) -> list[tuple[str, dict[str, Any] | list[tuple[str, Any]]]]:
    """(label, how) per level: a patch mapping, or (key path, value) pairs to set."""
    if spec == LEAVE_ONE_OUT:
        pops = base.get("populations") or []
        if len(pops) < 2:
            raise UserError(f"study: grid.{axis}: leave_one_population_out needs at least two populations")
        # Only the held_out flags: other axes may change the populations too.
        return [(f"out-{p['name']}", [(f"populations.{i}.held_out", i == k) for i in range(len(pops))])
                for k, p in enumerate(pops)]
    if isinstance(spec, dict):
        return list(spec.items())
    return [(_label(axis, v), [(axis, v)]) for v in spec]


def expand(study: StudyConfig, base: dict[str, Any]) -> list[Cell]:
    """Every cell of the grid, each scenario validated; an error names the axis and level."""
    try:
        base = set_keys(base, list(study.set.items()))
    except UserError as exc:
        raise UserError(f"study: set: {exc}") from None
    base = expand_populations(base)  # leave_one_population_out and populations.N keys need them listed
    grid = dict(study.grid)
    if base.get("arms"):  # a base with arms sweeps them as the first axis
        grid = {"arm": base.pop("arms"), **grid}
    base.pop("arms", None)
    searched: set[str] = set()
    if study.search is not None:
        axis = study.search.axis
        if axis not in grid:  # the searched levels make the first axis, as arms do
            grid = {axis: {}, **grid}
        elif not isinstance(grid[axis], dict):
            raise UserError(f"study: search.axis: grid.{axis} must have named levels (patches) for searched "
                            "levels to join it")
        clash = sorted(set(grid[axis]) & set(study.search.levels))
        if clash:
            raise UserError(f"study: search.levels.{clash[0]}: also a level of grid.{axis}")
        grid[axis] = {**grid[axis], **study.search.levels}  # type: ignore[dict-item]
        searched = set(study.search.levels)
    axes = {axis: _levels(axis, spec, base) for axis, spec in grid.items()}
    cells = []
    for combo in itertools.product(*axes.values()):
        raw = base
        for (label, how), axis in zip(combo, axes):
            try:
                raw = set_keys(raw, how) if isinstance(how, list) else deep_merge(raw, how)
            except UserError as exc:
                raise UserError(f"study: grid.{axis}.{label}: {exc}") from None
        labels = {axis: label for (label, _), axis in zip(combo, axes)}
        name = CELL_SEPARATOR.join(labels.values())
        raw = {**raw, "name": f"{study.name}.{name}"}
        try:
            scenario = parse_scenario(raw)
        except UserError as exc:
            where = ", ".join(f"grid.{a}.{lab}" for a, lab in labels.items())
            raise UserError(f"study: cell {name} ({where}): {exc}") from None
        if scenario.arms is not None:
            raise UserError(f"study: cell {name}: arms do not nest in a study grid")
        if study.comparison.utility == "client_val" and scenario.evaluation.local_val_fraction == 0:
            raise UserError(f"study: comparison.utility: client_val needs evaluation.local_val_fraction > 0 "
                            f"(cell {name}); or use utility: test")
        level = labels.get(study.search.axis) if study.search is not None else None
        cells.append(Cell(labels, scenario, level if level in searched else None))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise UserError("study: grid: two cells get the same name; give the levels distinct names")
    return cells


def study_cells(study_dir: Path) -> pd.DataFrame:
    """The cells table of a study directory: every cell that has started, with its axes' labels and status."""
    study, base = load_study(Path(study_dir) / "study.yaml")
    entries = [cell_entry(c.name, Path(study_dir) / "cells" / c.name, c.labels)
               for c in expand(study, base) if (Path(study_dir) / "cells" / c.name / "scenario.yaml").is_file()]
    if not entries:
        raise UserError(f"{study_dir}: no cell of this study has started yet")
    return cells_frame(entries)


def search_outcomes(study_dir: Path) -> pd.DataFrame:
    """Per searched cell (``search.parquet``): level, status, knob, value and probe utility at its setting.

    ``status``: matched, nearest (budget spent), at_bracket_end (the target held at the
    most private end), unreachable (missed even at the least private end: excluded) or
    failed. ``probes``: runs the cell's searches took, tuning included.
    """
    columns = ["cell", "level", "status", "knob", "value", "utility", "target", "tuned", "probes"]
    path = Path(study_dir) / "search.parquet"
    if not path.is_file():
        return pd.DataFrame(columns=columns)
    table = pd.read_parquet(path)
    rows = []
    for cell, g in table.groupby("cell", sort=False):
        used = g[g["used"]]
        pick = used[used["chosen"]]
        # No combination used: the cell tuned, and none of its combinations reached the target.
        first = used.iloc[0] if len(used) else g.iloc[0]
        status = first["status"] if len(used) else "unreachable"
        rows.append({"cell": cell, "level": first["level"], "status": status, "knob": first["knob"],
                     "value": float(pick["value"].iloc[0]) if len(pick) else float("nan"),
                     "utility": float(pick["utility"].iloc[0]) if len(pick) else float("nan"),
                     "target": float(first["target"]), "tuned": first["tuned"], "probes": int((g["probe"] >= 0).sum())})
    return pd.DataFrame(rows, columns=columns)
