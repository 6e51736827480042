"""A study's search, run as a user runs it: knobs found at the target, the unreachable named, probes resumed.

The pure search is tested in test_search.py; here one small study runs end to
end (minutes): a DP-SGD level whose bracket spans the target, and one whose
bracket cannot reach it; then again from the command line on another number of
CPUs, which must reproduce every result.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from engine_helpers import TINY_STUDY

from simfl.engine.scenario import load_scenario
from simfl.results.analysis import final_values, run_metrics
from simfl.results.compare import differences
from simfl.studies.probes import plan_searches, with_setting
from simfl.studies.spec import expand, load_study
from simfl.studies.study import main as study_main
from simfl.studies.study_dir import Study

ROOT = Path(__file__).resolve().parents[2]
TARGET = 0.14


def spec(tmp: Path) -> dict:
    out = dict(TINY_STUDY, base=str(ROOT / "scenarios" / "defences_smoke.yaml"), output={"dir": str(tmp), "name": "s"})
    # Enough training that utility moves with σ (at TINY_STUDY's two rounds it stays near chance).
    out["set"] = {**out["set"], "training.rounds": 4, "training.local_epochs": 3, "evaluation.every": 4,
                  "training.optimizer": {"kind": "sgd", "lr": 0.05, "momentum": 0.9}}
    out["grid"] = {"defence": {"none": {"defence": "none"}}, "seed": [0]}
    out["search"] = {"levels": {"dp": {"defence": {"kind": "dpsgd"}},
                                "dp_noisy": {"defence": {"kind": "dpsgd"}}},
                     "knobs": {"dp_noisy": {"low": 4.0, "high": 5.0}},  # too noisy for the target anywhere
                     "budget": 3, "tolerance": 0.01}
    out["comparison"] = {"target_accuracy": TARGET, "proposed": "dpsgd", "baselines": ["none"]}
    return out


def test_searched_levels_join_the_grid_axis_and_probes_drop_attacks(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec(tmp_path), sort_keys=False))
    study, base = load_study(path)
    cells = expand(study, base)
    assert [c.name for c in cells] == ["none__seed-0", "dp__seed-0", "dp_noisy__seed-0"]
    assert [c.searched for c in cells] == [None, "dp", "dp_noisy"]
    plans = plan_searches(study, cells)
    assert [(p.knob.name, p.knob.low, p.knob.high) for p in plans] == [("noise_multiplier", 0.05, 5.0),
                                                                      ("noise_multiplier", 4.0, 5.0)]
    probe = with_setting(plans[0].cell, plans[0].knob, 0.7, {"training.optimizer.lr": 0.3}, probe=True)
    assert probe.attacks.record and probe.live_attacks is None  # a probe records its attack jobs, attacks none
    assert probe.defence.noise_multiplier == 0.7 and probe.training.optimizer.lr == 0.3
    cell = with_setting(plans[0].cell, plans[0].knob, 0.7, {}, probe=False)
    assert cell.live_attacks is not None and cell.attacks == plans[0].cell.scenario.attacks


def test_a_defence_without_a_search_knob_is_one_line(tmp_path, capsys):
    s = spec(tmp_path)
    s["search"] = {"levels": {"plain": {"defence": "none"}}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(s, sort_keys=False))
    assert study_main([str(path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "simfl: error: study: search.levels.plain: defence none declares no knob to search"]
    assert not (tmp_path / "s").exists()


def test_a_target_at_chance_is_one_line_before_anything_is_written(ray_local, tmp_path, capsys):
    s = spec(tmp_path)
    s["comparison"]["target_accuracy"] = 0.125  # 8 classes
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(s, sort_keys=False))
    assert study_main([str(path), "--quiet"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "simfl: error: study: comparison.target_accuracy: 0.125 is at or below chance (1/8 classes): every defence "
        "reaches it at its most private setting; search for a target above chance"]
    assert not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def searched_study(ray_local, tmp_path_factory) -> dict:
    """The study above, run in this process on the session's Ray instance (4 CPUs); its stderr kept."""
    tmp = tmp_path_factory.mktemp("searched")
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(spec(tmp), sort_keys=False))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = study_main(["--no-dashboard", str(path)])
    assert code == 0, err.getvalue()[-3000:]
    return {"dir": tmp / "s", "spec": path, "err": err.getvalue()}


