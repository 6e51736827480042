"""A run directory opened from Python: hand-written runs (analysis_helpers), every figure worked out by hand."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from analysis_helpers import SMOKE, attack_row, make_run, naive_attacks
from pytest import approx

from simfl.core.errors import UserError
from simfl.engine.run_tables import SCHEMAS
from simfl.results.run import SUMMARY_COLUMNS, Run

ADAPTIVE = [attack_row(1, "A", "ig", "adaptive", False, 0.9, 5.0, 0.0),
            attack_row(2, "A", "ig", "adaptive", True, 0.7, 7.0, 0.0)]
CLIENT_VAL = (10 * 0.5 + 30 * 0.9 + 20 * 0.6) / 60  # the final round's training clients, by their samples


@pytest.fixture(scope="module")
def arms(tmp_path_factory):
    """A scenario's arms as ``python -m simfl.run`` leaves them: none (naive attacks), latent (and an adaptive
    attacker), bido (no attacks); dpsgd never started."""
    parent = tmp_path_factory.mktemp("arms")
    shutil.copy(SMOKE, parent / "scenario.yaml")
    make_run(parent, naive_attacks(), name="none")
    make_run(parent, naive_attacks() + ADAPTIVE, "defence.kind=latent", name="latent")
    make_run(parent, [], "defence.kind=bido", name="bido")
    return parent


def test_tables_are_the_run_directorys_parquet(arms):
    run = Run(arms / "latent")
    for name in ("rounds", "evals", "client_evals", "attacks"):
        pd.testing.assert_frame_equal(getattr(run, name), pd.read_parquet(arms / "latent" / name))
    assert len(run.attacks) == len(naive_attacks()) + 2
    assert run.table("evals") is run.evals  # read once


def test_a_table_with_no_rows_is_empty_with_its_columns(arms):
    run = Run(arms / "bido")  # no attacks, and these hand-written runs log no clients
    for name in ("attacks", "clients"):
        frame = getattr(run, name)
        assert frame.empty and list(frame.columns) == SCHEMAS[name].names


def test_the_scenario_is_the_validated_scenario_yaml(arms):
    assert Run(arms / "latent").scenario.defence.kind == "latent"
    assert Run(arms).scenario.arms is not None


def test_summary_of_a_run_with_attacks(arms):
    s = Run(arms / "latent").summary()
    assert list(s.columns) == SUMMARY_COLUMNS
    assert list(zip(s["attack"], s["knowledge"])) == [("gi", "naive"), ("ig", "adaptive"), ("ig", "naive")]
    assert (s["rounds"] == 2).all() and (s["defence"] == "latent").all()
    assert s["test_accuracy"].tolist() == approx([0.75] * 3)
    assert s["client_val_accuracy"].tolist() == approx([CLIENT_VAL] * 3)
    assert s["dp_epsilon_max"].tolist() == approx([2.5] * 3)
    assert s["images"].tolist() == [4, 2, 4]
    # gi: acc 2/4, MSE .05, PSNR 25, SSIM .3; ig adaptive: 1/2, .8, 6, 0; ig naive: 3/4, .15, 21, .5.
    assert s[["attacker_acc", "mse", "psnr", "ssim"]].to_numpy().tolist() == [
        approx([0.5, 0.05, 25.0, 0.3]), approx([0.5, 0.8, 6.0, 0.0]), approx([0.75, 0.15, 21.0, 0.5])]


def test_summary_names_the_naive_attacker_that_is_also_the_adaptive_one(arms):
    s = Run(arms / "none").summary()
    assert list(zip(s["attack"], s["knowledge"])) == [("gi", "naive = adaptive"), ("ig", "naive = adaptive")]


def test_summary_without_attacks_is_one_row(arms):
    s = Run(arms / "bido").summary()
    assert len(s) == 1 and s.loc[0, "defence"] == "bido" and s.loc[0, "test_accuracy"] == approx(0.75)
    assert s[["attack", "knowledge", "images", "attacker_acc"]].isna().all(axis=None)


def test_arms_are_runs_and_summarised_together(arms):
    run = Run(arms)
    assert sorted(run.arms) == ["bido", "latent", "none"]  # dpsgd never started
    assert run.arms["latent"].path == arms / "latent"
    s = run.summary()
    assert list(s.columns) == ["arm", *SUMMARY_COLUMNS]
    assert s["arm"].tolist() == ["none", "none", "bido", "latent", "latent", "latent"]  # in the scenario's order
    with pytest.raises(UserError, match=r"run\.arms\['none'\]\.evals"):
        _ = run.evals


def test_a_directory_that_is_not_a_run_is_one_line(tmp_path):
    with pytest.raises(UserError) as err:
        Run(tmp_path)
    assert str(err.value) == f"{tmp_path}: not a run directory (no scenario.yaml)"


def test_a_run_with_no_round_written_yet_has_no_summary(arms, tmp_path):
    shutil.copy(arms / "none" / "scenario.yaml", tmp_path / "scenario.yaml")
    with pytest.raises(UserError, match="no round written yet"):
        Run(tmp_path).summary()
