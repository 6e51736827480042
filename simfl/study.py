"""``python -m simfl.study STUDY.yaml``: a grid of runs (cells) over scenario keys, one report.

A study is a base scenario and a grid. Each axis of the grid is either a
scenario key with a list of values (``seed: [0, 1]``, ``training.local_steps:
[1, 5]``), named patches (``defence: {dp_1: {defence: {kind: dpsgd, ...}}}``),
or ``leave_one_population_out``. Every combination is a cell: a complete run
directory under ``<study>/cells/<cell>``. Cells run concurrently on one Ray
instance or cluster as far as its CPUs and GPUs allow; a killed study given
``--resume`` skips finished cells and resumes checkpointed ones. At the end,
all cells' metrics go to one tidy Parquet (``metrics.parquet``) and the report
is written (``report.md``, figures/).

Everything is validated, every cell's data loaded and its actors planned before
the study directory exists, so a typo in cell 37 costs nothing.
"""

from __future__ import annotations

import argparse
import itertools
import os
import json
import re
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml
from pydantic import Field, PositiveInt, ValidationError, field_validator, model_validator

from simfl.errors import UserError
from simfl.scenario import Scenario, deep_merge, parse_override, parse_scenario, set_keys
from simfl.validation import NAME_PATTERN, Strict, format_validation_error
from simfl.run import EXIT_USER_ERROR, Prepared, add_ray_arguments, connect_ray, fresh_dir, prepare_under, run_in

LEAVE_ONE_OUT = "leave_one_population_out"
CELL_SEPARATOR = "__"


class ComparisonConfig(Strict):
    """How defences are compared: privacy at a matched utility, the proposed defence against the best baseline."""

    target_accuracy: float = Field(0.9, gt=0.0, lt=1.0)
    # client_val: the final global model on the training clients' local validation splits
    # (the paper's "client classification accuracy"); test: the global test split.
    utility: Literal["client_val", "test"] = "client_val"
    proposed: str = "latent"
    baselines: list[str] = Field(default_factory=lambda: ["dpsgd", "bido"], min_length=1)


class StudyOutput(Strict):
    dir: str = "runs"
    name: str | None = Field(None, pattern=NAME_PATTERN)


