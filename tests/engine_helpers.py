"""Helpers shared by the engine tests: run a scenario in-process and read its results."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import psutil
import torch
from ray._common.utils import get_default_ray_temp_dir

from simfl.engine.run_tables import EXECUTION_COLUMNS
from simfl.simulation.runner import main

# Columns that legitimately differ between equal runs (timing, placement, retries).
VOLATILE = EXECUTION_COLUMNS

# A study small enough for tests: three defences by two seeds, two rounds, two weak attacks.
TINY_STUDY = {
    "name": "tiny",
    "base": "defences_smoke.yaml",
    "set": {
        "arms": None,
        "data.synthetic": {"num_classes": 8, "val_size": 300, "test_size": 300},
        "training.rounds": 2, "training.clients_per_round": 6, "training.local_epochs": 1,
        "evaluation.every": 2, "checkpoint.every": 1,
        "attacks.methods": [{"kind": "ig", "iterations": 20}, {"kind": "idlg", "iterations": 10}],
        "attacks.victims": 2, "attacks.rounds": [1, 2], "attacks.held_out_victims": 1,
        "resources": {"client_actors": 1, "cpus_per_actor": 0.5},
        "attacks.pool": {"actors": 1, "cpus_per_actor": 0.5},
    },
    "grid": {
        "defence": {"none": {"defence": "none"},
                    "dp_lo": {"defence": {"kind": "dpsgd", "noise_multiplier": 0.5}},
                    "dp_hi": {"defence": {"kind": "dpsgd", "noise_multiplier": 1.5}}},
        "seed": [0, 1],
    },
    "comparison": {"target_accuracy": 0.2, "proposed": "dpsgd", "baselines": ["none"]},
}


SMOKE_FAST = [
    "--set", "training.rounds=3",
    "--set", "training.clients_per_round=8",
    "--set", "training.local_epochs=1",
    "--set", "evaluation.every=1",
    "--set", "evaluation.local_clients=8",
    "--quiet",
]


def run_smoke(out: Path, name: str, *extra: str) -> Path:
    """Run scenarios/smoke.yaml in this process (on the session's Ray instance); return the run dir."""
    code = main(["scenarios/smoke.yaml", "--set", f"output.dir={out}", "--set", f"output.name={name}",
                 *SMOKE_FAST, *extra])
    assert code == 0
    return out / name


def table(run_dir: Path, name: str) -> pd.DataFrame:
    df = pd.read_parquet(run_dir / name)
    keys = [c for c in ("round", "client_id", "population", "scope") if c in df.columns]
    return df.drop(columns=[c for c in VOLATILE if c in df.columns]).sort_values(keys).reset_index(drop=True)


def final_weights(run_dir: Path) -> torch.Tensor:
    return torch.load(run_dir / "final_weights.pt", weights_only=True)["weights"]


def assert_same_results(a: Path, b: Path) -> None:
    """Bit-identical final model and identical metric tables."""
    assert torch.equal(final_weights(a), final_weights(b))
    for name in ("rounds", "clients", "evals", "client_evals"):
        pd.testing.assert_frame_equal(table(a, name), table(b, name), check_exact=True)


def kill_at_checkpoint(cmd: list[str], cwd: Path, run_dir: Path, round_: int) -> None:
    """Run ``cmd`` in its own process group and SIGKILL the whole group once round ``round_`` is checkpointed."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / f"round_{round_:06d}.pt").exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for_workers_of(proc.pid)


def running(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie has ended)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for_workers_of(driver_pid: int, timeout: float = 120) -> None:
    """Wait until the Ray workers of a killed driver's local instance have exited.

    They are not in the driver's process group: killed with it, its actors live on for a moment, and
    a coordinator could still write a cell (final weights, then nothing else) while a resume reads it.
    Ray names a local session's directory after its driver's pid and each worker's log after the worker's.
    """
    sessions = Path(get_default_ray_temp_dir())  # RAY_TMPDIR, else TMPDIR, else /tmp: as Ray chooses it
    logs = list(sessions.glob(f"session_*_{driver_pid}/logs/python-core-worker-*_*.log"))
    assert logs, f"no Ray worker logs of driver {driver_pid}: has Ray changed how it names them?"
    pids = {int(p.stem.rsplit("_", 1)[1]) for p in logs}
    deadline = time.monotonic() + timeout
    while alive := [pid for pid in pids if running(pid)]:
        assert time.monotonic() < deadline, f"Ray workers {alive} of killed driver {driver_pid} still running"
        time.sleep(0.1)

