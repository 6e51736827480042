"""From run directories to the numbers a paper reports: tidy metrics, matched-utility comparison, population gaps.

Pure pandas over the runs' Parquet tables, so a report can be rebuilt at any
time from the directories alone. The tidy table (``metrics.parquet`` of a
study) has one row per (cell, round, metric, population, attack, knowledge):

- ``round`` is null for a run's final figures (the last evaluation; attack
  metrics over every attacked round);
- ``population`` is null for an aggregate over the populations with the row's
  ``held_out`` flag (training populations, or held-out ones);
- ``attack`` is ``worst`` for the worst case over attacks (the attack whose mean
  leaks most for that metric);
- image-free baselines scored on the same victims have no attack: metric
  ``mean_<m>`` (the global mean image) and ``class_mean_<m>`` (each victim's
  class-mean image, what the label alone gives) for every privacy metric m;
- ``low``/``high`` is the run's own 95 % interval (Wilson over images for
  attacker accuracy, normal over images or clients for the others).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from simfl.engine.knowledge import naive_attacker_is_exact, naive_first
from simfl.engine.run_tables import ROUND_DEFENCE_COLUMNS
from simfl.engine.scenario import load_scenario
from simfl.results.intervals import mean_interval, seed_interval, weighted_interval, wilson

# Privacy metrics of reconstructions, and which way is the worse leak.
PRIVACY = {"attacker_acc": "max", "mse": "min", "psnr": "max", "ssim": "max"}
ATTACK_COLUMNS = {"attacker_correct": "attacker_acc", "mse": "mse", "psnr": "psnr", "ssim": "ssim",
                  "label_accuracy": "label_accuracy", "nn_match": "nn_match"}
# Instance identification (the reconstruction's nearest pool image is its own original; see
# simfl.privacy.metrics): tabulated per attack and for the image-free guesses, higher = worse leak. Not in
# PRIVACY, so the grid-era curves and verdicts keep their four metrics; the searched comparison shows it.
INSTANCE = {"nn_match": "max"}
# Image-free guesses scored beside every attack (see simfl.privacy.metrics.score_batch): their column prefixes.
BASELINES = ("mean_", "class_mean_")
# Lower is more private for these; higher for MSE.
MORE_PRIVATE = {"attacker_acc": "min", "mse": "max", "psnr": "min", "ssim": "min"}
TIDY_COLUMNS = ["round", "metric", "population", "held_out", "attack", "knowledge", "value", "low", "high", "n"]
UTILITY_METRIC = {"client_val": "local_val_accuracy", "test": "test_accuracy"}


def _row(metric: str, value: float, round_: int | None = None, population: str | None = None,
         held_out: bool | None = None, attack: str | None = None, knowledge: str | None = None,
         interval: tuple[float, float] = (np.nan, np.nan), n: int | None = None) -> dict:
    return {"round": round_, "metric": metric, "population": population, "held_out": held_out, "attack": attack,
            "knowledge": knowledge, "value": float(value), "low": interval[0], "high": interval[1], "n": n}


def run_metrics(run_dir: Path) -> pd.DataFrame:
    """Every metric of one run, per round and final, in the tidy layout above."""
    run_dir = Path(run_dir)
    rows: list[dict] = []
    rounds = pd.read_parquet(run_dir / "rounds").sort_values("round")
    last = int(rounds["round"].max())
    for column in ("train_loss", "train_accuracy", *ROUND_DEFENCE_COLUMNS):
        for r, v in zip(rounds["round"], rounds[column]):
            if v is not None and not pd.isna(v):
                rows.append(_row(column, v, int(r)))
    final_train = rounds[rounds["round"] == last].iloc[0]
    rows.append(_row("client_train_accuracy", final_train["train_accuracy"]))
    if rounds["dp_epsilon_max"].notna().any():
        rows.append(_row("dp_epsilon_max", rounds["dp_epsilon_max"].max()))
    if rounds["sigma_mean"].notna().any():  # the latent defence's realised noise scale, as it ended
        rows.append(_row("sigma_mean", rounds["sigma_mean"].dropna().iloc[-1]))
    held = held_out_map(run_dir)
    rows += _eval_rows(run_dir, held)
    if (run_dir / "attacks").is_dir():
        attacks = pd.read_parquet(run_dir / "attacks")
        if naive_attacker_is_exact(load_scenario(run_dir / "scenario.yaml")):
            # The adaptive attacker is the naive one (e.g. no defence): its rows under both names,
            # so every comparison of adaptive attackers has its reference.
            naive = attacks[attacks["knowledge"] == "naive"]
            attacks = pd.concat([naive, naive.assign(knowledge="adaptive")], ignore_index=True)
        attacks["held_out"] = attacks["population"].map(held).fillna(False).astype(bool)
        rows += _attack_rows(attacks)
    return pd.DataFrame(rows, columns=TIDY_COLUMNS).astype(
        {"round": "Int32", "held_out": "boolean", "n": "Int64", "value": "float64", "low": "float64",
         "high": "float64"})


def held_out_map(run_dir: Path) -> dict[str, bool]:
    """Population -> whether it is held out, from the run's partition."""
    part = pd.read_parquet(run_dir / "partition.parquet", columns=["population", "held_out"])
    return dict(zip(part["population"], part["held_out"].astype(bool)))


