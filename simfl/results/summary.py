"""The arms summary ``python -m simfl.run`` prints for a scenario with ``arms:`` (and writes to ``summary.md``).

A view over the tidy metrics that studies and reports use
(:func:`simfl.results.analysis.run_metrics`): the same means, intervals and worst
attack, read back from the arms' Parquet tables, so the summary can be rebuilt
for any run after the fact and never disagrees with the report.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from simfl.engine.knowledge import naive_attacker_is_exact
from simfl.engine.scenario import load_scenario
from simfl.results.analysis import UTILITY_METRIC, final_values, run_metrics, worst_attack
from simfl.results.markdown import DIGITS, fmt, fmt_interval, table

# Privacy metrics per attack, in the table's order, and their decimals there (coarser than the
# worst case's: an interval stands beside each).
ATTACK_DIGITS = {"attacker_acc": 2, "mse": 3, "psnr": 1, "ssim": 2}
# The worst-case table's columns, in order.
WORST = ("attacker_acc", "psnr", "ssim", "mse")


def final_value(metrics: pd.DataFrame, metric: str) -> float:
    """A run's final value of a metric without attack (global, training populations); NaN where not logged."""
    values = final_values(metrics.assign(cell=""), metric)["value"]
    return float(values.iloc[0]) if len(values) else np.nan


def training_attacks(metrics: pd.DataFrame) -> pd.DataFrame:
    """Final rows of every attack (and the worst one) over all victims of the training populations."""
    return metrics[metrics["round"].isna() & metrics["population"].isna() & metrics["attack"].notna()
                   & (metrics["held_out"] == False)]  # noqa: E712 (nullable boolean)


def attack_groups(attacks: pd.DataFrame, naive_is_exact: bool) -> Iterator[tuple[str, str, pd.DataFrame]]:
    """(attack, attacker knowledge, its rows indexed by metric) for each attack and knowledge, sorted.

    Where the naive attacker is exact it is also the adaptive one (its rows repeat the naive ones):
    one group, knowledge "naive = adaptive".
    """
    for (attack, knowledge), g in attacks[attacks["attack"] != "worst"].groupby(["attack", "knowledge"], sort=True):
        if naive_is_exact and knowledge != "naive":
            continue
        yield attack, "naive = adaptive" if naive_is_exact else knowledge, g.set_index("metric")


def attack_cells(attacks: pd.DataFrame, naive_is_exact: bool) -> list[list[str]]:
    """Per attack and attacker knowledge: who attacks, images, and each privacy metric with its interval."""
    return [[attack, knowledge, str(int(by.loc["attacker_acc", "n"])),
             *(fmt_interval(by.loc[m, "value"], by.loc[m, "low"], by.loc[m, "high"], digits)
               for m, digits in ATTACK_DIGITS.items())]
            for attack, knowledge, by in attack_groups(attacks, naive_is_exact)]


def baseline_cells(metrics: pd.DataFrame) -> list[list[str]]:
    """The image-free guesses on the same victims, as rows of the attack table (runs before them: none)."""
    rows = []
    for prefix, name in (("mean_", "(global mean image)"), ("class_mean_", "(class mean of the label)")):
        found = {m: final_values(metrics.assign(cell=""), prefix + m) for m in ATTACK_DIGITS}
        if any(f.empty for f in found.values()):
            continue
        rows.append([name, "no attack", str(int(found["attacker_acc"]["n"].iloc[0])),
                     *(fmt_interval(f["value"].iloc[0], f["low"].iloc[0], f["high"].iloc[0], ATTACK_DIGITS[m])
                       for m, f in found.items())])
    return rows


def worst_cells(metrics: pd.DataFrame, naive_is_exact: bool) -> list[str]:
    """Each privacy metric at its worst over attacks and attacker knowledge, naming the attack that reached it."""
    cells = []
    for m in WORST:
        found = worst_attack(metrics, m)
        assert found is not None  # only called for runs with attacks
        value, attack, knowledge = found
        cells.append(f"{fmt(value, DIGITS[m])} ({attack}{'' if naive_is_exact else ', ' + knowledge})")
    return cells


def arms_table(parent: Path) -> str:
    """Markdown: one row per arm, attack and attacker knowledge, then each arm's worst case over attackers.

    Victims are the training populations' (held-out probes are in the report's
    population tables). Where the naive attacker already knows everything the
    victim computed (:func:`simfl.engine.knowledge.naive_attacker_is_exact`) it is
    also the adaptive one ("naive = adaptive").
    """
    parent = Path(parent)
    planned = load_scenario(parent / "scenario.yaml").arms
    assert planned is not None  # a parent directory holds a scenario with arms
    arms = [a for a in planned if (parent / a / "rounds").is_dir()]
    rows, worst, probes = [], [], False
    for arm in arms:
        scenario = load_scenario(parent / arm / "scenario.yaml")
        metrics = run_metrics(parent / arm)
        test, eps = fmt(final_value(metrics, "test_accuracy")), fmt(final_value(metrics, "dp_epsilon_max"), 2)
        head = [arm, scenario.defence.kind, test, fmt(final_value(metrics, UTILITY_METRIC["client_val"])), eps]
        attacks = training_attacks(metrics)
        rows += [head + cells for cells in [*attack_cells(attacks, naive_attacker_is_exact(scenario)),
                                            *baseline_cells(metrics)]] or [head + ["–"] * 7]
        if len(attacks):
            worst.append([arm, scenario.defence.kind, test, eps,
                          *worst_cells(metrics, naive_attacker_is_exact(scenario))])
        probes |= bool((metrics["attack"].notna() & (metrics["held_out"] == True)).any())  # noqa: E712
    # "client val acc" is the study's utility (client_val): the final global model, eval mode, on the
    # training clients' validation splits; not the last cohort's training accuracy with noise or DP on.
    lines = table(["arm", "defence", "test acc", "client val acc", "ε (max)", "attack", "attacker", "images",
                   "attacker acc", "MSE", "PSNR", "SSIM"], rows)
    lines += ["", "Means over every attacked image, with 95 % intervals (Wilson for attacker accuracy; "
              "normal approximation for the others). The rows without an attack score image-free guesses on "
              "the same victims: an attack shows the instance only where it beats the class mean of the "
              "label, which batch-size-1 gradients give away."
              + (" Held-out probes are left out here: see `python -m simfl.studies.report`." if probes else "")]
    if worst:
        lines += ["", "Worst case over attacks and attacker knowledge (what a defence must be judged by), "
                  "with the attack that reached it:", "",
                  *table(["arm", "defence", "test acc", "ε (max)", "worst attacker acc", "worst PSNR", "worst SSIM",
                          "lowest MSE"], worst)]
    return "\n".join(lines)
