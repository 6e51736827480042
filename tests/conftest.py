"""Shared fixtures: one local Ray instance for the whole session.

Starting Ray costs seconds and every actor ~0.5 GB here, so engine tests share
one instance (4 logical CPUs on 2 cores, enough for a 4-actor run) instead of
each starting their own. Tests that need their own cluster (two nodes, SIGKILL)
start it themselves.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
