"""The examples run as a user runs them, and what they print is what their run directories hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from pytest import approx

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_quickstart_prints_its_runs_tables(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    run_dir = Path(lines[0].removeprefix("run directory: "))
    assert run_dir.parent == tmp_path and (run_dir / "final_weights.pt").is_file()

    evals = pd.read_parquet(run_dir / "evals")
    test = evals[evals["scope"] == "test"].sort_values(["round", "population"])
    printed = "\n".join(lines[2:lines.index("summary:")])
    assert printed == test[["round", "population", "accuracy"]].to_string(index=False)
    assert sorted(set(test["round"])) == [1, 2, 3]

    header, row = lines[lines.index("summary:") + 1:]
    assert header.split() == ["rounds", "defence", "test_accuracy", "client_val_accuracy"]
    rounds, defence, test_acc, _ = row.split()
    final = test[(test["round"] == 3) & (test["population"] == "global")]["accuracy"].item()
    assert (int(rounds), defence, float(test_acc)) == (3, "none", approx(final, abs=1e-6))
