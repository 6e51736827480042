"""Hand-worked references for the analysis, intervals and summary tests: a t half-width by hand and
a tiny hand-written run directory whose every expected figure is worked out below.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import stats

from simfl.engine.run_tables import SCHEMAS
from simfl.engine.scenario import load_scenario, scenario_to_yaml

SMOKE = Path(__file__).resolve().parents[1] / "scenarios" / "defences_smoke.yaml"


def t_half(values) -> float:
    """Half-width of the 95 % t-interval of a mean, by hand."""
    v = np.asarray(values, dtype=float)
    return float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def write_table(directory, name, rows):
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMAS[name]), directory / "part-000000.parquet")


def attack_row(round_, population, attack, knowledge, correct, mse, psnr, ssim=0.5, label_acc=1.0, client=0):
    return {"round": round_, "client_id": client, "population": population, "attack": attack,
            "knowledge": knowledge, "defence": "none", "view": "gradient", "labels": "known", "batch_size": 1,
            "attacker_correct": correct, "mse": mse, "psnr": psnr, "ssim": ssim, "label_accuracy": label_acc}


# Training population A: per round, per attack, (attacker_correct, mse, psnr, ssim).
#   ig: round 1 (T, .1, 20, .6) (T, .1, 20, .6); round 2 (F, .2, 22, .4) (T, .2, 22, .4)
#       -> final acc .75, mse .15, psnr 21, ssim .5
#   gi: round 1 (F, .05, 25, .3) (F, .05, 25, .3); round 2 (T, .05, 25, .3) (T, .05, 25, .3)
#       -> final acc .5, mse .05, psnr 25, ssim .3
# Worst, final: attacker_acc ig (.75), mse gi (.05), psnr gi (25), ssim ig (.5).
# Worst attacker_acc by round: ig in round 1 (1 vs 0), gi in round 2 (1 vs .5).
# Held-out population C, round 2: ig (T, .3, 15, .2), gi (F, .4, 14, .1): worst is ig for every metric.
A_ATTACKS = {
    "ig": {1: [(True, 0.1, 20.0, 0.6), (True, 0.1, 20.0, 0.6)], 2: [(False, 0.2, 22.0, 0.4), (True, 0.2, 22.0, 0.4)]},
    "gi": {1: [(False, 0.05, 25.0, 0.3), (False, 0.05, 25.0, 0.3)], 2: [(True, 0.05, 25.0, 0.3)] * 2},
}
C_ATTACKS = {"ig": {2: [(True, 0.3, 15.0, 0.2)]}, "gi": {2: [(False, 0.4, 14.0, 0.1)]}}


def naive_attacks():
    rows = []
    for population, design in (("A", A_ATTACKS), ("C", C_ATTACKS)):
        for attack, by_round in design.items():
            for r, images in by_round.items():
                for correct, mse, psnr, ssim in images:
                    rows.append(attack_row(r, population, attack, "naive", correct, mse, psnr, ssim))
    return rows


def make_run(root: Path, attacks: list[dict], *overrides: str, name: str = "run") -> Path:
    """A run directory by hand; its scenario is defences_smoke.yaml's without arms, with ``overrides``
    (``KEY.PATH=VALUE``; the defence is none unless set)."""
    run = root / name
    write_table(run / "rounds", "rounds", [
        {"round": 2, "train_loss": 0.8, "train_accuracy": 0.7, "dp_epsilon_max": 2.5},
        {"round": 1, "train_loss": 1.2, "train_accuracy": 0.5, "dp_epsilon_max": 1.5},
    ])
    evals = []
    for r, (glob, a, c) in {1: (0.6, 0.65, 0.4), 2: (0.75, 0.7, 0.5)}.items():
        evals += [
            {"round": r, "population": "global", "held_out": False, "scope": "test", "samples": 1000, "accuracy": glob},
            {"round": r, "population": "A", "held_out": False, "scope": "test", "samples": 400, "accuracy": a},
            {"round": r, "population": "C", "held_out": True, "scope": "test", "samples": 200, "accuracy": c},
        ]
    evals.append({"round": 2, "population": "A", "held_out": False, "scope": "local_val", "clients": 2,
                  "samples": 40, "accuracy": 0.8})
    write_table(run / "evals", "evals", evals)
    clients = [
        # Round 1: not the final evaluation, must be ignored.
        {"round": 1, "client_id": 0, "population": "A", "samples": 10, "accuracy": 0.0},
        {"round": 1, "client_id": 3, "population": "C", "samples": 10, "accuracy": 1.0},
        # Round 2. A: (10, .5), (30, .9) -> .8 weighted; B: (20, .6); C (held out): (10, .2), (30, .4) -> .35
        {"round": 2, "client_id": 0, "population": "A", "samples": 10, "accuracy": 0.5},
        {"round": 2, "client_id": 1, "population": "A", "samples": 30, "accuracy": 0.9},
        {"round": 2, "client_id": 2, "population": "B", "samples": 20, "accuracy": 0.6},
        {"round": 2, "client_id": 3, "population": "C", "samples": 10, "accuracy": 0.2},
        {"round": 2, "client_id": 4, "population": "C", "samples": 30, "accuracy": 0.4},
    ]
    write_table(run / "client_evals", "client_evals", clients)
    if attacks:
        write_table(run / "attacks", "attacks", attacks)
    pq.write_table(pa.table({"client_id": pa.array([0, 1, 2, 3, 4], pa.int64()),
                             "population": ["A", "A", "B", "C", "C"],
                             "held_out": [False, False, False, True, True]}), run / "partition.parquet")
    (run / "scenario.yaml").write_text(scenario_to_yaml(load_scenario(SMOKE, ["arms=null", *overrides])))
    return run
