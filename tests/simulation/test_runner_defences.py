"""Defences in the engine: all four arms of defences_smoke.yaml, what each logs, determinism, arm resume."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from engine_helpers import assert_same_results, kill_at_checkpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from simfl.core.weights import FlatWeights
from simfl.engine.scenario import load_scenario
from simfl.privacy.defences import defended_model
from simfl.privacy.defences.dpsgd import epsilon, sample_rate
from simfl.simulation.runner import main

ROOT = Path(__file__).resolve().parents[2]
ALL_ATTACKS = {"ig", "idlg", "feature_match", "feature_decoder", "latent_decoder", "server_decoder", "decoded_ig",
               "lti"}
SMALL = [
    "--set", "training.rounds=2",
    "--set", "training.local_epochs=1",
    "--set", "evaluation.every=1",
    "--set", "attacks.rounds=[1, 2]",
    "--set", "attacks.victims=2",
    # Every kind of attack, at tiny budgets: what is tested is that each runs against each arm, not how well.
    "--set", "attacks.methods=[{kind: ig, iterations: 20}, {kind: idlg, iterations: 5}, "
    "{kind: feature_match, iterations: 5}, {kind: feature_decoder, steps: 10}, {kind: latent_decoder, steps: 10}, "
    "server_decoder, {kind: decoded_ig, iterations: 5, decoder_steps: 10}, {kind: lti, samples: 10, steps: 10}]",
    "--quiet",
]
# The arms of defences_smoke.yaml and the defence each runs.
ARMS = {"none": "none", "dpsgd": "dpsgd", "bido": "bido", "latent": "latent", "latent_local": "latent"}


@pytest.fixture(scope="module")
def arms_run(ray_local, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("arms")
    code = main(["scenarios/defences_smoke.yaml", "--set", f"output.dir={out}", "--set", "output.name=cmp", *SMALL])
    assert code == 0
    return out / "cmp"


@pytest.mark.timeout(900)
def test_every_arm_runs_to_the_end_with_the_same_clients_and_a_summary(arms_run):
    assert sorted(p.name for p in arms_run.iterdir() if p.is_dir()) == sorted(ARMS)
    cohorts = {}
    for arm, kind in ARMS.items():
        assert (arms_run / arm / "final_weights.pt").is_file()
        assert load_scenario(arms_run / arm / "scenario.yaml").defence.kind == kind
        clients = pd.read_parquet(arms_run / arm / "clients")
        cohorts[arm] = sorted(zip(clients["round"], clients["client_id"], strict=True))
        attacked = pd.read_parquet(arms_run / arm / "attacks")[["round", "client_id"]].drop_duplicates()
        cohorts[arm + "/attacked"] = sorted(map(tuple, attacked.values.tolist()))
    assert cohorts["none"] == cohorts["dpsgd"] == cohorts["bido"] == cohorts["latent"] == cohorts["latent_local"]
    assert cohorts["none/attacked"] == cohorts["latent/attacked"] == cohorts["dpsgd/attacked"] == cohorts[
        "latent_local/attacked"]
    summary = (arms_run / "summary.md").read_text()
    for arm, kind in ARMS.items():
        assert f"| {arm} | {kind} |" in summary


@pytest.mark.timeout(900)
def test_naive_and_adaptive_rows_are_marked(arms_run):
    for arm, expected in (("none", {"naive"}), ("bido", {"naive"}), ("dpsgd", {"naive", "adaptive"}),
                          ("latent", {"naive", "adaptive"}), ("latent_local", {"naive", "adaptive"})):
        attacks = pd.read_parquet(arms_run / arm / "attacks")
        assert set(attacks["knowledge"]) == expected, arm
        assert set(attacks["defence"]) == {ARMS[arm]}
        # Every attack ran with every knowledge level on the same victims; the server's decoder exists only
        # under the latent defence, and only the adaptive attacker is told it.
        sizes = attacks.groupby(["attack", "knowledge"]).size()
        pairs = {(a, k) for a in ALL_ATTACKS for k in expected} - {("server_decoder", "naive")}
        if ARMS[arm] != "latent":
            pairs -= {("server_decoder", "adaptive")}
        assert sizes.nunique() == 1 and set(sizes.index) == pairs, arm
        # Optimisation attacks log their objective at the true images beside the found ones; learned ones none.
        optimised = attacks["attack"].isin(["ig", "idlg", "feature_match", "decoded_ig"])
        assert attacks.loc[optimised, "objective_at_truth"].notna().all()
        assert attacks.loc[~optimised, "objective_at_truth"].isna().all()
    events = EventAccumulator(str(arms_run / "latent" / "tensorboard" / "attacks"))
    events.Reload()
    assert {"attack/ig/psnr", "attack/ig_adaptive/psnr"} <= set(events.Tags()["scalars"])


@pytest.mark.timeout(900)
def test_dp_epsilon_per_client_is_the_accountants_for_its_steps(arms_run):
    sc = load_scenario(arms_run / "dpsgd" / "scenario.yaml")
    clients = pd.read_parquet(arms_run / "dpsgd" / "clients")
    assert clients["dp_epsilon"].notna().all()
    for row in clients.itertuples():
        q = sample_rate(row.samples, sc.training.batch_size)
        assert row.dp_epsilon == pytest.approx(epsilon(sc.defence.noise_multiplier, q, int(row.dp_steps),
                                                       sc.defence.delta))
    # A client's steps add up over the rounds it took part in.
    again = clients[clients["participation"] == 2]
    assert (again["dp_steps"] == 2 * again["steps"]).all()
    rounds = pd.read_parquet(arms_run / "dpsgd" / "rounds")
    assert (rounds["dp_epsilon_max"] == clients.groupby("round")["dp_epsilon"].max().values).all()


@pytest.mark.timeout(900)
def test_each_defence_logs_its_state_per_round(arms_run):
    latent = pd.read_parquet(arms_run / "latent" / "rounds")
    knobs = ["lam", "sigma_mean", "sigma_min", "sigma_max", "decoder_mse_server", "decoder_mse"]
    assert latent[knobs].notna().all().all()
    bido = pd.read_parquet(arms_run / "bido" / "clients")
    assert bido[["hsic_xz", "hsic_yz"]].notna().all().all() and (bido["hsic_xz"] > 0).all()
    none = pd.read_parquet(arms_run / "none" / "rounds")
    assert none[["lam", "dp_epsilon_max", "hsic_xz"]].isna().all().all()
    dp = pd.read_parquet(arms_run / "dpsgd" / "rounds")
    assert (dp["defence"] == "dpsgd").all()
    assert json.loads(dp["defence_knobs"].iloc[-1]) == {"noise_multiplier": 0.5, "max_grad_norm": 1.0,
                                                         "delta": 1e-5, "accountant": "rdp"}
    events = EventAccumulator(str(arms_run / "latent" / "tensorboard"))
    events.Reload()
    assert {"defence/lam", "defence/sigma_mean", "defence/decoder_mse_server", "defence/knob/sigma_max"} <= set(
        events.Tags()["scalars"])


@pytest.mark.timeout(900)
def test_the_decoder_never_travels_in_what_clients_share(arms_run):
    """The shared model (final weights, every client update) has exactly the model's entries: ρ yes, D no."""
    sc = load_scenario(arms_run / "latent" / "scenario.yaml")
    model, defence = defended_model(sc.model, sc.defence, sc.seed, (3, 28, 8))
    flat = FlatWeights(model)
    weights = torch.load(arms_run / "latent" / "final_weights.pt", weights_only=True)["weights"]
    assert len(weights) == len(flat) == sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for b in model.buffers() if b.is_floating_point())
    assert "latent.rho" in {name for name, _, _ in flat.layout}
    # The decoder lives in the coordinator's checkpoint, apart from the shared weights.
    checkpoint = sorted((arms_run / "latent" / "checkpoints").glob("round_*.pt"))[-1]
    state = torch.load(checkpoint, weights_only=True)
    decoder = state["defence"]["decoder"]
    assert decoder.numel() > 0 and decoder.numel() != len(weights)


