"""One federated round as plain objects around a transport: plan, send and receive, aggregate.

As in Flower's ``configure_train`` → ``send_and_receive`` → ``aggregate_train``:

- :meth:`Rounds.plan` draws the round's cohort, its victims and the held-out
  clients to probe, from (seed, round) alone (independent of actors and resumes);
- a :class:`Transport` trains the clients and returns typed :class:`ClientReply`
  messages (the coordinator actor's is Ray, with re-runs after actor deaths;
  :class:`InProcessTransport` calls :class:`ClientWorker` objects directly);
- :meth:`Rounds.aggregate` turns the replies into the new global weights and
  the clients' rows; :meth:`Rounds.defence_step` runs the defence's server step
  and aggregates its declared client figures over the cohort.

Nothing here touches Ray, files or TensorBoard: sinks (``simfl.engine.run_log``)
consume what these return. So a round is unit-tested in-process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from simfl.core.aggregation import ServerOptimizer, weighted_mean
from simfl.core.models import SplitNet
from simfl.core.seeding import rng
from simfl.core.training import evaluate
from simfl.data.partition import Partition
from simfl.engine.client_work import ClientWorker
from simfl.engine.messages import ClientReply, EvalReply, TrainTask
from simfl.engine.scenario import Scenario
from simfl.engine.victim import Victim
from simfl.privacy.defences import Defence

# How a declared client figure is aggregated over the cohort (see Defence.client_figures).
COHORT_AGGREGATES: dict[str, Callable[[list[float]], Any]] = {"mean": np.mean, "max": np.max, "min": np.min}


def sample_cohort(sc: Scenario, eligible: np.ndarray, round_: int) -> np.ndarray:
    """This round's clients, from (seed, round) alone: independent of actors and of resumes."""
    k = sc.training.cohort_size(len(eligible))
    return np.sort(rng(sc.seed, "sample", round_).choice(eligible, size=k, replace=False))


def sample_victims(sc: Scenario, cohort: np.ndarray, round_: int) -> set[int]:
    """This round's attacked clients among its cohort, from (seed, round) alone."""
    if sc.attacks is None or not sc.attacks.attacked(round_):
        return set()
    k = sc.attacks.victim_count(len(cohort))
    return {int(c) for c in rng(sc.seed, "victims", round_).choice(cohort, size=k, replace=False)}


def sample_held_out_victims(sc: Scenario, held_out_clients: np.ndarray, round_: int) -> np.ndarray:
    """This round's probed held-out clients (``attacks.held_out_victims``), sorted, from (seed, round) alone."""
    if sc.attacks is None or not sc.attacks.attacked(round_) or not sc.attacks.held_out_victims:
        return np.zeros(0, dtype=np.int64)
    k = min(sc.attacks.held_out_victims, len(held_out_clients))
    return np.sort(rng(sc.seed, "held-out-victims", round_).choice(held_out_clients, size=k, replace=False))


def attack_jobs(victims: list[Victim], per_job: int) -> list[list[Victim]]:
    """Victims in client-id order, split into stackable groups of at most ``per_job``."""
    groups: dict[tuple, list[Victim]] = {}
    for v in sorted(victims, key=lambda v: v.client_id):
        groups.setdefault(v.group, []).append(v)
    return [g[i : i + per_job] for g in groups.values() for i in range(0, len(g), per_job)]


@dataclass(frozen=True)
class RoundPlan:
    """What a round will do, fixed before anything is sent."""

    round: int
    cohort: np.ndarray  # sorted client ids that train
    victims: frozenset[int]  # attacked among the cohort
    probes: np.ndarray  # held-out clients probed as victims (never aggregated)
    broadcast: dict[str, Any]  # the defence's server output the clients train under
    evaluate: bool  # whether the round ends with an evaluation


