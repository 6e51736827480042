"""Where finished attack jobs go: the attacks table, per-round TensorBoard means and grids, PNGs.

Jobs finish out of order and long after their round, so a round's means are
logged when its last job is settled (finished or dropped). Attack events have
their own TensorBoard writer (``tensorboard/attacks``): after a resume it purges
from the earliest round whose jobs are re-run, which the training writer must
not do, and re-logs the means of later rounds from the kept table rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.tensorboard import SummaryWriter

from simfl.engine.run_tables import RunTables

METRICS = ("psnr", "ssim", "mse", "attacker_correct", "nn_match")
# Logged under another name than the column's: a share of images, not a per-image verdict.
SCALAR_NAMES = {"attacker_correct": "attacker_accuracy", "nn_match": "nn_match_rate"}
BASELINES = (("", ""), ("random_", "_random_baseline"), ("mean_", "_mean_baseline"),
             ("class_mean_", "_class_mean_baseline"))


def attack_label(kind: str, knowledge: str) -> str:
    """How an attack is named in TensorBoard tags and PNG names: ``ig`` (naive) or ``ig_adaptive``."""
    return kind if knowledge == "naive" else f"{kind}_{knowledge}"


class AttackLog:
    """Where finished attack jobs go: the attacks table, per-round TensorBoard means, reconstruction grids."""

    def __init__(
        self,
        run_dir: Path,
        tables: RunTables,
        population_of: Callable[[int], str],
        resumed_round: int | None = None,
        rerun_rounds: set[int] | None = None,
    ) -> None:
        """``resumed_round``: the checkpoint's round when resuming; ``rerun_rounds``: rounds of its pending jobs."""
        self.run_dir = Path(run_dir)
        self.tables = tables
        self.population_of = population_of
        self.left: dict[int, int] = {}  # jobs of a round not yet settled
        self.rows: dict[int, list[dict]] = {}  # finished rows of rounds with jobs left
        self.grid: dict[int, tuple[int, dict]] = {}  # per round: the grids of its lowest-client job
        purge = None
        rerun_rounds = rerun_rounds or set()
        if resumed_round is not None:
            purge = min(rerun_rounds | {resumed_round + 1})
        self.tb = SummaryWriter(str(self.run_dir / "tensorboard" / "attacks"), purge_step=purge)
        if purge is not None:
            self._relog_kept(purge, rerun_rounds)

    def _relog_kept(self, purge: int, rerun_rounds: set[int]) -> None:
        """Rounds at or after the purge step: re-log complete ones, keep partial ones' rows for their means."""
        if not (self.run_dir / "attacks").is_dir():
            return
        kept = pd.read_parquet(self.run_dir / "attacks")
        for r, group in kept[kept["round"] >= purge].groupby("round"):
            rows = group.to_dict("records")
            if int(r) in rerun_rounds:
                self.rows[int(r)] = rows
            else:
                self._log_means(int(r), rows)

    def expect(self, jobs: list[dict]) -> list[dict]:
        """Count jobs per round before any is submitted: waiting for room may finish some meanwhile."""
        for job in jobs:
            self.left[job["round"]] = self.left.get(job["round"], 0) + 1
        return jobs

    def done(self, job: dict, out: dict) -> None:
        """Stream a finished job out: its table rows and PNGs now, the round's means with its last job."""
        r = job["round"]
        rows = out["rows"]
        for row in rows:
            row["population"] = self.population_of(row["client_id"])
            row["submitted_at"] = job["submitted_at"]
        self.tables.append("attacks", rows)
        first = job["victims"][0].client_id
        from torchvision.utils import make_grid, save_image  # noqa: PLC0415  (lazy: seconds per Ray worker, and most runs never use it)

        png_dir = self.run_dir / "reconstructions"
        png_dir.mkdir(exist_ok=True)
        grids = {}
        for kind, (orig, recon) in out["grids"].items():
            grids[kind] = make_grid(torch.cat([orig, recon]), nrow=len(orig), padding=1, pad_value=1.0)
            save_image(grids[kind], png_dir / f"round{r:05d}_{kind}_client{first}.png")
        # One grid per round and attack in TensorBoard: the job with the lowest client id,
        # so which one shows does not depend on which attacker finished first.
        if r not in self.grid or first < self.grid[r][0]:
            self.grid[r] = (first, grids)
        self.rows.setdefault(r, []).extend(rows)
        self.settle(r)

    def settle(self, r: int) -> None:
        """One job of round ``r`` is finished or dropped; with the round's last, log its means and grid."""
        self.left[r] -= 1
        if self.left[r]:
            return
        del self.left[r]
        rows = self.rows.pop(r, [])
        if rows:
            self._log_means(r, rows)
        _, grids = self.grid.pop(r, (None, {}))
        for kind, grid in grids.items():
            self.tb.add_image(f"attack/{kind}/originals_above_reconstructions", grid, r)

    def _log_means(self, r: int, rows: list[dict]) -> None:
        for kind in sorted({attack_label(row["attack"], row["knowledge"]) for row in rows}):
            mine = [row for row in rows if attack_label(row["attack"], row["knowledge"]) == kind]
            for prefix, suffix in BASELINES:
                for metric in METRICS:
                    # Rows kept from a run begun before a column existed lack it (None or NaN): left out.
                    values = [v for v in (row.get(prefix + metric) for row in mine) if v is not None and v == v]
                    if values:
                        name = SCALAR_NAMES.get(metric, metric)
                        self.tb.add_scalar(f"attack/{kind}/{name}{suffix}", float(np.mean(values)), r)
            label = float(np.mean([row["label_accuracy"] for row in mine]))
            self.tb.add_scalar(f"attack/{kind}/label_accuracy", label, r)

    def flush(self) -> None:
        """Write pending TensorBoard events to disk."""
        self.tb.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        self.tb.close()
