"""simfl from Python: run the quick-start scenario, look at its tables, open the run again.

    python examples/quickstart.py [OUTPUT_DIR]      # default: runs/

Three short rounds of scenarios/smoke.yaml (the full scenario: ``python -m simfl.run
scenarios/smoke.yaml``), on a private local Ray instance that the script starts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import simfl

SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "smoke.yaml"


def main(out: str) -> None:
    """Run, print, reopen."""
    # Any scenario key can be overridden, as `--set` does on the command line.
    run = simfl.simulate(SCENARIO, {"training.rounds": 3, "training.local_epochs": 1, "evaluation.every": 1,
                                    "output.dir": out})
    print(f"run directory: {run.path}")
    evals = run.evals  # a pandas DataFrame, read from the run's Parquet files
    test = evals[evals["scope"] == "test"].sort_values(["round", "population"])
    print("test accuracy by round and population:")
    print(test[["round", "population", "accuracy"]].to_string(index=False))

    again = simfl.Run(run.path)  # any run directory, e.g. one the command line wrote
    print("summary:")
    print(again.summary()[["rounds", "defence", "test_accuracy", "client_val_accuracy"]].to_string(index=False))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs")