def _eval_rows(run_dir: Path, held: dict[str, bool]) -> list[dict]:
    evals = pd.read_parquet(run_dir / "evals")
    rows: list[dict] = []
    for row in evals.itertuples():
        population = None if row.population == "global" else row.population
        rows.append(_row(f"{row.scope}_accuracy", row.accuracy, int(row.round), population,
                         None if population is None else bool(row.held_out), n=int(row.samples)))
    final = int(evals["round"].max()) if len(evals) else None
    if final is None:
        return rows
    test = evals[(evals["round"] == final) & (evals["scope"] == "test")]
    for row in test.itertuples():
        population = None if row.population == "global" else row.population
        rows.append(_row("test_accuracy", row.accuracy, None, population,
                         None if population is None else bool(row.held_out), n=int(row.samples)))
    clients = pd.read_parquet(run_dir / "client_evals") if (run_dir / "client_evals").is_dir() else None
    if clients is None or not len(clients):
        return rows
    clients = clients[clients["round"] == clients["round"].max()].copy()
    clients["held_out"] = clients["population"].map(held).fillna(False).astype(bool)
    groups: list[tuple[tuple[Any, ...], pd.DataFrame]] = [((p,), g) for p, g in clients.groupby("population")]
    groups += [((None, h), g) for h, g in clients.groupby("held_out")]
    for key, g in groups:
        population = key[0]
        flag = held.get(population, False) if population is not None else bool(key[1])
        acc, interval = weighted_interval(g["accuracy"].to_numpy(), g["samples"].to_numpy())
        rows.append(_row("local_val_accuracy", acc, None, population, flag, interval=interval, n=len(g)))
    return rows


def _attack_stats(rows: pd.DataFrame, prefix: str = "") -> dict[str, tuple[float, tuple[float, float], int]]:
    """Mean, interval and count of each attack metric; with ``prefix``, of that baseline's columns instead."""
    out = {}
    for column, name in ATTACK_COLUMNS.items():
        if prefix and name not in PRIVACY and name not in INSTANCE:
            continue
        if prefix + column not in rows or rows[prefix + column].isna().any():  # runs from before the column
            continue
        values = rows[prefix + column].astype(float).to_numpy()
        rate = column in ("attacker_correct", "nn_match")
        interval = wilson(int(values.sum()), len(values)) if rate else mean_interval(values)
        out[name] = (float(values.mean()), interval, len(values))
    return out


