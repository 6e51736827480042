"""A run directory opened from Python: its tables as DataFrames, its scenario, its summary.

Why: a run is a directory of Parquet tables and a ``scenario.yaml``, written so
that anything can be recomputed from it; a notebook should get at them without
knowing that layout. Reading only (no Ray), and lazy: a table is read on first
access and kept, so opening every cell of a study costs nothing until a table
is asked for (a run still going is read as it stood then: open it again).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import pandas as pd

from simfl.core.errors import UserError
from simfl.engine.knowledge import naive_attacker_is_exact
from simfl.engine.run_tables import SCHEMAS
from simfl.engine.scenario import Scenario, load_scenario
from simfl.results.analysis import UTILITY_METRIC, run_metrics
from simfl.results.summary import WORST, attack_groups, final_value, training_attacks

# summary()'s columns: per run, then per attack and attacker knowledge (null without attacks).
SUMMARY_COLUMNS = ["rounds", "defence", "test_accuracy", "client_val_accuracy", "dp_epsilon_max",
                   "attack", "knowledge", "images", *WORST]


class Run:
    """A run directory (or a scenario's arms under one parent: see :attr:`arms`).

    ``run.rounds``, ``run.clients``, ``run.evals``, ``run.client_evals``, ``run.attacks``: the
    run's tables (docs/reference/run-directory.md says every column). A table the run wrote no row of
    (``attacks`` in a run without attacks) is an empty frame with the table's columns.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "scenario.yaml").is_file():
            raise UserError(f"{self.path}: not a run directory (no scenario.yaml)")
        self._tables: dict[str, pd.DataFrame] = {}

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @cached_property
    def scenario(self) -> Scenario:
        """The validated scenario the run ran (its ``scenario.yaml``)."""
        return load_scenario(self.path / "scenario.yaml")

    @cached_property
    def arms(self) -> dict[str, Run]:
        """Each arm's run, by arm name, of those started so far; empty for a scenario without arms."""
        return {arm: Run(self.path / arm) for arm in self.scenario.arms or {}
                if (self.path / arm / "scenario.yaml").is_file()}

    def table(self, name: str) -> pd.DataFrame:
        """One of the run's tables (``rounds``, ``clients``, ``evals``, ``client_evals``, ``attacks``), read once."""
        if name not in SCHEMAS:
            raise UserError(f"{name}: not a run table (one of {', '.join(SCHEMAS)})")
        if self.scenario.arms is not None:
            raise UserError(f"{self.path}: a scenario with arms has no tables of its own; each arm has, "
                            f"e.g. run.arms[{next(iter(self.scenario.arms))!r}].{name}")
        if name not in self._tables:
            directory = self.path / name  # a table with no rows has no directory (run_tables.PartWriter)
            self._tables[name] = (pd.read_parquet(directory) if directory.is_dir()
                                  else SCHEMAS[name].empty_table().to_pandas())
        return self._tables[name]

    @property
    def rounds(self) -> pd.DataFrame:
        """One row per round: cohort, training loss and accuracy, update norms, the defence's figures."""
        return self.table("rounds")

    @property
    def clients(self) -> pd.DataFrame:
        """One row per client per round it trained."""
        return self.table("clients")

    @property
    def evals(self) -> pd.DataFrame:
        """The global model's evaluations: per round, population and scope (test, local_val)."""
        return self.table("evals")

    @property
    def client_evals(self) -> pd.DataFrame:
        """Each evaluated client's local validation figures."""
        return self.table("client_evals")

    @property
    def attacks(self) -> pd.DataFrame:
        """One row per reconstructed image; empty (with the columns) where the run had no attacks."""
        return self.table("attacks")

    def metrics(self) -> pd.DataFrame:
        """Every metric of the run, per round and final, in the studies' tidy layout
        (:func:`simfl.results.analysis.run_metrics`)."""
        self._require_rounds()
        return run_metrics(self.path)

    def summary(self) -> pd.DataFrame:
        """Rounds run, final test and client validation accuracy, ε, and each attack's final means.

        One row per attack and attacker knowledge (over the training populations' victims, as
        ``python -m simfl.run`` tabulates arms; "naive = adaptive" where the naive attacker is
        exact), or one row without attacks. For a scenario with arms: every started arm's rows,
        with an ``arm`` column first.
        """
        if self.scenario.arms is not None:
            frames = [run.summary().assign(arm=arm) for arm, run in self.arms.items()
                      if (run.path / "rounds").is_dir()]
            columns = ["arm", *SUMMARY_COLUMNS]
            return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)
        metrics = self.metrics()
        head = {"rounds": int(self.rounds["round"].max()), "defence": self.scenario.defence.kind,
                "test_accuracy": final_value(metrics, "test_accuracy"),
                "client_val_accuracy": final_value(metrics, UTILITY_METRIC["client_val"]),
                "dp_epsilon_max": final_value(metrics, "dp_epsilon_max")}
        groups = attack_groups(training_attacks(metrics), naive_attacker_is_exact(self.scenario))
        rows = [{**head, "attack": attack, "knowledge": knowledge, "images": int(by.loc["attacker_acc", "n"]),
                 **{m: float(by.loc[m, "value"]) for m in WORST}} for attack, knowledge, by in groups]
        return pd.DataFrame(rows or [head], columns=SUMMARY_COLUMNS)

    def _require_rounds(self) -> None:
        if self.scenario.arms is not None:
            raise UserError(f"{self.path}: a scenario with arms; each arm is a run: run.arms[name]")
        if not (self.path / "rounds").is_dir():
            raise UserError(f"{self.path}: no round written yet")
