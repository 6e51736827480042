"""What a client actor does, without Ray: one warm worker that owns a shard of virtual clients.

It keeps one model whose weights are a flat vector (loading the global model
is a single copy), its clients' data (gathered and shifted once, on first use)
and their state across rounds. Nothing here is per-client Python objects
created per call: that churn is what makes stateless per-client engines slow.

The Ray actor (``simfl.simulation.actors.client.ClientShard``) only fetches the data from the
object store and forwards calls here; an in-process transport
(``simfl.engine.round.InProcessTransport``) drives workers directly, so a whole round
is testable without Ray.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from contextlib import AbstractContextManager

import numpy as np
import torch

from simfl.core.resources import within_gpu_share
from simfl.core.seeding import torch_generator
from simfl.core.training import evaluate, train_client
from simfl.core.weights import FlatWeights
from simfl.data import Dataset
from simfl.data.client_data import ClientData, client_data
from simfl.data.partition import Partition
from simfl.engine.messages import ClientReply, EvalReply, TrainTask
from simfl.engine.scenario import Scenario
from simfl.engine.victim import capture
from simfl.privacy.defences import defended_model


def new_client_state() -> dict[str, int]:
    """What the engine remembers about a client between rounds (defences add their own keys)."""
    return {"participation": 0, "last_round": 0}


class ClientWorker:
    """A shard of clients: their data, their state, and one model to train them all with."""

    def __init__(
        self, scenario: Scenario, shard: int, device: torch.device, node_id: str = ""
    ) -> None:
        self.sc = scenario
        self.device = device
        self.shard = shard
        self.node_id = node_id
        self.home: frozenset[int] = frozenset()
        self.states: dict[int, dict[str, int]] = {}
        self.data: dict[int, ClientData] = {}

    def attach(self, dataset: Dataset, partition: Partition, home: Sequence[int],
               states: dict[int, dict[str, int]]) -> dict:
        """Take the data, build the model, the home clients and the state of those that have one.

        Called after creation and again after a restart, so the coordinator's
        journal is the authority on what state the clients are in. ``states``
        holds only home clients the journal knows (those that have trained); the
        others start from :func:`new_client_state` when first trained, so
        attaching does not grow with the population.
        """
        self.home = frozenset(int(c) for c in home)
        if not set(states) <= self.home:
            raise ValueError(f"shard {self.shard}: attach got the state of clients it does not own: "
                             f"{sorted(set(states) - self.home)[:5]}")
        self.dataset = dataset
        self.partition = partition
        self.shifts = [p.shift for p in self.sc.populations]
        shape = (dataset.channels, dataset.image_size, dataset.num_classes)
        model, self.defence = defended_model(self.sc.model, self.sc.defence, self.sc.seed, shape)
        self.model = model.to(self.device)
        self.flat = FlatWeights(self.model)
        self._weights_cache: tuple[tuple[str, int], torch.Tensor] | None = None
        self._received: int | None = None  # the round whose defence broadcast the defence holds
        self.states = {int(c): dict(s) for c, s in states.items()}
        return {"shard": self.shard, "node_id": self.node_id, "pid": os.getpid(), "clients": len(self.home)}

    @property
    def attached(self) -> bool:
        """Whether :meth:`attach` has run (a restarted actor's worker has not)."""
        return hasattr(self, "flat")

    def _data(self, client: int) -> ClientData:
        """Home clients' data are built once and kept; a visiting client's are built per call."""
        if client in self.data:
            return self.data[client]
        data = client_data(self.dataset, self.partition, self.shifts, self.sc.seed, client)
        if client in self.home:
            self.data[client] = data
        return data

    def _state(self, client: int) -> dict[str, int]:
        """The state this worker holds for ``client``; a new one if the client has never trained."""
        if client not in self.states:
            self.states[client] = new_client_state()
        return self.states[client]

    def _weights(self, key: tuple[str, int], weights: np.ndarray) -> torch.Tensor:
        """The round's global weights as a tensor, converted once per round, not once per call."""
        if self._weights_cache is None or self._weights_cache[0] != key:
            self._weights_cache = (key, torch.from_numpy(np.array(weights, dtype=np.float32)).to(self.device))
        return self._weights_cache[1]

    def _gpu_share(self) -> AbstractContextManager[None]:
        return within_gpu_share("resources.gpus_per_actor", self.sc.resources.gpus_per_actor,
                                f"client actor {self.shard}")

    def train(self, task: TrainTask, weights: np.ndarray, broadcast: dict | None) -> list[ClientReply]:
        """Train each of the task's clients from ``weights``; randomness comes from (seed, client, round).

        ``task.states`` carries the state of clients this worker does not hold a
        current copy of (another shard's clients it was given to balance the
        round). ``task.victims`` are attacked this round: their replies also
        carry what they share and, for scoring only, their private images.
        ``broadcast`` is the defence's server-side output for this round (e.g. its decoder).

        ``task.probe``: the clients (held-out ones) are attacked as if they had
        joined the round, and nothing else: every one is a victim, each trains on
        a deep copy of its state (nothing held here changes), and its reply
        carries no update (it is never aggregated).
        """
        given = {int(c): s for c, s in task.states.items()}
        if not task.probe:
            self.states.update({c: dict(s) for c, s in given.items()})
        with self._gpu_share():
            global_weights = self._weights(("train", task.round), weights)
            if self._received != task.round:
                self.defence.receive(broadcast or {}, self.device)
                self._received = task.round
            return [self._train_one(task, client, given, global_weights) for client in task.clients]

    def _train_one(self, task: TrainTask, client: int, given: dict[int, dict], weights: torch.Tensor) -> ClientReply:
        data = self._data(client)
        if task.probe:
            state = copy.deepcopy(given[client] if client in given else self.states.get(client, new_client_state()))
        else:
            state = self._state(client)
        gen = torch_generator(self.sc.seed, "client-train", client, task.round)
        attacked = (task.probe or client in task.victims) and self.sc.attacks is not None
        before = copy.deepcopy(state) if attacked else state  # a victim shares from its state at the round's start
        local = train_client(self.model, self.flat, weights, data.x, data.y, self.sc.training, gen, self.defence, state)
        victim = None
        if attacked:
            assert self.sc.attacks is not None
            victim = capture(self.model, self.flat, weights, data.x, data.y, self.sc.attacks, self.sc.training,
                             local, self.sc.seed, client, task.round, self.defence, before)
        state["participation"] += 1
        state["last_round"] = task.round
        return ClientReply(
            client_id=client,
            delta=None if task.probe else local.delta.numpy(),
            samples=local.samples,
            steps=local.steps,
            loss=local.loss,
            accuracy=local.accuracy,
            time_s=local.time_s,
            state=dict(state),
            actor=self.shard,
            node_id=self.node_id,
            victim=victim,
            defence=local.defence,
        )

    def evaluate(self, round_: int, weights: np.ndarray, clients: list[int]) -> list[EvalReply]:
        """Global model on each client's local validation split (clients with none are skipped)."""
        replies = []
        with self._gpu_share():
            self.flat.load(self._weights(("eval", round_), weights))
            for client in clients:
                data = self._data(client)
                if len(data.val_y) == 0:
                    continue
                loss_sum, correct, n = evaluate(self.model, data.val_x, data.val_y, self.sc.evaluation.batch_size)
                replies.append(EvalReply(client_id=client, samples=n, loss_sum=loss_sum, correct=correct))
        return replies
