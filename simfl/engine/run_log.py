"""Where a run's results go: its Parquet tables and TensorBoard, fed from round results.

The coordinator hands each round's aggregate, the defence's figures and the
evaluations here; this module decides how they are written. It holds no
training state, so a resumed run's log is rebuilt from the run directory
(tables truncated to the checkpoint's manifest, TensorBoard purged past it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from simfl.engine.round import Aggregate
from simfl.engine.run_tables import RunTables


class RunLog:
    """The run's tables and TensorBoard writer."""

    def __init__(self, run_dir: Path, flush_seconds: float, scenario_yaml: str,
                 resume: tuple[int, dict[str, list[str]]] | None = None) -> None:
        """``resume``: (the checkpoint's round, its tables manifest): what was written after it is discarded."""
        self.run_dir = Path(run_dir)
        self.tables = RunTables(self.run_dir, flush_seconds)
        if resume is not None:
            self.tables.truncate_to(resume[1])
        self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume[0] + 1 if resume else None)
        if resume is None:
            # Markdown code block, so TensorBoard's text tab shows the scenario verbatim.
            self.tb.add_text("scenario", "```yaml\n" + scenario_yaml + "```", 0)

    def training(self, agg: Aggregate) -> None:
        """The cohort's rows and means."""
        self.tables.append("clients", agg.client_rows)
        self.tb.add_scalar("train/loss", agg.train_loss, agg.round)
        self.tb.add_scalar("train/accuracy", agg.train_accuracy, agg.round)

    def defence(self, round_: int, kind: str, knobs: dict[str, Any], figures: dict[str, float]) -> dict[str, Any]:
        """The defence's round figures and knobs to TensorBoard; returns their rounds-table columns."""
        for name, value in figures.items():
            self.tb.add_scalar(f"defence/{name}", value, round_)
        for name, value in knobs.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(f"defence/knob/{name}", value, round_)
        return {**figures, "defence": kind, "defence_knobs": json.dumps(knobs, sort_keys=True)}

    def evaluation(self, round_: int, central: list[dict], per_client: list[dict], per_population: list[dict]) -> None:
        """Log an evaluation: central and per-population scalars, and the evals and client_evals rows."""
        for row in central:
            self.tb.add_scalar(f"test_accuracy/{row['population']}", row["accuracy"], round_)
            self.tb.add_scalar(f"test_loss/{row['population']}", row["loss"], round_)
        for row in per_population:
            self.tb.add_scalar(f"local_val_accuracy/{row['population']}", row["accuracy"], round_)
        if per_client:
            self.tables.append("client_evals", per_client)
        self.tables.append("evals", central + per_population)

    def round(self, row: dict[str, Any]) -> None:
        """Log a round's row and its duration."""
        self.tables.append("rounds", [row])
        self.tb.add_scalar("time/round_s", row["round_time_s"], row["round"])

    def flush(self) -> None:
        """Write buffered table rows and TensorBoard events."""
        self.tables.flush()
        self.tb.flush()

    def close(self) -> None:
        """Write buffered table rows and close TensorBoard."""
        self.tables.flush()
        self.tb.close()
