"""Where a run was made: the machine, the kernels its actors pinned, the library versions, simfl's commit.

Why: the same scenario and seed give the same numbers on machines of one kind
(:mod:`simfl.core.determinism`), and two runs that disagree must say why. A
run directory keeps this record as ``environment.json`` beside its scenario,
and ``python -m simfl.report DIR --compare OTHER`` names what differs between
two records when their results do.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from simfl.core.determinism import cpu_kernel_env

VERSIONED = ("simfl", "torch", "numpy", "ray", "opacus")
# What two records must share for their runs to give the same numbers (the rest is informative).
MUST_MATCH = ("cpu", "kernels", "versions", "commit")


def cpu_model() -> str:
    """The CPU's model name with its family, model and stepping numbers and cache size (``/proc/cpuinfo``:
    virtual machines often name only "AMD EPYC", and the numbers tell its generations apart)."""
    info = Path("/proc/cpuinfo")
    fields: dict[str, str] = {}
    for line in info.read_text().splitlines() if info.exists() else []:
        key, _, value = line.partition(":")
        if not key.strip():
            break  # the first processor's block is enough
        fields.setdefault(key.strip(), value.strip())
    if "model name" not in fields:
        return platform.processor() or "unknown"
    numbers = ", ".join(f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping", "cache size") if k in fields)
    return f"{fields['model name']} ({numbers})"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where there is none)."""
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def source_commit() -> str | None:
    """The git commit simfl's source is at (``+dirty`` with uncommitted changes), or None outside a checkout."""
    src = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def environment() -> dict:
    """This process's record (the driver's machine, which hosts the coordinator; a cluster's client actors
    are named per client by their Ray node in the ``clients`` table)."""
    flags = cpu_flags()
    versions: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu_model(),
        "avx512": "avx512f" in flags,
        "kernels": cpu_kernel_env(),
        "versions": versions,
        "python": sys.version.split()[0],
        "commit": source_commit(),
    }


def mismatches(a: dict, b: dict) -> list[str]:
    """What two records disagree on among the fields that decide the numbers, one line per field."""
    return [f"{key}: {a.get(key)!r} against {b.get(key)!r}" for key in MUST_MATCH if a.get(key) != b.get(key)]
