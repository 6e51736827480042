"""``python -m simfl.study STUDY.yaml``: a grid of runs (cells) over scenario keys, one report.

The study itself (its schema, grid and cells) is :mod:`simfl.studies.spec`; this
module runs it. Every cell is a complete run directory under
``<study>/cells/<cell>``. Cells run concurrently on one Ray instance or
cluster as far as its CPUs and GPUs allow; a killed study given ``--resume``
skips finished cells and resumes checkpointed ones. At the end, all cells'
metrics go to one tidy Parquet (``metrics.parquet``) and the report is written
(``report.md``, figures/).

Everything is validated, every cell's data loaded and its actors planned before
the study directory exists, so a typo in cell 37 costs nothing. From Python:
:func:`run_study`, which returns the study directory opened (:class:`~simfl.studies.study_dir.Study`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from simfl.core.checkpoint import latest_round
from simfl.core.errors import UserError
from simfl.engine.scenario import Overrides, override_items
from simfl.results.analysis import write_study_tables
from simfl.simulation.runner import (
    EXIT_USER_ERROR,
    Prepared,
    RayOptions,
    add_ray_arguments,
    connect_ray,
    fresh_dir,
    prepare_under,
    ray_options,
)
from simfl.studies.cell_pool import run_cells
from simfl.studies.probes import Found, drop_recorded, plan_searches, run_searches, seed_cell
from simfl.studies.report import headline, write_report
from simfl.studies.spec import StudyConfig, expand, load_study, study_cells
from simfl.studies.study_dir import Study


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m simfl.study``."""
    p = argparse.ArgumentParser(prog="python -m simfl.study", description=__doc__.splitlines()[0])
    p.add_argument("study", nargs="?", help="study YAML file (omit with --resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a key of the base scenario in every cell, e.g. --set data.name=synthetic")
    p.add_argument("--out", metavar="STUDY_DIR",
                   help="the study directory to create (default: output.dir/<name>-<time>)")
    p.add_argument("--resume", metavar="STUDY_DIR", help="continue a killed study: finished cells are skipped")
    add_ray_arguments(p)
    p.add_argument("--no-report", action="store_true", help="do not write report.md at the end")
    p.add_argument("--quiet", action="store_true", help="no per-cell progress lines")
    return p


