"""A study's searches: find each searched cell's knob value at the target utility, by probe runs.

The search logic is :mod:`simfl.studies.search`; this module runs it. Probes are
complete runs that record their attack jobs instead of attacking
(``attacks.record``: utility alone decides the knob), written under
``<study>/search/<cell>.probe<k>`` (with ``.tune<j>`` for a tuned
combination), run in waves: each wave holds the next probe of every search
still going, packed onto the cluster like cells. Searches replay from the
probes on disk, so a killed study resumes its searches where they stood.

The cell at the chosen setting does not train again: it starts as a copy of
the kept probe (:func:`seed_cell`), whose training is bit-identical to the
cell's, and resumes it with live attacks, which attack the recorded jobs.
Recorded jobs are deleted once no run needs them (:func:`drop_recorded`).

Tuning (``search.tune``): on the first seed of each group of cells (cells that
differ only in their seed), every combination of the tuned keys is searched;
the one that reaches the target at the most private knob value is used for
every seed of the group, and stated in ``search.parquet``.
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from simfl.core.errors import UserError
from simfl.engine.scenario import Scenario, parse_scenario, scenario_to_yaml, set_keys
from simfl.privacy.defences import DEFENCES
from simfl.privacy.defences.base import SearchKnob
from simfl.results.analysis import UTILITY_METRIC, final_values, run_metrics
from simfl.simulation.runner import RayOptions, prepare_under
from simfl.studies.cell_pool import run_cells
from simfl.studies.search import Search, more_private
from simfl.studies.spec import CELL_SEPARATOR, SEEDED_FROM, Cell, StudyConfig

SEED_AXIS = "seed"


@dataclass
class CellSearch:
    """One searched cell: its knob, the combinations tried (tuning) and their searches."""

    cell: Cell
    knob: SearchKnob
    combos: list[dict[str, Any]]  # tuned key path -> value; [{}] without tuning
    tuning: bool  # this cell tunes (tries every combination); else it waits for its group's choice
    group: str
    searches: dict[int, Search] = field(default_factory=dict)  # combination index -> its search
    combo: int | None = None  # the combination used

    def probe_name(self, j: int, k: int) -> str:
        """The run directory name of probe ``k`` of combination ``j``."""
        return f"{self.cell.name}{'' if len(self.combos) == 1 else f'.tune{j}'}.probe{k}"


def knob_of(study: StudyConfig, cell: Cell) -> SearchKnob:
    """The searched cell's knob: what its defence declares, with the study's bracket if it gives one."""
    assert study.search is not None and cell.searched is not None
    kind = cell.scenario.defence.kind
    declared = DEFENCES[kind].search_knob
    if declared is None:
        raise UserError(f"study: search.levels.{cell.searched}: defence {kind} declares no knob to search")
    given = study.search.knobs.get(cell.searched)
    if given is not None:
        declared = replace(declared, low=declared.low if given.low is None else given.low,
                           high=declared.high if given.high is None else given.high)
    try:
        Search(declared, 0.5, study.search.tolerance, study.search.budget)
    except ValueError as exc:
        raise UserError(f"study: search.knobs.{cell.searched}: {exc}") from None
    return declared


def with_setting(cell: Cell, knob: SearchKnob, value: float, combo: dict[str, Any], *, probe: bool) -> Scenario:
    """The cell's scenario at one knob value and tuned combination; a ``probe`` records its attacks."""
    raw = cell.scenario.model_dump(mode="json")
    items = [(f"defence.{k}", v) for k, v in knob.settings(value).items()] + list(combo.items())
    raw = set_keys(raw, items)
    if probe and raw.get("attacks") is not None:
        raw["attacks"]["record"] = True
    try:
        return parse_scenario(raw)
    except UserError as exc:
        where = ", ".join(f"{k}={v}" for k, v in items)
        raise UserError(f"study: search: cell {cell.name} at {where}: {exc}") from None