@dataclass(frozen=True)
class Aggregate:
    """The cohort's replies aggregated: new global weights, one row per client, and the cohort's means."""

    round: int
    weights: torch.Tensor
    global_update_norm: float
    client_rows: list[dict]
    samples: int
    train_loss: float
    train_accuracy: float

    def round_row(self, reruns: int, victims: int, dropped: int, defence: dict[str, Any], seconds: float,
                  finished_at: float) -> dict[str, Any]:
        """The rounds-table row (``defence``: the defence step's figures, its kind and knobs)."""
        return {
            "round": self.round,
            "clients": len(self.client_rows),
            "samples": self.samples,
            "train_loss": self.train_loss,
            "train_accuracy": self.train_accuracy,
            "update_norm_mean": float(np.mean([row["update_norm"] for row in self.client_rows])),
            "global_update_norm": self.global_update_norm,
            "reruns": reruns,
            "attack_victims": victims,
            "attack_victims_dropped": dropped,
            "round_time_s": seconds,
            "finished_at": finished_at,
            **defence,
        }


class Transport(Protocol):
    """Sends a round's work to the client shards and brings typed replies back (sorted by client id)."""

    def train(self, task: TrainTask, weights: torch.Tensor, broadcast: dict[str, Any]) -> tuple[list[ClientReply], int]:
        """Train ``task.clients`` (spread over the shards as the transport sees fit); replies and re-runs."""
        ...

    def evaluate(self, round_: int, weights: torch.Tensor, clients: np.ndarray) -> list[EvalReply]:
        """The global model on each client's local validation split."""
        ...


class Rounds:
    """Everything about a round but the transport: planning, aggregation, the defence's server step."""

    def __init__(self, sc: Scenario, partition: Partition, defence: Defence, server: ServerOptimizer) -> None:
        self.sc = sc
        self.partition = partition
        self.defence = defence
        self.server = server
        held = partition.held_out[partition.client_population]
        self.train_clients = np.flatnonzero(~held)
        self.held_out_clients = np.flatnonzero(held)

    def plan(self, round_: int) -> RoundPlan:
        """The round's cohort, victims and held-out probes (drawn from seed and round), broadcast, and evaluation."""
        cohort = sample_cohort(self.sc, self.train_clients, round_)
        return RoundPlan(
            round=round_,
            cohort=cohort,
            victims=frozenset(sample_victims(self.sc, cohort, round_)),
            probes=sample_held_out_victims(self.sc, self.held_out_clients, round_),
            broadcast=self.defence.broadcast(),
            evaluate=round_ % self.sc.evaluation.every == 0 or round_ == self.sc.training.rounds,
        )

    def aggregate(self, plan: RoundPlan, weights: torch.Tensor, replies: Sequence[ClientReply]) -> Aggregate:
        """New global weights from the cohort's updates (sample-weighted, then the server optimiser)."""
        if any(r.delta is None for r in replies):
            raise ValueError("aggregate: a probe's reply has no update to aggregate")
        deltas = [torch.tensor(r.delta) for r in replies]  # copies out of the read-only object store
        samples = [r.samples for r in replies]
        new_weights = self.server.step(weights, weighted_mean(deltas, samples))
        names, pop = self.partition.populations, self.partition.client_population
        rows = [
            {
                "round": plan.round,
                "client_id": r.client_id,
                "population": names[pop[r.client_id]],
                "samples": r.samples,
                "steps": r.steps,
                "loss": r.loss,
                "accuracy": r.accuracy,
                "update_norm": float(np.linalg.norm(r.delta)),  # type: ignore[arg-type]  # checked above
                "time_s": r.time_s,
                "actor": r.actor,
                "node_id": r.node_id,
                "attempt": r.attempt,
                "participation": r.state["participation"],
                **r.defence,
            }
            for r in replies
        ]
        total = sum(samples)
        return Aggregate(
            round=plan.round,
            weights=new_weights,
            global_update_norm=float((new_weights - weights).norm()),
            client_rows=rows,
            samples=total,
            train_loss=sum(row["loss"] * row["samples"] for row in rows) / total,
            train_accuracy=sum(row["accuracy"] * row["samples"] for row in rows) / total,
        )

    def defence_step(self, round_: int, model: SplitNet, client_rows: list[dict]) -> dict[str, float]:
        """The defence's server step (``model`` holds the new global weights), then its cohort figures.

        Client figures are aggregated as the defence declares them (e.g. ε's mean
        and maximum: the least protected client so far this round).
        """
        figures = self.defence.server_round(round_, model, client_rows)
        for name, aggregates in self.defence.client_figures.items():
            values = [row[name] for row in client_rows if row.get(name) is not None]
            for agg in aggregates if values else ():
                figures[name if agg == "mean" else f"{name}_{agg}"] = float(COHORT_AGGREGATES[agg](values))
        return figures

    def local_eval_rows(self, round_: int, replies: Sequence[EvalReply]) -> tuple[list[dict], list[dict]]:
        """(one client_evals row per client, one evals row per population with clients evaluated)."""
        names, pop, held = self.partition.populations, self.partition.client_population, self.partition.held_out
        per_client = [
            {"round": round_, "client_id": r.client_id, "population": names[pop[r.client_id]], "samples": r.samples,
             "loss": r.loss_sum / r.samples, "accuracy": r.correct / r.samples}
            for r in replies
        ]
        per_population = []
        for p, name in enumerate(names):
            mine = [r for r in replies if pop[r.client_id] == p]
            if not mine:
                continue
            n = sum(r.samples for r in mine)
            per_population.append(
                {"round": round_, "population": name, "held_out": bool(held[p]), "scope": "local_val",
                 "clients": len(mine), "samples": n, "loss": sum(r.loss_sum for r in mine) / n,
                 "accuracy": sum(r.correct for r in mine) / n}
            )
        return per_client, per_population

    def local_eval_clients(self, round_: int) -> np.ndarray:
        """The clients whose local validation split is evaluated this round, from (seed, round) alone."""
        n = self.partition.num_clients
        chosen = self.sc.evaluation.local_clients
        k = n if chosen == "all" else min(chosen, n)
        return np.sort(rng(self.sc.seed, "local-eval", round_).choice(n, size=k, replace=False))