def run_study(study: str | Path | None = None, overrides: Overrides | None = None, *,
              out: str | Path | None = None, resume: str | Path | None = None,
              address: str | None = None, num_cpus: int | None = None, dashboard: bool = False,
              report: bool = True, quiet: bool = True) -> Study:
    """Run a study file's grid of cells (searches first, if it has them) and open the study directory.

    ``overrides``: keys of the base scenario set in every cell, as ``--set`` strings or a mapping of
    key paths to values. ``out``: the study directory to create (default: ``output.dir/<name>-<time>``);
    ``resume``: a killed study's directory to continue (then no study file, overrides or ``out``).
    Ray as :func:`simfl.simulate` has it. ``report``: write ``report.md``; ``quiet``: no line per cell.
    Bad input raises :class:`~simfl.core.errors.UserError` before anything is written. A cell that
    fails is reported on stderr and left unfinished (see :attr:`Study.cell_table`; resume to retry it);
    if no cell finished, nothing can be tabulated: ``UserError`` naming the study directory.
    """
    outcome = drive_study(study, overrides, out=out, resume=resume, options=RayOptions(address, num_cpus, dashboard),
                          report=report, quiet=quiet)
    if outcome.summary_error is not None:
        raise UserError(f"{outcome.study_dir}: {outcome.summary_error}")
    return Study(outcome.study_dir)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for a user error, reported in one line)."""
    args = build_parser().parse_args(argv)
    try:
        outcome = drive_study(args.study or None, args.overrides, out=args.out or None, resume=args.resume or None,
                              options=ray_options(args), report=not args.no_report, quiet=args.quiet)
    except UserError as exc:
        print(f"simfl: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    if outcome.summary_error is not None:  # e.g. no cell finished: nothing to tabulate or report
        print(f"simfl: error: {outcome.summary_error}", file=sys.stderr)
    elif outcome.report is not None:
        if table := headline(outcome.report.read_text()):
            print(table)  # as a scenario's arms print their table
        print(f"simfl study: report: {outcome.report}", file=sys.stderr)
    done = outcome.cells - len(outcome.failed) - len(outcome.excluded)
    print(f"simfl: study {outcome.name}: {done} of {outcome.cells} cells done"
          f"{f', {len(outcome.excluded)} excluded' if outcome.excluded else ''}; results in {outcome.study_dir}")
    if outcome.failed:
        print(f"simfl: {len(outcome.failed)} cells failed: {', '.join(outcome.failed)} "
              f"(re-run with --resume {outcome.study_dir})", file=sys.stderr)
    return 0 if outcome.summary_error is None and not outcome.failed else 1


@dataclass(frozen=True)
class StudyOutcome:
    """What a study run left: its directory, the cells that failed or were excluded, whether it was tabulated."""

    name: str
    study_dir: Path
    cells: int
    failed: list[str]
    excluded: list[str]  # searched cells whose target utility is out of reach
    report: Path | None  # report.md, when asked for and written
    summary_error: str | None  # why cells.parquet and metrics.parquet could not be written (None: they were)


def drive_study(source: str | Path | None, overrides: Overrides | None, *,
                out: str | Path | None, resume: str | Path | None, options: RayOptions,
                report: bool, quiet: bool) -> StudyOutcome:
    """Everything :func:`run_study` and the command line do; a bad input raises before anything is written."""
    study_dir: Path | None = None
    if resume is not None:
        if source is not None or overrides or out is not None:
            raise UserError("--resume: a resumed study uses its saved study.yaml; drop the study file, --set and --out")
        study_dir = Path(resume)
        if not (study_dir / "study.yaml").is_file():
            raise UserError(f"--resume {study_dir}: not a study directory (no study.yaml)")
        study, base = load_study(study_dir / "study.yaml")
    elif source is not None:
        study, base = load_study(source)
        study = study.model_copy(update={"set": {**study.set, **dict(override_items(overrides))}})
    else:
        raise UserError("give a study file, or --resume STUDY_DIR")
    cells = expand(study, base)
    plans = plan_searches(study, cells) if study.search is not None else []
    if study_dir is None:
        study_dir = Path(out) if out is not None else fresh_dir(study.output.dir, study.output.name, study.name)
        if study_dir.exists():
            raise UserError(f"--out {study_dir}: exists already (use --resume to continue a study)")
    cells_dir = study_dir / "cells"
    if not quiet:
        print(f"simfl study: {study.name}: {len(cells)} cells over {', '.join(study.grid)}; "
              "loading data and planning actors", file=sys.stderr)
    connect_ray(options)
    # Each cell and probe without a progress bar: one line per cell, not one per step.
    prepared = prepare_under(cells_dir, {c.name: c.scenario for c in cells}, options, quiet=True)
    if plans:
        _check_target_above_chance(study, prepared)
    if not study_dir.exists():
        _write_header(study_dir, study, base)
    excluded: list[str] = []
    found: dict[str, Found | None] = {}
    if plans:
        found = run_searches(study_dir, study, plans, options, quiet=quiet)
        excluded = sorted(name for name, f in found.items() if f is None)
        kept = {n: f for n, f in found.items() if f is not None}
        prepared.update(prepare_under(cells_dir, {n: f.scenario for n, f in kept.items()}, options, quiet=True))
        for name, f in kept.items():
            prep = prepared[name][0]
            seed_cell(cells_dir / name, f, prep.scenario)
            if latest_round(cells_dir / name) == prep.scenario.training.rounds:
                prepared[name] = (prep, 0)  # its probe's training, copied: no client actor to hold a CPU for
        drop_recorded(study_dir)
        for name in excluded:
            prepared.pop(name)
        if excluded:
            print(f"simfl study: EXCLUDED (the target utility {study.comparison.target_accuracy:g} is out of reach): "
                  f"{', '.join(excluded)}; see search.parquet", file=sys.stderr)
    status = run_cells(cells_dir, prepared, study.concurrency, quiet=quiet)
    if found:
        drop_recorded(study_dir)
    failed = sorted(n for n, s in status.items() if s.startswith("failed"))
    written, error = None, None
    try:
        written = _summarise(study_dir, report)
    except UserError as exc:  # e.g. no cell finished: nothing to tabulate or report
        error = str(exc)
    return StudyOutcome(study.name, study_dir, len(cells), failed, excluded, written, error)


def _check_target_above_chance(study: StudyConfig, prepared: dict[str, tuple[Prepared, int]]) -> None:
    """A search's target at or below chance is met by every setting: nothing would be matched."""
    target = study.comparison.target_accuracy
    classes = max(prep.dataset.num_classes for prep, _ in prepared.values())
    if target <= 1 / classes:
        raise UserError(f"study: comparison.target_accuracy: {target:g} is at or below chance (1/{classes} classes): "
                        "every defence reaches it at its most private setting; search for a target above chance")


def _summarise(study_dir: Path, report: bool) -> Path | None:
    """The study's tables, then (if asked) its report; the report's path."""
    write_study_tables(study_dir, study_cells(study_dir))
    return write_report(study_dir) if report else None


def _write_header(study_dir: Path, study: StudyConfig, base: dict[str, Any]) -> None:
    """The study as resolved (base inlined), so ``--resume`` needs nothing outside the directory."""
    try:
        study_dir.mkdir(parents=True)
    except OSError as exc:
        raise UserError(f"output.dir: cannot create {study_dir} ({exc.strerror})") from None
    saved = study.model_dump(mode="json")
    saved.update(base=None, scenario=base)
    (study_dir / "study.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