def worst_attack(metrics: pd.DataFrame, metric: str) -> tuple[float, str, str] | None:
    """A run's verdict on one privacy metric: (value, attack, knowledge) of the attack that leaks most.

    Over every attack and attacker knowledge, on the final figures of the
    training populations' victims; None where nothing was attacked.
    """
    rows = metrics[metrics["round"].isna() & metrics["population"].isna() & (metrics["held_out"] == False)  # noqa: E712
                   & metrics["attack"].notna() & (metrics["attack"] != "worst") & (metrics["metric"] == metric)]
    if rows.empty:
        return None
    rows = rows.sort_values("knowledge", key=lambda k: k != "naive", kind="stable")  # ties: the weaker attacker
    pick = rows["value"].idxmax() if PRIVACY[metric] == "max" else rows["value"].idxmin()
    return float(rows.at[pick, "value"]), str(rows.at[pick, "attack"]), str(rows.at[pick, "knowledge"])


def _attack_rows(attacks: pd.DataFrame) -> list[dict]:
    """Means per (round or final) x (population or held-out aggregate) x attack x knowledge, plus the worst attack."""
    rows: list[dict] = []
    scopes = [(int(r), g) for r, g in attacks.groupby("round")] + [(None, attacks)]
    for round_, by_round in scopes:
        parts = [(p, bool(g["held_out"].iloc[0]), g) for p, g in by_round.groupby("population")]
        parts += [(None, bool(h), g) for h, g in by_round.groupby("held_out")]
        for population, flag, g in parts:
            for knowledge, gk in g.groupby("knowledge"):
                per_attack = {a: _attack_stats(ga) for a, ga in gk.groupby("attack")}
                for attack, stats in per_attack.items():
                    for name, (value, interval, n) in stats.items():
                        rows.append(_row(name, value, round_, population, flag, attack, knowledge, interval, n))
                for name, how in PRIVACY.items():
                    pick = (max if how == "max" else min)(per_attack, key=lambda a: per_attack[a][name][0])
                    value, interval, n = per_attack[pick][name]
                    rows.append(_row(name, value, round_, population, flag, "worst", knowledge, interval, n))
            # Every attack ran on the same images: each scored its baselines alike, so count each image once.
            images = g.drop_duplicates(["round", "client_id", "image"])
            for prefix in BASELINES:
                # Runs from before a baseline existed have no (or null) columns for it.
                if prefix + "psnr" in images and images[prefix + "psnr"].notna().all():
                    for name, (value, interval, n) in _attack_stats(images, prefix).items():
                        rows.append(_row(prefix + name, value, round_, population, flag, None, None, interval, n))
    return rows


# ---------------------------------------------------------------- cells


def cell_entry(name: str, run_dir: Path, labels: dict[str, str]) -> dict:
    """One row of the cells table: what a cell is (its axes' labels, defence, knobs, seed) and where."""
    sc = load_scenario(Path(run_dir) / "scenario.yaml")
    return {"cell": name, "status": cell_status(run_dir), "run_dir": str(run_dir), "seed": sc.seed,
            "defence": sc.defence.kind, "knobs": json.dumps(sc.defence.knobs(), sort_keys=True),
            "_defence_cfg": sc.defence.model_dump_json(),
            **{f"axis.{a}": lab for a, lab in labels.items()}}


def cells_frame(entries: list[dict]) -> pd.DataFrame:
    """Cells with their roles: ``setting`` (labels of the axes that change the defence), ``context``
    (labels of the other non-seed axes, e.g. the population split) and ``group`` (all but the seed)."""
    cells = pd.DataFrame(entries)
    axes = [c for c in cells.columns if c.startswith("axis.")]
    seed_axes, defence_axes = [], []
    for axis in axes:
        others = [a for a in axes if a != axis]
        grouped = cells.groupby(others, sort=False) if others else [(None, cells)]
        for _, g in grouped:
            if g["seed"].nunique() > 1 and g[axis].nunique() == g["seed"].nunique():
                seed_axes.append(axis)
                break
            if g["_defence_cfg"].nunique() > 1:
                defence_axes.append(axis)
                break
    context_axes = [a for a in axes if a not in seed_axes and a not in defence_axes]

    def join(row: pd.Series, cols: list[str], empty: str) -> str:
        return "__".join(str(row[c]) for c in cols) if cols else empty

    cells["setting"] = [join(r, defence_axes, r["defence"]) for _, r in cells.iterrows()]
    cells["context"] = [join(r, context_axes, "all") for _, r in cells.iterrows()]
    others = [a for a in axes if a not in seed_axes]
    cells["group"] = [join(r, others, "all" if seed_axes else r["cell"]) for _, r in cells.iterrows()]
    return cells.drop(columns=["_defence_cfg"])


