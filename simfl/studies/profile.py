"""Where a study's time went: searches' probes kept and not kept, cells' training and attacks, the rest.

Why: a study is many runs packed onto a few cores; its wall time says nothing of
which part to make cheaper. This reads a finished (or running) study directory
and nothing else: no Ray, no re-run. Each run holds the CPUs its actors reserve
from its header (``environment.json``, written when it starts) to its final
weights (a cell seeded from its kept probe: from its ``seeded_from.json``);
those spans times the CPUs held are the **reserved core-seconds** that
the table splits, and their sum beside the study's wall time times the cores
says how full the cluster was. The attacker actor's own time is split by attack
from the ``attacks`` table (``attack_s`` per job; what remains of a job is
scoring, the objective at the truth and, first, the attack evaluator's training).

File times are the clock for a run's start and end (a run records no start
otherwise), so profile the study directory where it was written, not a copy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from simfl.core.errors import UserError
from simfl.engine.scenario import load_scenario
from simfl.privacy.attacks import ATTACKS
from simfl.results.markdown import table
from simfl.studies.spec import SEEDED_FROM

# What each kind of run is, in the order the table lists them.
KINDS = {
    "probe_kept": "search: the chosen probes (the attacked cell trains the same model again)",
    "probe_dropped": "search: probes not kept",
    "cell_startup": "cells: start-up (actors, data, attack evaluator) before round 1",
    "cell_rounds": "cells: rounds (training and evaluation; attacks run beside them)",
    "cell_tail": "cells: after the last round (waiting for attacks, final writes)",
    "cell_attacks_only": "cells seeded from their kept probe: attacks on its recorded jobs (no training)",
}


@dataclass(frozen=True)
class RunSpan:
    """One run of the study: when it ran, what it held, where its time went."""

    name: str
    kind: str  # probe_kept, probe_dropped or cell
    cpus: float  # the CPUs its actors reserve
    attackers: int  # attacker actors
    start: float  # unix s: its header written
    first_round_start: float | None
    last_round_end: float | None
    end: float  # unix s: its final weights written (or its last row, if still going)


def _mtime(path: Path) -> float | None:
    return path.stat().st_mtime if path.exists() else None


def run_span(run_dir: Path, kind: str) -> RunSpan:
    """A run's span and the CPUs it holds, from its header, tables and final weights."""
    sc = load_scenario(run_dir / "scenario.yaml")
    seeded = run_dir / SEEDED_FROM
    start = (json.loads(seeded.read_text())["seeded_at"] if seeded.is_file()
             else _mtime(run_dir / "environment.json") or _mtime(run_dir / "scenario.yaml"))
    assert start is not None
    rounds = _table(run_dir, "rounds", ["round", "round_time_s", "finished_at"])
    first = last = None
    if len(rounds):
        rounds = rounds.drop_duplicates("round", keep="last").sort_values("round")
        first = float(rounds["finished_at"].iloc[0] - rounds["round_time_s"].iloc[0])
        last = float(rounds["finished_at"].iloc[-1])
    # As planned on the cluster it ran on; none where the rounds are its probe's (a seeded cell trains nothing).
    actors = 0 if last is not None and last < start else _table(run_dir, "clients", ["actor"])["actor"].nunique()
    cpus, _ = sc.demand(actors)
    attackers = sc.live_attacks.pool.actors if sc.live_attacks is not None else 0
    attacks = _table(run_dir, "attacks", ["finished_at"])
    ends = [t for t in (_mtime(run_dir / "final_weights.pt"), last,
                        float(attacks["finished_at"].max()) if len(attacks) else None) if t is not None]
    return RunSpan(run_dir.name, kind, cpus, attackers, start, first, last, max(ends) if ends else start)


def _table(run_dir: Path, name: str, columns: list[str]) -> pd.DataFrame:
    path = run_dir / name
    if not path.is_dir() or not any(path.glob("part-*.parquet")):
        return pd.DataFrame(columns=columns)
    return pd.read_parquet(path, columns=columns)


def study_runs(study_dir: Path) -> list[RunSpan]:
    """Every probe and cell run of a study directory, each with its kind."""
    study_dir = Path(study_dir)
    kept: set[str] = set()
    search = study_dir / "search.parquet"
    if search.is_file():
        probes = pd.read_parquet(search)
        for row in probes[probes["chosen"] & probes["used"]].itertuples():
            combos = probes[(probes["cell"] == row.cell)]["combination"].nunique()
            kept.add(f"{row.cell}{'' if combos == 1 else f'.tune{row.combination}'}.probe{row.probe}")
    runs = []
    for folder, kind in (("search", "probe"), ("cells", "cell")):
        for run_dir in sorted((study_dir / folder).glob("*/scenario.yaml")):
            name = run_dir.parent.name
            sub = kind if kind == "cell" else ("probe_kept" if name in kept else "probe_dropped")
            runs.append(run_span(run_dir.parent, sub))
    return runs


