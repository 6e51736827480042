"""A study directory opened from Python: its cells as runs, its tidy metrics, its report.

Why: a study writes one run directory per cell, ``cells.parquet``,
``metrics.parquet`` and ``report.md``; a notebook should get at them without
knowing that layout. Reading only (no Ray); every table is read on first access.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import pandas as pd

from simfl.core.errors import UserError
from simfl.results.run import Run
from simfl.studies.profile import profile
from simfl.studies.spec import StudyConfig, load_study, study_cells


class Study:
    """A study directory (``python -m simfl.study`` or :func:`simfl.run_study` wrote it)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "study.yaml").is_file():
            raise UserError(f"{self.path}: not a study directory (no study.yaml)")

    def __repr__(self) -> str:
        return f"Study({str(self.path)!r})"

    @cached_property
    def config(self) -> StudyConfig:
        """The validated study, as saved with its base scenario inlined."""
        return load_study(self.path / "study.yaml")[0]

    @cached_property
    def cell_table(self) -> pd.DataFrame:
        """One row per started cell: its axes' labels, defence, seed, status and run directory."""
        return study_cells(self.path)

    @cached_property
    def cells(self) -> dict[str, Run]:
        """Each started cell's run, by cell name."""
        return {row.cell: Run(row.run_dir) for row in self.cell_table.itertuples()}

    @cached_property
    def metrics(self) -> pd.DataFrame:
        """The tidy metrics of every finished cell, keyed by cell (``metrics.parquet``; layout:
        :mod:`simfl.results.analysis`)."""
        path = self.path / "metrics.parquet"
        if not path.is_file():
            raise UserError(f"{self.path}: no metrics.parquet yet (the study has not finished; resume it)")
        return pd.read_parquet(path)

    def profile(self) -> str:
        """Where the study's time went, as Markdown (:func:`simfl.studies.profile.profile`)."""
        return profile(self.path)

    @property
    def report(self) -> Path | None:
        """``report.md``, where it was written."""
        path = self.path / "report.md"
        return path if path.is_file() else None
