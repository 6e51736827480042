"""Checkpoints: everything a resumed run needs to continue bit-for-bit.

Saved with ``torch.save`` and read back with ``weights_only=True``: only tensors
and plain containers go in, so loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"round_(\d{6,})\.pt")


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, round_: int, state: dict[str, Any], keep: int) -> Path:
    """Write atomically, then prune all but the newest ``keep`` checkpoints."""
    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"round_{round_:06d}.pt"
    tmp = directory / f".{path.name}.tmp"
    torch.save({"round": round_, **state}, tmp)
    os.replace(tmp, path)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink()
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest round first."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found, key=lambda item: item[0])]  # round 1000000 sorts last


def latest_round(run_dir: Path) -> int | None:
    """The round of the newest checkpoint (from its name; nothing is loaded); None if there is none."""
    found = list_checkpoints(run_dir)
    return int(_NAME.fullmatch(found[-1].name).group(1)) if found else None  # type: ignore[union-attr]


def load_latest(run_dir: Path) -> dict[str, Any] | None:
    """The newest checkpoint, read with ``weights_only=True`` (never arbitrary pickles); None if there is none."""
    found = list_checkpoints(run_dir)
    if not found:
        return None
    return torch.load(found[-1], map_location="cpu", weights_only=True)