def attack_time(study_dir: Path) -> pd.DataFrame:
    """The attacker actors' seconds per attack and knowledge over every cell, and what the jobs spent besides.

    Columns: attack, knowledge, learned (trains a network on the server's data), jobs, seconds
    (summed ``attack_s``), per_job (mean). A last row ``(scoring, evaluator, objective at truth)``
    holds the jobs' time outside their attacks: a job's span on its actor (from the later of its
    submission and the actor's previous job's end, to its last attack's end) less its attacks.
    """
    rows, other = [], 0.0
    for run_dir in sorted((Path(study_dir) / "cells").glob("*/attacks")):
        a = _table(run_dir.parent, "attacks", ["round", "attack", "knowledge", "attacker", "attack_s",
                                               "submitted_at", "finished_at", "client_id"])
        if a.empty:
            continue
        # One job: one round's victims on one actor (its attacks share the submission time).
        jobs = a.groupby(["attacker", "submitted_at", "attack", "knowledge"], as_index=False).agg(
            attack_s=("attack_s", "first"), finished_at=("finished_at", "max"))
        rows.append(jobs)
        per_job = jobs.groupby(["attacker", "submitted_at"], as_index=False).agg(
            attack_s=("attack_s", "sum"), finished_at=("finished_at", "max")).sort_values("finished_at")
        for _, g in per_job.groupby("attacker"):
            previous = None
            for job in g.itertuples():
                begin = job.submitted_at if previous is None else max(job.submitted_at, previous)
                other += max(0.0, job.finished_at - begin - job.attack_s)
                previous = job.finished_at
    if not rows:
        return pd.DataFrame(columns=["attack", "knowledge", "learned", "jobs", "seconds", "per_job"])
    jobs = pd.concat(rows)
    out = jobs.groupby(["attack", "knowledge"], as_index=False).agg(jobs=("attack_s", "size"),
                                                                     seconds=("attack_s", "sum"))
    out.insert(2, "learned", out["attack"].map(lambda k: k in ATTACKS and "aux" in getattr(
        ATTACKS[k], "__dataclass_fields__", {})))
    out = pd.concat([out, pd.DataFrame([{"attack": "(scoring, evaluator, objective at truth)", "knowledge": "",
                                         "learned": False, "jobs": len(jobs.groupby(["attacker", "submitted_at"])),
                                         "seconds": other}])], ignore_index=True)
    out["per_job"] = out["seconds"] / out["jobs"]
    return out.sort_values("seconds", ascending=False, ignore_index=True)


def core_seconds(runs: list[RunSpan]) -> dict[str, float]:
    """Reserved core-seconds per kind (:data:`KINDS`): each run's span times the CPUs it holds."""
    out = dict.fromkeys(KINDS, 0.0)
    for r in runs:
        if r.kind != "cell":
            out[r.kind] += (r.end - r.start) * r.cpus
            continue
        if r.last_round_end is not None and r.last_round_end < r.start:  # its rounds are its probe's
            out["cell_attacks_only"] += (r.end - r.start) * r.cpus
            continue
        first = r.first_round_start if r.first_round_start is not None else r.end
        last = r.last_round_end if r.last_round_end is not None else r.end
        out["cell_startup"] += (first - r.start) * r.cpus
        out["cell_rounds"] += (last - first) * r.cpus
        out["cell_tail"] += (r.end - last) * r.cpus
    return out


def profile(study_dir: str | Path, cores: float | None = None) -> str:
    """The study's profile as Markdown: wall time, reserved core-seconds by kind, attack time by attack.

    ``cores``: the CPUs the study ran on (default: the most its runs held at once).
    """
    study_dir = Path(study_dir)
    if not (study_dir / "study.yaml").is_file():
        raise UserError(f"{study_dir}: not a study directory (no study.yaml)")
    runs = study_runs(study_dir)
    if not runs:
        raise UserError(f"{study_dir}: no probe or cell has started yet")
    begin = _mtime(study_dir / "study.yaml") or min(r.start for r in runs)
    end = max([r.end for r in runs] + [t for t in (_mtime(study_dir / "report.md"),) if t is not None])
    wall = end - begin
    cores = cores or max(sum(r.cpus for r in runs if r.start <= t < r.end) for t in (r.start for r in runs))
    spent = core_seconds(runs)
    available = wall * cores
    counts = {k: sum(1 for r in runs if r.kind == k) for k in (*KINDS, "cell")}
    seeded = sum(1 for r in runs if r.kind == "cell" and r.last_round_end is not None and r.last_round_end < r.start)
    counts.update({k: counts["cell"] - seeded for k in ("cell_startup", "cell_rounds", "cell_tail")},
                  cell_attacks_only=seeded)
    probes = counts["probe_kept"] + counts["probe_dropped"]
    lines = [f"Study {study_dir.name}: {wall / 60:.1f} min wall on {cores:g} CPUs "
             f"({len(runs)} runs: {probes} probes, {counts['cell']} cells)", ""]
    rows = [[text, str(counts[k]), f"{spent[k] / 60:.1f}", f"{100 * spent[k] / available:.0f} %"]
            for k, text in KINDS.items()]
    idle = available - sum(spent.values())
    rows.append(["not reserved by any run (Ray start-up, data loading, waves waiting for their slowest "
                 "probe, the report)", "", f"{idle / 60:.1f}", f"{100 * idle / available:.0f} %"])
    lines += table(["where", "runs", "core-minutes reserved", "share of wall x CPUs"], rows)
    attacks = attack_time(study_dir)
    if len(attacks):
        total = attacks["seconds"].sum()
        held = sum((r.end - r.start) * r.attackers for r in runs)
        lines += ["", f"Attacker actors: busy {total / 60:.1f} of {held / 60:.1f} actor-minutes (the cells' spans "
                  "times their attacker actors):", ""]
        lines += table(["attack", "knowledge", "learned", "jobs", "minutes", "s per job", "share"],
                       [[r.attack, r.knowledge, "yes" if r.learned else "", str(r.jobs), f"{r.seconds / 60:.1f}",
                         f"{r.per_job:.1f}", f"{100 * r.seconds / total:.0f} %"] for r in attacks.itertuples()])
    return "\n".join(lines) + "\n"
