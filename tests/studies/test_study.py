"""Running studies: a bad study fails in one line with no directory, a killed study resumes without redoing cells."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
from test_spec import study_file

from simfl.studies.report import headline

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simfl.study", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_bad_study_on_the_command_line_is_one_line_exit_2_and_no_directory(tmp_path):
    out = tmp_path / "runs"
    path = study_file(tmp_path, grid={"seed": [0], "training.rounds": ["ten"]}, output={"dir": str(out)})
    proc = cli(str(path), "--no-dashboard", "--num-cpus", "1")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("simfl: error: study: cell seed-0__rounds-ten") and "training.rounds" in line
    assert not out.exists()


def test_the_headline_is_the_reports_matched_comparison_table():
    report = ("# Study\n\n## Matched-utility comparison (client_val 0.35)\n\nWhat it shows.\n\n| a | b |\n|---|---|\n"
              "| 1 | 2 |\n\n## Cells\n\n| c |\n")
    assert headline(report) == "| a | b |\n|---|---|\n| 1 | 2 |"
    assert headline("# Study\n\n## Cells\n\n| c |\n") == ""


def test_killed_study_resumes_without_redoing_finished_cells(tiny_study):
    study_dir, killed = tiny_study["dir"], tiny_study["killed"]
    cells = pd.read_parquet(study_dir / "cells.parquet")
    assert sorted(cells["cell"]) == sorted(tiny_study["cells"])
    assert set(cells["status"]) == {"finished"}
    # Cells finished before the kill were skipped by the resume, their files untouched.
    assert killed["finished"], "the study was killed before any cell finished"
    for name, mtime in killed["finished"].items():
        assert (study_dir / "cells" / name / "final_weights.pt").stat().st_mtime_ns == mtime
        assert f"cell {name}: finished before, skipped" in tiny_study["resume_log"]
    assert len(killed["finished"]) < len(tiny_study["cells"]), "the study finished before it was killed"


def test_study_tables_are_tidy_and_cover_every_cell(tiny_study):
    study_dir = tiny_study["dir"]
    metrics = pd.read_parquet(study_dir / "metrics.parquet")
    assert set(metrics["cell"]) == set(tiny_study["cells"])
    final = metrics[metrics["round"].isna()]
    for cell in tiny_study["cells"]:
        mine = final[(final["cell"] == cell)]
        assert (mine["metric"] == "local_val_accuracy").any() and (mine["metric"] == "test_accuracy").any()
        # Attack metrics per knowledge, with the worst attack, for training victims and held-out probes.
        worst = mine[(mine["attack"] == "worst") & mine["population"].isna()]
        assert set(worst["knowledge"]) == {"naive", "adaptive"}
        assert set(worst["held_out"]) == {True, False}
    per_round = metrics[metrics["round"].notna() & (metrics["metric"] == "train_loss")]
    assert per_round.groupby("cell")["round"].apply(sorted).map(list).tolist() == \
        [[1, 2]] * len(tiny_study["cells"])
    cells = pd.read_parquet(study_dir / "cells.parquet")
    assert set(cells["setting"]) == {"none", "dp_lo", "dp_hi"}
    assert set(cells["seed"]) == {0, 1}
