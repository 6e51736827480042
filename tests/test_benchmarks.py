"""The benchmarks run and print their figures (no timing asserts: these machines are noisy)."""

import math
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from simfl.privacy.attacks import ATTACKS

pytestmark = pytest.mark.engine  # whole benchmarks or clusters in subprocesses: minutes

ROOT = Path(__file__).resolve().parents[1]
HALF_ULP = 0.0005  # the benchmarks print 3 decimals


@pytest.mark.timeout(600)
def test_engine_benchmark_quick_prints_its_figures():
    proc = subprocess.run([sys.executable, "benchmarks/engine.py", "--quick", "--timed-rounds", "2", "--passes", "2"],
                          cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    number = r"([0-9.eE+-]+|nan|inf)"
    rows = {}
    for name, unit in [("engine samples/s", "rounds"), ("engine round time \\(s\\)", "rounds"),
                       ("limit samples/s", "passes"), ("limit pass time \\(s\\)", "passes")]:
        row = re.search(rf"^\| {name} \| {number} \| {number} \| {number} \| (\d+) {unit} \|$", proc.stdout, re.M)
        assert row, (name, proc.stdout)
        rows[name] = [float(v) for v in row.groups()[:3]]
        assert int(row.group(4)) == 2, proc.stdout  # 2 timed rounds, 2 passes of the limit
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
    pair = re.search(rf"^  engine / limit of each pair, in order: {number}$", proc.stdout, re.M)
    assert pair and float(pair.group(1)) == float(ratio.group(1)), proc.stdout  # one pair: its ratio is the pooled
    cpu = re.search(rf"pair 1: CPU over the engine's timed rounds \(cores, of (\d+)\): client actors {number}, "
                    rf"coordinator {number}, driver {number}, Ray's own processes {number}; unused {number}",
                    proc.stdout)
    assert cpu, proc.stdout
    cores, parts = int(cpu.group(1)), [float(v) for v in cpu.groups()[1:5]]
    assert 0 < parts[0] <= cores and all(v >= 0 for v in parts[1:]), proc.stdout
    # Five figures printed to 3 decimals: their rounding adds up to 5 x 0.0005.
    assert float(cpu.group(6)) == pytest.approx(cores - sum(parts), abs=5 * HALF_ULP + 1e-9), proc.stdout
    side = re.search(rf"side by side .*, (\d+) samples\): engine's train_client {number} ms per sample, plain loop "
                     rf"{number} ms \(ratio {number}\)", proc.stdout)
    assert side and int(side.group(1)) > 1000, proc.stdout  # --quick: the first timed round's 50 clients
    engine_ms, plain_ms, ratio_ = map(float, side.groups()[1:])
    assert engine_ms > 0 and plain_ms > 0, proc.stdout
    # The ratio was rounded from unrounded times: it lies within the interval the rounded ones allow.
    low, high = (plain_ms - HALF_ULP) / (engine_ms + HALF_ULP), (plain_ms + HALF_ULP) / (engine_ms - HALF_ULP)
    assert low - HALF_ULP - 1e-9 <= ratio_ <= high + HALF_ULP + 1e-9, proc.stdout
    population = {}
    for clients, images in [(500, 50), (2000, 50), (500, 5), (5000, 5)]:
        row = re.search(rf"^\| {clients} x {images} \| {number} \| {number} \| {number} \| {number} \| {number} "
                        rf"\| {number} \| (\d+) \|$", proc.stdout, re.M)
        assert row, (clients, images, proc.stdout)
        setup, median, low, high, peak, checkpoint = map(float, row.groups()[:6])
        assert setup > 0 and 0 < low <= median <= high and peak > 0.1 and checkpoint > 0, proc.stdout
        population[clients, images] = int(row.group(7))
    # --quick: 1 warm-up, 2 timed, 1 memory round and the last: at most 5 x 50 clients have trained.
    assert all(50 <= n <= 250 for n in population.values()), population
    assert re.search(rf"median round at 5000 clients: {number} s vs {number} s at 500 clients of the same size "
                     rf"\(ratio {number}\); peak memory {number} GiB", proc.stdout), proc.stdout


@pytest.mark.timeout(600)
def test_attack_benchmark_quick_prints_its_figures():
    proc = subprocess.run([sys.executable, "benchmarks/attacks.py", "--quick", "--victims", "4"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch threads: 2 (set explicitly)" in proc.stdout, proc.stdout
    for case in ("shared weights", "different weights"):
        line = re.search(rf"ig batched 4 victims \({case}\): ([0-9.]+) s; single x4: ([0-9.]+) s; "
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


def test_reproducibility_check_prints_its_table_and_the_pinned_kernels_ignore_the_caps():
    # Exit 0 or 1: 1 says this machine's pinned fingerprint differs from the record (another model); the
    # pinned kernels must still ignore the instruction-set caps on any machine.
    proc = subprocess.run([sys.executable, "benchmarks/reproducibility.py"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    rows = dict(re.findall(r"^\| ([A-Za-z0-9, ]+) \| ([0-9a-f]{16}) \|$", proc.stdout, flags=re.M))
    assert set(rows) == {"pinned", "pinned, AVX2 caps", "native", "native, AVX2 caps"}, proc.stdout
    assert rows["pinned"] == rows["pinned, AVX2 caps"]
    assert "pinned = pinned with AVX2 caps: yes" in proc.stdout
    assert (proc.returncode == 0) == ("pinned = recorded" in proc.stdout and proc.stdout.rstrip().endswith("yes"))


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
        "defence determinism: 1 vs 2 actors (DP-SGD)",  # --cpu: one arm (the suite checks all on the CPU)
        "throughput (50 clients, 10/round)",  # --cpu: a tenth of the GPU run's workload
    ]
    assert all(" | pass | " in line for line in table), proc.stdout


PEERS_HINT = ('peers: Flower and pfl-research are not installed; install the extra in a venv that sees simfl: '
              'python -m venv --system-site-packages .peers && .peers/bin/pip install -e ".[peers]" '
              '&& .peers/bin/python benchmarks/peers.py')


def peers_requirements() -> list[str]:
    """The ``peers`` extra exactly as pyproject.toml pins it."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"]["peers"]


@pytest.mark.timeout(120)
def test_peers_without_the_extra_says_how_to_install_it_in_one_line():
    importable = subprocess.run([sys.executable, "-c", "import flwr, pfl"], capture_output=True).returncode == 0
    assert not importable, "simfl's own environment must not carry the peers (they pin older protobuf and attrs)"
    proc = subprocess.run([sys.executable, "benchmarks/peers.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines() == [PEERS_HINT]


@pytest.mark.timeout(900)
def test_peers_run_flower_and_pfl_beside_simfl_in_a_venv_with_the_extra(tmp_path):
    """The venv the Benchmarks guide describes, made here (the extra installs from the package index in ~15 s)."""
    venv = tmp_path / "peers"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "-q", *peers_requirements()], capture_output=True,
                             text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    proc = subprocess.run([python, "benchmarks/peers.py", "--warmup", "1", "--timed", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    number = r"([0-9.]+)"
    rows = {}
    for name in ("simfl", "flower", "pfl"):
        row = re.search(rf"^\| {name} \| [^|]+ \| {number} \({number}-{number}\) \| {number} \({number}-{number}\) "
                        rf"\| {number} \|$", proc.stdout, re.M)
        assert row, (name, proc.stdout)
        rows[name] = [float(v) for v in row.groups()]
    for name, (s, s_lo, s_hi, sps, sps_lo, sps_hi, ratio) in rows.items():
        assert 0 < s_lo <= s <= s_hi and 0 < sps_lo <= sps <= sps_hi, (name, proc.stdout)
        # Each round trains 50 clients of ~50 images: s/round x samples/s is that round's samples.
        assert 1000 < s * sps < 5000, (name, proc.stdout)
        # the ratio is printed with two decimals
        assert math.isclose(ratio, rows["simfl"][3] / sps, rel_tol=0.01, abs_tol=0.006), (name, proc.stdout)
    assert rows["simfl"][6] == 1.0


@pytest.mark.timeout(900)
def test_verdict_benchmark_quick_times_both_sides_and_compares_their_results():
    # Both sides at this checkout (HEAD as the base): the script's machinery, not a claim about a past commit.
    proc = subprocess.run([sys.executable, "benchmarks/verdict.py", "--quick", "--before", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    out = proc.stdout
    sides = dict(re.findall(r"^\| (before|after) \| [0-9a-f]+ \| [0-9]+ \| ([0-9]+) \|$", out, re.M))
    assert set(sides) == {"before", "after"} and all(int(v) > 0 for v in sides.values()), out
    ratio = re.search(r"^after / before: ([0-9.]+) \(median wall\)$", out, re.M)
    assert ratio and float(ratio.group(1)) > 0, out
    assert "results identical (every table, final weight, report): yes" in out, out
    # Its DP-SGD cell reaches the target (just above chance) and is seeded from the probe its search kept.
    assert re.search(r"^\| search: the chosen probes .* \| 1 \|", out, re.M), out
    assert re.search(r"^\| cells seeded from their kept probe: .* \| 1 \|", out, re.M), out
    assert not list(ROOT.glob(".git/worktrees/before*")), "the base commit's worktree was left behind"
