"""A client shard's work without Ray: training, probes, evaluation, typed replies."""

from __future__ import annotations

import pytest
import torch

from simfl.core.weights import FlatWeights
from simfl.engine.client_work import ClientWorker, new_client_state
from simfl.engine.messages import TrainTask
from simfl.engine.scenario import parse_scenario
from simfl.privacy.defences import defended_model
from simfl.simulation.runner import prepare


def _worker(defence: str = "dpsgd"):
    sc = parse_scenario({
        "populations": [{"name": "a", "clients": 2, "quantity": {"mean": 12}},
                        {"name": "b", "clients": 2, "held_out": True, "quantity": {"mean": 12}}],
        "data": {"size": 16, "synthetic": {"val_size": 20, "test_size": 20}},
        "model": {"width": 8}, "training": {"batch_size": 4}, "defence": defence,
        "attacks": {"view": "update", "held_out_victims": 1},
    })
    prepared = prepare(sc)
    ds = prepared.dataset
    shape = (ds.channels, ds.image_size, ds.num_classes)
    weights = FlatWeights(defended_model(sc.model, sc.defence, sc.seed, shape)[0]).snapshot().numpy()
    worker = ClientWorker(sc, 0, torch.device("cpu"))
    worker.attach(ds, prepared.partition, [0, 1, 2, 3], {1: {"participation": 2, "last_round": 5}})
    return worker, weights


def test_a_probe_shares_what_the_client_would_and_leaves_its_state_alone():
    worker, weights = _worker("dpsgd")  # DP-SGD: its accountant is client state a probe must not advance
    given = {3: {"participation": 0, "last_round": 0, "dp_steps": 7}}  # as sent for a visiting client
    first = worker.train(TrainTask(1, [2, 3], given, probe=True), weights, {})
    again = worker.train(TrainTask(1, [2, 3], given, probe=True), weights, {})
    real = worker.train(TrainTask(1, [2, 3], given, victims=[2, 3]), weights, {})
    for p, q, t in zip(first, again, real, strict=True):
        # Every probed client is a victim, and shares exactly what it would have shared had it joined.
        assert p.delta is None and p.victim is not None
        assert torch.equal(p.victim.observation.shared, t.victim.observation.shared)
        assert torch.equal(p.victim.observation.shared, torch.tensor(t.delta))
        # It worked on a copy of its state: probing twice changes nothing, and the real round starts from the same.
        assert p.state == q.state == t.state and p.defence == q.defence == t.defence
    assert real[0].state["dp_steps"] > 0 and real[1].state["dp_steps"] > 7
    assert worker.states[2] == real[0].state  # a real round keeps the new state


def test_only_victims_carry_what_they_shared_and_evaluation_skips_clients_without_validation_data():
    worker, weights = _worker("none")
    replies = worker.train(TrainTask(1, [0, 1], victims=[1]), weights, {})
    assert [r.client_id for r in replies] == [0, 1]
    assert replies[0].victim is None and replies[1].victim is not None
    assert all(r.delta is not None and r.delta.shape == weights.shape for r in replies)
    evals = worker.evaluate(1, weights, [0, 1, 2, 3])
    assert all(e.samples > 0 and 0 <= e.correct <= e.samples for e in evals)
    assert [e.client_id for e in evals] == sorted(e.client_id for e in evals)


def test_attach_takes_only_journaled_states_and_new_clients_start_fresh():
    worker, weights = _worker("none")
    assert set(worker.states) == {1}  # nothing held for home clients that never trained
    replies = worker.train(TrainTask(6, [0, 1]), weights, {})
    assert replies[0].state == {**new_client_state(), "participation": 1, "last_round": 6}
    assert replies[1].state == {"participation": 3, "last_round": 6}  # continues from its journaled state


def test_attach_refuses_the_state_of_a_client_it_does_not_own():
    worker, _ = _worker("none")
    with pytest.raises(ValueError, match=r"does not own: \[2\]"):
        worker.attach(worker.dataset, worker.partition, [0, 1], {2: new_client_state()})
