"""The comparison at a searched utility: per-image, paired, with cluster-bootstrap intervals.

When a study searched each defence's knob to the target utility
(:mod:`simfl.studies.search`), every finished cell sits at the target, so nothing is
interpolated: each defence's privacy is read off its own cells. And every
arm attacked the same victims (same seed: same clients, rounds and images),
so defences are compared image by image (:mod:`simfl.studies.paired`), with
intervals from a bootstrap over (seed, round, client) clusters rather than a
t-interval over two or three seeds. Every seed is kept: a seed whose search
ended short of the target is shown with its achieved utility, and a defence
that cannot reach the target at all is named as excluded.

Worst case: for each defence, the (attack, knowledge) pair whose mean leaks
most on the metric, over every attack and attacker knowledge, pooled over
seeds. The best baseline is fixed by one rule before any paired difference is
computed: the study's ``comparison.best_baseline`` if it names one, else the
baseline (among ``comparison.baselines`` that reached the target) with the
lowest worst-case attacker accuracy, the primary metric; the same baseline
serves every metric.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from simfl.results.analysis import INSTANCE, PRIVACY, held_out_map
from simfl.studies.paired import cluster_bootstrap, pair, relative_change

# Per-image columns of the attacks table for each privacy metric (and its image-free baselines).
IMAGE_COLUMNS = {"attacker_acc": "attacker_correct", "mse": "mse", "psnr": "psnr", "ssim": "ssim",
                 "nn_match": "nn_match"}
WORSE = {**PRIVACY, **INSTANCE}  # which way each metric leaks more
PRIMARY = "attacker_acc"
KEYS = ("seed", "round", "client_id", "image")
CLUSTERS = ("seed", "round", "client_id")


def image_rows(cells: pd.DataFrame) -> pd.DataFrame:
    """Every finished cell's reconstructions of training-population victims, one row per image and attack."""
    frames = []
    for cell in cells.itertuples():
        run_dir = Path(cell.run_dir)
        if cell.status != "finished" or not (run_dir / "attacks").is_dir():
            continue
        attacks = pd.read_parquet(run_dir / "attacks")
        held = held_out_map(run_dir)
        attacks = attacks[~attacks["population"].map(held).fillna(False).astype(bool)]
        frames.append(attacks.assign(cell=cell.cell, defence_kind=cell.defence, setting=cell.setting,
                                     context=cell.context, seed=int(cell.seed)))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _values(rows: pd.DataFrame, metric: str, prefix: str = "") -> pd.Series:
    return rows[prefix + IMAGE_COLUMNS[metric]].astype(float)


def worst_pair(rows: pd.DataFrame, metric: str) -> tuple[str, str]:
    """The (attack, knowledge) whose mean leaks most on ``metric``, pooled over the rows' seeds."""
    means = rows.groupby(["attack", "knowledge"])[IMAGE_COLUMNS[metric]].apply(lambda v: v.astype(float).mean())
    # Ties: the naive attacker (the weaker claim), then the attack name, so the pick is reproducible.
    means = means.sort_index(key=lambda idx: idx.map(lambda v: (v != "naive", v)) if idx.name == "knowledge" else idx)
    pick = means.idxmax() if WORSE[metric] == "max" else means.idxmin()
    return str(pick[0]), str(pick[1])


def _interval(rows: pd.DataFrame, values: pd.Series, seed: int) -> tuple[float, float, float]:
    clusters = rows[list(CLUSTERS)]
    return cluster_bootstrap(values.to_numpy(), clusters, seed=seed)


def _per_image_baseline(rows: pd.DataFrame, metric: str, prefix: str) -> pd.Series | None:
    """An image-free guess's score, once per image (every attack scored the same guess on it)."""
    column = prefix + IMAGE_COLUMNS[metric]
    if column not in rows or rows[column].isna().any():
        return None
    return rows.drop_duplicates(list(KEYS))[column].astype(float)


def best_baseline(images: pd.DataFrame, baselines: list[str], named: str | None,
                  reached: dict[str, bool]) -> str | None:
    """The baseline every paired difference is taken against (see the module docstring for the rule)."""
    if named is not None:
        return named if named in set(images["defence_kind"]) else None
    scores = {}
    for b in baselines:
        rows = images[images["defence_kind"] == b]
        if rows.empty or not reached.get(b, False):
            continue
        attack, knowledge = worst_pair(rows, PRIMARY)
        mine = rows[(rows["attack"] == attack) & (rows["knowledge"] == knowledge)]
        scores[b] = float(_values(mine, PRIMARY).mean())
    return min(scores, key=lambda b: (scores[b], b)) if scores else None


