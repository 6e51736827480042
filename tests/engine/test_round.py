"""A round without Ray: planning, aggregation of typed replies, the defence step, an in-process transport."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simfl.core.aggregation import ServerOptimizer
from simfl.core.resources import assign_clients
from simfl.core.seeding import torch_generator
from simfl.core.training import train_client
from simfl.core.weights import FlatWeights
from simfl.engine.client_work import ClientWorker
from simfl.engine.messages import ClientReply, EvalReply, TrainTask
from simfl.engine.round import InProcessTransport, Rounds, sample_cohort
from simfl.engine.scenario import parse_scenario
from simfl.privacy.defences import Defence, defended_model
from simfl.privacy.defences.base import NoDefenceConfig
from simfl.simulation.runner import prepare

SCENARIO = {
    "populations": [{"name": "a", "clients": 6, "quantity": {"mean": 12}},
                    {"name": "b", "clients": 3, "quantity": {"mean": 10}},
                    {"name": "c", "clients": 2, "held_out": True, "quantity": {"mean": 10}}],
    "data": {"size": 16, "synthetic": {"val_size": 20, "test_size": 20}},
    "model": {"width": 8},
    "training": {"rounds": 4, "clients_per_round": 4, "batch_size": 4},
    "evaluation": {"every": 2},
    "attacks": {"victims": 2, "rounds": [1, 3], "held_out_victims": 1, "view": "update"},
}


def _rounds(**changes):
    sc = parse_scenario({**SCENARIO, **changes})
    prepared = prepare(sc)
    ds = prepared.dataset
    shape = (ds.channels, ds.image_size, ds.num_classes)
    torch.manual_seed(0)
    model, defence = defended_model(sc.model, sc.defence, sc.seed, shape)
    flat = FlatWeights(model)
    rounds = Rounds(sc, prepared.partition, defence, ServerOptimizer(sc.training.algorithm, flat.trainable))
    return sc, prepared, rounds, model, flat


def _reply(client: int, delta: list[float], samples: int, loss: float, accuracy: float, **defence) -> ClientReply:
    return ClientReply(client_id=client, delta=np.array(delta, dtype=np.float32), samples=samples, steps=1, loss=loss,
                       accuracy=accuracy, time_s=0.0, state={"participation": 1}, actor=0, node_id="n",
                       defence=defence)


def test_the_plan_is_drawn_from_seed_and_round_alone():
    sc, prepared, rounds, _, _ = _rounds()
    plan = rounds.plan(1)
    held = prepared.partition.held_out[prepared.partition.client_population]
    assert len(plan.cohort) == 4 and not held[plan.cohort].any() and list(plan.cohort) == sorted(plan.cohort)
    assert len(plan.victims) == 2 and plan.victims <= set(plan.cohort.tolist())
    assert len(plan.probes) == 1 and held[plan.probes].all()
    assert not plan.evaluate and rounds.plan(2).evaluate and rounds.plan(4).evaluate  # every 2, and the last
    assert rounds.plan(2).victims == frozenset() and len(rounds.plan(2).probes) == 0  # not an attacked round
    again = _rounds()[2].plan(1)
    assert np.array_equal(again.cohort, plan.cohort) and again.victims == plan.victims
    assert np.array_equal(plan.cohort, sample_cohort(sc, rounds.train_clients, 1))


def test_aggregation_is_the_sample_weighted_mean_and_rows_follow_the_replies():
    sc, prepared, rounds, _, flat = _rounds()
    n = len(flat.vector)
    plan = rounds.plan(1)
    weights = torch.zeros(n)
    a, b = plan.cohort[:2].tolist()
    replies = [_reply(a, [1.0] * n, 10, 2.0, 0.5), _reply(b, [4.0] * n, 30, 1.0, 0.9)]
    agg = rounds.aggregate(plan, weights, replies)
    trainable = flat.trainable
    assert torch.allclose(agg.weights[trainable], torch.full((int(trainable.sum()),), 3.25))  # (10·1 + 30·4) / 40
    assert agg.train_loss == pytest.approx((10 * 2.0 + 30 * 1.0) / 40)
    assert agg.train_accuracy == pytest.approx((10 * 0.5 + 30 * 0.9) / 40)
    assert agg.global_update_norm == pytest.approx(float(agg.weights.norm()))
    assert [row["client_id"] for row in agg.client_rows] == [a, b]
    assert agg.client_rows[1]["update_norm"] == pytest.approx(4.0 * np.sqrt(n))
    names = prepared.partition.populations
    assert agg.client_rows[0]["population"] == names[prepared.partition.client_population[a]]
    row = agg.round_row(reruns=1, victims=2, dropped=0, defence={"defence": "none"}, seconds=1.5, finished_at=9.0)
    assert row["clients"] == 2 and row["samples"] == 40 and row["reruns"] == 1 and row["defence"] == "none"


class _Figures(Defence):
    client_figures = {"eps": ("mean", "max"), "steps": ("mean",)}

    def server_round(self, round_, model, client_rows):
        return {"server": float(round_)}


def test_the_defence_step_aggregates_its_declared_client_figures():
    sc, _, rounds, model, _ = _rounds()
    rounds.defence = _Figures(NoDefenceConfig(), (3, 16, 4), 0)
    rows = [{"eps": 1.0, "steps": 2.0}, {"eps": 3.0, "steps": 4.0}, {"eps": None, "steps": 6.0}]
    assert rounds.defence_step(5, model, rows) == {"server": 5.0, "eps": 2.0, "eps_max": 3.0, "steps": 4.0}
    assert _Figures.round_columns() == ("eps", "eps_max", "steps")


def test_local_evaluation_rows_per_client_and_per_population():
    _, prepared, rounds, _, _ = _rounds()
    pop = prepared.partition.client_population
    clients = rounds.local_eval_clients(2)
    assert np.array_equal(clients, rounds.local_eval_clients(2))
    replies = [EvalReply(int(c), samples=4, loss_sum=2.0, correct=3) for c in clients]
    per_client, per_population = rounds.local_eval_rows(2, replies)
    assert len(per_client) == len(clients) and per_client[0]["accuracy"] == 0.75 and per_client[0]["loss"] == 0.5
    assert {row["population"] for row in per_population} == {prepared.partition.populations[p] for p in pop[clients]}
    assert sum(row["clients"] for row in per_population) == len(clients)
    held = {row["population"]: row["held_out"] for row in per_population}
    assert held.get("c", True) and not held.get("a", False)


def test_a_round_through_the_in_process_transport_is_fedavg_of_each_clients_own_training():
    sc, prepared, rounds, model, flat = _rounds()
    owner = assign_clients(prepared.partition.sizes, 2)
    workers = [ClientWorker(sc, i, torch.device("cpu")) for i in range(2)]
    for i, worker in enumerate(workers):
        worker.attach(prepared.dataset, prepared.partition, np.flatnonzero(owner == i).tolist(), {})
    transport = InProcessTransport(workers, owner)
    weights = flat.snapshot()
    plan = rounds.plan(1)
    replies, reruns = transport.train(TrainTask(1, plan.cohort.tolist(), victims=sorted(plan.victims)), weights, {})
    assert reruns == 0 and [r.client_id for r in replies] == plan.cohort.tolist()
    assert {r.client_id for r in replies if r.victim is not None} == set(plan.victims)
    agg = rounds.aggregate(plan, weights, replies)
    # The same clients trained by hand, one after another, and averaged by sample count.
    expected = torch.zeros_like(weights)
    total = 0
    for c in plan.cohort.tolist():
        data = workers[owner[c]]._data(c)
        local = train_client(model, flat, weights, data.x, data.y, sc.training,
                             torch_generator(sc.seed, "client-train", c, 1))
        expected += local.delta * local.samples
        total += local.samples
    assert torch.allclose(agg.weights, weights + expected / total, atol=1e-6)
    probes, _ = transport.train(TrainTask(1, plan.probes.tolist(), probe=True), weights, {})
    assert all(r.delta is None and r.victim is not None for r in probes)
    evals = transport.evaluate(1, agg.weights, rounds.local_eval_clients(1))
    assert evals and all(e.samples > 0 for e in evals)
