"""Comparing two result directories: exact on results, blind to wall times, row order and where they lie."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from simfl.results.compare import differences
from simfl.studies.report import main as report_main


def _run(root: Path, accuracy: float = 0.5, round_time: float = 1.0, order: tuple[int, ...] = (0, 1),
         cpu: str = "CPU A") -> Path:
    rows = [{"round": 1, "accuracy": accuracy, "hist": [1, 2], "round_time_s": round_time, "node_id": "a"},
            {"round": 2, "accuracy": float("nan"), "hist": [3], "round_time_s": 2 * round_time, "node_id": "b"}]
    (root / "evals").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([rows[i] for i in order]), root / "evals" / "part-000000.parquet")
    pq.write_table(pa.table({"cell": ["x"], "run_dir": [str(root)]}), root / "cells.parquet")
    torch.save({"w": torch.tensor([1.0, 2.0])}, root / "final_weights.pt")
    (root / "report.md").write_text(f"# Study {root}\nutility 0.5\n")
    (root / "environment.json").write_text(json.dumps({"cpu": cpu, "kernels": {}, "versions": {}, "commit": "c"}))
    return root


def test_a_rerun_elsewhere_with_other_wall_times_and_row_order_reproduces(tmp_path):
    a = _run(tmp_path / "a")
    b = _run(tmp_path / "b", round_time=7.5, order=(1, 0))
    assert differences(a, b) == []


def test_the_last_bit_of_a_result_is_a_difference(tmp_path):
    a = _run(tmp_path / "a")
    b = _run(tmp_path / "b", accuracy=float(torch.nextafter(torch.tensor(0.5, dtype=torch.float64),
                                                               torch.tensor(1.0, dtype=torch.float64))))
    assert differences(a, b) == ["evals: rows differ (first in columns accuracy)"]


def test_weights_report_and_missing_tables_are_differences(tmp_path):
    a = _run(tmp_path / "a")
    b = _run(tmp_path / "b")
    torch.save({"w": torch.tensor([1.0, 2.5])}, b / "final_weights.pt")
    (b / "report.md").write_text(f"# Study {b}\nutility 0.6\n")
    shutil.rmtree(b / "evals")
    assert differences(a, b) == [f"evals: only in {a}", "final_weights.pt: weights differ", "report.md: differs"]


def test_report_cli_compares_and_exits_1_on_a_difference(tmp_path, capsys):
    a = _run(tmp_path / "a")
    b = _run(tmp_path / "b", round_time=3.0)
    before = (a / "report.md").read_text()
    assert report_main([str(a), "--compare", str(b)]) == 0
    assert "reproduces" in capsys.readouterr().out
    c = _run(tmp_path / "c", accuracy=0.25, cpu="CPU B")
    assert report_main([str(a), "--compare", str(c)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "evals: rows differ (first in columns accuracy)", "made elsewhere: cpu: 'CPU A' against 'CPU B'",
        f"simfl: 1 difference(s) between {a} and {c}"]
    assert report_main([str(a), "--compare", str(tmp_path / "none")]) == 2
    assert (a / "report.md").read_text() == before  # --compare writes nothing