def test_search_finds_the_target_names_the_unreachable_and_resumes(searched_study, capsys):
    study_dir, err = searched_study["dir"], searched_study["err"]
    assert "EXCLUDED" in err and "dp_noisy__seed-0" in err

    probes = pd.read_parquet(study_dir / "search.parquet")
    dp = probes[probes["cell"] == "dp__seed-0"]
    assert set(probes[probes["cell"] == "dp_noisy__seed-0"]["status"]) == {"unreachable"}
    assert dp["status"].iloc[0] in {"matched", "nearest"}
    assert list(dp["value"][:2]) == [5.0, 0.05]  # the most private end first, then the other end
    assert dp["utility"].iloc[0] < TARGET < dp["utility"].iloc[1]  # the bracket spans the target
    chosen = dp[dp["chosen"]].iloc[0]
    assert abs(chosen["utility"] - TARGET) == min(abs(dp["utility"] - TARGET))

    # The cell ran at the chosen setting, with attacks, and training did not change: same utility as its probe.
    # It did not train again: it is its kept probe's copy, resumed to attack the jobs the probe recorded.
    cell = study_dir / "cells" / "dp__seed-0"
    assert load_scenario(cell / "scenario.yaml").defence.noise_multiplier == pytest.approx(chosen["value"])
    assert load_scenario(cell / "scenario.yaml").live_attacks is not None
    assert (cell / "attacks").is_dir()
    assert "cell dp__seed-0: started (trained already: attacks only)" in err
    kept = study_dir / "search" / f"dp__seed-0.probe{int(chosen['probe'])}"
    assert json.loads((cell / "seeded_from.json").read_text())["probe"] == kept.name
    assert pd.read_parquet(cell / "rounds").equals(pd.read_parquet(kept / "rounds"))  # the very rows, times too
    assert sorted(pd.read_parquet(cell / "attacks")["round"].unique()) == [1, 2]
    assert not list(study_dir.glob("*/*/attack_jobs"))  # recorded jobs are dropped once no cell needs them
    m = run_metrics(cell)
    m.insert(0, "cell", "x")
    assert final_values(m, "local_val_accuracy")["value"].iloc[0] == pytest.approx(chosen["utility"], abs=1e-12)
    assert not (study_dir / "cells" / "dp_noisy__seed-0").exists()

    report = (study_dir / "report.md").read_text()
    assert "Matched-utility comparison (searched" in report
    assert "**Excluded" in report and "dp_noisy__seed-0 (dp_noisy)" in report

    # Resumed: every probe and cell is found finished, nothing runs again.
    stamps = {p: p.stat().st_mtime_ns for p in study_dir.glob("*/*/final_weights.pt")}
    assert study_main(["--no-dashboard", "--resume", str(study_dir)]) == 0, capsys.readouterr().err[-3000:]
    assert {p: p.stat().st_mtime_ns for p in study_dir.glob("*/*/final_weights.pt")} == stamps
    assert pd.read_parquet(study_dir / "search.parquet").equals(probes)


def test_the_same_study_on_another_number_of_cpus_gives_identical_results(searched_study, tmp_path):
    # The CLI in its own Ray instance with 1 CPU: one cell or probe at a time, where the fixture's 4 CPUs
    # packed them side by side. Every table (search decisions, cells, metrics, each run's tables but the
    # wall times), every final weight and the report must come out the same (issue 28).
    out = tmp_path / "again"
    proc = subprocess.run([sys.executable, "-m", "simfl.study", str(searched_study["spec"]), "--out", str(out),
                           "--num-cpus", "1", "--no-dashboard", "--quiet"], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "report.md").exists() and len(list(out.rglob("final_weights.pt"))) == 7  # 5 probes, 2 cells
    assert differences(searched_study["dir"], out) == []


def test_the_profile_counts_every_probe_and_cell(searched_study):
    text = Study(searched_study["dir"]).profile()
    assert "(7 runs: 5 probes, 2 cells)" in text
    assert "| search: the chosen probes (the attacked cell trains the same model again) | 1 |" in text
    assert "| search: probes not kept | 4 |" in text
    assert "| ig | naive |  |" in text and "| idlg | naive |  |" in text  # per attack, none of them learned
