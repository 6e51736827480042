"""``python -m simfl.study STUDY.yaml``: a grid of runs (cells) over scenario keys, one report.

The study itself (its schema, grid and cells) is :mod:`simfl.studies.spec`; this
module runs it. Every cell is a complete run directory under
``<study>/cells/<cell>``. Cells run concurrently on one Ray instance or
cluster as far as its CPUs and GPUs allow; a killed study given ``--resume``
skips finished cells and resumes checkpointed ones. At the end, all cells'
metrics go to one tidy Parquet (``metrics.parquet``) and the report is written
(``report.md``, figures/).

Everything is validated, every cell's data loaded and its actors planned before
the study directory exists, so a typo in cell 37 costs nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from simfl.core.errors import UserError
from simfl.engine.scenario import parse_override
from simfl.results.analysis import write_study_tables
from simfl.simulation.runner import EXIT_USER_ERROR, add_ray_arguments, connect_ray, fresh_dir, prepare_under
from simfl.studies.cell_pool import run_cells
from simfl.studies.probes import plan_searches, run_searches
from simfl.studies.report import write_report
from simfl.studies.spec import StudyConfig, expand, load_study, study_cells


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


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for a user error, reported in one line)."""
    args = build_parser().parse_args(argv)
    try:
        if args.resume:
            if args.study or args.overrides or args.out:
                raise UserError(
                    "--resume: a resumed study uses its saved study.yaml; drop the study file, --set and --out"
                )
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
        plans = plan_searches(study, cells) if study.search is not None else []
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
    excluded: list[str] = []
    if plans:
        try:
            found = run_searches(args, quiet, study_dir, study, plans)
            excluded = sorted(name for name, sc in found.items() if sc is None)
            prepared.update(prepare_under(quiet, cells_dir, {n: sc for n, sc in found.items() if sc is not None}))
        except UserError as exc:
            print(f"simfl: error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        for name in excluded:
            prepared.pop(name)
        if excluded:
            print(f"simfl study: EXCLUDED (the target utility {study.comparison.target_accuracy:g} is out of reach): "
                  f"{', '.join(excluded)}; see search.parquet", file=sys.stderr)
    status = run_cells(args, quiet, cells_dir, prepared, study.concurrency)
    failed = sorted(n for n, s in status.items() if s.startswith("failed"))
    summarised = True
    try:
        _summarise(study_dir, args.no_report)
    except UserError as exc:  # e.g. no cell finished: nothing to tabulate or report
        print(f"simfl: error: {exc}", file=sys.stderr)
        summarised = False
    done = len(cells) - len(failed) - len(excluded)
    print(f"simfl: study {study.name}: {done} of {len(cells)} cells done"
          f"{f', {len(excluded)} excluded' if excluded else ''}; results in {study_dir}")
    if failed:
        print(f"simfl: {len(failed)} cells failed: {', '.join(failed)} (re-run with --resume {study_dir})",
              file=sys.stderr)
    return 0 if summarised and not failed else 1


def _summarise(study_dir: Path, no_report: bool) -> None:
    """The study's tables, then its report, whose headline table is printed as arms print theirs."""
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
