"""``python -m simfl.calibrate``: bad input refused in one line, the probe scenarios, the outputs; one run end to end.

The halving itself is tested with a fake evaluation in test_halving.py.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import yaml

from simfl.engine.scenario import load_scenario, parse_scenario, set_keys
from simfl.results.analysis import final_values, run_metrics
from simfl.studies.calibrate import PARQUET_COLUMNS, main, patch_text, probe_scenario, results_frame, summary_table
from simfl.studies.halving import Candidate, Halving, Result
from simfl.studies.spec import expand, load_study

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "scenarios" / "smoke.yaml")


def fake_halving() -> Halving:
    shipped, fast, slow = Candidate(0.01, 4, shipped=True), Candidate(0.1, 2), Candidate(0.0033, 1)
    c = lambda values: tuple(enumerate(values, start=1))  # noqa: E731
    return Halving(0.9, 4, [
        [Result(fast, 1, 2, c([0.5, 0.7])), Result(shipped, 1, 2, c([0.2, 0.3])), Result(slow, 1, 2, c([0.1, 0.1]))],
        [Result(fast, 2, 4, c([0.5, 0.7, 0.92, 0.95])), Result(shipped, 2, 4, c([0.2, 0.3, 0.4, 0.52]))],
    ])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target", "1.5"], "--target 1.5: must be in (0, 1]"),
        (["--target", "0"], "--target 0: must be in (0, 1]"),
        (["--rounds", "0"], "--rounds 0: must be at least 1"),
        (["--window", "0"], "--window 0: must be at least 1"),
        (["--lrs", "0.1,abc"], "--lrs 0.1,abc: 'abc' is not a number"),
        (["--lrs", "-0.1"], "--lrs -0.1: -0.1 must be positive"),
        (["--epochs", "1,0"], "--epochs 1,0: 0 must be positive"),
        (["--epochs", "1.5"], "--epochs 1.5: '1.5' is not an integer"),
        (["--set", "training.local_steps=5", "--set", "training.local_epochs=1"], "training.local_steps: calibration"),
        (["--set", "evaluation.local_val_fraction=0.0"], "--utility client_val needs evaluation.local_val_fraction"),
        (["--set", "training.bogus=1"], "scenario: training.bogus: unknown key"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "cal"
    assert main([SMOKE, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("simfl: error: ") and message in err[0], err
    assert not out.exists()


def test_a_missing_scenario_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere.yaml"), "--out", str(tmp_path / "cal")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scenario file" in err[0]
    assert not (tmp_path / "cal").exists()


def test_an_existing_output_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "cal"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main([SMOKE, "--out", str(out)]) == 2
    assert "exists already and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_probe_runs_drop_defence_attacks_and_arms_and_evaluate_every_round():
    sc = load_scenario(ROOT / "scenarios" / "defences_smoke.yaml")
    assert sc.arms is not None and sc.attacks is not None
    probe = probe_scenario(sc, Candidate(0.3, 2), 5)
    assert probe.defence.kind == "none" and probe.attacks is None and probe.arms is None
    assert probe.training.optimizer.lr == 0.3 and probe.training.local_epochs == 2 and probe.training.rounds == 5
    assert probe.evaluation.every == 1
    # Everything else as the scenario has it.
    assert probe.populations == sc.populations and probe.training.optimizer.momentum == 0.9 and probe.seed == sc.seed


def test_results_table_and_patch(tmp_path):
    h = fake_halving()
    frame = results_frame(h)
    assert list(frame.columns) == PARQUET_COLUMNS
    assert len(frame) == 2 * 3 + 4 * 2
    assert set(frame[frame["rung"] == 2]["candidate"]) == {"lr0.1_ep2", "lr0.01_ep4"}

    text = patch_text(h, "scenarios/smoke.yaml", load_scenario(SMOKE), "client_val")
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert "best:    lr 0.1, local_epochs 2: reached 0.9 at round 3 of 4; final utility 0.950" in text
    assert "shipped: lr 0.01, local_epochs 4: did not reach 0.9 in 4 rounds; final utility 0.520" in text
    assert any("lr0.0033_ep1: 2 rounds" in line for line in header)
    patch = yaml.safe_load(text)
    assert patch == {"training.optimizer.lr": 0.1, "training.local_epochs": 2}
    raw = yaml.safe_load(Path(SMOKE).read_text())
    sc = parse_scenario(set_keys(raw, list(patch.items())))
    assert sc.training.optimizer.lr == 0.1 and sc.training.local_epochs == 2 and sc.training.optimizer.momentum == 0.9

    table = summary_table(h)
    assert "| lr0.1_ep2 | 0.1 | 2 | 4 | 3 | 0.950 | best |" in table
    assert "| lr0.01_ep4 | 0.01 | 4 | 4 | – | 0.520 | shipped |" in table


def test_trailing_means_are_named_in_the_table_the_patch_and_the_parquet():
    h = fake_halving()
    h = Halving(h.target, h.budget, [[replace(r, window=2) for r in rung] for rung in h.rungs], window=2)
    table = summary_table(h)
    assert "rounds to 0.9 (mean of 2 rounds)" in table and "final utility (mean of 2 rounds)" in table
    # fast: 0.5 0.7 0.92 0.95 -> trailing 0.6 0.81 0.935: reaches 0.9 at round 4, final 0.935.
    assert "| lr0.1_ep2 | 0.1 | 2 | 4 | 4 | 0.935 | best |" in table
    text = patch_text(h, "scenarios/smoke.yaml", load_scenario(SMOKE), "client_val")
    assert "as the mean of the last 2 evaluated rounds" in text
    assert "reached 0.9 at round 4 of 4; final utility 0.935 (mean of 2 rounds)" in text
    frame = results_frame(h)
    fast = frame[(frame["candidate"] == "lr0.1_ep2") & (frame["rung"] == 2)].sort_values("round")
    assert math.isnan(fast["trailing"].iloc[0])
    assert fast["trailing"].iloc[1:].tolist() == pytest.approx([0.6, 0.81, 0.935])


@pytest.mark.engine
def test_calibrate_end_to_end_on_the_smoke_scenario(ray_local, tmp_path, capsys):
    out = tmp_path / "cal"
    args = [SMOKE, "--out", str(out), "--rounds", "2", "--target", "0.3", "--lrs", "0.003,0.01,0.1", "--epochs", "1",
            "--set", "training.local_epochs=1", "--set", "training.clients_per_round=4",
            "--set", "evaluation.local_clients=6", "--set", "data.synthetic.test_size=200",
            "--set", "resources.client_actors=1", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "rounds to 0.3" in printed and str(out / "calibrated.yaml") in printed

    frame = pd.read_parquet(out / "calibration.parquet")
    assert list(frame.columns) == PARQUET_COLUMNS
    # Rungs of 1 and 2 rounds; three candidates, then the best and the shipped one (lr 0.01, 1 epoch).
    assert sorted(frame[frame["rung"] == 1]["candidate"]) == ["lr0.003_ep1", "lr0.01_ep1", "lr0.1_ep1"]
    second = frame[frame["rung"] == 2]
    assert "lr0.01_ep1" in set(second["candidate"]) and second["candidate"].nunique() <= 2
    assert set(second["round"]) == {1, 2} and frame["round"].max() == 2
    # The curve's last point is the run's final utility as a study reads it.
    run = out / "candidates" / "lr0.01_ep1.rung2"
    metrics = run_metrics(run).assign(cell="x")
    final = float(final_values(metrics, "local_val_accuracy")["value"].iloc[0])
    assert second[second["candidate"] == "lr0.01_ep1"].sort_values("round")["utility"].iloc[-1] == pytest.approx(final)
    assert (out / "calibration.png").stat().st_size > 0

    patch = yaml.safe_load((out / "calibrated.yaml").read_text())
    assert set(patch) == {"training.optimizer.lr", "training.local_epochs"}
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"base": SMOKE, "include": [str(out / "calibrated.yaml")],
                                     "grid": {"seed": [0]}}))
    (cell,) = expand(*load_study(study))
    assert cell.scenario.training.optimizer.lr == patch["training.optimizer.lr"]
    assert cell.scenario.training.local_epochs == patch["training.local_epochs"]

    # Run again into the same directory: refused, nothing touched.
    assert main(args) == 2
