"""The benchmarks run and print their figures (no timing asserts: these machines are noisy)."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simfl.attacks import ATTACKS

pytestmark = pytest.mark.engine  # whole benchmarks or clusters in subprocesses: minutes

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_engine_benchmark_quick_prints_its_figures():
    proc = subprocess.run([sys.executable, "benchmarks/engine.py", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    number = r"([0-9.eE+-]+|nan|inf)"
    rows = {}
    for name, unit in [("engine samples/s", "rounds"), ("engine round time \\(s\\)", "rounds"),
                       ("limit samples/s", "passes"), ("limit pass time \\(s\\)", "passes")]:
        row = re.search(rf"^\| {name} \| {number} \| {number} \| {number} \| (\d+) {unit} \|$", proc.stdout, re.M)
        assert row, (name, proc.stdout)
        rows[name] = [float(v) for v in row.groups()[:3]]
        assert int(row.group(4)) == 3, proc.stdout  # --quick: 3 timed rounds, 3 passes of the limit
    ratio = re.search(rf"^\| engine / limit \| {number} \| \| \| median / median \|$", proc.stdout, re.M)
    memory = re.search(rf"peak memory \(PSS, driver \+ Ray, outside the timed rounds\): {number} GiB at 2000 clients "
                       rf"\(target < 8\), {number} GiB at 500", proc.stdout)
    per_round = re.search(rf"median round: {number} s vs {number} s at 500 clients \(ratio {number}\)", proc.stdout)
    assert ratio and memory and per_round, proc.stdout
    figures = [v for values in rows.values() for v in values]
    figures += [float(ratio.group(1)), *map(float, per_round.groups())]
    assert all(math.isfinite(v) and v > 0 for v in figures), proc.stdout
    for values in rows.values():
        assert values[1] <= values[0] <= values[2], proc.stdout  # min <= median <= max
    assert float(memory.group(1)) > 0.1 and float(memory.group(2)) > 0.1, proc.stdout


@pytest.mark.timeout(600)
def test_attack_benchmark_quick_prints_its_figures():
    proc = subprocess.run([sys.executable, "benchmarks/attacks.py", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch threads: 2 (set explicitly)" in proc.stdout, proc.stdout
    for case in ("shared weights", "different weights"):
        line = re.search(rf"ig batched 16 victims \({case}\): ([0-9.]+) s; single x16: ([0-9.]+) s; "
                         rf"ratio ([0-9.]+)x \(target >= 4x: (met|not met)\)", proc.stdout)
        assert line, proc.stdout
        assert float(line.group(1)) > 0 and float(line.group(2)) > 0 and float(line.group(3)) > 0
    for kind in ATTACKS.kinds():  # every registered attack, batched and single
        line = re.search(rf"^{kind} batched \d+ victims: ([0-9.]+) s; single x\d+: ([0-9.]+) s; ratio ([0-9.]+)x$",
                         proc.stdout, re.M)
        assert line and float(line.group(3)) > 0, (kind, proc.stdout)
    slowdown = re.search(r"median round: ([0-9.]+) s with attacks vs ([0-9.]+) s without over 4 rounds; "
                         r"slowdown ratio ([0-9.]+)", proc.stdout)
    jobs = re.search(r"attack jobs: (\d+) \((\d+) victims sampled, (\d+) dropped", proc.stdout)
    assert slowdown and jobs, proc.stdout
    assert float(slowdown.group(3)) > 0
    # Rounds 2 and 4 were attacked, 4 victims each: every one was attacked or counted as dropped.
    assert int(jobs.group(2)) == 8 and int(jobs.group(1)) * 4 + int(jobs.group(3)) == 8


@pytest.mark.timeout(600)
def test_defence_benchmark_quick_prints_its_figures():
    proc = subprocess.run([sys.executable, "benchmarks/defences.py", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"none +[0-9.]+ ms", proc.stdout), proc.stdout
    for kind in ("dpsgd", "bido", "latent"):
        line = re.search(rf"{kind} +([0-9.]+) ms +ratio +([0-9.]+)x", proc.stdout)
        assert line and float(line.group(1)) > 0 and float(line.group(2)) > 0, proc.stdout
    assert re.search(r"server step per round [0-9.]+ s", proc.stdout), proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="this machine has CUDA: the one-line answer is for machines without")
def test_gpu_check_without_cuda_says_so_in_one_line():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines() == [
        "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check"
    ]


@pytest.mark.timeout(900)
def test_gpu_check_dry_run_on_the_cpu_passes_every_check():
    """The script's own logic, on the CPU (GPU shares 0), so it is ready to run unattended on a GPU."""
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    checks = [line.split(" | ")[0].removeprefix("| ") for line in table]
    assert checks == [
        "smoke: shares 0.25 / 0.5 / one actor, identical weights",
        "memory share: overrun fails alone",
        "defences + attacks on GPU shares, naive and adaptive",
        "defence determinism: 1 vs 2 actors (DP-SGD, latent)",
        "throughput (500 clients, 50/round)",
    ]
    assert all(" | pass | " in line for line in table), proc.stdout
