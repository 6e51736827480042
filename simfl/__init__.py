"""simfl: federated-learning privacy simulation on Ray.

From Python::

    import simfl
    run = simfl.simulate("scenarios/smoke.yaml", {"training.rounds": 3})
    run.evals, run.summary()                       # pandas DataFrames
    simfl.Run(run.path).scenario                   # any run directory, reopened
    study = simfl.run_study("scenarios/study_smoke.yaml", out="runs/s")
    study.cells, study.metrics, study.report

Bad input raises :class:`UserError` with the command line's one-line message.
The floors of the package (``simfl.core`` < ``data`` < ``privacy`` < ``engine``
< ``results`` < ``simulation`` < ``studies``) are in docs/guides/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from simfl.core.errors import UserError

if TYPE_CHECKING:
    from simfl.results.run import Run
    from simfl.simulation.runner import simulate
    from simfl.studies.study import run_study
    from simfl.studies.study_dir import Study

__version__ = "0.1.0"

# Importing any simfl module (``simfl.core.config`` in a Ray actor, a pure test) runs this file first,
# and pure modules must not load Ray (tests/test_layers.py) nor pay for pandas and the results floor.
# So the API is imported on first use (PEP 562): ``simfl.simulate`` loads Ray then, ``simfl.Run`` does not.
_LAZY = {
    "simulate": "simfl.simulation.runner",
    "run_study": "simfl.studies.study",
    "Run": "simfl.results.run",
    "Study": "simfl.studies.study_dir",
}

__all__ = ["Run", "Study", "UserError", "__version__", "run_study", "simulate"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'simfl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # once imported, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
