"""The 95 % intervals simfl reports, one function per kind of sample, in one place.

A run's figures are means over attacked images (Wilson for a proportion,
normal otherwise) or over clients (sample-weighted); a study's are means over
seeds (Student t, clipped to the metric's range). Every table and the tidy
metrics use these, so an interval means the same thing wherever it is printed.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import t


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


def weighted_interval(values: np.ndarray, weights: np.ndarray, z: float = 1.96) -> tuple[float, tuple[float, float]]:
    """Sample-weighted mean over clients and its 95 % interval (ratio-estimator standard error, clipped to [0, 1]).

    The unweighted spread of client accuracies would not be centred on the weighted mean.
    """
    values, weights = np.asarray(values, dtype=float), np.asarray(weights, dtype=float)
    mean = float((values * weights).sum() / weights.sum())
    n = len(values)
    if n < 2:
        return mean, (np.nan, np.nan)
    se = math.sqrt(n / (n - 1) * float(((weights * (values - mean)) ** 2).sum())) / float(weights.sum())
    return mean, (max(mean - z * se, 0.0), min(mean + z * se, 1.0))


def bounds(metric: str) -> tuple[float, float]:
    """The range a metric can take: an interval is clipped to it (a proportion's t-interval from two seeds
    easily spans [-1, 2])."""
    name = metric.partition(":")[0]
    if name.endswith("accuracy") or name == "attacker_acc":
        return (0.0, 1.0)
    if name == "ssim":
        return (-1.0, 1.0)
    if name in ("mse", "psnr") or name.startswith("dp_"):
        return (0.0, np.inf)
    return (-np.inf, np.inf)


def seed_interval(values: np.ndarray, metric: str = "") -> tuple[float, float, float]:
    """Mean and 95 % t-interval over seeds, clipped to the metric's range (no interval from one seed)."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return (np.nan, np.nan, np.nan)
    mean = float(values.mean())
    if len(values) < 2:
        return (mean, np.nan, np.nan)
    half = float(t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    lo, hi = bounds(metric)
    return (mean, max(mean - half, lo), min(mean + half, hi))
