"""The Ray transport of a round: client actors, balanced chunks, re-runs after deaths, the state journal.

It implements :class:`simfl.engine.round.Transport` over :class:`simfl.simulation.actors.client.ClientShard`
actors. Work goes out in chunks (:class:`simfl.engine.scheduling.RoundSchedule`), two
calls deep per actor so that none idles waiting for the next. A chunk of a
dead actor goes back to the queue; Ray restarts the actor and it is
re-attached (given its data and the journaled state of its clients) before its
next call. The journal, the last state each client returned, is the authority
on client state: it is what a restarted actor gets back and what a checkpoint keeps.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError

from simfl.core.determinism import actor_runtime_env
from simfl.core.resources import assign_clients
from simfl.data.partition import Partition
from simfl.engine.client_work import new_client_state
from simfl.engine.messages import ClientReply, EvalReply, TrainTask
from simfl.engine.scenario import Scenario
from simfl.engine.scheduling import RoundSchedule
from simfl.simulation.actors.client import ClientShard, ShardNotAttached
from simfl.simulation.actors.restarts import once_restarted

# How many chunks per actor may fail within one round before the run gives up.
MAX_RERUNS_PER_ROUND = 3
# How long a round waits on silent actors before saying so (it keeps waiting).
WAIT_REPORT_S = 60


class RayTransport:
    """Client actors that train and evaluate the clients of a round, surviving actor deaths."""

    def __init__(self, sc: Scenario, partition: Partition, refs: dict, n_actors: int, name: str,
                 journal: dict[int, dict[str, int]]) -> None:
        """``refs``: the dataset's and partition's object refs; ``name``: a prefix unique to the run."""
        self.partition = partition
        self.refs = refs
        self.journal = journal
        self.owner = assign_clients(partition.sizes, n_actors)
        res = sc.resources
        self.actors = [
            ClientShard.options(  # type: ignore[attr-defined]
                num_cpus=res.cpus_per_actor,
                num_gpus=res.gpus_per_actor,
                max_restarts=-1,
                max_task_retries=0,
                scheduling_strategy="SPREAD",
                name=f"{name}/client-{i}",
                namespace="simfl",
                runtime_env=actor_runtime_env(),
            ).remote(sc.model_dump(mode="json"), i)
            for i in range(n_actors)
        ]
        self.incarnation = [0] * n_actors
        self.home_fresh = np.ones(partition.num_clients, dtype=bool)
        self.info = ray.get([self._attach(i) for i in range(n_actors)])

    def _attach(self, shard: int) -> ray.ObjectRef:
        """Give a (new or restarted) client actor its data, its home clients and the journaled state of those."""
        self.incarnation[shard] += 1
        home = np.flatnonzero(self.owner == shard)
        self.home_fresh[home] = True
        states = {int(c): self.journal[int(c)] for c in home if int(c) in self.journal}
        return self.actors[shard].attach.remote(self.refs, home, states)

    def _reattach(self, shard: int) -> None:
        """Re-attach an actor whose call was lost; waits (with backoff) for Ray to restart it if needed."""
        once_restarted(lambda: self._attach(shard), f"client actor {shard}")

    def _states_to_send(self, shard: int, chunk: list[int]) -> dict[int, dict]:
        """Client states the actor lacks: clients it does not own, or whose home copy is stale."""
        return {c: self.journal.get(c, new_client_state()) for c in chunk
                if self.owner[c] != shard or not self.home_fresh[c]}

    def train(self, task: TrainTask, weights: torch.Tensor, broadcast: dict[str, Any]) -> tuple[list[ClientReply], int]:
        """Train ``task.clients``; a probe's states are neither changed nor journaled."""
        weights_ref, broadcast_ref = ray.put(weights.numpy()), ray.put(broadcast)
        victims = set(task.clients) if task.probe else set(task.victims)

        def call(shard: int, chunk: list[int]) -> ray.ObjectRef:
            part = TrainTask(task.round, chunk, self._states_to_send(shard, chunk),
                             [c for c in chunk if c in victims], task.probe)
            return self.actors[shard].train.remote(part, weights_ref, broadcast_ref)

        replies, reruns = self._dispatch("train", task.round, np.asarray(task.clients), call)
        if not task.probe:
            for reply, shard, incarnation in replies:
                self.journal[reply.client_id] = reply.state
                # The home actor's copy is current only if it trained the client itself, in its present incarnation.
                self.home_fresh[reply.client_id] = (self.owner[reply.client_id] == shard
                                                    and incarnation == self.incarnation[shard])
        return [reply for reply, _, _ in replies], reruns

    def evaluate(self, round_: int, weights: torch.Tensor, clients: np.ndarray) -> list[EvalReply]:
        """The global model on each client's local validation split, sorted by client id."""
        weights_ref = ray.put(weights.numpy())
        replies, _ = self._dispatch("evaluate", round_, clients,
                                    lambda shard, chunk: self.actors[shard].evaluate.remote(round_, weights_ref, chunk))
        return [reply for reply, _, _ in replies]

    def _dispatch(
        self, what: str, round_: int, clients: np.ndarray, call: Any
    ) -> tuple[list[tuple[Any, int, int]], int]:
        """Run ``call(shard, chunk)`` over the actors until every client is done; re-run the chunks of dead actors.

        Returns (reply, shard, incarnation) per client sorted by client id, and how many chunks were re-run.
        """
        schedule = RoundSchedule(clients, self.owner, self.partition.sizes, len(self.actors))
        in_flight: dict = {}
        attempts: dict[int, int] = {}
        reruns = 0

        def submit(shard: int) -> None:
            chunk = schedule.next_for(shard)
            if chunk is not None:
                in_flight[call(shard, chunk)] = (shard, chunk, self.incarnation[shard])

        for _ in range(2):
            for shard in range(len(self.actors)):
                submit(shard)
        done: list[tuple[Any, int, int]] = []
        waited = 0
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=WAIT_REPORT_S)
            if not ready:
                waited += WAIT_REPORT_S
                busy = sorted({shard for shard, _, _ in in_flight.values()})
                print(f"simfl: {what} round {round_}: client actors {busy} have not answered for {waited} s "
                      "(lost node, or no resources to restart an actor?)", file=sys.stderr)
                continue
            waited = 0
            (ref,) = ready
            shard, chunk, incarnation = in_flight.pop(ref)
            try:
                out = ray.get(ref)
            except (RayActorError, ShardNotAttached):
                # Died mid-call (RayActorError) or between calls (restarted, empty).
                reruns += 1
                if reruns > MAX_RERUNS_PER_ROUND * len(self.actors):
                    raise
                for c in chunk:
                    attempts[c] = attempts.get(c, 1) + 1
                schedule.give_back(chunk)
                if incarnation == self.incarnation[shard]:  # not yet re-attached since this call went out
                    self._reattach(shard)
                submit(shard)
                continue
            for reply in out:
                attempt = attempts.get(reply.client_id, 1)
                if attempt != 1 and isinstance(reply, ClientReply):
                    reply = replace(reply, attempt=attempt)
                done.append((reply, shard, incarnation))
            submit(shard)
        done.sort(key=lambda item: item[0].client_id)
        return done, reruns

    def stop(self) -> None:
        """Kill the client actors."""
        for actor in self.actors:
            ray.kill(actor)