class StudyConfig(Strict):
    name: str = Field("study", pattern=NAME_PATTERN)
    base: str | None = None  # scenario file, relative to the study file
    scenario: dict[str, Any] | None = None  # or the scenario inline
    set: dict[str, Any] = Field(default_factory=dict)  # KEY.PATH: value, laid over the base
    grid: dict[str, list[Any] | dict[str, dict[str, Any]] | Literal["leave_one_population_out"]] = Field(min_length=1)
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
    """One combination of the grid's levels: its name, its label on each axis, and its scenario."""

    def __init__(self, labels: dict[str, str], scenario: Scenario) -> None:
        self.labels = labels
        self.scenario = scenario
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
        if not base_path.is_file():
            raise UserError(f"study: base: no scenario file at {base_path}")
        try:
            base = yaml.safe_load(base_path.read_text())
        except yaml.YAMLError as exc:
            raise UserError(f"study: base: {base_path} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(base, dict):
            raise UserError(f"study: base: {base_path} must hold a YAML mapping at the top level")
    else:
        base = dict(study.scenario)
    return study, base


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
    grid = dict(study.grid)
    if base.get("arms"):  # a base with arms sweeps them as the first axis
        grid = {"arm": base.pop("arms"), **grid}
    base.pop("arms", None)
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
        cells.append(Cell(labels, scenario))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise UserError("study: grid: two cells get the same name; give the levels distinct names")
    return cells


def study_cells(study_dir: Path) -> pd.DataFrame:
    """The cells table of a study directory: every cell that has started, with its axes' labels and status."""
    from simfl.analysis import cell_entry, cells_frame

    study, base = load_study(Path(study_dir) / "study.yaml")
    entries = [cell_entry(c.name, Path(study_dir) / "cells" / c.name, c.labels)
               for c in expand(study, base) if (Path(study_dir) / "cells" / c.name / "scenario.yaml").is_file()]
    if not entries:
        raise UserError(f"{study_dir}: no cell of this study has started yet")
    return cells_frame(entries)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m simfl.study", description=__doc__.splitlines()[0])
    p.add_argument("study", nargs="?", help="study YAML file (omit with --resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a key of the base scenario in every cell, e.g. --set data.name=synthetic")
    p.add_argument("--out", metavar="STUDY_DIR", help="the study directory to create (default: output.dir/<name>-<time>)")
    p.add_argument("--resume", metavar="STUDY_DIR", help="continue a killed study: finished cells are skipped")
    add_ray_arguments(p)
    p.add_argument("--no-report", action="store_true", help="do not write report.md at the end")
    p.add_argument("--quiet", action="store_true", help="no per-cell progress lines")
    return p


def cell_demand(prep: Prepared, n_actors: int) -> tuple[float, float]:
    """CPUs and GPUs a cell's actors hold while it runs."""
    sc = prep.scenario
    cpus = n_actors * sc.resources.cpus_per_actor + sc.resources.coordinator_cpus
    gpus = n_actors * sc.resources.gpus_per_actor
    if sc.attacks is not None:
        cpus += sc.attacks.pool.actors * sc.attacks.pool.cpus_per_actor
        gpus += sc.attacks.pool.actors * sc.attacks.pool.gpus_per_actor
    return cpus, gpus


def run_cells(args: argparse.Namespace, quiet: argparse.Namespace, cells_dir: Path,
              prepared: dict[str, tuple[Prepared, int]], concurrency: int | Literal["auto"]) -> dict[str, str]:
    """Run every cell, packing as many at once as the cluster holds; returns each cell's status.

    A cell is started when its actors' CPUs and GPUs fit beside the running
    cells' (one always runs, however large), so no cell's actors sit waiting
    for another cell's resources. A cell that fails is reported and the others
    go on.
    """
    import ray

    totals = ray.cluster_resources()
    cpus, gpus = totals.get("CPU", 0.0), totals.get("GPU", 0.0)
    limit = len(prepared) if concurrency == "auto" else concurrency
    queue = list(prepared)
    status: dict[str, str] = {}
    running: dict[Future, tuple[str, float, float, float]] = {}
    lock = threading.Lock()
    started_at = time.monotonic()

    def fits(name: str) -> bool:
        need_c, need_g = cell_demand(*prepared[name])
        used_c = sum(c for _, c, _, _ in running.values())
        used_g = sum(g for _, _, g, _ in running.values())
        return not running or (used_c + need_c <= cpus + 1e-9 and used_g + need_g <= gpus + 1e-9)

    def say(text: str) -> None:
        if not args.quiet:
            with lock:
                print(f"simfl study [{time.monotonic() - started_at:6.0f} s] {text}", file=sys.stderr, flush=True)

    def loop() -> None:
        while queue or running:
            while len(running) < limit and (name := next((n for n in queue if fits(n)), None)):
                queue.remove(name)
                prep, n_actors = prepared[name]
                need_c, need_g = cell_demand(prep, n_actors)
                say(f"cell {name}: started ({n_actors} client actors)")
                future = pool.submit(run_in, quiet, cells_dir / name, prep, n_actors)
                running[future] = (name, need_c, need_g, time.monotonic())
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                name, _, _, t0 = running.pop(future)
                try:
                    out = future.result()
                except Exception as exc:  # a bug or a lost cluster in one cell: the others go on
                    status[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    say(f"cell {name}: FAILED ({status[name]})")
                    continue
                if out is None:
                    status[name] = "skipped (finished before)"
                    say(f"cell {name}: finished before, skipped")
                else:
                    status[name] = "finished"
                    acc = out[1].get("test_accuracy")
                    say(f"cell {name}: finished in {time.monotonic() - t0:.0f} s"
                        + (f", test accuracy {acc:.3f}" if acc is not None else ""))

    with ThreadPoolExecutor(max_workers=limit) as pool:
        try:
            loop()
        except KeyboardInterrupt:  # the pool would wait for every running cell: leave now, resumable
            print(f"\nsimfl: study interrupted; finished cells are kept. Continue with "
                  f"--resume {cells_dir.parent}", file=sys.stderr)
            ray.shutdown()
            os._exit(130)
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.resume:
            if args.study or args.overrides or args.out:
                raise UserError("--resume: a resumed study uses its saved study.yaml; drop the study file, --set and --out")
            study_dir = Path(args.resume)
            if not (study_dir / "study.yaml").is_file():
                raise UserError(f"--resume {study_dir}: not a study directory (no study.yaml)")
            study, base = load_study(study_dir / "study.yaml")
        elif args.study:
            study, base = load_study(args.study)
            study = study.model_copy(update={"set": {**study.set, **dict(map(parse_override, args.overrides))}})
            study_dir = None
        else:
            raise UserError("give a study file, or --resume STUDY_DIR")
        cells = expand(study, base)
        if study_dir is None:
            study_dir = Path(args.out) if args.out else fresh_dir(study.output.dir, study.output.name, study.name)
            if study_dir.exists():
                raise UserError(f"--out {study_dir}: exists already (use --resume to continue a study)")
        cells_dir = study_dir / "cells"
        if not args.quiet:
            print(f"simfl study: {study.name}: {len(cells)} cells over {', '.join(study.grid)}; "
                  "loading data and planning actors", file=sys.stderr)
        connect_ray(args)
        quiet = argparse.Namespace(**{**vars(args), "quiet": True})  # one line per cell, not one per step
        prepared = prepare_under(quiet, cells_dir, {c.name: c.scenario for c in cells})
        fresh = not study_dir.exists()
        if fresh:
            _write_header(study_dir, study, base)
    except UserError as exc:
        print(f"simfl: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    status = run_cells(args, quiet, cells_dir, prepared, study.concurrency)
    failed = sorted(n for n, s in status.items() if s.startswith("failed"))
    summarised = True
    try:
        _summarise(study_dir, args.no_report)
    except UserError as exc:  # e.g. no cell finished: nothing to tabulate or report
        print(f"simfl: error: {exc}", file=sys.stderr)
        summarised = False
    print(f"simfl: study {study.name}: {len(cells) - len(failed)} of {len(cells)} cells done; results in {study_dir}")
    if failed:
        print(f"simfl: {len(failed)} cells failed: {', '.join(failed)} (re-run with --resume {study_dir})",
              file=sys.stderr)
    return 0 if summarised and not failed else 1


def _summarise(study_dir: Path, no_report: bool) -> None:
    """The study's tables, then its report, whose headline table is printed as arms print theirs."""
    from simfl.analysis import write_study_tables
    from simfl.report import write_report

    write_study_tables(study_dir, study_cells(study_dir))
    if no_report:
        return
    report = write_report(study_dir)
    text = report.read_text()
    if "## Matched-utility comparison (" in text:
        print(text.split("## Matched-utility comparison")[1].split("\n## ")[0].split("\n\n", 2)[-1].strip())
    print(f"simfl study: report: {report}", file=sys.stderr)


def _write_header(study_dir: Path, study: StudyConfig, base: dict[str, Any]) -> None:
    """The study as resolved (base inlined), so ``--resume`` needs nothing outside the directory."""
    try:
        study_dir.mkdir(parents=True)
    except OSError as exc:
        raise UserError(f"output.dir: cannot create {study_dir} ({exc.strerror})") from None
    saved = study.model_dump(mode="json")
    saved.update(base=None, scenario=base)
    (study_dir / "study.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))


if __name__ == "__main__":
    sys.exit(main())
