"""Unit tests of simfl.results.intervals: every interval worked out by hand (or with scipy for a t quantile)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from analysis_helpers import t_half
from scipy import stats

from simfl.results.intervals import bounds, mean_interval, seed_interval, weighted_interval, wilson

approx = pytest.approx


def test_wilson_known_values():
    assert wilson(3, 4) == approx((0.30064, 0.95441), abs=1e-4)
    # Half the images: centred on 1/2, half-width 1.96 sqrt(1/8 + 1.96^2/16) / (1 + 1.96^2/2).
    half = 1.96 * math.sqrt(1 / 8 + 1.96**2 / 16) / (1 + 1.96**2 / 2)
    assert wilson(1, 2) == approx((0.5 - half, 0.5 + half))


def test_wilson_stays_inside_the_unit_interval_and_needs_images():
    low, high = wilson(0, 5)
    assert low == approx(0.0, abs=1e-12) and 0 < high < 1
    low, high = wilson(5, 5)
    assert 0 < low < 1 and high == approx(1.0)
    assert all(np.isnan(wilson(0, 0)))


def test_mean_interval_is_normal_over_images():
    values = np.array([20.0, 20.0, 22.0, 22.0])
    half = 1.96 * float(np.std(values, ddof=1)) / 2
    assert mean_interval(values) == approx((21.0 - half, 21.0 + half))
    assert mean_interval(np.array([25.0] * 4)) == approx((25.0, 25.0))
    assert all(np.isnan(mean_interval(np.array([1.0]))))  # one image: no interval


class TestSeedInterval:
    def test_mean_and_t_interval_of_three_values(self):
        values = np.array([0.4, 0.5, 0.7])
        half = float(stats.t.ppf(0.975, 2)) * float(np.std(values, ddof=1)) / math.sqrt(3)
        mean, low, high = seed_interval(values, "")
        assert mean == approx(1.6 / 3)
        assert low == approx(1.6 / 3 - half)
        assert high == approx(1.6 / 3 + half)
        assert half == approx(t_half(values))
        assert half == approx(4.302652729911275 * 0.15275252316519466 / math.sqrt(3))

    def test_one_value_has_no_interval(self):
        mean, low, high = seed_interval(np.array([0.42]), "attacker_acc")
        assert mean == approx(0.42)
        assert np.isnan(low) and np.isnan(high)

    def test_nans_are_dropped(self):
        mean, low, high = seed_interval(np.array([0.4, np.nan, 0.6]), "")
        assert mean == approx(0.5)
        assert high - mean == approx(t_half([0.4, 0.6]))
        assert mean - low == approx(t_half([0.4, 0.6]))
        assert all(np.isnan(seed_interval(np.array([np.nan, np.nan]), "")))
        assert all(np.isnan(seed_interval(np.array([]), "")))

    @pytest.mark.parametrize("metric", ["attacker_acc", "local_val_accuracy", "test_accuracy"])
    def test_proportion_is_clipped_to_unit_interval(self, metric):
        values = np.array([0.2, 0.5, 0.8])  # half-width 4.30 * 0.3 / sqrt(3) = 0.745
        mean, low, high = seed_interval(values, metric)
        assert mean == approx(0.5)
        assert low == 0.0
        assert high == 1.0

    def test_difference_is_not_clipped(self):
        values = np.array([0.2, 0.5, 0.8])
        half = t_half(values)
        assert half > 0.5
        mean, low, high = seed_interval(values, "")
        assert (mean, low, high) == approx((0.5, 0.5 - half, 0.5 + half))
        assert low < 0 and high > 1

    def test_mse_is_clipped_at_zero_only(self):
        values = np.array([0.01, 0.02, 0.9])
        half = t_half(values)
        mean, low, high = seed_interval(values, "mse")
        assert low == 0.0
        assert high == approx(values.mean() + half)

    @pytest.mark.parametrize(
        "metric, expected",
        [
            ("attacker_acc", (0.0, 1.0)),
            ("attacker_acc:naive", (0.0, 1.0)),
            ("local_val_accuracy", (0.0, 1.0)),
            ("test_accuracy", (0.0, 1.0)),
            ("ssim", (-1.0, 1.0)),
            ("mse", (0.0, np.inf)),
            ("psnr", (0.0, np.inf)),
            ("dp_epsilon_max", (0.0, np.inf)),
            ("", (-np.inf, np.inf)),
            ("gap", (-np.inf, np.inf)),
        ],
    )
    def test_bounds(self, metric, expected):
        assert bounds(metric) == expected


def test_weighted_interval_is_centred_on_the_weighted_mean():
    # Ten large accurate clients and ten small poor ones: the unweighted spread would miss the value.
    acc = np.array([0.9] * 10 + [0.3] * 10)
    samples = np.array([200] * 10 + [10] * 10)
    mean, (low, high) = weighted_interval(acc, samples)
    assert mean == approx((0.9 * 2000 + 0.3 * 100) / 2100)
    assert low <= mean <= high and 0.0 <= low and high <= 1.0
    assert all(np.isnan(weighted_interval(np.array([0.4]), np.array([5]))[1]))  # one client: no interval
