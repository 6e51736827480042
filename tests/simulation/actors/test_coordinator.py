"""The engine end to end on a local Ray instance: determinism, fault tolerance, outputs."""

from __future__ import annotations

import threading
import time

import pandas as pd
import pytest
import ray
from engine_helpers import assert_same_results, final_weights, run_smoke, table

from simfl.core.resources import assign_clients


@pytest.fixture(scope="module")
def two_actor_run(ray_local, tmp_path_factory):
    return run_smoke(tmp_path_factory.mktemp("runs"), "two", "--set", "resources.client_actors=2")


def test_same_seed_same_results_with_2_and_4_actors(two_actor_run, tmp_path):
    four = run_smoke(tmp_path, "four", "--set", "resources.client_actors=4")
    assert pd.read_parquet(four / "clients")["actor"].nunique() == 4
    assert pd.read_parquet(two_actor_run / "clients")["actor"].nunique() == 2
    assert_same_results(two_actor_run, four)


def test_different_seed_gives_different_results(two_actor_run, tmp_path):
    other = run_smoke(tmp_path, "seed1", "--set", "resources.client_actors=2", "--set", "seed=1")
    assert not final_weights(other).equal(final_weights(two_actor_run))


def test_run_outputs_are_complete(two_actor_run):
    rounds = table(two_actor_run, "rounds")
    clients = pd.read_parquet(two_actor_run / "clients")
    evals = table(two_actor_run, "evals")
    assert rounds["round"].tolist() == [1, 2, 3]
    assert (rounds["clients"] == 8).all()
    assert len(clients) == 24 and clients.groupby("round").size().eq(8).all()
    # Held-out clients never train but are evaluated.
    assert "new_scanner" not in set(clients["population"])
    assert {"global", "central_lab", "rural_clinic", "new_scanner"} <= set(evals["population"])
    assert set(evals["scope"]) == {"test", "local_val"}
    # participation counts the rounds each client has trained, this one included.
    by_client = clients.sort_values(["client_id", "round"])
    assert (by_client.groupby("client_id").cumcount().add(1).values == by_client["participation"].values).all()
    partition = pd.read_parquet(two_actor_run / "partition.parquet")
    assert len(partition) == 24
    # Rounds are balanced by lending clients to the other actor: some train away from home,
    # and (participation above) their state still follows them.
    home = assign_clients((partition["n_train"] + partition["n_val"]).to_numpy(), 2)
    assert (clients["actor"].to_numpy() != home[clients["client_id"].to_numpy()]).any()
    assert (two_actor_run / "scenario.yaml").is_file()


def test_killed_client_actor_is_restarted_and_its_clients_rerun(two_actor_run, tmp_path):
    name = "killed"
    run_dir = tmp_path / name
    errors: list[BaseException] = []

    def target():
        try:
            run_smoke(tmp_path, name, "--set", "resources.client_actors=2")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    # Kill client actor 0 as soon as round 1 has been checkpointed: mid-run.
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "round_000001.pt").exists():
        assert time.monotonic() < deadline, "round 1 never finished"
        time.sleep(0.05)
    (actor_name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["name"].startswith(f"{name}-") and a["name"].endswith("/client-0")]
    victim = ray.get_actor(actor_name, namespace="simfl")
    ray.kill(victim, no_restart=False)
    thread.join(timeout=300)
    assert not errors, errors
    rounds = pd.read_parquet(run_dir / "rounds")
    assert rounds["reruns"].sum() >= 1
    assert (pd.read_parquet(run_dir / "clients")["attempt"] > 1).any()
    # Nothing lost: the run equals the uninterrupted one, client state included.
    assert_same_results(two_actor_run, run_dir)
