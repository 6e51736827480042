"""A real two-node Ray cluster on this machine, used exactly as a user would use one.

Two `ray start --block` processes (a head and a worker node, one CPU each) form
the cluster; `python -m simfl.run ... --address` then drives it from outside.
With one CPU per node and one CPU per client actor, two client actors can only
fit one per node, so the run's `clients` table must name both nodes.

The cluster must not disturb other Ray instances that tests may run beside it:
every port with a fixed default gets a free one, worker ports are left to the
OS, the temp dir (which also holds the `address=auto` pointer file) is private,
and teardown signals only what this fixture started: the nodes' process groups
and their descendants. It never runs `ray stop`, which would kill every Ray
process on the machine.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import pytest

pytestmark = pytest.mark.engine  # whole benchmarks or clusters in subprocesses: minutes

REPO = Path(__file__).resolve().parents[1]
# The `ray` CLI of the interpreter running the tests, so cluster and engine share one Ray.
RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
STARTUP_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30
# Bounded so two nodes fit beside whatever else the test session runs.
OBJECT_STORE_BYTES = 512 * 1024**2


@dataclass(frozen=True)
class Cluster:
    address: str
    node_ids: frozenset[str]


def free_ports(n: int) -> list[int]:
    """n distinct ports that are free now (held open together so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cluster_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # On SIGTERM a node first asks the GCS to drain it for up to 30 s; at teardown
    # the GCS may already be gone, so that would only delay the kill.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    return env


def start_node(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        # Own session: the node's daemons share a process group we can signal as one.
        return subprocess.Popen(
            [RAY, "start", "--block", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=cluster_env(),
        )


def stop_node(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        # Whatever of the group outlived its leader, or ignored SIGTERM.
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def descendants(procs: list[subprocess.Popen]) -> list[psutil.Process]:
    """Every process below the given ones. Ray starts worker processes in sessions of
    their own, so signalling the nodes' process groups does not reach them."""
    found = []
    for proc in procs:
        try:
            found += psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    return found


def alive_node_ids(address: str) -> set[str]:
    """Hex ids of the nodes `ray status` lists as active. It reads the GCS directly;
    the state API (`ray list nodes`) would need the dashboard's HTTP server."""
    try:
        status = subprocess.run(
            [RAY, "status", "--address", address], capture_output=True, text=True, timeout=60, env=cluster_env()
        )
    except subprocess.TimeoutExpired:  # GCS not answering yet; the caller retries until its deadline.
        return set()
    active = status.stdout.partition("Active:")[2].partition("Pending:")[0]
    return set(re.findall(r"\bnode_([0-9a-f]+)\b", active))


def wait_for_nodes(address: str, count: int, procs: dict[str, subprocess.Popen], logs: dict[str, Path]) -> set[str]:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                pytest.fail(f"{name} `ray start` exited with {proc.returncode}:\n{logs[name].read_text()[-4000:]}")
        ids = alive_node_ids(address)
        if len(ids) == count:
            return ids
        time.sleep(1)
    tails = "\n".join(f"--- {name}\n{logs[name].read_text()[-2000:]}" for name in procs)
    pytest.fail(f"{count} alive nodes not seen at {address} within {STARTUP_TIMEOUT_S} s\n{tails}")


@pytest.fixture
def two_node_cluster():
    assert RAY, "the `ray` CLI is not installed"
    # Short on purpose: Ray's Unix socket paths under it must stay below 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    (gcs_port, client_port, dashboard_port, head_agent_port, worker_agent_port) = free_ports(5)
    address = f"127.0.0.1:{gcs_port}"
    common = [
        "--num-cpus=1",
        # Both nodes would otherwise claim the same physical GPUs.
        "--num-gpus=0",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
        # Port 0 lets the OS pick each worker's port, where the default fixed
        # range would be shared with every other Ray node on this machine.
        "--min-worker-port=0",
        "--max-worker-port=0",
    ]
    head_args = [
        "--head",
        f"--port={gcs_port}",
        "--include-dashboard=false",
        # The API server still starts without the dashboard UI, on a fixed
        # default port (8265) that may belong to another cluster.
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={client_port}",
        f"--dashboard-agent-listen-port={head_agent_port}",
        *common,
    ]
    worker_args = [f"--address={address}", f"--dashboard-agent-listen-port={worker_agent_port}", *common]

    logs = {"head": Path(temp_dir) / "head.log", "worker": Path(temp_dir) / "worker.log"}
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["head"] = start_node(head_args, logs["head"])
        wait_for_nodes(address, 1, procs, logs)
        procs["worker"] = start_node(worker_args, logs["worker"])
        node_ids = wait_for_nodes(address, 2, procs, logs)
        yield Cluster(address=address, node_ids=frozenset(node_ids))
    finally:
        # Taken before any signal: once a raylet dies, its workers are re-parented
        # and can no longer be told apart from other clusters' workers.
        workers = descendants(list(procs.values()))
        # Worker node first, while the head's GCS can still record it leaving.
        for name in ("worker", "head"):
            if name in procs:
                stop_node(procs[name])
        # Workers exit on their own once their raylet is gone; kill any that linger.
        _, lingering = psutil.wait_procs(workers, timeout=STOP_TIMEOUT_S)
        for p in lingering:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.timeout(600)
def test_client_actors_spread_over_both_nodes(two_node_cluster, tmp_path):
    out_dir = tmp_path / "runs"
    cmd = [
        sys.executable,
        "-m",
        "simfl.run",
        "scenarios/smoke.yaml",
        "--address",
        two_node_cluster.address,
        "--set",
        "resources.client_actors=2",
        "--set",
        f"output.dir={out_dir}",
        "--set",
        "training.rounds=2",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
    assert run.returncode == 0, f"simfl.run exited {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"

    run_dirs = [p for p in out_dir.iterdir() if p.is_dir()]
    assert len(run_dirs) == 1, f"expected one run directory under {out_dir}, found {run_dirs}"
    clients = pd.read_parquet(run_dirs[0] / "clients")
    assert "node_id" in clients.columns, list(clients.columns)
    assert len(two_node_cluster.node_ids) == 2
    assert set(clients["node_id"].unique()) == set(two_node_cluster.node_ids)
