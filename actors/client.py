"""The client actor: one warm process that owns a shard of virtual clients.

It keeps one model whose weights are a flat vector (loading the global model
is a single copy), its clients' data (gathered and shifted once, on first use)
and their state across rounds. Nothing here is per-client Python objects
created per call: that churn is what makes stateless per-client engines slow.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import ray
import torch

from simfl.attacks.victim import capture
from simfl.client_data import ClientData, client_data
from simfl.config import Scenario
from simfl.data import Dataset
from simfl.defences import defended_model
from simfl.partition import Partition
from simfl.resources import actor_device, torch_threads, within_gpu_share
from simfl.seeding import torch_generator
from simfl.training import evaluate, train_client
from simfl.weights import FlatWeights


class ShardNotAttached(RuntimeError):
    """Raised by a client actor that Ray restarted and that has not been re-attached yet."""


def new_client_state() -> dict[str, int]:
    """What the engine remembers about a client between rounds (defences add their own keys)."""
    return {"participation": 0, "last_round": 0}


@ray.remote
class ClientShard:
    def __init__(self, scenario: dict, shard: int, client_ids: list[int]) -> None:
        self.sc = Scenario.model_validate(scenario)
        res = self.sc.resources
        torch.set_num_threads(torch_threads(res.cpus_per_actor))
        self.device = actor_device(res.gpus_per_actor)
        self.shard = shard
        self.home = frozenset(int(c) for c in client_ids)
        self.states: dict[int, dict[str, int]] = {}
        self.data: dict[int, ClientData] = {}
        self.node_id = ray.get_runtime_context().get_node_id()

    def attach(self, refs: dict, states: dict[int, dict[str, int]]) -> dict:
        """Fetch the dataset and partition, build the model, and take the state of every home client.

        Called after creation and again after Ray restarts this actor (or after a
        call to it was lost), so the constructor holds no object refs and the
        coordinator's journal is the authority on what state the clients are in.
        Data come zero-copy from the node's object store.
        """
        if set(states) != self.home:
            raise ValueError(f"shard {self.shard}: attach needs the state of exactly its {len(self.home)} clients")
        self.dataset: Dataset = ray.get(refs["dataset"])
        self.partition: Partition = ray.get(refs["partition"])
        self.shifts = [p.shift for p in self.sc.populations]
        ds = self.dataset
        model, self.defence = defended_model(self.sc, (ds.channels, ds.image_size, ds.num_classes))
        self.model = model.to(self.device)
        self.flat = FlatWeights(self.model)
        self._weights_cache: tuple[tuple[str, int], torch.Tensor] | None = None
        self._received: int | None = None  # the round whose defence broadcast the defence holds
        self.states = {int(c): dict(s) for c, s in states.items()}
        return {"shard": self.shard, "node_id": self.node_id, "pid": os.getpid(), "clients": len(self.states)}

    def _require_attached(self) -> None:
        if not hasattr(self, "flat"):
            raise ShardNotAttached(f"client shard {self.shard} was restarted and holds no data yet")

    def _data(self, client: int) -> ClientData:
        """Home clients' data are built once and kept; a visiting client's are built per call."""
        if client in self.data:
            return self.data[client]
        data = client_data(self.dataset, self.partition, self.shifts, self.sc.seed, client)
        if client in self.home:
            self.data[client] = data
        return data

    def _weights(self, key: tuple[str, int], weights: np.ndarray) -> torch.Tensor:
        """The round's global weights as a tensor, converted once per round, not once per call."""
        if self._weights_cache is None or self._weights_cache[0] != key:
            self._weights_cache = (key, torch.from_numpy(np.array(weights, dtype=np.float32)).to(self.device))
        return self._weights_cache[1]

    def train(
        self,
        round_: int,
        weights: np.ndarray,
        clients: list[int],
        states: dict[int, dict],
        victims: list[int],
        broadcast: dict | None = None,
        probe: bool = False,
    ) -> list[dict]:
        """Train each listed client from ``weights``; randomness comes from (seed, client, round).

        ``states`` carries the state of clients this actor does not hold a current
        copy of (another actor's clients it was given to balance the round).
        ``victims`` (a subset of ``clients``) are attacked this round: their rows
        also carry what they share and, for scoring only, their private images.
        ``broadcast`` is the defence's server-side output for this round (e.g. its decoder).

        ``probe``: the clients (held-out ones) are attacked as if they had joined the
        round, and nothing else: every one is a victim, each trains on a deep copy of
        its state (``self.states`` and the given ``states`` are left as they were),
        and its row carries no update (it is never aggregated).
        """
        self._require_attached()
        with within_gpu_share("resources.gpus_per_actor", self.sc.resources.gpus_per_actor,
                              f"client actor {self.shard}"):
            given = {int(c): s for c, s in states.items()}
            if not probe:
                self.states.update({c: dict(s) for c, s in given.items()})
            global_weights = self._weights(("train", round_), weights)
            if self._received != round_:
                self.defence.receive(broadcast or {}, self.device)
                self._received = round_
            results = []
            for client in clients:
                data = self._data(client)
                if probe:
                    state = copy.deepcopy(given[client] if client in given else self.states[client])
                else:
                    state = self.states[client]
                gen = torch_generator(self.sc.seed, "client-train", client, round_)
                local = train_client(self.model, self.flat, global_weights, data.x, data.y, self.sc.training, gen,
                                     self.defence, state)
                victim = None
                if probe or client in victims:
                    victim = capture(self.model, self.flat, global_weights, data.x, data.y, self.sc.attacks,
                                     self.sc.training, local, self.sc.seed, client, round_, self.defence)
                state["participation"] += 1
                state["last_round"] = round_
                results.append(
                    {
                        "client_id": client,
                        "delta": None if probe else local.delta.numpy(),
                        "samples": local.samples,
                        "steps": local.steps,
                        "loss": local.loss,
                        "accuracy": local.accuracy,
                        "time_s": local.time_s,
                        "state": dict(state),
                        "actor": self.shard,
                        "node_id": self.node_id,
                        "victim": victim,
                        "defence": local.defence,
                    }
                )
            return results

    def evaluate(self, round_: int, weights: np.ndarray, clients: list[int]) -> list[dict]:
        """Global model on each client's local validation split (clients with none are skipped)."""
        self._require_attached()
        rows = []
        with within_gpu_share("resources.gpus_per_actor", self.sc.resources.gpus_per_actor, f"client actor {self.shard}"):
            self.flat.load(self._weights(("eval", round_), weights))
            for client in clients:
                data = self._data(client)
                if len(data.val_y) == 0:
                    continue
                loss_sum, correct, n = evaluate(self.model, data.val_x, data.val_y, self.sc.evaluation.batch_size)
                rows.append({"client_id": client, "samples": n, "loss_sum": loss_sum, "correct": correct})
        return rows
