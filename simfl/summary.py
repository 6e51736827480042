"""What a finished run (or a scenario's arms) comes to, as the table a reader compares defences by.

Read back from the run directories' Parquet tables, never from memory, so the
same summary is available for any run after the fact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from simfl.scenario import load_scenario

# Attack means reported per (attack, knowledge), with their reference baselines.
ATTACK_COLUMNS = {"attacker_correct": "attacker_acc", "mse": "mse", "psnr": "psnr", "ssim": "ssim"}


def run_summary(run_dir: Path) -> dict:
    """Final utility and privacy of one run: accuracies, ε, and per attack the mean over every attacked image."""
    run_dir = Path(run_dir)
    sc = load_scenario(run_dir / "scenario.yaml")
    rounds = pd.read_parquet(run_dir / "rounds")
    evals = pd.read_parquet(run_dir / "evals")
    test = evals[(evals["scope"] == "test") & (evals["population"] == "global")]
    last = rounds[rounds["round"] == rounds["round"].max()].iloc[0]
    # The naive attacker already knows everything the victim computed: no defence, or BiDO
    # at gradient-view batch size 1 (its HSIC terms vanish for one sample).
    exact = sc.defence.kind == "none" or (
        sc.defence.kind == "bido" and sc.attacks is not None and sc.attacks.view == "gradient"
        and sc.attacks.batch_size == 1)
    out: dict = {
        "defence": sc.defence.kind,
        "naive_is_exact": exact,
        "rounds": int(last["round"]),
        "test_accuracy": float(test.loc[test["round"].idxmax(), "accuracy"]) if len(test) else np.nan,
        "client_accuracy": float(last["train_accuracy"]),
        "dp_epsilon_max": float(rounds["dp_epsilon_max"].max()) if rounds["dp_epsilon_max"].notna().any() else None,
        "attacks": [],
    }
    if (run_dir / "attacks").is_dir():
        attacks = pd.read_parquet(run_dir / "attacks")
        for (kind, knowledge), rows in attacks.groupby(["attack", "knowledge"], sort=True):
            entry = {"attack": kind, "knowledge": knowledge, "images": len(rows),
                     "rounds": sorted(int(r) for r in rows["round"].unique())}
            for column, name in ATTACK_COLUMNS.items():
                values = rows[column].astype(float)
                entry[name] = float(values.mean())
                entry[f"{name}_ci"] = wilson(int(values.sum()), len(values)) if column == "attacker_correct" \
                    else mean_interval(values.to_numpy())
                entry[f"mean_image_{name}"] = float(rows[f"mean_{column}"].mean())
            out["attacks"].append(entry)
    return out


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson interval of a proportion: honest at the few dozen images a smoke run attacks."""
    if n == 0:
        return (np.nan, np.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (float(centre - half), float(centre + half))


def mean_interval(values: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """Normal-approximation 95 % interval of a mean over images."""
    if len(values) < 2:
        return (np.nan, np.nan)
    half = z * values.std(ddof=1) / np.sqrt(len(values))
    return (float(values.mean() - half), float(values.mean() + half))


def _ci(entry: dict, name: str, digits: int) -> str:
    low, high = entry[f"{name}_ci"]
    return f"{_fmt(entry[name], digits)} [{_fmt(low, digits)}, {_fmt(high, digits)}]"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def arms_table(parent: Path) -> str:
    """Markdown: one row per arm, attack and attacker knowledge, then each arm's worst case over attackers.

    Where the naive attacker already knows everything the victim computed (no
    defence; BiDO in the gradient view at batch size 1) it is also the adaptive
    one ("naive = adaptive").
    """
    parent = Path(parent)
    sc = load_scenario(parent / "scenario.yaml")
    summaries = {name: run_summary(parent / name) for name in sc.arms if (parent / name / "rounds").is_dir()}
    lines = [
        "| arm | defence | test acc | client acc | ε (max) | attack | attacker | images | attacker acc | MSE | PSNR | SSIM |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    worst = ["| arm | defence | test acc | ε (max) | worst attacker acc | worst PSNR | worst SSIM | lowest MSE |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        head = f"| {name} | {s['defence']} | {_fmt(s['test_accuracy'])} | {_fmt(s['client_accuracy'])} | " \
               f"{_fmt(s['dp_epsilon_max'], 2)}"
        for a in s["attacks"]:
            who = "naive = adaptive" if s["naive_is_exact"] else a["knowledge"]
            lines.append(f"{head} | {a['attack']} | {who} | {a['images']} | {_ci(a, 'attacker_acc', 2)} | "
                         f"{_ci(a, 'mse', 3)} | {_ci(a, 'psnr', 1)} | {_ci(a, 'ssim', 2)} |")
        if s["attacks"]:
            worst.append(
                f"| {name} | {s['defence']} | {_fmt(s['test_accuracy'])} | {_fmt(s['dp_epsilon_max'], 2)} | "
                f"{_fmt(max(a['attacker_acc'] for a in s['attacks']))} | "
                f"{_fmt(max(a['psnr'] for a in s['attacks']), 2)} | {_fmt(max(a['ssim'] for a in s['attacks']))} | "
                f"{_fmt(min(a['mse'] for a in s['attacks']), 4)} |"
            )
        else:
            lines.append(f"{head} | – | – | – | – | – | – | – |")
    lines += ["", "Means over every attacked image, with 95 % intervals (Wilson for attacker accuracy; "
              "normal approximation for the others)."]
    if len(worst) > 2:
        lines += ["", "Worst case over attacks and attacker knowledge (what a defence must be judged by):", "",
                  *worst]
    return "\n".join(lines)
