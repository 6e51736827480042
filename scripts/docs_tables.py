"""The measured tables of the docs: regenerate one from a run directory, or list the stale ones.

Every measured table lives in its own file under ``docs/tables/`` with a stamp
(commit, command, date, machine, the code paths it measures; see
``scripts/table_stamps.py`` for the format and the staleness rule), and the
docs hook includes it into the guides, marked when stale::

    python scripts/docs_tables.py --stale      # list the stale tables (exit 0)
    python scripts/docs_tables.py arms runs/defences_smoke-20261202-101500 \\
        --out docs/tables/defences-smoke-worst.md --part worst \\
        --command "python -m simfl.run scenarios/defences_smoke.yaml"

``study`` reads a study directory's report: its matched-utility comparison
(the table ``simfl.study`` prints at the end)::

    python scripts/docs_tables.py study runs/study_verdict-20261208 --out docs/tables/study-verdict.md \\
        --command "python -m simfl.study scenarios/study_verdict.yaml"

``arms`` reads a scenario-with-arms run directory through
:func:`simfl.results.summary.arms_table`, the summary ``simfl.run`` prints, and
stamps the table with ``HEAD`` (warning when the measured paths have uncommitted
changes), the run's date and this machine. Run it where and when the run was
made; ``--commit``, ``--date`` and ``--machine`` say otherwise. Title, note and
measured paths are kept from the file it overwrites unless given.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
from pathlib import Path

import table_stamps
import torch

from simfl.results.summary import arms_table
from simfl.studies.report import headline

# What an arms run measures unless told: the code between a scenario and its summary.
ARMS_MEASURES = ["simfl/core", "simfl/data", "simfl/privacy", "simfl/engine", "simfl/simulation",
                 "simfl/results/analysis.py", "simfl/results/summary.py"]


def machine() -> str:
    """This machine in a few words: CPUs and GPU."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPUs ({platform.machine()}, {platform.system()}), {gpu}"


def tables_of(markdown: str) -> list[str]:
    """The markdown tables in ``markdown``, in order (runs of lines starting with ``|``)."""
    found: list[list[str]] = []
    previous = False
    for line in markdown.splitlines():
        is_row = line.startswith("|")
        if is_row and not previous:
            found.append([])
        if is_row:
            found[-1].append(line)
        previous = is_row
    return ["\n".join(rows) for rows in found]


def arms_body(run_dir: Path, part: str) -> str:
    """The arms summary's table: every attack on every arm (``attacks``) or each arm's worst case (``worst``)."""
    tables = tables_of(arms_table(run_dir))
    if part == "worst" and len(tables) < 2:
        raise SystemExit(f"{run_dir}: no attacks, so no worst-case table")
    return tables[0 if part == "attacks" else 1]


def study_body(study_dir: Path) -> str:
    """The study report's matched-utility comparison table."""
    report = study_dir / "report.md"
    body = headline(report.read_text()) if report.is_file() else ""
    if not body:
        raise SystemExit(f"{study_dir}: no report.md with a matched-utility comparison")
    return tables_of(body)[0]


def regenerate(args: argparse.Namespace) -> int:
    """Write the table and its stamp to ``args.out``."""
    run_dir = Path(args.run_dir)
    header = "study.yaml" if args.kind == "study" else "scenario.yaml"
    if not (run_dir / header).is_file():
        raise SystemExit(f"{run_dir}: not a {args.kind} directory (no {header})")
    previous = table_stamps.read_table(args.out).stamp if Path(args.out).is_file() else {}
    measures = args.measures or previous.get("measures") or ARMS_MEASURES
    root = table_stamps.ROOT
    commit = args.commit or table_stamps.git(root, "rev-parse", "--short", "HEAD").strip()
    dirty = table_stamps.git(root, "status", "--porcelain", "--", *measures).strip()
    if dirty and not args.commit:
        print(f"warning: uncommitted changes under the measured paths; stamped {commit} all the same:\n{dirty}",
              file=sys.stderr)
    made = dt.date.fromtimestamp((run_dir / header).stat().st_mtime).isoformat()
    stamp = {"title": args.title or previous.get("title"), "commit": commit, "command": args.command,
             "date": args.date or made, "machine": args.machine or machine(), "measures": measures,
             "note": args.note or previous.get("note")}
    body = study_body(run_dir) if args.kind == "study" else arms_body(run_dir, args.part)
    Path(args.out).write_text(table_stamps.table_text(stamp, body))
    print(f"wrote {args.out} (stamp {commit})")
    return 0


def list_stale(directory: Path) -> int:
    """Print each stale table and the measured files changed since its stamp; exit 0 either way."""
    found = table_stamps.stale(table_stamps.ROOT, directory)
    for table, paths in found:
        print(f"{table.path.relative_to(table_stamps.ROOT)}: stale since {table.stamp['commit']}: {', '.join(paths)}")
    total = len(table_stamps.read_tables(directory))
    print(f"{len(found)} of {total} tables stale")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Regenerate a table (``arms``, ``study``) or list the stale ones (``--stale``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stale", action="store_true", help="list the tables whose measured code changed")
    parser.add_argument("--tables", type=Path, default=table_stamps.TABLES, help="the tables folder")
    commands = parser.add_subparsers(dest="kind")
    arms = commands.add_parser("arms", help="a scenario-with-arms run directory's summary table")
    arms.add_argument("run_dir", help="the run directory holding scenario.yaml and one directory per arm")
    arms.add_argument("--part", choices=("attacks", "worst"), default="worst",
                      help="every attack on every arm, or each arm's worst case (default)")
    study = commands.add_parser("study", help="a study directory's matched-utility comparison (from report.md)")
    study.add_argument("run_dir", help="the study directory holding study.yaml and report.md")
    for sub in (arms, study):
        sub.add_argument("--out", type=Path, required=True, help="the table file to write (docs/tables/NAME.md)")
        sub.add_argument("--command", required=True, help="the command that made the run, for the stamp")
        sub.add_argument("--measures", nargs="+", help=f"code paths the table measures (default: the file's, "
                                                       f"else {ARMS_MEASURES})")
        sub.add_argument("--commit", help="the commit the run was made at (default: HEAD)")
        sub.add_argument("--date", help="the date of the run (default: its header file's)")
        sub.add_argument("--machine", help="the machine it ran on (default: this one)")
        sub.add_argument("--title", help="the table's title")
        sub.add_argument("--note", help="what a reader should know about it (e.g. a fix it predates)")
    args = parser.parse_args(argv)
    if args.stale:
        return list_stale(args.tables)
    if args.kind in ("arms", "study"):
        return regenerate(args)
    parser.error("say --stale, arms RUN_DIR or study STUDY_DIR")
    return 2


if __name__ == "__main__":
    sys.exit(main())
