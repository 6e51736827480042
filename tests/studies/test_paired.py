"""Unit tests of simfl.studies.paired: pairing on shared victims and the cluster bootstrap, against known answers,
scipy's observation bootstrap, an analytic interval of cluster means and a plain numpy cluster bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from simfl.studies.paired import (
    SUMMARY_COLUMNS,
    Paired,
    cluster_bootstrap,
    cluster_codes,
    pair,
    paired_summary,
    relative_change,
)

approx = pytest.approx


def clustered(k: int, size: int, between: float, within: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k clusters of `size` values each: a cluster effect of sd `between` plus noise of sd `within`."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(k), size)
    return rng.normal(0, between, k)[labels] + rng.normal(0, within, k * size), labels


def numpy_cluster_bootstrap(values, labels, n_resamples, seed, confidence=0.95):
    """Reference: resample cluster members explicitly, one resample at a time."""
    rng = np.random.default_rng(seed)
    groups = [values[labels == c] for c in np.unique(labels)]
    stats_ = [np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))]).mean()
              for _ in range(n_resamples)]
    return np.percentile(stats_, [50 * (1 - confidence), 50 * (1 + confidence)])


def victims(seeds=(0, 1), rounds=(1, 2), clients=(3, 7), images=3) -> pd.DataFrame:
    index = pd.MultiIndex.from_product([seeds, rounds, clients, range(images)],
                                       names=["seed", "round", "client_id", "image"])
    return index.to_frame(index=False)


class TestClusterBootstrap:
    def test_constant_differences_give_the_point(self):
        values, labels = np.full(60, 0.3), np.repeat(np.arange(12), 5)
        assert cluster_bootstrap(values, labels) == approx((0.3, 0.3, 0.3), abs=1e-12)
        assert cluster_bootstrap(values, labels, method="BCa") == approx((0.3, 0.3, 0.3), abs=1e-12)

    def test_singleton_clusters_agree_with_scipys_observation_bootstrap(self):
        values = np.random.default_rng(3).exponential(1.0, 150)
        estimate, low, high = cluster_bootstrap(values, np.arange(150), n_resamples=4000, seed=1)
        ref = stats.bootstrap((values,), np.mean, method="percentile", n_resamples=4000,
                              rng=np.random.default_rng(2)).confidence_interval
        se = values.std(ddof=1) / math.sqrt(len(values))
        assert estimate == approx(values.mean())
        assert low == approx(ref.low, abs=0.1 * se) and high == approx(ref.high, abs=0.1 * se)
        # Skewed data: the percentile interval is not symmetric, so a normal interval would not pass alone.
        assert high - estimate > estimate - low

    def test_clustered_data_widen_the_interval_to_that_of_cluster_means(self):
        values, labels = clustered(k=300, size=10, between=1.0, within=0.01)
        _, low, high = cluster_bootstrap(values, labels)
        _, naive_low, naive_high = cluster_bootstrap(values, np.arange(len(values)))
        assert (high - low) > 2.5 * (naive_high - naive_low)  # sqrt(10) in expectation
        means = values.reshape(300, 10).mean(axis=1)
        half = 1.96 * means.std(ddof=1) / math.sqrt(300)
        assert low == approx(means.mean() - half, abs=0.1 * half)
        assert high == approx(means.mean() + half, abs=0.1 * half)

    def test_unequal_sizes_weigh_clusters_by_their_observations(self):
        rng = np.random.default_rng(5)
        sizes = rng.integers(1, 30, 40)
        labels = np.repeat(np.arange(40), sizes)
        values = rng.normal(sizes[labels] / 10, 1.0)  # big clusters have big values: the two means differ
        estimate, low, high = cluster_bootstrap(values, labels, n_resamples=3000, seed=4)
        cluster_means = pd.Series(values).groupby(labels).mean()
        assert estimate == approx(values.mean())
        assert abs(values.mean() - cluster_means.mean()) > 0.3
        assert low < estimate < high
        ref_low, ref_high = numpy_cluster_bootstrap(values, labels, n_resamples=3000, seed=9)
        width = ref_high - ref_low
        assert low == approx(ref_low, abs=0.1 * width) and high == approx(ref_high, abs=0.1 * width)

    def test_labels_may_be_columns_and_clusters_need_not_be_contiguous(self):
        frame = victims()
        frame["value"] = frame["seed"] * 1.0 + frame["client_id"] * 0.1 + frame["image"] * 0.01
        shuffled = frame.sample(frac=1.0, random_state=0)
        by_columns = cluster_bootstrap(shuffled["value"], shuffled[["seed", "round", "client_id"]], seed=2)
        labels = list(zip(shuffled["seed"], shuffled["round"], shuffled["client_id"]))
        assert cluster_bootstrap(shuffled["value"], labels, seed=2) == by_columns
        assert len(np.unique(cluster_codes(shuffled[["seed", "round", "client_id"]]))) == 8

    def test_is_deterministic_given_a_seed(self):
        values, labels = clustered(k=30, size=4, between=1.0, within=0.5)
        first = cluster_bootstrap(values, labels, seed=11)
        assert cluster_bootstrap(values, labels, seed=11) == first
        assert cluster_bootstrap(values, labels, seed=12) != first
        assert relative_change(values + 5, values + 6, labels, seed=11) == relative_change(
            values + 5, values + 6, labels, seed=11)

    def test_degenerate_inputs(self):
        assert all(np.isnan(cluster_bootstrap(np.array([]), np.array([]))))
        estimate, low, high = cluster_bootstrap(np.array([1.0, 2.0, 4.0]), np.zeros(3))
        assert estimate == approx(7 / 3) and np.isnan(low) and np.isnan(high)
        with pytest.raises(ValueError, match="finite"):
            cluster_bootstrap(np.array([1.0, np.nan]), np.arange(2))
        with pytest.raises(ValueError, match="length"):
            cluster_bootstrap(np.arange(3.0), np.arange(2))


class TestRelativeChange:
    def test_half_the_baseline_is_minus_fifty_percent(self):
        a, labels = clustered(k=20, size=5, between=1.0, within=0.3)
        a = a + 10
        assert relative_change(a, 2 * a, labels) == approx((-50.0, -50.0, -50.0))

    def test_resamples_both_arms_jointly(self):
        # b varies a lot between clusters, a tracks it: jointly resampled the ratio barely moves.
        b, labels = clustered(k=50, size=4, between=3.0, within=0.01)
        b = b + 20
        a = 0.8 * b + np.random.default_rng(1).normal(0, 0.01, len(b))
        estimate, low, high = relative_change(a, b, labels)
        assert estimate == approx(100 * (a.mean() - b.mean()) / b.mean())
        assert estimate == approx(-20.0, abs=0.1)
        assert low < estimate < high and high - low < 0.1

    def test_zero_baseline_mean_has_no_answer(self):
        assert all(np.isnan(relative_change(np.ones(4), np.zeros(4), np.arange(4))))


class TestPair:
    def test_joins_on_keys_and_reports_unmatched(self):
        base = victims()
        a = base.assign(value=1.0, attack="ig").iloc[1:]  # a lacks the first victim
        b = base.assign(value=0.25).sample(frac=1.0, random_state=1)
        extra = {"seed": 9, "round": 1, "client_id": 3, "image": 0, "value": 5.0}
        b = pd.concat([b, pd.DataFrame([extra])], ignore_index=True)
        paired = pair(a, b)
        assert isinstance(paired, Paired) and not paired.shared
        assert list(paired.frame.columns) == ["seed", "round", "client_id", "image", "a", "b", "diff"]
        assert len(paired.frame) == len(base) - 1
        assert (paired.frame["diff"] == 0.75).all()
        assert paired.only_b.to_dict("records") == [
            {"seed": 0, "round": 1, "client_id": 3, "image": 0},
            {"seed": 9, "round": 1, "client_id": 3, "image": 0}]
        assert paired.only_a.empty
        with pytest.raises(ValueError, match="0 keys only in a, 2 only in b"):
            pair(a, b, strict=True)

    def test_matched_arms_are_shared_and_values_align(self):
        base = victims()
        a = base.assign(value=base["image"] + 10.0 * base["seed"], flag=base["image"] % 2 == 0)
        b = a.assign(value=a["value"] - 0.5).iloc[::-1]
        paired = pair(a, b)
        assert paired.shared and (paired.frame["diff"] == 0.5).all()
        flags = pair(a, b, value="flag").frame
        assert flags["a"].dtype == float and set(flags["a"]) == {0.0, 1.0}

    def test_repeated_keys_raise_instead_of_multiplying_rows(self):
        base = victims()
        a = pd.concat([base.assign(value=1.0, knowledge="naive"), base.assign(value=2.0, knowledge="adaptive")])
        with pytest.raises(ValueError, match="share their keys"):
            pair(a, base.assign(value=0.0))
        keys = ("seed", "round", "client_id", "image", "knowledge")
        b = pd.concat([base.assign(value=0.0, knowledge="naive"), base.assign(value=0.0, knowledge="adaptive")])
        assert len(pair(a, b, keys=keys).frame) == 2 * len(base)
        with pytest.raises(KeyError, match="lacks"):
            pair(a, b, keys=(*keys, "population"))


def test_paired_summary_per_group():
    base = victims(seeds=range(3), rounds=range(4), clients=range(5), images=4)
    rng = np.random.default_rng(0)
    frames = []
    for knowledge, shift in (("naive", 0.1), ("adaptive", 0.3)):
        b = base.assign(knowledge=knowledge, value=rng.uniform(0.5, 1.5, len(base)))
        frames.append((b.assign(value=b["value"] + shift), b))
    a = pd.concat([f[0] for f in frames])
    b = pd.concat([f[1] for f in frames])
    paired = pair(a, b, keys=("seed", "round", "client_id", "image", "knowledge"))
    summary = paired_summary(paired, by=["knowledge"], n_resamples=500)
    assert list(summary.columns) == ["knowledge", *SUMMARY_COLUMNS]
    row = summary.set_index("knowledge").loc["adaptive"]
    assert row["n_images"] == len(base) and row["n_clusters"] == 60
    assert row["diff"] == approx(0.3) and row["diff_low"] == approx(0.3) and row["diff_high"] == approx(0.3)
    assert row["mean_a"] - row["mean_b"] == approx(row["diff"])
    assert row["rel_change"] == approx(100 * 0.3 / row["mean_b"])
    assert row["rel_low"] < row["rel_change"] < row["rel_high"]
    whole = paired_summary(paired.frame, n_resamples=500)
    assert len(whole) == 1 and whole.loc[0, "n_images"] == 2 * len(base)
    assert whole.loc[0, "diff"] == approx(0.2)
