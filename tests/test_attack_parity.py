"""The parity check against the reference Inverting Gradients runs, or says in one line how to get the reference."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HINT = 'attack_parity: the reference (breaching) is not installed; install the extra: pip install -e ".[parity]"'


@pytest.mark.timeout(600)
def test_attack_parity_quick_prints_its_table_or_the_install_hint():
    proc = subprocess.run([sys.executable, "benchmarks/attack_parity.py", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    importable = subprocess.run([sys.executable, "-c", "import breaching"], capture_output=True).returncode == 0
    if not importable:
        assert proc.stdout.strip().splitlines() == [HINT]
        return
    rows = [line.strip("| ").split(" | ") for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith(("| source", "| ---"))]
    # 2 sources x 2 states x 2 victims, each: source, state, victim, then four numbers.
    assert len(rows) == 8, proc.stdout
    for row in rows:
        assert len(row) == 7 and row[0] in ("synthetic", "skimage") and row[1] in ("init", "trained"), row
        assert all(math.isfinite(float(v)) for v in row[3:]), row
    assert "analytic head inversion" in proc.stdout and "wall time: simfl" in proc.stdout, proc.stdout
