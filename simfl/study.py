"""``python -m simfl.study STUDY.yaml``: a grid of runs (cells) over scenario keys, one report.

The study itself (its schema, grid and cells) is :mod:`simfl.study_spec`; this
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
import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Literal

import ray
import yaml

from simfl.analysis import write_study_tables
from simfl.errors import UserError
from simfl.report import write_report
from simfl.run import EXIT_USER_ERROR, Prepared, add_ray_arguments, connect_ray, fresh_dir, prepare_under, run_in
from simfl.scenario import parse_override
from simfl.study_spec import StudyConfig, expand, load_study, study_cells


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