def study_metrics(cells: pd.DataFrame) -> pd.DataFrame:
    """The tidy metrics of every finished cell, keyed by ``cell``."""
    frames = []
    for row in cells.itertuples():
        if row.status != "finished":  # a killed cell's curves would sit at a utility it never reached
            continue
        m = run_metrics(Path(row.run_dir))
        m.insert(0, "cell", row.cell)
        frames.append(m)
    if not frames:
        return pd.DataFrame(columns=["cell", *TIDY_COLUMNS])
    return pd.concat(frames, ignore_index=True)


def cell_status(run_dir: Path) -> str:
    """``finished`` (final weights saved), ``incomplete`` (rounds written) or ``not run``."""
    if (Path(run_dir) / "final_weights.pt").is_file():
        return "finished"
    return "incomplete" if (Path(run_dir) / "rounds").is_dir() else "not run"


def write_study_tables(study_dir: Path, cells: pd.DataFrame) -> pd.DataFrame:
    """``cells.parquet`` (one row per cell) and ``metrics.parquet`` (tidy, every cell) of a study."""
    cells.to_parquet(Path(study_dir) / "cells.parquet", index=False)
    metrics = study_metrics(cells)
    # Each row carries what its cell is, so one file answers a question without a join.
    keys = ["cell", "defence", "setting", "context", "seed", *(c for c in cells.columns if c.startswith("axis."))]
    metrics = cells[keys].merge(metrics, on="cell", how="inner")
    metrics.to_parquet(Path(study_dir) / "metrics.parquet", index=False)
    return metrics


# ---------------------------------------------------------------- selections


def final_values(metrics: pd.DataFrame, metric: str, *, held_out: bool | None = False, attack: str | None = None,
                 knowledge: str | None = None, population: str | None = None) -> pd.DataFrame:
    """Final (round null) rows of one metric, aggregate or one population; columns cell, value, low, high."""
    m = metrics[metrics["round"].isna() & (metrics["metric"] == metric)]
    m = m[m["population"].isna()] if population is None else m[m["population"] == population]
    if held_out is not None and population is None and metric != "test_accuracy":
        m = m[m["held_out"].fillna(False) == held_out]
    m = m[m["attack"].isna()] if attack is None else m[m["attack"] == attack]
    m = m[m["knowledge"].isna()] if knowledge is None else m[m["knowledge"] == knowledge]
    return m[["cell", "value", "low", "high", "n"]]


def utility(cells: pd.DataFrame, metrics: pd.DataFrame, kind: str) -> pd.Series:
    """Each cell's utility: final client validation accuracy (training populations) or global test accuracy."""
    m = final_values(metrics, UTILITY_METRIC[kind], held_out=False)
    return cells["cell"].map(dict(zip(m["cell"], m["value"])))


