"""Waiting out an actor restart: one place for the backoff both the client and the attacker pools need.

Ray notices an actor's death and restarts it asynchronously (``max_restarts=-1``);
on a loaded machine, calls sent in between fail for several seconds with a
``RayActorError`` (``ActorUnavailableError`` while it restarts). Re-sending at
once would spend every retry before the actor is back, so a lost call's
follow-up goes out only once the actor answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayActorError

# How long a dead actor may take to come back before the run gives up on it.
RESTART_TIMEOUT_S = 300


def once_restarted(call: Callable[[], ray.ObjectRef], what: str, timeout_s: float = RESTART_TIMEOUT_S) -> Any:
    """``ray.get(call())``, re-issued with backoff while the actor behind it is dead or restarting.

    ``what`` names the actor in the error raised when it is not back within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    pause = 0.1
    while True:
        try:
            return ray.get(call())
        except RayActorError:
            if time.monotonic() + pause > deadline:
                raise RuntimeError(f"{what} could not be restarted within {timeout_s:g} s") from None
            time.sleep(pause)
            pause = min(2 * pause, 5.0)
