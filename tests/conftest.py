"""Shared fixtures: one local Ray instance for the whole session.

Starting Ray costs seconds and every actor ~0.5 GB here, so engine tests share
one instance (4 logical CPUs on 2 cores, enough for a 4-actor run) instead of
each starting their own. Tests that need their own cluster (two nodes, SIGKILL)
start it themselves.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
import yaml
from engine_helpers import TINY_STUDY, wait_for_workers_of

from simfl.simulation.runner import RAY_SYSTEM_CONFIG
from simfl.studies.study import main as study_main

# Tests that start Ray (directly, or through a fixture that does) are engine tests: `pytest -m "not engine"`
# is the quick loop. Subprocess benchmarks and the two-node cluster mark themselves.
ENGINE_FIXTURES = {"ray_local", "tiny_study"}


# Fixtures every xdist worker starts for itself (cheap, or needed once per process).
PER_WORKER_FIXTURES = {"ray_local", "one_torch_thread"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups (README runs `-n 2 --dist loadgroup`)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.engine)
    for item, group in shared_fixture_groups(items).items():
        item.add_marker(pytest.mark.xdist_group(group))
    # Longest first: the engine tests (minutes each) start while the quick ones can still fill the workers' gaps.
    items.sort(key=lambda item: item.get_closest_marker("engine") is None)


def shared_fixture_groups(items: list[pytest.Item]) -> dict[pytest.Item, str]:
    """One xdist group per set of tests that share a module- or session-scoped fixture of ours (a study, a run).

    Such a fixture runs once per worker that needs it: tests sharing one (directly or through another test's
    second shared fixture) go to the same worker, so each runs once. Every other test is scheduled alone.
    """
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    shared = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)  # pytest's resolved fixture closure (no public accessor)
        keys = sorted(f"{defs[-1].baseid}::{name}" for name, defs in (info.name2fixturedefs if info else {}).items()
                      if defs and defs[-1].scope != "function" and defs[-1].baseid.startswith("tests")
                      and name not in PER_WORKER_FIXTURES)
        for key in keys[1:]:
            parent[root(key)] = root(keys[0])
        if keys:
            shared[item] = keys[0]
    return {item: root(key) for item, key in shared.items()}


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    # Tests train tiny models in this process: extra intra-op threads only add
    # contention (50x slowdowns seen on a busy 2-core machine). Actors set their own.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_local():
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", _system_config=dict(RAY_SYSTEM_CONFIG))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_study(ray_local, tmp_path_factory):
    """A six-cell study run as a user runs it: SIGKILLed once a cell has finished, then resumed.

    The one study the suite runs end to end (CI runs none of its own): shared by the study and report
    tests, whose report test checks every figure. The killed run is ``python -m simfl.study`` in its own
    process group; the resume runs in this process, on the session's Ray instance (no second Ray start).
    """
    root = Path(__file__).resolve().parents[1]
    tmp = tmp_path_factory.mktemp("study")
    spec = dict(TINY_STUDY, base=str(root / "scenarios" / "defences_smoke.yaml"), output={"dir": str(tmp), "name": "s"})
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    study_dir = tmp / "s"
    cmd = [sys.executable, "-m", "simfl.study", "--no-dashboard", "--num-cpus", "2"]
    proc = subprocess.Popen([*cmd, str(path)], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    while not list(study_dir.glob("cells/*/final_weights.pt")):
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for_workers_of(proc.pid)
    finished = {p.parent.name: p.stat().st_mtime_ns for p in study_dir.glob("cells/*/final_weights.pt")}
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        code = study_main(["--no-dashboard", "--resume", str(study_dir)])
    assert code == 0, log.getvalue()
    cells = [f"{d}__seed-{s}" for d in ("none", "dp_lo", "dp_hi") for s in (0, 1)]
    return {"dir": study_dir, "cells": cells, "killed": {"finished": finished}, "resume_log": log.getvalue()}
