"""Unit tests of simfl.results.analysis: pure pandas over hand-built frames and a tiny hand-written run directory.

No Ray, no training: every expected number below is worked out by hand (or with
scipy for a t quantile), so a wrong aggregation, interpolation, pairing or
choice of worst attack / best baseline fails a test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from analysis_helpers import attack_row, make_run, naive_attacks, t_half

from simfl.results import analysis
from simfl.results.analysis import (
    TIDY_COLUMNS,
    cells_frame,
    interpolate_at,
    matched_utility,
    operating_points,
    population_gaps,
    run_metrics,
    worst_attack,
)
from simfl.results.intervals import mean_interval, wilson

approx = pytest.approx


# ---------------------------------------------------------------- interpolate_at


class TestInterpolateAt:
    def test_linear_between_unsorted_points(self):
        x = np.array([0.8, 0.2, 0.5])
        y = np.array([1.0, 0.0, 0.3])
        assert interpolate_at(x, y, 0.6) == approx(0.3 + (0.1 / 0.3) * 0.7)
        assert interpolate_at(x, y, 0.35) == approx(0.15)
        assert interpolate_at(x, y, 0.5) == approx(0.3)

    def test_endpoints_are_inside_the_range(self):
        x = np.array([0.8, 0.2, 0.5])
        y = np.array([1.0, 0.0, 0.3])
        assert interpolate_at(x, y, 0.2) == approx(0.0)
        assert interpolate_at(x, y, 0.8) == approx(1.0)

    def test_no_extrapolation(self):
        x = np.array([0.8, 0.2, 0.5])
        y = np.array([1.0, 0.0, 0.3])
        assert np.isnan(interpolate_at(x, y, 0.19))
        assert np.isnan(interpolate_at(x, y, 0.81))

    def test_ties_in_x_are_averaged(self):
        x = np.array([0.6, 0.4, 0.2, 0.4])
        y = np.array([1.0, 0.6, 0.0, 0.2])
        assert interpolate_at(x, y, 0.4) == approx(0.4)  # mean of 0.2 and 0.6
        assert interpolate_at(x, y, 0.3) == approx(0.2)
        assert interpolate_at(x, y, 0.5) == approx(0.7)

    def test_nans_are_ignored(self):
        x = np.array([0.2, np.nan, 0.6, 0.4])
        y = np.array([0.0, 5.0, 1.0, np.nan])
        # Only (0.2, 0) and (0.6, 1) are usable: the point at x = 0.4 has no y.
        assert interpolate_at(x, y, 0.4) == approx(0.5)
        assert interpolate_at(x, y, 0.3) == approx(0.25)

    def test_a_point_without_y_does_not_extend_the_range(self):
        x = np.array([0.2, 0.6, 0.9])
        y = np.array([0.0, 1.0, np.nan])
        assert np.isnan(interpolate_at(x, y, 0.8))

    def test_single_point(self):
        assert interpolate_at(np.array([0.5]), np.array([0.3]), 0.5) == approx(0.3)
        assert np.isnan(interpolate_at(np.array([0.5]), np.array([0.3]), 0.51))
        assert np.isnan(interpolate_at(np.array([0.5]), np.array([0.3]), 0.49))

    def test_single_x_repeated_is_averaged(self):
        assert interpolate_at(np.array([0.5, 0.5]), np.array([0.2, 0.4]), 0.5) == approx(0.3)

    def test_nothing_usable(self):
        assert np.isnan(interpolate_at(np.array([np.nan, 0.5]), np.array([1.0, np.nan]), 0.5))
        assert np.isnan(interpolate_at(np.array([]), np.array([]), 0.5))


# ---------------------------------------------------------------- hand-built study frames

CELL_COLUMNS = ["cell", "status", "run_dir", "seed", "defence", "knobs", "setting", "context", "group"]


def cell(name, defence, setting, seed, context="all"):
    return {"cell": name, "status": "finished", "run_dir": f"/nowhere/{name}", "seed": seed, "defence": defence,
            "knobs": "{}", "setting": setting, "context": context, "group": f"{setting}__{context}"}


def tidy(cell_, metric, value, *, round_=pd.NA, population=None, held_out=False, attack=None, knowledge=None,
         n=10):
    return {"cell": cell_, "round": round_, "metric": metric, "population": population, "held_out": held_out,
            "attack": attack, "knowledge": knowledge, "value": float(value), "low": np.nan, "high": np.nan, "n": n}


def metrics_frame(rows):
    """As ``study_metrics`` returns them: the tidy columns with their nullable dtypes, plus ``cell``."""
    return pd.DataFrame(rows, columns=["cell", *TIDY_COLUMNS]).astype(
        {"round": "Int32", "held_out": "boolean", "n": "Int64", "value": "float64", "low": "float64",
         "high": "float64"})


def util(cell_, value, **kw):
    return tidy(cell_, "local_val_accuracy", value, **kw)


def priv(cell_, metric, value, knowledge="naive", **kw):
    kw.setdefault("attack", "worst")
    return tidy(cell_, metric, value, knowledge=knowledge, **kw)


# Per defence, per seed: the (utility, attacker_acc, mse) of each setting. Target utility 0.5.
#   dpsgd  seed 0: (0.4, 0.2), (0.6, 0.4) -> acc 0.3 ; mse (0.08, 0.04) -> 0.06
#          seed 1: (0.3, 0.3), (0.7, 0.5) -> acc 0.4 ; mse (0.09, 0.05) -> 0.07
#   bido   seed 0: (0.45, 0.5), (0.55, 0.3) -> acc 0.4 ; mse (0.1, 0.2) -> 0.15
#          seed 1: (0.4, 0.6), (0.6, 0.2) -> acc 0.4 ; mse (0.1, 0.3) -> 0.2
#   latent seed 0: (0.5, 0.15), (0.8, 0.9) -> acc 0.15 (target on the lower end) ; mse (0.2, 0.0) -> 0.2
#          seed 1: (0.2, 0.0), (0.6, 0.4) -> acc 0.3 ; mse (0.4, 0.2) -> 0.25
#   prune  both seeds at utilities 0.1, 0.2: never reaches the target.
#   none   seed 0: utility 0.7, acc 0.9, mse 0.01 ; seed 1: utility 0.8, acc 0.8, mse 0.03
DESIGN = {
    "dpsgd": {0: [(0.4, 0.2, 0.08), (0.6, 0.4, 0.04)], 1: [(0.3, 0.3, 0.09), (0.7, 0.5, 0.05)]},
    "bido": {0: [(0.45, 0.5, 0.1), (0.55, 0.3, 0.2)], 1: [(0.4, 0.6, 0.1), (0.6, 0.2, 0.3)]},
    "latent": {0: [(0.5, 0.15, 0.2), (0.8, 0.9, 0.0)], 1: [(0.2, 0.0, 0.4), (0.6, 0.4, 0.2)]},
    "prune": {0: [(0.1, 0.05, 0.5), (0.2, 0.1, 0.4)], 1: [(0.1, 0.06, 0.5), (0.2, 0.1, 0.4)]},
    "none": {0: [(0.7, 0.9, 0.01)], 1: [(0.8, 0.8, 0.03)]},
}
# The adaptive attacker breaks DP-SGD (its attacker_acc + 0.2), so the most private baseline changes.
ADAPTIVE_SHIFT = {"dpsgd": 0.2}


def study(context="all"):
    cells, rows = [], []
    for defence, by_seed in DESIGN.items():
        for seed, points in by_seed.items():
            for i, (u, acc, mse) in enumerate(points):
                name = f"{context}-{defence}-s{i}-seed{seed}"
                setting = defence if defence == "none" else f"{defence}-{i}"
                cells.append(cell(name, defence, setting, seed, context))
                rows.append(util(name, u))
                # Decoys a correct analysis must ignore: held-out aggregate, one population, a per-round value.
                rows.append(util(name, 0.99, held_out=True))
                rows.append(util(name, 0.01, population="A"))
                rows.append(util(name, 0.02, round_=3))
                for knowledge in ("naive", "adaptive"):
                    shift = ADAPTIVE_SHIFT.get(defence, 0.0) if knowledge == "adaptive" else 0.0
                    rows.append(priv(name, "attacker_acc", acc + shift, knowledge))
                    rows.append(priv(name, "mse", mse, knowledge))
                    # Decoys: a single attack (not the worst), held-out victims, a population, a round.
                    rows.append(priv(name, "attacker_acc", 0.77, knowledge, attack="ig"))
                    rows.append(priv(name, "attacker_acc", 0.66, knowledge, held_out=True))
                    rows.append(priv(name, "attacker_acc", 0.55, knowledge, population="A"))
                    rows.append(priv(name, "attacker_acc", 0.44, knowledge, round_=3))
    return pd.DataFrame(cells, columns=CELL_COLUMNS), rows


@pytest.fixture(scope="module")
def matched():
    cells, rows = study()
    metrics = metrics_frame(rows)
    return matched_utility(cells, metrics, 0.5, "client_val", "latent", ["dpsgd", "bido", "prune"])


def one(frame, **where):
    sel = frame
    for k, v in where.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, f"{len(sel)} rows for {where}"
    return sel.iloc[0]


class TestMatchedUtility:
    def test_rows(self, matched):
        assert set(matched["knowledge"]) == {"naive", "adaptive"}
        assert set(matched["defence"]) == set(DESIGN)
        assert set(matched["metric"]) == set(analysis.PRIVACY)
        assert len(matched) == 2 * len(DESIGN) * len(analysis.PRIVACY)

    def test_dpsgd_interpolated_per_seed_then_averaged(self, matched):
        r = one(matched, defence="dpsgd", metric="attacker_acc", knowledge="naive")
        assert r["value"] == approx(0.35)
        assert r["utility"] == approx(0.5)
        assert r["seeds_reached"] == 2 and r["seeds"] == 2
        half = t_half([0.3, 0.4])
        assert r["low"] == 0.0  # 0.35 - 12.7 * 0.0707 / 1.41 < 0: clipped for a proportion
        assert r["high"] == approx(0.35 + half)
        assert tuple(r["utility_range"]) == approx((0.3, 0.7))
        assert np.isnan(r["relative_change"]) and pd.isna(r["baseline"])
        m = one(matched, defence="dpsgd", metric="mse", knowledge="naive")
        assert m["value"] == approx(0.065)

    def test_adaptive_values(self, matched):
        r = one(matched, defence="dpsgd", metric="attacker_acc", knowledge="adaptive")
        assert r["value"] == approx(0.55)

    def test_bido_and_latent(self, matched):
        assert one(matched, defence="bido", metric="attacker_acc", knowledge="naive")["value"] == approx(0.4)
        assert one(matched, defence="bido", metric="mse", knowledge="naive")["value"] == approx(0.175)
        lat = one(matched, defence="latent", metric="attacker_acc", knowledge="naive")
        assert lat["value"] == approx(0.225)
        assert lat["seeds_reached"] == 2
        assert one(matched, defence="latent", metric="mse", knowledge="naive")["value"] == approx(0.225)

    def test_defence_that_never_reaches_the_target(self, matched):
        r = one(matched, defence="prune", metric="attacker_acc", knowledge="naive")
        assert np.isnan(r["value"]) and np.isnan(r["low"]) and np.isnan(r["high"])
        assert r["seeds_reached"] == 0 and r["seeds"] == 2
        assert tuple(r["utility_range"]) == approx((0.1, 0.2))

    def test_undefended_reports_its_own_utility(self, matched):
        r = one(matched, defence="none", metric="attacker_acc", knowledge="naive")
        assert r["utility"] == approx(0.75)
        assert r["value"] == approx(0.85)
        assert r["seeds_reached"] == 2
        assert one(matched, defence="none", metric="mse", knowledge="naive")["value"] == approx(0.02)
        assert np.isnan(r["relative_change"])

    def test_relative_change_against_most_private_baseline_attacker_acc(self, matched):
        r = one(matched, defence="latent", metric="attacker_acc", knowledge="naive")
        # Lowest attacker_acc at the target: dpsgd (0.35) beats bido (0.4); prune never got there.
        assert r["baseline"] == "dpsgd"
        per_seed = [(0.15 - 0.3) / 0.3 * 100, (0.3 - 0.4) / 0.4 * 100]  # -50, -25: paired on the seed
        assert r["relative_change"] == approx(np.mean(per_seed))
        assert r["relative_change"] == approx(-37.5)
        assert r["relative_change"] != approx((0.225 - 0.35) / 0.35 * 100)  # not a ratio of means
        assert r["relative_low"] == approx(-37.5 - t_half(per_seed))  # a difference: not clipped
        assert r["relative_high"] == approx(-37.5 + t_half(per_seed))

    def test_relative_change_against_most_private_baseline_mse(self, matched):
        r = one(matched, defence="latent", metric="mse", knowledge="naive")
        # Highest MSE is the most private: bido (0.175) beats dpsgd (0.065).
        assert r["baseline"] == "bido"
        per_seed = [(0.2 - 0.15) / 0.15 * 100, (0.25 - 0.2) / 0.2 * 100]
        assert r["relative_change"] == approx(np.mean(per_seed))

    def test_best_baseline_per_knowledge(self, matched):
        r = one(matched, defence="latent", metric="attacker_acc", knowledge="adaptive")
        # Against the adaptive attacker dpsgd leaks 0.55: bido (0.4) is now the most private.
        assert r["baseline"] == "bido"
        per_seed = [(0.15 - 0.4) / 0.4 * 100, (0.3 - 0.4) / 0.4 * 100]
        assert r["relative_change"] == approx(np.mean(per_seed))

    def test_seed_missing_in_baseline_is_not_paired(self):
        cells, rows = study()
        # dpsgd's seed 1 stops short of the target: only seed 0 is paired.
        low = cells["cell"].str.contains("dpsgd") & (cells["seed"] == 1)
        rows = [dict(r, value=0.1) if r["metric"] == "local_val_accuracy" and r["cell"] in set(cells[low]["cell"])
                and pd.isna(r["round"]) and r["population"] is None and not r["held_out"] else r for r in rows]
        out = matched_utility(cells, metrics_frame(rows), 0.5, "client_val", "latent", ["dpsgd", "bido"])
        d = one(out, defence="dpsgd", metric="attacker_acc", knowledge="naive")
        assert d["seeds_reached"] == 1 and d["value"] == approx(0.3)
        assert np.isnan(d["low"])
        r = one(out, defence="latent", metric="attacker_acc", knowledge="naive")
        assert r["baseline"] == "dpsgd"
        assert r["relative_change"] == approx(-50.0)

    def test_contexts_are_separate(self):
        c1, r1 = study("iid")
        c2, r2 = study("skew")
        # In "skew" every attacker_acc is 0.1 higher: dpsgd 0.45 at the target.
        r2 = [dict(r, value=r["value"] + 0.1) if r["metric"] == "attacker_acc" else r for r in r2]
        out = matched_utility(pd.concat([c1, c2], ignore_index=True), metrics_frame(r1 + r2), 0.5, "client_val",
                              "latent", ["dpsgd", "bido"])
        assert one(out, context="iid", defence="dpsgd", metric="attacker_acc", knowledge="naive")["value"] \
            == approx(0.35)
        assert one(out, context="skew", defence="dpsgd", metric="attacker_acc", knowledge="naive")["value"] \
            == approx(0.45)
        skew = one(out, context="skew", defence="latent", metric="attacker_acc", knowledge="naive")
        assert skew["relative_change"] == approx(np.mean([(0.25 - 0.4) / 0.4 * 100, (0.4 - 0.5) / 0.5 * 100]))

    def test_test_accuracy_as_utility(self):
        cells, rows = study()
        # Global test accuracy = client validation utility + 0.1; held-out and per-population rows are decoys.
        extra = []
        for r in rows:
            if r["metric"] == "local_val_accuracy" and pd.isna(r["round"]) and r["population"] is None \
                    and not r["held_out"]:
                extra.append(tidy(r["cell"], "test_accuracy", r["value"] + 0.1, held_out=pd.NA))
                extra.append(tidy(r["cell"], "test_accuracy", 0.0, population="A", held_out=False))
        out = matched_utility(cells, metrics_frame(rows + extra), 0.6, "test", "latent", ["dpsgd", "bido"])
        assert one(out, defence="dpsgd", metric="attacker_acc", knowledge="naive")["value"] == approx(0.35)
        assert one(out, defence="none", metric="attacker_acc", knowledge="naive")["utility"] == approx(0.85)


class TestCurves:
    def test_points_mean_over_seeds(self):
        cells, rows = study()
        c = analysis.curves(cells, metrics_frame(rows), "client_val")
        r = one(c, defence="dpsgd", setting="dpsgd-0", metric="attacker_acc", knowledge="naive")
        assert r["seeds"] == 2
        assert r["utility"] == approx(0.35)  # seeds at 0.4 and 0.3
        assert r["utility_low"] == 0.0  # a t-interval from two seeds, clipped to [0, 1]
        assert r["value"] == approx(0.25)
        assert r["high"] == approx(0.25 + t_half([0.2, 0.3]))
        r = one(c, defence="dpsgd", setting="dpsgd-0", metric="attacker_acc", knowledge="adaptive")
        assert r["value"] == approx(0.45)
        assert one(c, defence="bido", setting="bido-1", metric="mse", knowledge="naive")["value"] == approx(0.25)


# ---------------------------------------------------------------- cells_frame


def entry(name, seed, defence_cfg, labels, defence="dpsgd"):
    return {"cell": name, "status": "finished", "run_dir": f"/runs/{name}", "seed": seed, "defence": defence,
            "knobs": json.dumps({k: v for k, v in defence_cfg.items() if k != "kind"}, sort_keys=True),
            "_defence_cfg": json.dumps(defence_cfg, sort_keys=True),
            **{f"axis.{a}": lab for a, lab in labels.items()}}


NOISE = {"dp-lo": 0.5, "dp-hi": 1.0}


def grid_entries(order=("defence", "seed", "split")):
    out = []
    for d, noise in NOISE.items():
        for s in range(3):
            for split in ("iid", "skew"):
                labels = {"defence": d, "seed": f"s{s}", "split": split}
                out.append(entry(f"{d}_s{s}_{split}", 100 + s, {"kind": "dpsgd", "noise": noise},
                                 {a: labels[a] for a in order}))
    return out


class TestCellsFrame:
    def test_defence_seed_split_grid(self):
        cells = cells_frame(grid_entries())
        assert "_defence_cfg" not in cells.columns
        assert len(cells) == 12
        for r in cells.itertuples():
            d, s, split = r.cell.split("_")
            assert r.setting == d
            assert r.context == split
            assert r.group == f"{d}__{split}"  # no seed label
        assert cells.groupby("group")["seed"].nunique().eq(3).all()
        assert cells["group"].nunique() == 4

    def test_axis_order_does_not_matter(self):
        cells = cells_frame(grid_entries(order=("seed", "split", "defence")))
        for r in cells.itertuples():
            d, s, split = r.cell.split("_")
            assert (r.setting, r.context, r.group) == (d, split, f"{split}__{d}")

    def test_as_many_seeds_as_settings(self):
        entries = [entry(f"{d}_s{s}", s, {"kind": "dpsgd", "noise": n}, {"defence": d, "seed": f"s{s}"})
                   for d, n in NOISE.items() for s in range(2)]
        cells = cells_frame(entries)
        assert list(cells["setting"]) == ["dp-lo", "dp-lo", "dp-hi", "dp-hi"]
        assert list(cells["context"]) == ["all"] * 4
        assert list(cells["group"]) == ["dp-lo", "dp-lo", "dp-hi", "dp-hi"]

    def test_defence_kind_axis_with_none(self):
        entries = []
        for d, cfg in {"none": {"kind": "none"}, "dp": {"kind": "dpsgd", "noise": 1.0}}.items():
            for s in range(2):
                for split in ("iid", "skew"):
                    entries.append(entry(f"{d}_{s}_{split}", s, cfg, {"method": d, "seed": f"s{s}", "split": split},
                                         defence=cfg["kind"]))
        cells = cells_frame(entries)
        for r in cells.itertuples():
            d, s, split = r.cell.split("_")
            assert (r.setting, r.context, r.group) == (d, split, f"{d}__{split}")

    def test_arms_one_seed(self):
        # As the report builds it for a scenario's arms: one label per arm, one seed.
        entries = [entry("a", 0, {"kind": "none"}, {"arm": "a"}, defence="none"),
                   entry("b", 0, {"kind": "dpsgd", "noise": 1.0}, {"arm": "b"})]
        cells = cells_frame(entries)
        assert list(cells["setting"]) == ["a", "b"]
        assert list(cells["context"]) == ["all", "all"]
        assert list(cells["group"]) == ["a", "b"]

    def test_seed_axis_alone_is_one_group(self):
        entries = [entry(f"c{s}", s, {"kind": "none"}, {"seed": f"s{s}"}, defence="none") for s in range(3)]
        cells = cells_frame(entries)
        assert list(cells["setting"]) == ["none"] * 3
        assert list(cells["context"]) == ["all"] * 3
        assert cells["group"].nunique() == 1  # group: every axis but the seed, i.e. none here

    def test_single_run_without_axes(self):
        cells = cells_frame([entry("run1", 3, {"kind": "bido"}, {}, defence="bido")])
        r = cells.iloc[0]
        assert (r["setting"], r["context"], r["group"]) == ("bido", "all", "run1")


# ---------------------------------------------------------------- population_gaps and operating_points


def gap_study():
    # One setting with held-out clients over two seeds, one without (no held-out rows: no gap reported).
    cells = pd.DataFrame([cell("h0", "latent", "lat", 0, "split"), cell("h1", "latent", "lat", 1, "split"),
                          cell("n0", "none", "none", 0, "split")], columns=CELL_COLUMNS)
    rows = []
    # (local_val training, held-out; test A, B (training), C (held-out); attacker_acc naive training, held-out)
    values = {"h0": (0.8, 0.7, 0.9, 0.7, 0.5, 0.6, 0.3), "h1": (0.9, 0.6, 0.6, 0.8, 0.4, 0.5, 0.4)}
    for c, (lt, lh, ta, tb, tc, at, ah) in values.items():
        rows += [util(c, lt), util(c, lh, held_out=True), util(c, 0.0, population="A", held_out=False),
                 util(c, 0.0, round_=2)]
        rows += [tidy(c, "test_accuracy", ta, population="A", held_out=False),
                 tidy(c, "test_accuracy", tb, population="B", held_out=False),
                 tidy(c, "test_accuracy", tc, population="C", held_out=True),
                 tidy(c, "test_accuracy", 0.99, held_out=pd.NA)]  # global: no flag, not a population
        rows += [priv(c, "attacker_acc", at), priv(c, "attacker_acc", ah, held_out=True),
                 priv(c, "attacker_acc", 1.0, attack="ig"), priv(c, "attacker_acc", 1.0, round_=2),
                 priv(c, "attacker_acc", 0.0, population="A")]
    rows += [util("n0", 0.9), tidy("n0", "test_accuracy", 0.9, held_out=pd.NA), priv("n0", "attacker_acc", 0.9)]
    return cells, metrics_frame(rows)


class TestPopulationGaps:
    def test_gaps(self):
        gaps = population_gaps(*gap_study())
        assert set(gaps["defence"]) == {"latent"}
        assert set(gaps["metric"]) == {"local_val_accuracy", "test_accuracy", "attacker_acc:naive"}

        r = one(gaps, metric="local_val_accuracy")
        assert (r["context"], r["setting"], r["seeds"]) == ("split", "lat", 2)
        assert r["training"] == approx(0.85)
        assert r["held_out"] == approx(0.65)
        diffs = [0.1, 0.3]
        assert r["gap"] == approx(0.2)
        assert r["gap_low"] == approx(0.2 - t_half(diffs))  # a difference: below 0, not clipped
        assert r["gap_low"] < 0
        assert r["gap_high"] == approx(0.2 + t_half(diffs))

        t = one(gaps, metric="test_accuracy")
        # Per cell: training = mean of populations A and B, held-out = C.
        assert t["training"] == approx(np.mean([0.8, 0.7]))
        assert t["held_out"] == approx(0.45)
        assert t["gap"] == approx(np.mean([0.8 - 0.5, 0.7 - 0.4]))

        a = one(gaps, metric="attacker_acc:naive")
        assert a["training"] == approx(0.55)
        assert a["held_out"] == approx(0.35)
        assert a["gap"] == approx(0.2)


def op_study():
    cells, rows = [], []
    # Mean utilities over two seeds: dp-a 0.3, dp-b 0.52, dp-c 0.7; dp-x has no utility at all.
    for setting, us in {"dp-a": (0.2, 0.4), "dp-b": (0.5, 0.54), "dp-c": (0.7, 0.7), "dp-x": (None, None)}.items():
        for seed, u in enumerate(us):
            name = f"{setting}-{seed}"
            cells.append(cell(name, "dpsgd", setting, seed))
            if u is not None:
                rows.append(util(name, u))
            rows.append(util(name, 0.5, held_out=True))  # decoy
    for seed, u in enumerate((0.9, 0.8)):
        cells.append(cell(f"none-{seed}", "none", "none", seed))
        rows.append(util(f"none-{seed}", u))
    # Another context where dp-c is nearest.
    for setting, u in {"dp-a": 0.3, "dp-c": 0.46, "dp-b": 0.6}.items():
        cells.append(cell(f"o-{setting}", "dpsgd", setting, 0, "other"))
        rows.append(util(f"o-{setting}", u))
    return pd.DataFrame(cells, columns=CELL_COLUMNS), metrics_frame(rows)


class TestOperatingPoints:
    def test_nearest_mean_utility(self):
        points = operating_points(*op_study(), 0.5, "client_val")
        assert len(points) == 3
        dp = one(points, context="all", defence="dpsgd")
        assert dp["setting"] == "dp-b"
        assert dp["utility"] == approx(0.52)
        none = one(points, context="all", defence="none")
        assert none["setting"] == "none" and none["utility"] == approx(0.85)
        other = one(points, context="other", defence="dpsgd")
        assert other["setting"] == "dp-c" and other["utility"] == approx(0.46)

    def test_target_decides(self):
        points = operating_points(*op_study(), 0.35, "client_val")
        assert one(points, context="all", defence="dpsgd")["setting"] == "dp-a"
        points = operating_points(*op_study(), 0.65, "client_val")
        assert one(points, context="all", defence="dpsgd")["setting"] == "dp-c"


# ---------------------------------------------------------------- run_metrics on a hand-written run directory


def pick(m, metric, *, round_=None, population=None, held_out=None, attack=None, knowledge=None):
    sel = m[m["metric"] == metric]
    sel = sel[sel["round"].isna()] if round_ is None else sel[sel["round"] == round_]
    sel = sel[sel["population"].isna()] if population is None else sel[sel["population"] == population]
    sel = sel[sel["held_out"].isna()] if held_out is None else sel[sel["held_out"].fillna(not held_out) == held_out]
    sel = sel[sel["attack"].isna()] if attack is None else sel[sel["attack"] == attack]
    sel = sel[sel["knowledge"].isna()] if knowledge is None else sel[sel["knowledge"] == knowledge]
    assert len(sel) == 1, f"{len(sel)} rows: {metric} round={round_} population={population} held_out={held_out} " \
                          f"attack={attack} knowledge={knowledge}"
    return sel.iloc[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("analysis"), naive_attacks())


@pytest.fixture(scope="module")
def naive_metrics(run_dir):
    return run_metrics(run_dir)


class TestRunMetrics:
    def test_layout(self, naive_metrics):
        m = naive_metrics
        assert list(m.columns) == TIDY_COLUMNS
        assert str(m["round"].dtype) == "Int32"
        assert str(m["held_out"].dtype) == "boolean"

    def test_rounds(self, naive_metrics):
        m = naive_metrics
        assert pick(m, "train_loss", round_=1)["value"] == approx(1.2)
        assert pick(m, "train_accuracy", round_=2)["value"] == approx(0.7)
        assert pick(m, "client_train_accuracy")["value"] == approx(0.7)  # the last round's
        assert pick(m, "dp_epsilon_max")["value"] == approx(2.5)
        assert not (m["metric"] == "lam").any()  # a defence column the run never logged

    def test_final_test_accuracy(self, naive_metrics):
        m = naive_metrics
        r = pick(m, "test_accuracy")
        assert r["value"] == approx(0.75) and r["n"] == 1000
        assert pick(m, "test_accuracy", population="A", held_out=False)["value"] == approx(0.7)
        assert pick(m, "test_accuracy", population="C", held_out=True)["value"] == approx(0.5)
        assert pick(m, "test_accuracy", round_=1)["value"] == approx(0.6)
        assert pick(m, "test_accuracy", round_=2)["value"] == approx(0.75)

    def test_local_val_accuracy(self, naive_metrics):
        m = naive_metrics
        train = pick(m, "local_val_accuracy", held_out=False)
        # Sample-weighted over the training populations' clients: (5 + 27 + 12) / 60.
        assert train["value"] == approx(44 / 60)
        assert train["n"] == 3
        # Ratio-estimator standard error of the weighted mean, by hand (samples 10, 30, 20).
        a, w = np.array([0.5, 0.9, 0.6]), np.array([10.0, 30.0, 20.0])
        se = np.sqrt(3 / 2 * ((w * (a - 44 / 60)) ** 2).sum()) / w.sum()
        assert (train["low"], train["high"]) == approx((44 / 60 - 1.96 * se, 44 / 60 + 1.96 * se))
        held = pick(m, "local_val_accuracy", held_out=True)
        assert held["value"] == approx((2 + 12) / 40)
        assert held["n"] == 2
        assert pick(m, "local_val_accuracy", population="A", held_out=False)["value"] == approx(0.8)
        assert pick(m, "local_val_accuracy", population="B", held_out=False)["value"] == approx(0.6)
        assert pick(m, "local_val_accuracy", population="C", held_out=True)["value"] == approx(0.35)
        # The per-round evaluation of population A is there too.
        assert pick(m, "local_val_accuracy", round_=2, population="A", held_out=False)["value"] == approx(0.8)

    def test_attack_means_per_attack_and_knowledge(self, naive_metrics):
        m = naive_metrics
        r = pick(m, "attacker_acc", round_=1, population="A", held_out=False, attack="ig", knowledge="naive")
        assert r["value"] == approx(1.0) and r["n"] == 2
        r = pick(m, "mse", round_=2, held_out=False, attack="ig", knowledge="naive")
        assert r["value"] == approx(0.2)
        r = pick(m, "psnr", held_out=False, attack="ig", knowledge="naive")
        assert r["value"] == approx(21.0) and r["n"] == 4
        assert pick(m, "ssim", held_out=False, attack="gi", knowledge="naive")["value"] == approx(0.3)
        assert pick(m, "label_accuracy", held_out=False, attack="gi", knowledge="naive")["value"] == approx(1.0)
        held = pick(m, "attacker_acc", held_out=True, attack="gi", knowledge="naive")
        assert held["value"] == approx(0.0) and held["n"] == 1

    def test_worst_attack_leaks_most(self, naive_metrics):
        m = naive_metrics
        for knowledge in ("naive", "adaptive"):
            final = {name: pick(m, name, held_out=False, attack="worst", knowledge=knowledge)["value"]
                     for name in analysis.PRIVACY}
            assert final == approx({"attacker_acc": 0.75, "mse": 0.05, "psnr": 25.0, "ssim": 0.5})
            by_pop = pick(m, "mse", population="A", held_out=False, attack="worst", knowledge=knowledge)
            assert by_pop["value"] == approx(0.05)
            held = {name: pick(m, name, held_out=True, attack="worst", knowledge=knowledge)["value"]
                    for name in analysis.PRIVACY}
            assert held == approx({"attacker_acc": 1.0, "mse": 0.3, "psnr": 15.0, "ssim": 0.2})
        assert pick(m, "attacker_acc", round_=1, held_out=False, attack="worst", knowledge="naive")["value"] \
            == approx(1.0)
        # Round 2: gi (1.0) beats ig (0.5); over all rounds ig (0.75) beats gi (0.5).
        r2 = pick(m, "attacker_acc", round_=2, held_out=False, attack="worst", knowledge="naive")
        assert r2["value"] == approx(1.0)
        assert (r2["low"], r2["high"]) == approx(wilson(2, 2))
        assert pick(m, "mse", round_=1, held_out=False, attack="worst", knowledge="naive")["value"] == approx(0.05)

    def test_worst_carries_the_picked_attacks_interval(self, naive_metrics):
        m = naive_metrics
        w = pick(m, "mse", held_out=False, attack="worst", knowledge="naive")
        gi = pick(m, "mse", held_out=False, attack="gi", knowledge="naive")
        assert (w["value"], w["n"]) == (gi["value"], gi["n"])
        w = pick(m, "psnr", held_out=False, attack="worst", knowledge="naive")
        lo, hi = mean_interval(np.array([25.0] * 4))
        assert (w["low"], w["high"]) == approx((lo, hi))

    def test_wilson_interval_for_attacker_acc(self, naive_metrics):
        m = naive_metrics
        r = pick(m, "attacker_acc", held_out=False, attack="ig", knowledge="naive")
        # Wilson by hand for 3 successes out of 4, z = 1.96.
        z, n, p = 1.96, 4, 0.75
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        assert (r["low"], r["high"]) == approx((centre - half, centre + half))
        assert (r["low"], r["high"]) == approx((0.30064, 0.95441), abs=1e-4)
        assert r["n"] == 4
        w = pick(m, "attacker_acc", held_out=False, attack="worst", knowledge="naive")
        assert (w["low"], w["high"]) == approx((r["low"], r["high"]))
        # A normal interval on the other metrics.
        ps = pick(m, "psnr", held_out=False, attack="ig", knowledge="naive")
        assert (ps["low"], ps["high"]) == approx(mean_interval(np.array([20.0, 20.0, 22.0, 22.0])))

    def test_naive_only_is_mirrored_as_adaptive(self, naive_metrics):
        m = naive_metrics
        attack_rows = m[m["knowledge"].notna()]
        naive = attack_rows[attack_rows["knowledge"] == "naive"].drop(columns="knowledge").reset_index(drop=True)
        adaptive = attack_rows[attack_rows["knowledge"] == "adaptive"].drop(columns="knowledge").reset_index(drop=True)
        assert len(naive) > 0
        pd.testing.assert_frame_equal(naive, adaptive)

    def test_adaptive_rows_are_not_mirrored_when_present(self, tmp_path):
        rows = naive_attacks()
        rows += [attack_row(1, "A", "ig", "adaptive", False, 0.9, 5.0, 0.0),
                 attack_row(2, "A", "ig", "adaptive", True, 0.7, 7.0, 0.0)]
        m = run_metrics(make_run(tmp_path, rows, "defence.kind=latent"))
        r = pick(m, "attacker_acc", held_out=False, attack="ig", knowledge="adaptive")
        assert r["value"] == approx(0.5) and r["n"] == 2
        assert pick(m, "mse", held_out=False, attack="worst", knowledge="adaptive")["value"] == approx(0.8)
        assert not ((m["knowledge"] == "adaptive") & (m["attack"] == "gi")).any()
        assert not ((m["knowledge"] == "adaptive") & (m["held_out"] == True)).any()  # noqa: E712
        # The naive figures are untouched.
        assert pick(m, "attacker_acc", held_out=False, attack="worst", knowledge="naive")["value"] == approx(0.75)

    @pytest.mark.parametrize(("overrides", "mirrored"), [
        (["defence.kind=bido"], True),  # gradient view at batch size 1: the HSIC terms vanish
        # At batch size 4 they enter the gradient: no adaptive attacker (ig runs at any batch size).
        (["defence.kind=bido", "attacks.batch_size=4", "attacks.methods=[{kind: ig}]"], False),
        (["defence.kind=dpsgd"], False),
    ])
    def test_naive_rows_are_mirrored_only_where_the_naive_attacker_is_exact(self, tmp_path, overrides, mirrored):
        m = run_metrics(make_run(tmp_path, naive_attacks(), *overrides))
        assert (m["knowledge"] == "adaptive").any() == mirrored
        assert pick(m, "attacker_acc", held_out=False, attack="worst", knowledge="naive")["value"] == approx(0.75)

    def test_run_without_attacks(self, tmp_path):
        m = run_metrics(make_run(tmp_path, []))
        assert m["attack"].isna().all()
        assert pick(m, "test_accuracy")["value"] == approx(0.75)


def test_the_verdict_names_the_attack_that_leaks_most_over_attacks_and_knowledge(tmp_path):
    adaptive = [attack_row(1, "A", "ig", "adaptive", True, 0.01, 30.0, 0.9),
                attack_row(2, "A", "ig", "adaptive", True, 0.01, 30.0, 0.9)]
    metrics = run_metrics(make_run(tmp_path, naive_attacks() + adaptive, "defence.kind=latent"))
    # Naive: acc ig .75, mse gi .05, psnr gi 25, ssim ig .5; the adaptive ig beats them all on A (held-out C ignored).
    assert worst_attack(metrics, "attacker_acc") == (1.0, "ig", "adaptive")
    assert worst_attack(metrics, "mse") == (pytest.approx(0.01), "ig", "adaptive")
    assert worst_attack(metrics, "psnr") == (30.0, "ig", "adaptive")
    naive_only = run_metrics(make_run(tmp_path / "n", naive_attacks()))
    assert worst_attack(naive_only, "psnr") == (25.0, "gi", "naive")
    assert worst_attack(naive_only, "attacker_acc") == (0.75, "ig", "naive")
    assert worst_attack(run_metrics(make_run(tmp_path / "none", [])), "psnr") is None


def test_utility_by_round_weights_the_training_populations_by_their_validation_samples():
    def row(round_, metric, population, held_out, value, n):
        return {"cell": "a", "round": round_, "metric": metric, "population": population, "held_out": held_out,
                "attack": None, "knowledge": None, "value": value, "n": n}
    rows = [
        row(1.0, "local_val_accuracy", "p", False, 0.2, 30), row(1.0, "local_val_accuracy", "q", False, 0.6, 10),
        row(12.0, "local_val_accuracy", "p", False, 0.5, 30), row(12.0, "local_val_accuracy", "q", False, 0.9, 10),
        row(12.0, "local_val_accuracy", "h", True, 0.1, 50),  # held-out clients: not the utility
        row(None, "local_val_accuracy", None, False, 0.6, 20),  # the final row
        row(12.0, "test_accuracy", None, None, 0.45, 800), row(12.0, "test_accuracy", "p", False, 0.4, 800),
    ]
    got = analysis.utility_by_round(pd.DataFrame(rows), "client_val")
    assert got["round"].tolist() == [1, 12]
    assert got["value"].tolist() == pytest.approx([(0.2 * 30 + 0.6 * 10) / 40, (0.5 * 30 + 0.9 * 10) / 40])
    assert analysis.utility_by_round(pd.DataFrame(rows), "test")["value"].tolist() == [0.45]
