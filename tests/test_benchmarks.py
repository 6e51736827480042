"""The benchmarks run and print their figures (no timing asserts: these machines are noisy)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_engine_benchmark_quick_prints_its_figures():
    proc = subprocess.run([sys.executable, "benchmarks/engine.py", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ratio = re.search(r"efficiency ratio \(target >= 0.85\): ([0-9.]+)", proc.stdout)
    memory = re.search(r"peak memory \(PSS, driver \+ Ray\): ([0-9.]+) GiB at 2000 clients", proc.stdout)
    per_round = re.search(r"median round: ([0-9.]+) s vs ([0-9.]+) s at 500 clients", proc.stdout)
    assert ratio and memory and per_round, proc.stdout
    assert float(ratio.group(1)) > 0 and float(memory.group(1)) > 0.1 and float(per_round.group(1)) > 0
