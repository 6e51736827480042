"""Runs packed onto one Ray instance or cluster: as many at once as its CPUs and GPUs hold.

Shared by a study's cells and by its searches' probe runs (:mod:`simfl.studies.probes`).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Literal

import ray

from simfl.simulation.runner import Prepared, run_in


def cell_demand(prep: Prepared, n_actors: int) -> tuple[float, float]:
    """CPUs and GPUs a cell's actors hold while it runs."""
    return prep.scenario.demand(n_actors)


def run_cells(cells_dir: Path, prepared: dict[str, tuple[Prepared, int]], concurrency: int | Literal["auto"], *,
              quiet: bool) -> dict[str, str]:
    """Run every cell, packing as many at once as the cluster holds; returns each cell's status.

    A cell is started when its actors' CPUs and GPUs fit beside the running
    cells' (one always runs, however large), so no cell's actors sit waiting
    for another cell's resources. A cell that fails is reported and the others
    go on. Each cell runs without a progress bar; ``quiet``: no line per cell either.
    """
    totals = ray.cluster_resources()
    cpus, gpus = totals.get("CPU", 0.0), totals.get("GPU", 0.0)
    limit = len(prepared) if concurrency == "auto" else concurrency
    queue = list(prepared)
    status: dict[str, str] = {}
    running: dict[Future, tuple[str, float, float, float]] = {}
    lock = threading.Lock()
    started_at = time.monotonic()

    def fits(name: str) -> bool:
        need_c, need_g = cell_demand(*prepared[name])
        used_c = sum(c for _, c, _, _ in running.values())
        used_g = sum(g for _, _, g, _ in running.values())
        return not running or (used_c + need_c <= cpus + 1e-9 and used_g + need_g <= gpus + 1e-9)

    def say(text: str) -> None:
        if not quiet:
            with lock:
                print(f"simfl study [{time.monotonic() - started_at:6.0f} s] {text}", file=sys.stderr, flush=True)

    def loop() -> None:
        while queue or running:
            while len(running) < limit and (name := next((n for n in queue if fits(n)), None)):
                queue.remove(name)
                prep, n_actors = prepared[name]
                need_c, need_g = cell_demand(prep, n_actors)
                say(f"cell {name}: started ({n_actors} client actors)" if n_actors else
                    f"cell {name}: started (trained already: attacks only)")
                future = pool.submit(run_in, cells_dir / name, prep, n_actors, quiet=True)
                running[future] = (name, need_c, need_g, time.monotonic())
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                name, _, _, t0 = running.pop(future)
                try:
                    out = future.result()
                except Exception as exc:  # a bug or a lost cluster in one cell: the others go on
                    status[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    say(f"cell {name}: FAILED ({status[name]})")
                    continue
                if out is None:
                    status[name] = "skipped (finished before)"
                    say(f"cell {name}: finished before, skipped")
                else:
                    status[name] = "finished"
                    acc = out[1].get("test_accuracy")
                    say(f"cell {name}: finished in {time.monotonic() - t0:.0f} s"
                        + (f", test accuracy {acc:.3f}" if acc is not None else ""))

    with ThreadPoolExecutor(max_workers=limit) as pool:
        try:
            loop()
        except KeyboardInterrupt:  # the pool would wait for every running cell: leave now, resumable
            print(f"\nsimfl: study interrupted; finished cells are kept. Continue with "
                  f"--resume {cells_dir.parent}", file=sys.stderr)
            ray.shutdown()
            os._exit(130)
    return status