def plan_searches(study: StudyConfig, cells: list[Cell]) -> list[CellSearch]:
    """Every searched cell's search, each setting it may take validated (bracket ends × combinations)."""
    assert study.search is not None
    plans: list[CellSearch] = []
    seen_groups: set[str] = set()
    for cell in cells:
        if cell.searched is None:
            continue
        knob = knob_of(study, cell)
        tune = study.search.tune.get(cell.searched, {})
        combos = [dict(zip(tune, values)) for values in itertools.product(*tune.values())] or [{}]
        for combo in combos:
            for end in (knob.low, knob.high):
                with_setting(cell, knob, end, combo, probe=False)
        group = CELL_SEPARATOR.join(v for a, v in cell.labels.items() if a != SEED_AXIS)
        tuning = len(combos) > 1 and group not in seen_groups
        seen_groups.add(group)
        plans.append(CellSearch(cell, knob, combos, tuning, group))
    return plans


def _new_search(study: StudyConfig, knob: SearchKnob) -> Search:
    assert study.search is not None
    return Search(knob, study.comparison.target_accuracy, study.search.tolerance, study.search.budget)


def _utility(run_dir: Path, kind: str) -> float:
    """A finished run's utility: its final figure of the study's utility metric."""
    metrics = run_metrics(run_dir)
    metrics.insert(0, "cell", run_dir.name)
    rows = final_values(metrics, UTILITY_METRIC[kind])
    if rows.empty:
        raise UserError(f"{run_dir}: no final {UTILITY_METRIC[kind]} to search on")
    return float(rows["value"].iloc[0])


def _choose(plan: CellSearch) -> int | None:
    """The tuned combination used for the group: reaches the target at the most private knob value."""
    best: int | None = None
    for j, search in plan.searches.items():
        probe = search.chosen()
        if probe is None:
            continue
        if best is None or more_private(plan.knob, probe.value, plan.searches[best].chosen().value):  # type: ignore[union-attr]
            best = j
    return best


def _wave(study: StudyConfig, plans: list[CellSearch]) -> dict[str, tuple[CellSearch, int, float]]:
    """The next probe of every search still going: probe name -> (plan, combination, knob value)."""
    chosen = {p.group: p.combo for p in plans if p.tuning}
    wave: dict[str, tuple[CellSearch, int, float]] = {}
    for plan in plans:
        if plan.tuning:
            for j in range(len(plan.combos)):
                search = plan.searches.setdefault(j, _new_search(study, plan.knob))
                value = search.next_value()
                if value is not None:
                    wave[plan.probe_name(j, len(search.probes))] = (plan, j, value)
            if all(s.status() is not None for s in plan.searches.values()) and plan.combo is None:
                plan.combo = _choose(plan)
            continue
        if len(plan.combos) > 1:  # waits for its group's tuning cell
            if plan.group not in chosen or chosen[plan.group] is None:
                continue
            plan.combo = chosen[plan.group]
        else:
            plan.combo = 0
        assert plan.combo is not None
        search = plan.searches.setdefault(plan.combo, _new_search(study, plan.knob))
        value = search.next_value()
        if value is not None:
            wave[plan.probe_name(plan.combo, len(search.probes))] = (plan, plan.combo, value)
    return wave


@dataclass(frozen=True)
class Found:
    """A searched cell's outcome: its scenario at the chosen setting, and the probe that trained it."""

    scenario: Scenario
    probe: Path


