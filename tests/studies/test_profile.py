"""The study profile on a study directory built by hand, with known times: every figure checked exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simfl.core.errors import UserError
from simfl.engine.run_tables import SCHEMAS
from simfl.engine.scenario import load_scenario, scenario_to_yaml
from simfl.studies.profile import attack_time, core_seconds, profile, study_runs
from simfl.studies.report import main as report_main
from simfl.studies.spec import SEEDED_FROM

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_800_000_000.0


def _rows(name: str, rows: list[dict]) -> pa.Table:
    schema = SCHEMAS[name]
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


def _run(run_dir: Path, *, start: float, end: float, rounds: list[tuple[float, float]], attacks: bool,
         attack_rows: list[dict] = ()) -> None:
    """A run holding 0.5 CPU for its client actor (and 0.5 for its attacker with attacks) from start to end."""
    sc = load_scenario(ROOT / "scenarios" / "defences_smoke.yaml", {
        "arms": None, "resources": {"client_actors": 1, "cpus_per_actor": 0.5},
        "attacks.pool": {"actors": 1, "cpus_per_actor": 0.5}})
    if not attacks:
        sc = sc.model_copy(update={"attacks": None})
    run_dir.mkdir(parents=True)
    (run_dir / "scenario.yaml").write_text(scenario_to_yaml(sc))
    (run_dir / "environment.json").write_text("{}\n")
    os.utime(run_dir / "environment.json", (start, start))
    (run_dir / "final_weights.pt").write_bytes(b"")
    os.utime(run_dir / "final_weights.pt", (end, end))
    for name, rows in (("rounds", [{"round": i + 1, "round_time_s": t, "finished_at": f}
                                   for i, (t, f) in enumerate(rounds)]),
                       ("clients", [{"round": 1, "client_id": 0, "actor": 0}]),
                       ("attacks", list(attack_rows))):
        if rows:
            (run_dir / name).mkdir()
            pq.write_table(_rows(name, rows), run_dir / name / "part-000000.parquet")


@pytest.fixture()
def study(tmp_path) -> Path:
    """Two probes of one search (the second kept) from T0 to T0+100 and T0+100 to T0+160, then one cell.

    The cell starts at T0+160, trains rounds from T0+170 to T0+200 and ends at T0+230 (its attacks: one job of
    ig naive 8 s and lti naive 12 s submitted at T0+175 and finished at T0+205; another of ig 4 s submitted at
    T0+180, started when the first ended, finished at T0+215).
    """
    (tmp_path / "study.yaml").write_text("name: hand\n")
    os.utime(tmp_path / "study.yaml", (T0 - 10, T0 - 10))
    pd.DataFrame({"cell": ["dp__seed-0"] * 2, "combination": [0, 0], "probe": [0, 1], "chosen": [False, True],
                  "used": [True, True]}).to_parquet(tmp_path / "search.parquet")
    _run(tmp_path / "search" / "dp__seed-0.probe0", start=T0, end=T0 + 100, rounds=[(40, T0 + 90)], attacks=False)
    _run(tmp_path / "search" / "dp__seed-0.probe1", start=T0 + 100, end=T0 + 160, rounds=[(50, T0 + 155)],
         attacks=False)
    job = {"round": 1, "client_id": 0, "attacker": 0}
    _run(tmp_path / "cells" / "dp__seed-0", start=T0 + 160, end=T0 + 230,
         rounds=[(15, T0 + 185), (15, T0 + 200)], attacks=True,
         attack_rows=[{**job, "attack": "ig", "knowledge": "naive", "attack_s": 8.0, "submitted_at": T0 + 175,
                       "finished_at": T0 + 190, "image": 0},
                      {**job, "attack": "ig", "knowledge": "naive", "attack_s": 8.0, "submitted_at": T0 + 175,
                       "finished_at": T0 + 190, "image": 1},  # a second image of the same job: counted once
                      {**job, "attack": "lti", "knowledge": "naive", "attack_s": 12.0, "submitted_at": T0 + 175,
                       "finished_at": T0 + 205, "image": 0},
                      {**job, "round": 2, "attack": "ig", "knowledge": "naive", "attack_s": 4.0,
                       "submitted_at": T0 + 180, "finished_at": T0 + 215, "image": 0}])
    # Seeded from its probe at T0+230 (a copy: its header's time and rounds are the probe's), attacks only until
    # T0+250.
    seeded = tmp_path / "cells" / "dq__seed-0"
    _run(seeded, start=T0 + 100, end=T0 + 250, rounds=[(50, T0 + 155)], attacks=True,
         attack_rows=[{**job, "attack": "ig", "knowledge": "naive", "attack_s": 5.0, "submitted_at": T0 + 231,
                       "finished_at": T0 + 249, "image": 0}])
    (seeded / SEEDED_FROM).write_text(json.dumps({"probe": "dp__seed-0.probe1", "seeded_at": T0 + 230}))
    return tmp_path


def test_runs_are_told_apart_and_their_core_seconds_split(study):
    runs = {r.name: r for r in study_runs(study)}
    assert {n: r.kind for n, r in runs.items()} == {"dp__seed-0.probe0": "probe_dropped",
                                                   "dp__seed-0.probe1": "probe_kept", "dp__seed-0": "cell",
                                                   "dq__seed-0": "cell"}
    assert runs["dp__seed-0"].cpus == 1.0 and runs["dp__seed-0.probe0"].cpus == 0.5
    assert runs["dq__seed-0"].cpus == 0.5  # no client actor: its attacker alone
    spent = core_seconds(list(runs.values()))
    assert spent == {"probe_dropped": 50.0, "probe_kept": 30.0, "cell_startup": 10.0, "cell_rounds": 30.0,
                     "cell_tail": 30.0, "cell_attacks_only": 10.0}


def test_attack_time_is_counted_once_per_job_with_the_rest_of_each_job_apart(study):
    t = attack_time(study).set_index("attack")
    assert t.loc["ig", "seconds"] == 17.0 and t.loc["ig", "jobs"] == 3
    assert t.loc["lti", "seconds"] == 12.0 and bool(t.loc["lti", "learned"]) and not bool(t.loc["ig", "learned"])
    # Job 1: 175 → 205 less 20 s of attacks; job 2 waits for job 1: 205 → 215 less 4 s.
    # The seeded cell's job: 231 → 249 less 5 s.
    assert t.loc["(scoring, evaluator, objective at truth)", "seconds"] == pytest.approx(10.0 + 6.0 + 13.0)


def test_the_profile_names_each_share_of_the_wall_time(study):
    text = profile(study, cores=2)
    assert "Study " in text and "4.3 min wall on 2 CPUs (4 runs: 2 probes, 2 cells)" in text
    # 260 s x 2 CPUs = 520 core-seconds; the runs reserved 160 of them.
    assert "| search: probes not kept | 1 | 0.8 | 10 % |" in text
    assert "| cells: rounds (training and evaluation; attacks run beside them) | 1 | 0.5 | 6 % |" in text
    assert "| cells seeded from their kept probe: attacks on its recorded jobs (no training) | 1 | 0.2 | 2 % |" in text
    assert "| not reserved by any run" in text and "| 6.0 | 69 % |" in text
    # 29 s of attacks + 29 s besides; the cells' 70 s and 20 s x 1 actor.
    assert "busy 1.0 of 1.5 actor-minutes" in text


def test_a_directory_that_is_not_a_study_is_one_line(tmp_path):
    with pytest.raises(UserError, match="not a study directory"):
        profile(tmp_path)


def test_the_command_line_prints_it_and_writes_nothing(study, capsys):
    before = sorted(p.name for p in study.rglob("*"))
    assert report_main([str(study), "--profile"]) == 0
    assert "| search: the chosen probes" in capsys.readouterr().out
    assert sorted(p.name for p in study.rglob("*")) == before
