"""Attack jobs recorded instead of attacked (``attacks.record``), to be attacked later without training again.

Why: a study's search trains many probe runs and keeps one per cell; the cell
then needs attacks on exactly that training. A probe that records its attack
jobs (the victims' shares and private originals, the round's defence broadcast)
lets the cell attack them as a live run would have, at the cost of the attacks
alone. The same state goes into checkpoints for jobs still pending
(:func:`job_state`). Files: ``attack_jobs/round_NNNNNN.pt``, one per attacked
round, written atomically with ``torch.save`` and read with ``weights_only=True``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from simfl.engine.victim import victim_from_state, victim_state

_NAME = re.compile(r"round_(\d{6,})\.pt")


def job_state(job: dict) -> dict:
    """A job as plain tensors and containers: its round, its victims' states, the defence broadcast."""
    return {"round": job["round"], "victims": [victim_state(v) for v in job["victims"]], "context": job.get("context")}


def job_from_state(state: dict) -> dict:
    """The job :func:`job_state` saved, its victims rebuilt."""
    return {**state, "victims": [victim_from_state(v) for v in state["victims"]]}


def recorded_dir(run_dir: Path) -> Path:
    """Where a run records its attack jobs."""
    return Path(run_dir) / "attack_jobs"


def record_jobs(run_dir: Path, round_: int, jobs: list[dict]) -> Path:
    """Save one round's jobs (replacing what a killed attempt at the round left)."""
    directory = recorded_dir(run_dir)
    directory.mkdir(exist_ok=True)
    path = directory / f"round_{round_:06d}.pt"
    tmp = directory / f".{path.name}.tmp"
    torch.save({"round": round_, "jobs": [job_state(j) for j in jobs]}, tmp)
    os.replace(tmp, path)
    return path


def recorded_jobs(run_dir: Path, up_to: int) -> list[dict]:
    """The recorded jobs of rounds up to ``up_to``, as states (see :func:`job_from_state`), in round order."""
    directory = recorded_dir(run_dir)
    if not directory.is_dir():
        return []
    found = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name)))
    jobs: list[dict] = []
    for round_, path in found:
        if round_ <= up_to:
            jobs.extend(torch.load(path, map_location="cpu", weights_only=True)["jobs"])
    return jobs