def central_eval_rows(
    round_: int, model: SplitNet, test_sets: dict[str, tuple[torch.Tensor, torch.Tensor]],
    held_out: dict[str, bool], batch_size: int,
) -> list[dict]:
    """The global model (already loaded into ``model``) on each test set: one evals row each."""
    rows = []
    for name, (x, y) in test_sets.items():
        loss_sum, correct, n = evaluate(model, x, y, batch_size)
        rows.append({"round": round_, "population": name, "held_out": held_out.get(name, False), "scope": "test",
                     "clients": None, "samples": n, "loss": loss_sum / n, "accuracy": correct / n})
    return rows


class InProcessTransport:
    """Client workers in this process, each training its own clients: a round without Ray (tests, notebooks)."""

    def __init__(self, workers: list[ClientWorker], owner: np.ndarray) -> None:
        self.workers = workers
        self.owner = owner

    def train(self, task: TrainTask, weights: torch.Tensor, broadcast: dict[str, Any]) -> tuple[list[ClientReply], int]:
        """Each worker trains the task's clients it owns; replies sorted by client id, never a re-run."""
        replies: list[ClientReply] = []
        for shard, worker in enumerate(self.workers):
            mine = [int(c) for c in task.clients if self.owner[c] == shard]
            if mine:
                part = TrainTask(task.round, mine, victims=[c for c in task.victims if c in mine], probe=task.probe)
                replies += worker.train(part, weights.numpy(), broadcast)
        return sorted(replies, key=lambda r: r.client_id), 0

    def evaluate(self, round_: int, weights: torch.Tensor, clients: np.ndarray) -> list[EvalReply]:
        """Each worker evaluates the clients it owns; replies sorted by client id."""
        replies = [reply for shard, worker in enumerate(self.workers)
                   for reply in worker.evaluate(round_, weights.numpy(), [int(c) for c in clients
                                                                          if self.owner[c] == shard])]
        return sorted(replies, key=lambda r: r.client_id)
