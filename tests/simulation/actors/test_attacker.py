"""Attacks inside the engine: concurrent with training, streamed out, never lost (drop, resume)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import ray
import torch
from engine_helpers import SMOKE_FAST, final_weights, kill_at_checkpoint, run_smoke, table
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from simfl.core.config import AttackPoolConfig
from simfl.core.training import to_input
from simfl.core.weights import FlatWeights
from simfl.data.client_data import client_data
from simfl.data.synthetic import make_dataset
from simfl.engine.round import sample_held_out_victims
from simfl.engine.scenario import parse_scenario
from simfl.engine.victim import Victim
from simfl.privacy.attacks.observation import observe_gradient
from simfl.privacy.defences import defended_model
from simfl.privacy.evaluator import Evaluator, build_evaluator
from simfl.simulation.actors import attacker
from simfl.simulation.actors.attacker import AttackerKnowledge, AttackPool, client_device_view, peer_pool
from simfl.simulation.runner import main, prepare

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """One evaluator cache for every attack run of the session (it trains once, then loads)."""
    return tmp_path_factory.mktemp("data")


def attacks(data_root: Path, *extra: str) -> list[str]:
    """Overrides for an attacked smoke run; a small validation split keeps the evaluator quick."""
    return [
        "--set", f"data.root={data_root}",
        "--set", "data.synthetic.val_size=200",
        "--set", "resources.client_actors=2",
        "--set", "attacks={methods: [{kind: ig, iterations: 600}, {kind: idlg, iterations: 5}], victims: 2, "
                 "rounds: [1, 2]}",
        *extra,
    ]


@pytest.fixture(scope="module")
def attacked(ray_local, data_root, tmp_path_factory):
    return run_smoke(tmp_path_factory.mktemp("runs"), "attacked", *attacks(data_root))


def test_every_victim_is_attacked_by_every_method_and_scored(attacked):
    rows = pd.read_parquet(attacked / "attacks")
    rounds = pd.read_parquet(attacked / "rounds").sort_values("round")
    assert rounds["attack_victims"].tolist() == [2, 2, 0]
    assert rounds["attack_victims_dropped"].sum() == 0
    assert len(rows) == 2 * 2 * 2  # rounds x victims x methods, batch size 1
    assert rows.groupby(["round", "attack"]).size().eq(2).all()
    clients = pd.read_parquet(attacked / "clients")
    trained = set(zip(clients["round"], clients["client_id"], strict=True))
    assert set(zip(rows["round"], rows["client_id"], strict=True)) <= trained  # victims come from the cohort
    assert (rows["population"] != "new_scanner").all()
    assert set(rows["view"]) == {"gradient"} and set(rows["labels"]) == {"recovered"}
    metrics = ["mse", "psnr", "ssim", "random_mse", "random_psnr", "random_ssim", "mean_mse", "mean_psnr", "mean_ssim",
               "class_mean_mse", "class_mean_psnr", "class_mean_ssim"]
    assert np.isfinite(rows[metrics].to_numpy()).all()
    assert rows["evaluator_test_accuracy"].between(0.3, 1.0).all()  # 8 classes: chance is 0.125
    assert set(rows["evaluator_arch"]) == {Evaluator.arch}
    # Instance identification: each victim's one image among its label's validation peers (val_size 200).
    assert rows["nn_pool_size"].between(2, 1 + attacker.NN_PEERS).all()
    for prefix in ("", "random_", "mean_", "class_mean_"):
        ranks = rows[prefix + "nn_rank"]
        assert ranks.between(1, rows["nn_pool_size"]).all() and (rows[prefix + "nn_match"] == (ranks == 1)).all()
    # An image-free guess is one image, nearest one peer of ~25: it rarely singles out the victim.
    assert rows["class_mean_nn_match"].sum() <= 2 and rows["mean_nn_match"].sum() <= 2
    assert (rows.loc[rows.attack == "ig", "iterations"] == 600).all()
    assert (rows["finished_at"] >= rows["submitted_at"]).all()
    # B = 1: iDLG's analytic label is exact on an untrained-to-early model.
    assert rows["label_accuracy"].eq(1.0).all()


def test_attacks_run_while_later_rounds_train(attacked):
    rows = pd.read_parquet(attacked / "attacks")
    rounds = pd.read_parquet(attacked / "rounds").set_index("round")
    # Round 1's victims went to the attacker when round 1 ended; their 600-iteration
    # attack was still running when round 2 finished training.
    round1 = rows[rows["round"] == 1]
    assert (round1["submitted_at"] <= rounds.loc[1, "finished_at"]).all()
    assert round1["finished_at"].max() > rounds.loc[2, "finished_at"]


def test_reconstructions_reach_tensorboard_and_png(attacked):
    pngs = sorted(p.name for p in (attacked / "reconstructions").glob("*.png"))
    assert len(pngs) == 4 and {p.split("_")[1] for p in pngs} == {"ig", "idlg"}
    events = EventAccumulator(str(attacked / "tensorboard" / "attacks"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("attack/ig/originals_above_reconstructions")] == [1, 2]
    assert_means_match_table(attacked)


def assert_means_match_table(run_dir: Path) -> None:
    """TensorBoard's per-round attack means: one point per attacked round, equal to the table's means."""
    events = EventAccumulator(str(run_dir / "tensorboard" / "attacks"))
    events.Reload()
    rows = pd.read_parquet(run_dir / "attacks")
    for name, column in (("psnr", "psnr"), ("psnr_mean_baseline", "mean_psnr"),
                         ("attacker_accuracy", "attacker_correct")):
        logged = events.Scalars(f"attack/ig/{name}")
        expected = rows[rows.attack == "ig"].groupby("round")[column].mean()
        assert [e.step for e in logged] == expected.index.tolist(), name
        assert np.allclose([e.value for e in logged], expected.tolist()), name


def test_held_out_victims_are_sampled_from_seed_and_round_alone():
    sc = parse_scenario({"populations": [{"name": "a", "clients": 4}, {"name": "b", "clients": 3, "held_out": True}],
                         "attacks": {"held_out_victims": 2, "every": 2}})
    held = np.array([4, 5, 6])
    picked = sample_held_out_victims(sc, held, 2)
    assert len(picked) == 2 and set(picked) <= {4, 5, 6} and list(picked) == sorted(picked)
    assert np.array_equal(picked, sample_held_out_victims(sc, held, 2))
    assert len(sample_held_out_victims(sc, held, 3)) == 0  # not an attacked round
    assert np.array_equal(sample_held_out_victims(sc, held[:1], 2), [4])  # fewer held-out clients than asked
    rounds = {tuple(sample_held_out_victims(sc, held, r)) for r in range(2, 40, 2)}
    assert len(rounds) > 1  # drawn afresh each round


def test_held_out_clients_are_probed_without_changing_training(ray_local, data_root, tmp_path):
    # iDLG, few iterations: what is tested is who is attacked, not how well.
    quick = ("--set", "attacks.methods=[{kind: idlg, iterations: 5}]")
    probed = run_smoke(tmp_path, "probed", *attacks(data_root, *quick, "--set", "attacks.held_out_victims=2"))
    plain = run_smoke(tmp_path, "plain", *attacks(data_root, *quick))
    rows = pd.read_parquet(probed / "attacks")
    held = rows[rows["population"] == "new_scanner"]
    # Two held-out clients per attacked round, each attacked by every attack and knowledge.
    assert sorted(held["round"].unique()) == [1, 2]
    assert held.groupby(["round", "attack", "knowledge"]).size().eq(2).all()
    assert held.groupby("round")["client_id"].nunique().eq(2).all()
    assert np.isfinite(held[["mse", "psnr", "ssim"]].to_numpy()).all()
    assert pd.read_parquet(probed / "rounds").sort_values("round")["attack_victims"].tolist() == [4, 4, 0]
    # The cohort's victims are attacked as before; probes are no clients of the round.
    others = rows[rows["population"] != "new_scanner"]
    plain_rows = pd.read_parquet(plain / "attacks")
    assert set(zip(others["round"], others["client_id"])) == set(zip(plain_rows["round"], plain_rows["client_id"]))
    clients = pd.read_parquet(probed / "clients")
    assert "new_scanner" not in set(clients["population"])
    assert not set(held["client_id"]) & set(clients["client_id"])
    # Probes change nothing in training: same model, same client rows (participation included), same rounds.
    assert torch.equal(final_weights(probed), final_weights(plain))
    for name in ("clients", "evals", "client_evals"):
        pd.testing.assert_frame_equal(table(probed, name), table(plain, name), check_exact=True)
    pd.testing.assert_frame_equal(table(probed, "rounds").drop(columns="attack_victims"),
                                  table(plain, "rounds").drop(columns="attack_victims"), check_exact=True)


class FakeAttacker:
    """Answers a job at once with an object already in the store, or after ``delay`` s."""

    def __init__(self, delay=0.0):
        self.attack = SimpleNamespace(remote=self.remote)
        self.delay = delay

    def remote(self, victims, context, knowledge):
        if not self.delay:
            return ray.put({"rows": [], "grids": {}})
        return ray.remote(lambda d: time.sleep(d) or {"rows": [], "grids": {}}).options(num_cpus=0).remote(self.delay)


def test_finished_jobs_free_the_pool_before_it_is_judged_full(ray_local):
    done = []
    pool = AttackPool(AttackPoolConfig(max_pending=1, when_full="drop"), [FakeAttacker()], ray.put(None),
                      lambda job, out: done.append(job["round"]))
    assert pool.submit({"round": 1, "victims": []})
    # Round 1's job has finished but nobody collected it yet: it must not make round 2's drop.
    assert pool.submit({"round": 2, "victims": []})
    assert done == [1]
    pool.drain()
    assert done == [1, 2] and not pool.pending


def test_a_full_pool_waits_or_drops_as_configured(ray_local):
    for policy, accepted in (("drop", False), ("wait", True)):
        done = []
        pool = AttackPool(AttackPoolConfig(max_pending=1, when_full=policy), [FakeAttacker(delay=1.0)],
                          ray.put(None), lambda job, out, done=done: done.append(job["round"]))
        assert pool.submit({"round": 1, "victims": []})
        assert pool.submit({"round": 2, "victims": []}) is accepted
        # wait: round 2 went in only once round 1 was collected
        assert done == ([1] if policy == "wait" else [])
        pool.drain()
        assert done == ([1, 2] if policy == "wait" else [1])


def test_a_full_pool_drops_and_counts_instead_of_blocking(ray_local, data_root, tmp_path):
    run = run_smoke(tmp_path, "drop", *attacks(
        data_root,
        "--set", "attacks.methods=[{kind: ig, iterations: 800}]",
        "--set", "attacks.victims=3",
        "--set", "attacks.victims_per_job=1",
        "--set", "attacks.pool.max_pending=1",
        "--set", "attacks.pool.when_full=drop",
    ))
    rounds = pd.read_parquet(run / "rounds")
    rows = pd.read_parquet(run / "attacks")
    dropped = int(rounds["attack_victims_dropped"].sum())
    assert dropped >= 1
    # Nothing lost silently: every victim was either attacked (its row is there) or counted.
    assert rows[["round", "client_id"]].drop_duplicates().shape[0] + dropped == rounds["attack_victims"].sum() == 6


@pytest.mark.timeout(600)
def test_attacks_pending_at_a_kill_are_rerun_after_resume(ray_local, data_root, tmp_path):
    out = tmp_path / "killed"
    run_dir = out / "k"
    cmd = [sys.executable, "-m", "simfl.run", "scenarios/smoke.yaml", "--set", f"output.dir={out}",
           "--set", "output.name=k", *SMOKE_FAST, *attacks(data_root, "--set", "training.rounds=4"),
           "--set", "attacks.methods=[{kind: ig, iterations: 800}]", "--no-dashboard", "--num-cpus", "3"]
    kill_at_checkpoint(cmd, ROOT, run_dir, 2)
    assert not (run_dir / "attacks").exists(), "the attacks finished before the kill; make them slower"

    assert main(["--resume", str(run_dir), "--quiet"]) == 0  # in this process, on the session's Ray instance
    rows = pd.read_parquet(run_dir / "attacks")
    # Both attacked rounds' victims, each exactly once.
    assert sorted(rows.groupby("round").size().items()) == [(1, 2), (2, 2)]
    assert not rows.duplicated(["round", "client_id", "image"]).any()
    assert_means_match_table(run_dir)


def shifted_scenario() -> dict:
    return {"seed": 5, "data": {"size": 16, "synthetic": {"val_size": 64, "test_size": 16}},
            "populations": [{"name": "plain", "clients": 2, "quantity": {"mean": 12}},
                            {"name": "scanner", "clients": 3, "quantity": {"mean": 12},
                             "shift": {"color": [1.2, 0.9, 0.8], "color_jitter": 0.2, "brightness": 0.05,
                                       "jitter": 0.1, "contrast": 1.1, "blur": 0.5}}]}


@pytest.mark.parametrize("client", [0, 1, 2, 4])
def test_peers_are_seen_through_the_victims_own_device(client):
    sc = parse_scenario(shifted_scenario())
    prep = prepare(sc)
    shifts = [p.shift for p in sc.populations]
    own = client_data(prep.dataset, prep.partition, shifts, sc.seed, client)
    raw = prep.dataset.train_x[prep.partition.train_indices(client)]
    # Noise-free, the same device renders the client's raw images exactly as the client holds them.
    assert np.array_equal(client_device_view(np.array(raw), sc, client, prep.dataset.channels), own.x.numpy())
    noisy = parse_scenario({**shifted_scenario(), "populations": [
        {**p, "shift": {**p.get("shift", {}), "noise": 0.05}} for p in shifted_scenario()["populations"]]})
    seen = client_device_view(np.array(raw), noisy, client, prep.dataset.channels).astype(int)
    if client >= 2:  # the shifted population's device; its noise is a fresh draw of the same strength
        assert 0 < np.abs(seen - own.x.numpy()).mean() < 0.05 * 255
    with pytest.raises(ValueError, match="not one of the scenario's 5 clients"):
        client_device_view(np.array(raw), sc, 5, prep.dataset.channels)


def test_the_peer_pool_is_the_first_validation_images_of_the_victims_labels(monkeypatch):
    monkeypatch.setattr(attacker, "NN_PEERS", 3)
    dataset = make_dataset(train_size=10, val_size=40, test_size=8, image_size=8, num_classes=4, seed=1)
    knowledge = AttackerKnowledge.from_dataset(dataset, Evaluator(torch.zeros(1), 0.5, "k"), seed=0)
    val_y = dataset.val_y.tolist()
    expected = sorted(i for k in range(4) for i in [j for j, y in enumerate(val_y) if y == k][:3])
    assert knowledge.peers.labels.tolist() == [val_y[i] for i in expected]
    assert torch.equal(knowledge.peers.images, torch.from_numpy(dataset.val_x[expected]))
    sc = parse_scenario({"populations": [{"name": "a", "clients": 2}]})
    victim = Victim(1, 1, None, torch.zeros(2, 8, 8, 3, dtype=torch.uint8), torch.tensor([2, 0]))  # type: ignore[arg-type]
    pool = peer_pool(knowledge.peers, sc, victim, channels=3)
    keep = [i for i in expected if val_y[i] in (0, 2)]
    assert pool.shape == (6, 3, 8, 8)  # no shift: the images themselves, as model inputs
    assert torch.equal(pool, torch.from_numpy(dataset.val_x[keep]).permute(0, 3, 1, 2).float() / 255)


def test_an_attacker_restarted_by_ray_takes_its_knowledge_in_again(ray_local):
    """Nothing the actor needs lives in its constructor arguments: after a crash its next job still runs."""
    sc = parse_scenario({"data": {"size": 8}, "model": {"width": 4},
                         "populations": [{"name": "a", "clients": 2}],
                         "attacks": {"methods": [{"kind": "idlg", "iterations": 2}], "victims": 1}})
    dataset = make_dataset(train_size=10, val_size=16, test_size=4, image_size=8, num_classes=4, seed=1)
    shape = (3, 8, 4)
    knowledge = AttackerKnowledge.from_dataset(
        dataset, Evaluator(FlatWeights(build_evaluator(*shape)).snapshot(), 0.5, "k"), seed=0)
    model, _ = defended_model(sc.model, sc.defence, sc.seed, shape)
    flat = FlatWeights(model)
    private = torch.from_numpy(dataset.train_x[:1])
    label = torch.from_numpy(dataset.train_y[:1]).long()
    victim = Victim(1, 0, observe_gradient(model, flat, flat.snapshot(), to_input(private), label), private, label)
    done: list[dict] = []
    pool = AttackPool.start(sc.model_dump(mode="json"), knowledge, "restart-test", lambda job, out: done.append(out))
    try:
        pool.submit({"round": 1, "victims": [victim]})
        pool.drain()
        pid = ray.get(pool.actors[0].__ray_call__.remote(lambda self: os.getpid()))
        ray.kill(pool.actors[0], no_restart=False)  # Ray restarts it from its constructor arguments alone
        pool.submit({"round": 2, "victims": [victim]})
        pool.drain()
        assert ray.get(pool.actors[0].__ray_call__.remote(lambda self: os.getpid())) != pid
    finally:
        pool.stop()
    first, second = (pd.DataFrame(out["rows"]) for out in done)
    assert len(first) == len(second) == 1
    pd.testing.assert_series_equal(first["mse"], second["mse"])  # the same attack on the same victim
