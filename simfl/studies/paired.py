"""Paired comparison of two defence arms on shared victims, with a cluster bootstrap over (seed, round, client).

Why paired: every arm of a study attacks the same victims (same seed, so the
same sampled clients, rounds and images). The difference between arm A and a
baseline B on the *same* image removes what makes images hard or easy to
reconstruct, which is most of the spread; comparing two independent means
throws that away.

Why clusters: the images one client sends in one round of one seed share a
model state, an update and an attack run, so they are correlated. Resampling
images as if independent would make an interval far too narrow; resampling
whole clusters (one per seed, round and client) keeps the correlation inside
each resample. The statistic is the mean over every image of the resampled
clusters, so a cluster weighs as many images as it has.

Why not a t-interval over seeds (:func:`simfl.results.intervals.seed_interval`): with
two or three seeds the t quantile is 12.7 or 4.3, the seed-level standard
deviation rests on one or two degrees of freedom, and the per-image pairing is
lost. The clusters are many even when seeds are few.

The functions return ``(estimate, low, high)`` like
:func:`simfl.results.intervals.seed_interval`. With one cluster there is no interval
(``low``/``high`` NaN, as :func:`simfl.results.intervals.mean_interval` gives for one
image); with no observation everything is NaN; when every resample must give the
same value (e.g. every difference equal), the interval is that point.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Hashable, Sequence
from typing import Literal, NamedTuple, TypeAlias

import numpy as np
import pandas as pd
from scipy.stats import bootstrap

KEYS = ("seed", "round", "client_id", "image")
CLUSTERS = ("seed", "round", "client_id")
SUMMARY_COLUMNS = ["n_images", "n_clusters", "mean_a", "mean_b", "diff", "diff_low", "diff_high",
                   "rel_change", "rel_low", "rel_high"]

Method: TypeAlias = Literal["percentile", "basic", "BCa"]
ClusterLabels: TypeAlias = pd.DataFrame | pd.Series | np.ndarray | Sequence[Hashable]

# Not hand-written: scipy.stats.bootstrap resamples observations and has no cluster option, but with
# paired=True it resamples the positions shared by all its samples jointly. Handing it one position per
# cluster (the cluster's sum of values and its number of observations) makes it draw whole clusters with
# replacement, as one vectorised (n_resamples, n_clusters) index matrix; a ratio-of-sums statistic is then
# the mean over every observation of the resampled clusters. Its percentile, basic and BCa intervals all
# apply (BCa's jackknife then leaves out one cluster at a time).
_RNG = "rng" if "rng" in inspect.signature(bootstrap).parameters else "random_state"  # scipy < 1.15
# Resamples per vectorised call: keeps each (batch, n_clusters) array near 32 MiB.
_BATCH_ELEMENTS = 1 << 22


class Paired(NamedTuple):
    """Per-image values of two arms joined on their shared keys, and the keys only one arm has.

    ``frame`` has the key columns, ``a``, ``b`` (float) and ``diff = a - b``, one row per shared key;
    ``only_a``/``only_b`` hold the key columns of the rows one arm has and the other lacks (empty when the
    victims are shared, as they should be).
    """

    frame: pd.DataFrame
    only_a: pd.DataFrame
    only_b: pd.DataFrame

    @property
    def shared(self) -> bool:
        """Whether both arms have exactly the same keys."""
        return self.only_a.empty and self.only_b.empty


def pair(a: pd.DataFrame, b: pd.DataFrame, keys: Sequence[str] = KEYS, value: str = "value",
         strict: bool = False) -> Paired:
    """Join arm ``a``'s and baseline ``b``'s per-image ``value`` on ``keys``: ``diff`` is a minus b on one image.

    Unmatched keys are not dropped silently: they come back in ``only_a``/``only_b``, or with ``strict``
    raise ValueError. A key that repeats within one arm raises ValueError (a join would multiply rows):
    filter to one attack and knowledge first, or add those columns to ``keys``. Booleans (e.g.
    ``attacker_correct``) become 0.0/1.0.
    """
    keys = list(keys)
    if not keys:
        raise ValueError("pair needs at least one key column")
    sides = []
    for name, frame in (("a", a), ("b", b)):
        missing = [c for c in (*keys, value) if c not in frame.columns]
        if missing:
            raise KeyError(f"arm {name} lacks column(s) {missing}")
        repeated = frame.duplicated(keys, keep=False)
        if repeated.any():
            example = frame.loc[repeated, keys].iloc[0].to_dict()
            raise ValueError(f"arm {name}: {int(repeated.sum())} rows share their keys {keys} with another "
                             f"row (e.g. {example}); filter further or add key columns")
        side = frame[keys].reset_index(drop=True)
        side[name] = frame[value].to_numpy(dtype=float, na_value=np.nan)
        sides.append(side)
    merged = sides[0].merge(sides[1], on=keys, how="outer", indicator=True)
    both = merged["_merge"] == "both"
    only_a = merged.loc[merged["_merge"] == "left_only", keys].reset_index(drop=True)
    only_b = merged.loc[merged["_merge"] == "right_only", keys].reset_index(drop=True)
    if strict and (len(only_a) or len(only_b)):
        raise ValueError(f"the arms do not share their victims: {len(only_a)} keys only in a, "
                         f"{len(only_b)} only in b, {int(both.sum())} shared")
    frame = merged.loc[both, [*keys, "a", "b"]].reset_index(drop=True)
    frame["diff"] = frame["a"] - frame["b"]
    return Paired(frame, only_a, only_b)


def cluster_codes(clusters: ClusterLabels) -> np.ndarray:
    """Integer codes 0..k-1, one per observation, from cluster labels: one label per observation, or a
    DataFrame (or 2-D array) whose rows' combined columns label the cluster (e.g. seed, round, client_id)."""
    if isinstance(clusters, np.ndarray) and clusters.ndim == 2:
        clusters = pd.DataFrame(clusters)
    if isinstance(clusters, pd.DataFrame):
        if clusters.shape[1] == 0:
            raise ValueError("cluster labels need at least one column")
        return clusters.groupby(list(clusters.columns), sort=False, dropna=False).ngroup().to_numpy()
    labels = clusters if isinstance(clusters, pd.Series) else pd.Series(list(clusters), dtype=object)
    codes, _ = pd.factorize(labels, use_na_sentinel=False)
    return np.asarray(codes)


