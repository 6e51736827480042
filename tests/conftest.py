"""Shared fixtures: one local Ray instance for the whole session.

Starting Ray costs seconds and every actor ~0.5 GB here, so engine tests share
one instance (4 logical CPUs on 2 cores, enough for a 4-actor run) instead of
each starting their own. Tests that need their own cluster (two nodes, SIGKILL)
start it themselves.
"""

from __future__ import annotations

import pytest
import torch


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
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
