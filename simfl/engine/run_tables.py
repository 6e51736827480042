"""Run tables: their schemas, and a crash-safe streaming Parquet writer.

Each table is a directory of part files. A part is written under a hidden
temporary name and renamed into place, so a crash never leaves a truncated
file that ``pandas.read_parquet(run_dir / "clients")`` would choke on
(pyarrow skips names starting with "." or "_").
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from simfl.privacy.defences.base import client_columns, round_columns

# What defences log (null where the run's defence does not), as every registered defence declares it:
# per client, and per round (the cohort aggregates of the client figures, then the server step's figures).
CLIENT_DEFENCE_COLUMNS = client_columns()
ROUND_DEFENCE_COLUMNS = round_columns()

# Columns that record how a run was executed, not a result: wall-clock times, which Ray node and client actor
# ran a client, its attempt after a lost actor, a round's reruns. Two runs of one scenario and seed agree on
# every other column, whatever the actors and CPUs (simfl.results.compare).
EXECUTION_COLUMNS = frozenset({"round_time_s", "finished_at", "time_s", "node_id", "actor", "attempt", "reruns",
                               "attack_s", "submitted_at"})

SCHEMAS: dict[str, pa.Schema] = {
    "rounds": pa.schema(
        [
            ("round", pa.int32()),
            ("clients", pa.int32()),
            ("samples", pa.int64()),
            ("train_loss", pa.float64()),
            ("train_accuracy", pa.float64()),
            ("update_norm_mean", pa.float64()),
            ("global_update_norm", pa.float64()),
            ("reruns", pa.int32()),
            ("attack_victims", pa.int32()),  # victims this round, probed held-out ones included (attacked or dropped)
            ("attack_victims_dropped", pa.int32()),  # victims not attacked: the pool was full (when_full: drop)
            ("round_time_s", pa.float64()),
            ("finished_at", pa.float64()),
            ("defence", pa.string()),
            ("defence_knobs", pa.string()),  # JSON: every knob of the defence, defaults filled in
            *((name, pa.float64()) for name in ROUND_DEFENCE_COLUMNS),
        ]
    ),
    "clients": pa.schema(
        [
            ("round", pa.int32()),
            ("client_id", pa.int64()),
            ("population", pa.string()),
            ("samples", pa.int64()),
            ("steps", pa.int32()),
            ("loss", pa.float64()),
            ("accuracy", pa.float64()),
            ("update_norm", pa.float64()),
            ("time_s", pa.float64()),
            ("actor", pa.int32()),
            ("node_id", pa.string()),
            ("attempt", pa.int32()),
            ("participation", pa.int32()),
            *((name, pa.float64()) for name in CLIENT_DEFENCE_COLUMNS),
        ]
    ),
    "evals": pa.schema(
        [
            ("round", pa.int32()),
            ("population", pa.string()),
            ("held_out", pa.bool_()),
            ("scope", pa.string()),
            ("clients", pa.int32()),
            ("samples", pa.int64()),
            ("loss", pa.float64()),
            ("accuracy", pa.float64()),
        ]
    ),
    "client_evals": pa.schema(
        [
            ("round", pa.int32()),
            ("client_id", pa.int64()),
            ("population", pa.string()),
            ("samples", pa.int64()),
            ("loss", pa.float64()),
            ("accuracy", pa.float64()),
        ]
    ),
    # One row per reconstructed image; docs/guides/attacks.md "Attack metrics" explains every column.
    "attacks": pa.schema(
        [
            ("round", pa.int32()),
            ("client_id", pa.int64()),
            ("population", pa.string()),
            ("attack", pa.string()),
            ("knowledge", pa.string()),  # naive | adaptive (the attacker knows the defence)
            ("defence", pa.string()),
            ("view", pa.string()),
            ("labels", pa.string()),
            ("batch_size", pa.int32()),
            ("image", pa.int32()),
            ("matched_image", pa.int32()),
            ("true_label", pa.int32()),
            ("iterations", pa.int32()),
            ("objective", pa.float64()),
            ("objective_at_truth", pa.float64()),  # the same objective at the true images: convergence check
            ("label_accuracy", pa.float64()),
            ("mse", pa.float64()),
            ("psnr", pa.float64()),
            ("ssim", pa.float64()),
            ("attacker_correct", pa.bool_()),
            ("nn_match", pa.bool_()),  # the reconstruction's nearest pool image is its own original
            ("nn_rank", pa.int32()),  # that original's rank among the pool by pixel distance (1 = nearest)
            ("random_mse", pa.float64()),
            ("random_psnr", pa.float64()),
            ("random_ssim", pa.float64()),
            ("random_attacker_correct", pa.bool_()),
            ("random_nn_match", pa.bool_()),
            ("random_nn_rank", pa.int32()),
            ("mean_mse", pa.float64()),
            ("mean_psnr", pa.float64()),
            ("mean_ssim", pa.float64()),
            ("mean_attacker_correct", pa.bool_()),
            ("mean_nn_match", pa.bool_()),
            ("mean_nn_rank", pa.int32()),
            ("class_mean_mse", pa.float64()),
            ("class_mean_psnr", pa.float64()),
            ("class_mean_ssim", pa.float64()),
            ("class_mean_attacker_correct", pa.bool_()),
            ("class_mean_nn_match", pa.bool_()),
            ("class_mean_nn_rank", pa.int32()),
            ("nn_pool_size", pa.int32()),  # candidates nn_rank ranks among: the batch, then same-label peers
            ("evaluator_on_original", pa.bool_()),
            ("evaluator_test_accuracy", pa.float64()),
            ("evaluator_arch", pa.string()),  # the attacker-accuracy classifier's architecture (never the attacked one)
            ("victims_in_job", pa.int32()),
            ("attacker", pa.int32()),
            ("attack_s", pa.float64()),
            ("submitted_at", pa.float64()),
            ("finished_at", pa.float64()),
        ]
    ),
}


class PartWriter:
    """Buffers rows of one table and writes them as numbered part files."""

    def __init__(self, directory: Path, schema: pa.Schema) -> None:
        self.directory = Path(directory)  # created with the first part: a table with no rows has no directory
        self.schema = schema
        self.rows: list[dict] = []
        self.next_part = len(self.parts())

    def parts(self) -> list[str]:
        """The part files already written, in order."""
        return sorted(p.name for p in self.directory.glob("part-*.parquet"))

    def append(self, rows: list[dict]) -> None:
        """Buffer rows until the next :meth:`flush`."""
        self.rows.extend(rows)

    def flush(self) -> None:
        """Write buffered rows as the next part file (atomically: written aside, then renamed)."""
        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"part-{self.next_part:06d}.parquet"
        tmp = self.directory / f".{name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.directory / name)
        self.next_part += 1
        self.rows = []

    def truncate_to(self, keep: list[str]) -> None:
        """Delete parts written after a checkpoint, so a resumed run rewrites them exactly once."""
        for name in self.parts():
            if name not in keep:
                (self.directory / name).unlink()
        for tmp in self.directory.glob(".part-*.tmp"):
            tmp.unlink()
        self.next_part = len(self.parts())


class RunTables:
    """All tables of a run, flushed together every ``flush_seconds`` and at checkpoints."""

    def __init__(self, run_dir: Path, flush_seconds: float) -> None:
        self.writers = {name: PartWriter(Path(run_dir) / name, schema) for name, schema in SCHEMAS.items()}
        self.flush_seconds = flush_seconds
        self.last_flush = time.monotonic()

    def append(self, table: str, rows: list[dict]) -> None:
        """Queue rows; a key the table does not declare is an error (a figure is never silently dropped)."""
        names = set(self.writers[table].schema.names)
        for row in rows:
            extra = set(row) - names
            if extra:
                raise ValueError(f"table {table}: undeclared columns {sorted(extra)} (declare them in tables.SCHEMAS, "
                                 "or as the defence's client_figures / round_figures)")
        self.writers[table].append(rows)

    def maybe_flush(self) -> None:
        """Flush if ``flush_seconds`` have passed since the last flush."""
        if time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Flush every table."""
        for writer in self.writers.values():
            writer.flush()
        self.last_flush = time.monotonic()

    def manifest(self) -> dict[str, list[str]]:
        """The part files of every table: what a checkpoint records."""
        return {name: writer.parts() for name, writer in self.writers.items()}

    def truncate_to(self, manifest: dict[str, list[str]]) -> None:
        """Delete every table's parts not in ``manifest`` (written after the checkpoint a resumed run starts from)."""
        for name, writer in self.writers.items():
            writer.truncate_to(manifest.get(name, []))