def _cluster_sums(clusters: ClusterLabels, *columns: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-cluster sums of each column and per-cluster counts (clusters in order of first appearance)."""
    codes = cluster_codes(clusters)
    n = len(columns[0])
    if len(codes) != n or any(len(c) != n for c in columns):
        raise ValueError(f"values and cluster labels differ in length: {[len(c) for c in columns]}, {len(codes)}")
    for column in columns:
        if not np.isfinite(column).all():
            raise ValueError("values must be finite (drop or impute NaN/inf first)")
    k = int(codes.max()) + 1 if n else 0
    sums = [np.bincount(codes, weights=column, minlength=k) for column in columns]
    return sums, np.bincount(codes, minlength=k).astype(float)


def _interval(data: tuple[np.ndarray, ...], statistic, n_resamples: int, confidence: float,
              seed: int | np.random.Generator, method: Method) -> tuple[float, float]:
    k = len(data[0])
    # Degenerate resamples (a baseline's mean of 0 makes a relative change infinite; constant data) are
    # expected and show up as inf/NaN bounds in the tables; scipy's warnings about them would only be noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.filterwarnings("ignore", message=".*confidence interval cannot be calculated.*")
        res = bootstrap(data, statistic, paired=True, vectorized=True, axis=-1, n_resamples=n_resamples,
                        batch=max(1, min(n_resamples, _BATCH_ELEMENTS // k)), confidence_level=confidence,
                        method=method, **{_RNG: np.random.default_rng(seed)})
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _mean_of_resample(sums: np.ndarray, counts: np.ndarray, axis: int = -1) -> np.ndarray:
    return sums.sum(axis=axis) / counts.sum(axis=axis)


def _percent_change_of_resample(sums_a: np.ndarray, sums_b: np.ndarray, axis: int = -1) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return 100.0 * (sums_a.sum(axis=axis) - sums_b.sum(axis=axis)) / sums_b.sum(axis=axis)


def _constant(values: np.ndarray, reference: np.ndarray) -> bool:
    """values equal reference up to rounding, elementwise: every resample then gives the same statistic."""
    scale = max(float(np.abs(values).max()), float(np.abs(reference).max()))
    return float(np.abs(values - reference).max()) <= 1e-12 * scale


def cluster_bootstrap(values: np.ndarray | Sequence[float] | pd.Series, clusters: ClusterLabels, *,
                      n_resamples: int = 2000, confidence: float = 0.95, seed: int | np.random.Generator = 0,
                      method: Method = "percentile") -> tuple[float, float, float]:
    """Mean over all observations and its cluster-bootstrap interval: ``(estimate, low, high)``.

    Each resample draws as many clusters as there are, with replacement, and takes the mean over every
    observation of the drawn clusters (a cluster weighs its size). ``clusters``: one label per value, or a
    DataFrame of label columns. Deterministic given ``seed``. One cluster: ``(estimate, nan, nan)``; no
    value: all NaN; every cluster mean equal: ``(m, m, m)``. Non-finite values raise ValueError.
    """
    values = np.asarray(values, dtype=float).ravel()
    (sums,), counts = _cluster_sums(clusters, values)
    if len(values) == 0:
        return (np.nan, np.nan, np.nan)
    estimate = float(sums.sum() / counts.sum())
    if len(sums) < 2:
        return (estimate, np.nan, np.nan)
    if _constant(sums / counts, np.full(len(sums), estimate)):
        return (estimate, estimate, estimate)
    return (estimate, *_interval((sums, counts), _mean_of_resample, n_resamples, confidence, seed, method))


def relative_change(a_values: np.ndarray | Sequence[float] | pd.Series,
                    b_values: np.ndarray | Sequence[float] | pd.Series, clusters: ClusterLabels, *,
                    n_resamples: int = 2000, confidence: float = 0.95, seed: int | np.random.Generator = 0,
                    method: Method = "percentile") -> tuple[float, float, float]:
    """Paired relative change of means in percent, 100 (mean(a) - mean(b)) / mean(b), and its cluster-bootstrap
    interval: ``(estimate, low, high)``.

    ``a_values[i]`` and ``b_values[i]`` are the two arms on the same observation; one resample of clusters
    serves both, so the pairing is kept. Degenerate cases as in :func:`cluster_bootstrap`; mean(b) = 0 gives
    all NaN (a resample whose b-mean is 0 gives an infinite value, which can reach the interval).
    """
    a = np.asarray(a_values, dtype=float).ravel()
    b = np.asarray(b_values, dtype=float).ravel()
    (sums_a, sums_b), _ = _cluster_sums(clusters, a, b)
    if len(a) == 0 or sums_b.sum() == 0:
        return (np.nan, np.nan, np.nan)
    estimate = float(_percent_change_of_resample(sums_a, sums_b))
    if len(sums_a) < 2:
        return (estimate, np.nan, np.nan)
    if _constant(sums_a, sums_b * (sums_a.sum() / sums_b.sum())):
        return (estimate, estimate, estimate)
    return (estimate, *_interval((sums_a, sums_b), _percent_change_of_resample, n_resamples, confidence, seed,
                                 method))


def paired_summary(paired: pd.DataFrame | Paired, clusters: Sequence[str] = CLUSTERS, by: Sequence[str] = (), *,
                   n_resamples: int = 2000, confidence: float = 0.95, seed: int | np.random.Generator = 0,
                   method: Method = "percentile") -> pd.DataFrame:
    """One row per group of ``by`` (one row if empty) of a :func:`pair` frame: the columns of ``by``, then
    ``n_images``, ``n_clusters``, ``mean_a``, ``mean_b``, ``diff`` (= mean_a - mean_b) with its
    cluster-bootstrap interval ``diff_low``/``diff_high``, and ``rel_change`` (percent) with
    ``rel_low``/``rel_high``. Every group uses the same ``seed``.
    """
    frame = paired.frame if isinstance(paired, Paired) else paired
    clusters, by = list(clusters), list(by)
    groups = frame.groupby(by, sort=True, dropna=False) if by else [((), frame)]
    rows = []
    for name, group in groups:
        labels = group[clusters]
        diff = cluster_bootstrap(group["diff"].to_numpy(), labels, n_resamples=n_resamples, confidence=confidence,
                                 seed=seed, method=method)
        rel = relative_change(group["a"].to_numpy(), group["b"].to_numpy(), labels, n_resamples=n_resamples,
                              confidence=confidence, seed=seed, method=method)
        key = name if isinstance(name, tuple) else (name,)
        rows.append([*key, len(group), int(labels.drop_duplicates().shape[0]),
                     float(group["a"].mean()) if len(group) else np.nan,
                     float(group["b"].mean()) if len(group) else np.nan, *diff, *rel])
    return pd.DataFrame(rows, columns=[*by, *SUMMARY_COLUMNS])