def utility_by_round(metrics: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Each cell's utility after each evaluated round: columns cell, round, value.

    ``test``: the global test split's row. ``client_val``: runs log it per population each round, so it is
    the training populations' accuracies weighted by their validation samples, which is how the final
    aggregate row is made.
    """
    m = metrics[metrics["round"].notna() & (metrics["metric"] == UTILITY_METRIC[kind]) & metrics["attack"].isna()
                & metrics["knowledge"].isna()]
    if kind == "test":
        m = m[m["population"].isna()]
        return m[["cell", "round", "value"]].assign(round=m["round"].astype(int)).reset_index(drop=True)
    m = m[m["population"].notna() & (m["held_out"].fillna(True) == False)]  # noqa: E712 (a nullable column)
    m = m.assign(round=m["round"].astype(int), weighted=m["value"] * m["n"])
    sums = m.groupby(["cell", "round"], sort=True)[["weighted", "n"]].sum().reset_index()
    return sums.assign(value=sums["weighted"] / sums["n"])[["cell", "round", "value"]]


def knowledges(metrics: pd.DataFrame) -> list[str]:
    """The attacker knowledge levels in the metrics, naive first."""
    return naive_first(metrics["knowledge"].dropna())


# ---------------------------------------------------------------- matched utility


def interpolate_at(x: np.ndarray, y: np.ndarray, target: float) -> float:
    """y at x = target along the curve through (x, y), sorted by x; NaN outside the measured range.

    Outside the range there is nothing to interpolate, and extrapolating a
    privacy-utility curve would report a defence at a utility it never reached.
    """
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = np.asarray(x)[ok], np.asarray(y)[ok]
    if len(x) == 0 or target < x.min() or target > x.max():
        return np.nan
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    ux = np.unique(x)  # equal utilities: their mean privacy
    uy = np.array([y[x == v].mean() for v in ux])
    return float(np.interp(target, ux, uy)) if len(ux) > 1 else float(uy[0])


def curves(cells: pd.DataFrame, metrics: pd.DataFrame, utility_kind: str) -> pd.DataFrame:
    """Privacy-utility points: per (context, defence, setting) the utility and each privacy metric
    (worst attack, per attacker knowledge), mean and 95 % interval over seeds."""
    cells = cells.assign(utility=utility(cells, metrics, utility_kind))
    rows = []
    for (context, defence, setting), g in cells.groupby(["context", "defence", "setting"], sort=False):
        u, ul, uh = seed_interval(g["utility"].to_numpy(), "accuracy")
        for knowledge in knowledges(metrics):
            for metric in PRIVACY:
                vals = final_values(metrics, metric, attack="worst", knowledge=knowledge)
                v = g["cell"].map(dict(zip(vals["cell"], vals["value"]))).to_numpy(dtype=float)
                mean, low, high = seed_interval(v, metric)
                rows.append({"context": context, "defence": defence, "setting": setting, "seeds": len(g),
                             "utility": u, "utility_low": ul, "utility_high": uh, "knowledge": knowledge,
                             "metric": metric, "value": mean, "low": low, "high": high})
    return pd.DataFrame(rows)


def matched_utility(cells: pd.DataFrame, metrics: pd.DataFrame, target: float, utility_kind: str,
                    proposed: str, baselines: list[str]) -> pd.DataFrame:
    """Privacy at ``target`` utility per defence: each seed's curve over the defence's settings is
    interpolated at the target, then averaged over seeds (95 % t-interval).

    The undefended reference is not interpolated (it has no knob): its own
    utility is given. For the proposed defence, the relative change against the
    best baseline (the most private one at the target, per metric) is computed
    per seed, paired on the seed, then averaged, as the seed paper reports it (where no seed
    reached the target for both, the change of the means, unpaired and without an interval).
    """
    cells = cells.assign(utility=utility(cells, metrics, utility_kind))
    rows = []
    for context, ctx in cells.groupby("context", sort=False):
        for knowledge in knowledges(metrics):
            at: dict[tuple[str, str], dict[int, float]] = {}
            for metric in PRIVACY:
                vals = final_values(metrics, metric, attack="worst", knowledge=knowledge)
                value_of = dict(zip(vals["cell"], vals["value"]))
                for defence, g in ctx.groupby("defence", sort=False):
                    per_seed: dict[int, float] = {}
                    for seed, gs in g.groupby("seed"):
                        x = gs["utility"].to_numpy(dtype=float)
                        y = gs["cell"].map(value_of).to_numpy(dtype=float)
                        per_seed[int(seed)] = seed_interval(y)[0] if defence == "none" else interpolate_at(x, y, target)
                    at[(defence, metric)] = per_seed
                    mean, low, high = seed_interval(np.array(list(per_seed.values())), metric)
                    reached = int(np.sum(~np.isnan(list(per_seed.values()))))
                    u = (seed_interval(g.groupby("seed")["utility"].mean().to_numpy())[0] if defence == "none"
                         else target)
                    span = (float(np.nanmin(g["utility"])), float(np.nanmax(g["utility"])))
                    rows.append({"context": context, "knowledge": knowledge, "defence": defence, "metric": metric,
                                 "utility": u, "utility_range": span, "value": mean, "low": low, "high": high,
                                 "seeds_reached": reached, "seeds": len(per_seed), "baseline": None,
                                 "relative_change": np.nan, "relative_low": np.nan, "relative_high": np.nan,
                                 "relative_paired": None})
            _relative_changes(rows, at, context, knowledge, proposed, baselines)
    return pd.DataFrame(rows)


def _relative_changes(rows: list[dict], at: dict, context: str, knowledge: str, proposed: str,
                      baselines: list[str]) -> None:
    for metric in PRIVACY:
        if (proposed, metric) not in at:
            continue
        means = {b: np.nanmean(list(at[(b, metric)].values())) for b in baselines
                 if (b, metric) in at and not np.all(np.isnan(list(at[(b, metric)].values())))}
        if not means:
            continue
        pick = min if MORE_PRIVATE[metric] == "min" else max
        best = pick(means, key=lambda b: means[b])
        mine, theirs = at[(proposed, metric)], at[(best, metric)]
        rel = np.array([(mine[s] - theirs[s]) / abs(theirs[s]) * 100 for s in mine
                        if s in theirs and theirs[s] != 0], dtype=float)
        paired = bool(np.any(~np.isnan(rel)))
        mean, low, high = seed_interval(rel)
        if not paired:
            # No seed where both reached the target: the change of the means, without an interval.
            ours = seed_interval(np.array(list(mine.values())))[0]
            mean, low, high = (ours - means[best]) / abs(means[best]) * 100 if means[best] else np.nan, np.nan, np.nan
        for row in rows:
            key = (row["context"], row["knowledge"], row["defence"], row["metric"])
            if key == (context, knowledge, proposed, metric):
                row.update(baseline=best, relative_change=mean, relative_low=low, relative_high=high,
                           relative_paired=paired)


def operating_points(cells: pd.DataFrame, metrics: pd.DataFrame, target: float, utility_kind: str) -> pd.DataFrame:
    """Per (context, defence) the setting whose mean utility is nearest the target: the one figures show."""
    cells = cells.assign(utility=utility(cells, metrics, utility_kind))
    means = cells.groupby(["context", "defence", "setting"], sort=False)["utility"].mean().reset_index()
    means["distance"] = (means["utility"] - target).abs().fillna(np.inf)
    idx = means.groupby(["context", "defence"], sort=False)["distance"].idxmin()
    return means.loc[idx, ["context", "defence", "setting", "utility"]].reset_index(drop=True)


def over_seeds(cells: pd.DataFrame, rows: pd.DataFrame) -> tuple[float, float, float, str]:
    """Mean and interval of one figure over a setting's seeds; with one seed, the run's own interval."""
    rows = rows[rows["cell"].isin(cells["cell"])]
    if len(rows) == 0:
        return (np.nan, np.nan, np.nan, "")
    if len(rows) == 1:
        r = rows.iloc[0]
        return (float(r["value"]), float(r["low"]), float(r["high"]), "run")
    return (*seed_interval(rows["value"].to_numpy(), rows["metric"].iloc[0]), "seeds")


def attack_by_round(cells: pd.DataFrame, metrics: pd.DataFrame, points: pd.DataFrame,
                    metric_names: tuple[str, ...] = ("psnr", "attacker_acc")) -> pd.DataFrame:
    """Worst-attack privacy metric per round at each operating point (training-population victims)."""
    rows = []
    m = metrics[metrics["round"].notna() & (metrics["attack"] == "worst") & metrics["population"].isna()
                & (metrics["held_out"] == False)]  # noqa: E712 (nullable boolean)
    for p in points.itertuples():
        mine = cells[(cells["context"] == p.context) & (cells["defence"] == p.defence)
                     & (cells["setting"] == p.setting)]
        sel = m[m["cell"].isin(mine["cell"])]
        for (metric, knowledge, r), g in sel.groupby(["metric", "knowledge", "round"]):
            if metric not in metric_names:
                continue
            mean, low, high, over = over_seeds(mine, g)
            rows.append({"context": p.context, "defence": p.defence, "setting": p.setting, "metric": metric,
                         "knowledge": knowledge, "round": int(r), "value": mean, "low": low, "high": high,
                         "interval": over})
    return pd.DataFrame(rows)


def by_population(cells: pd.DataFrame, metrics: pd.DataFrame, points: pd.DataFrame) -> pd.DataFrame:
    """Per operating point and population: final accuracy on the clients' validation data, on the
    population's test set, and worst-attack privacy per knowledge."""
    rows = []
    final = metrics[metrics["round"].isna() & metrics["population"].notna()]
    for p in points.itertuples():
        mine = cells[(cells["context"] == p.context) & (cells["defence"] == p.defence)
                     & (cells["setting"] == p.setting)]
        sel = final[final["cell"].isin(mine["cell"])]
        for population, g in sel.groupby("population", sort=True):
            held = bool(g["held_out"].dropna().iloc[0]) if g["held_out"].notna().any() else False
            specs: list[tuple[str, tuple[str, str] | None]] = [("local_val_accuracy", None), ("test_accuracy", None)]
            specs += [(f"{metric}:{k}", (metric, k))
                      for k in knowledges(metrics) for metric in ("attacker_acc", "psnr")]
            for name, attack_spec in specs:
                if attack_spec is None:
                    rs = g[(g["metric"] == name) & g["attack"].isna()]
                else:
                    rs = g[(g["metric"] == attack_spec[0]) & (g["attack"] == "worst")
                           & (g["knowledge"] == attack_spec[1])]
                if not len(rs):
                    continue
                mean, low, high, over = over_seeds(mine, rs)
                rows.append({"context": p.context, "defence": p.defence, "setting": p.setting,
                             "population": population, "held_out": held, "metric": name, "value": mean,
                             "low": low, "high": high, "interval": over})
    return pd.DataFrame(rows)


def population_gaps(cells: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """Training minus held-out populations, per cell then over seeds, for every setting with held-out clients.

    Accuracy: the final model on the clients' validation data and on the
    populations' test sets. Privacy: the worst attack per knowledge, on
    training victims vs held-out probes (``attacks.held_out_victims``).
    """
    specs: list[tuple[str, str | None, str | None]] = [("local_val_accuracy", None, None),
                                                        ("test_accuracy", None, None)]
    specs += [(metric, "worst", k) for k in knowledges(metrics) for metric in ("attacker_acc", "psnr", "mse")]
    final = metrics[metrics["round"].isna()]
    rows = []
    for (context, defence, setting), g in cells.groupby(["context", "defence", "setting"], sort=False):
        for metric, attack, knowledge in specs:
            m = final[final["cell"].isin(g["cell"]) & (final["metric"] == metric)]
            m = m[m["attack"].isna()] if attack is None else m[(m["attack"] == attack) & (m["knowledge"] == knowledge)]
            if metric == "test_accuracy":  # per-population test sets: average populations by flag
                m = m[m["population"].notna()].groupby(["cell", "held_out"], as_index=False)["value"].mean()
            else:
                m = m[m["population"].isna()]
            train = dict(zip(m[m["held_out"] == False]["cell"], m[m["held_out"] == False]["value"]))  # noqa: E712
            held = dict(zip(m[m["held_out"] == True]["cell"], m[m["held_out"] == True]["value"]))  # noqa: E712
            both = [c for c in g["cell"] if c in train and c in held]
            if not both:
                continue
            name = metric if knowledge is None else f"{metric}:{knowledge}"
            t_mean = seed_interval(np.array([train[c] for c in both]))[0]
            h_mean = seed_interval(np.array([held[c] for c in both]))[0]
            gap = seed_interval(np.array([train[c] - held[c] for c in both]))  # a difference: unbounded
            rows.append({"context": context, "defence": defence, "setting": setting, "metric": name,
                         "training": t_mean, "held_out": h_mean, "gap": gap[0], "gap_low": gap[1],
                         "gap_high": gap[2], "seeds": len(both)})
    return pd.DataFrame(rows)