def compare(images: pd.DataFrame, utilities: pd.DataFrame, outcomes: pd.DataFrame, proposed: str,
            baselines: list[str], named_best: str | None, seed: int = 0) -> tuple[pd.DataFrame, str | None]:
    """One row per (context, defence, metric) at the matched utility, and the best baseline used.

    ``utilities``: cell, defence, context, seed, utility (each finished cell's achieved utility);
    ``outcomes``: :func:`simfl.studies.spec.search_outcomes` (searched cells' status, including excluded
    cells that never ran). Columns: worst attack and knowledge, value [low, high] over clusters, the
    class-mean and global-mean guesses on the same images, and the paired difference and relative
    change against the best baseline on the same images (its worst attack, the same images).
    """
    status = dict(zip(outcomes["cell"], outcomes["status"]))
    reached = {}
    for kind, g in utilities.groupby("defence"):
        reached[kind] = any(status.get(c, "matched") != "unreachable" for c in g["cell"])
    best = best_baseline(images, baselines, named_best, reached) if len(images) else None
    rows = []
    for context, ctx in images.groupby("context", sort=False) if len(images) else []:
        ref = ctx[ctx["defence_kind"] == best] if best is not None else ctx.iloc[:0]
        for setting, g in ctx.groupby("setting", sort=False):
            util = utilities[(utilities["context"] == context) & (utilities["setting"] == setting)]
            cells_status = [status.get(c, "grid") for c in util["cell"]]
            for metric in IMAGE_COLUMNS:
                if IMAGE_COLUMNS[metric] not in g or g[IMAGE_COLUMNS[metric]].isna().any():
                    continue  # runs from before the column
                attack, knowledge = worst_pair(g, metric)
                mine = g[(g["attack"] == attack) & (g["knowledge"] == knowledge)]
                value, low, high = _interval(mine, _values(mine, metric), seed)
                row = {"context": context, "setting": setting, "defence": g["defence_kind"].iloc[0],
                       "metric": metric, "attack": attack, "knowledge": knowledge, "value": value, "low": low,
                       "high": high, "images": len(mine), "seeds": int(mine["seed"].nunique()),
                       "utility": float(util["utility"].mean()) if len(util) else np.nan,
                       "utility_min": float(util["utility"].min()) if len(util) else np.nan,
                       "utility_max": float(util["utility"].max()) if len(util) else np.nan,
                       "search": ", ".join(f"{s} {cells_status.count(s)}" for s in dict.fromkeys(cells_status)),
                       "baseline": best}
                row["chance"] = (float((1.0 / mine["nn_pool_size"].astype(float)).mean())
                                 if metric == "nn_match" and "nn_pool_size" in mine else np.nan)
                for prefix, name in (("class_mean_", "class_mean"), ("mean_", "mean_image")):
                    guess = _per_image_baseline(mine, metric, prefix)
                    row[name] = float(guess.mean()) if guess is not None else np.nan
                row.update(_paired(mine, ref, metric, seed))
                rows.append(row)
    return pd.DataFrame(rows), best


def _paired(mine: pd.DataFrame, ref: pd.DataFrame, metric: str, seed: int) -> dict[str, float]:
    """Per-image difference against the best baseline's worst attack on the same images, and relative change."""
    out = {"diff": np.nan, "diff_low": np.nan, "diff_high": np.nan, "rel": np.nan, "rel_low": np.nan,
           "rel_high": np.nan, "paired_images": 0}
    if ref.empty or mine["defence_kind"].iloc[0] == ref["defence_kind"].iloc[0]:
        return out
    attack, knowledge = worst_pair(ref, metric)
    theirs = ref[(ref["attack"] == attack) & (ref["knowledge"] == knowledge)]
    a = mine[list(KEYS)].assign(value=_values(mine, metric).to_numpy())
    b = theirs[list(KEYS)].assign(value=_values(theirs, metric).to_numpy())
    joined = pair(a, b, keys=KEYS).frame
    if joined.empty:
        return out
    clusters = joined[list(CLUSTERS)]
    d, dl, dh = cluster_bootstrap(joined["diff"].to_numpy(), clusters, seed=seed)
    r, rl, rh = relative_change(joined["a"].to_numpy(), joined["b"].to_numpy(), clusters, seed=seed)
    return {"diff": d, "diff_low": dl, "diff_high": dh, "rel": r, "rel_low": rl, "rel_high": rh,
            "paired_images": len(joined)}


def by_round(images: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Each defence's worst attack per attacked round (early rounds apart from the pool), with the class-mean guess."""
    rows = []
    for (context, setting), g in images.groupby(["context", "setting"], sort=False) if len(images) else []:
        for metric in ("attacker_acc", "psnr"):
            attack, knowledge = worst_pair(g, metric)
            mine = g[(g["attack"] == attack) & (g["knowledge"] == knowledge)]
            for round_, r in mine.groupby("round"):
                value, low, high = _interval(r, _values(r, metric), seed)
                guess = _per_image_baseline(r, metric, "class_mean_")
                rows.append({"context": context, "setting": setting, "metric": metric, "round": int(round_),
                             "attack": attack, "knowledge": knowledge, "value": value, "low": low, "high": high,
                             "images": len(r), "class_mean": float(guess.mean()) if guess is not None else np.nan})
    return pd.DataFrame(rows)