def run_searches(study_dir: Path, study: StudyConfig, plans: list[CellSearch], options: RayOptions, *,
                 quiet: bool) -> dict[str, Found | None]:
    """Run every search to its end; returns each searched cell's setting and kept probe (None: excluded).

    Writes ``search.parquet``: every probe with its knob value, combination and utility,
    and each search's outcome. ``quiet``: no line per probe.
    """
    assert study.search is not None
    probes_dir = study_dir / "search"
    kind = study.comparison.utility
    failed: dict[str, str] = {}
    while True:
        wave = _wave(study, plans)
        # A tuning cell's choice may only be known after the wave that ended its searches.
        wave = wave or _wave(study, plans)
        if not wave:
            break
        scenarios = {name: with_setting(plan.cell, plan.knob, value, plan.combos[j], probe=True)
                     for name, (plan, j, value) in wave.items()}
        prepared = prepare_under(probes_dir, scenarios, options, quiet=True)
        status = run_cells(probes_dir, prepared, study.concurrency, quiet=quiet)
        for name, (plan, j, value) in wave.items():
            search = plan.searches[j]
            if status.get(name, "").startswith("failed"):
                failed[plan.cell.name] = status[name]
                # A failed probe ends its search: record it as missing the target at the privacy end reached.
                search.budget = len(search.probes) + 1
                search.record(value, float("-inf"))
                continue
            utility = _utility(probes_dir / name, kind)
            search.record(value, utility)
            if not quiet:
                print(f"simfl study: search {plan.cell.name}: {plan.knob.name} = {value:.4g}"
                      f"{'' if len(plan.combos) == 1 else f' ({json.dumps(plan.combos[j])})'} → {kind} {utility:.3f} "
                      f"(target {study.comparison.target_accuracy:g})", file=sys.stderr)
    _write_table(study_dir, study, plans, failed)
    out: dict[str, Found | None] = {}
    for plan in plans:
        kept = plan.searches.get(plan.combo) if plan.combo is not None else None
        probe = kept.chosen() if kept is not None else None
        if kept is None or probe is None or plan.combo is None or plan.cell.name in failed:
            out[plan.cell.name] = None
            continue
        name = plan.probe_name(plan.combo, kept.probes.index(probe))
        out[plan.cell.name] = Found(with_setting(plan.cell, plan.knob, probe.value, plan.combos[plan.combo],
                                                 probe=False), probes_dir / name)
    return out


def seed_cell(cell_dir: Path, found: Found, scenario: Scenario) -> None:
    """Start the cell as a copy of its kept probe (final weights left out), ``scenario`` its own.

    Resumed, the copy trains nothing (its checkpoint is the last round) and attacks the jobs the probe
    recorded: the cell a live run would have written, without its training. A cell directory that
    exists already (a resumed study) is left as it is; so is one whose probe did not finish.
    """
    if cell_dir.exists() or not (found.probe / "final_weights.pt").is_file():
        return
    tmp = cell_dir.with_name(f".{cell_dir.name}.seeding")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(found.probe, tmp, ignore=shutil.ignore_patterns("final_weights.pt"))
    (tmp / "scenario.yaml").write_text(scenario_to_yaml(scenario))
    (tmp / SEEDED_FROM).write_text(json.dumps({"probe": found.probe.name, "seeded_at": time.time()}) + "\n")
    tmp.rename(cell_dir)  # whole or not at all: a killed copy is never taken for a cell


def drop_recorded(study_dir: Path) -> None:
    """Delete recorded attack jobs no run needs (they hold the victims' private images; a live run keeps none):
    every probe's, once the cells are seeded with their copies, and every finished cell's."""
    for recorded in (study_dir / "search").glob("*/attack_jobs"):
        shutil.rmtree(recorded)
    for recorded in (study_dir / "cells").glob("*/attack_jobs"):
        if (recorded.parent / "final_weights.pt").is_file():
            shutil.rmtree(recorded)


def _write_table(study_dir: Path, study: StudyConfig, plans: list[CellSearch], failed: dict[str, str]) -> None:
    rows: list[dict[str, Any]] = []
    for plan in plans:
        if not plan.searches:  # its group's tuning found no combination reaching the target
            rows.append({"cell": plan.cell.name, "level": plan.cell.searched, "group": plan.group,
                         "combination": -1, "tuned": "{}", "knob": plan.knob.name, "value": float("nan"),
                         "utility": float("nan"), "probe": -1, "target": study.comparison.target_accuracy,
                         "tolerance": study.search.tolerance if study.search else float("nan"),
                         "status": "unreachable", "chosen": False, "used": True})
        for j, search in plan.searches.items():
            chosen = search.chosen()
            for k, probe in enumerate(search.probes):
                rows.append({
                    "cell": plan.cell.name, "level": plan.cell.searched, "group": plan.group,
                    "combination": j, "tuned": json.dumps(plan.combos[j], sort_keys=True),
                    "knob": plan.knob.name, "value": probe.value, "utility": probe.utility, "probe": k,
                    "target": search.target, "tolerance": search.tolerance,
                    "status": "failed" if plan.cell.name in failed else search.status(),
                    "chosen": chosen is not None and k == search.probes.index(chosen),
                    "used": plan.combo == j,
                })
    pd.DataFrame(rows).to_parquet(study_dir / "search.parquet", index=False)