@pytest.mark.timeout(900)
def test_resume_skips_finished_arms_and_starts_missing_ones_to_the_same_results(arms_run, tmp_path):
    copy = tmp_path / "cmp"
    shutil.copytree(arms_run, copy)
    shutil.rmtree(copy / "latent")  # as if killed before its first checkpoint
    (copy / "summary.md").unlink()
    before = (copy / "none" / "final_weights.pt").stat().st_mtime_ns
    assert main(["--resume", str(copy), "--quiet"]) == 0
    assert (copy / "none" / "final_weights.pt").stat().st_mtime_ns == before
    assert_same_results(arms_run / "latent", copy / "latent")
    assert (copy / "summary.md").is_file()


@pytest.mark.timeout(900)
@pytest.mark.parametrize("defence", ["latent", "dpsgd", "bido"])
def test_defended_runs_do_not_depend_on_the_number_of_actors(ray_local, tmp_path, defence):
    runs = []
    for actors in (1, 2):
        name = f"a{actors}"
        code = main(["scenarios/defences_smoke.yaml", "--set", "arms=null", "--set", f"defence.kind={defence}",
                     "--set", "attacks=null", "--set", f"resources.client_actors={actors}",
                     "--set", f"output.dir={tmp_path}", "--set", f"output.name={name}", *SMALL[:6], "--quiet"])
        assert code == 0
        runs.append(tmp_path / name)
    assert_same_results(*runs)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("defence", ["latent", "dpsgd"])
def test_a_killed_defended_run_resumes_to_the_same_results(ray_local, tmp_path, defence):
    """The defence's server state (decoder, its optimiser, λ), the clients' DP steps and the pending
    attack jobs with their round's broadcast all come back from the checkpoint."""
    args = ["--set", "arms=null", "--set", f"defence.kind={defence}", *SMALL[:-1], "--set", "training.rounds=3",
            "--set", "checkpoint.every=1", "--set", "attacks.rounds=[1, 3]"]
    assert main(["scenarios/defences_smoke.yaml", "--set", f"output.dir={tmp_path}", "--set", "output.name=ref",
                 *args, "--quiet"]) == 0
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "simfl.run", "scenarios/defences_smoke.yaml", "--set", f"output.dir={tmp_path}",
           "--set", "output.name=killed", *args, "--quiet", "--no-dashboard", "--num-cpus", "2"]
    kill_at_checkpoint(cmd, ROOT, run_dir, 2)
    assert not (run_dir / "final_weights.pt").exists()
    assert main(["--resume", str(run_dir), "--quiet"]) == 0
    assert_same_results(tmp_path / "ref", run_dir)
    volatile = ["attack_s", "submitted_at", "finished_at", "attacker", "victims_in_job"]
    keys = ["round", "client_id", "attack", "knowledge", "image"]
    ref, got = (pd.read_parquet(d / "attacks").drop(columns=volatile).sort_values(keys).reset_index(drop=True)
                for d in (tmp_path / "ref", run_dir))
    pd.testing.assert_frame_equal(ref, got)
