"""The client actor: a :class:`~simfl.engine.client_work.ClientWorker` in its own warm process.

The worker does the work (data, state, training; free of Ray). The actor adds
what only Ray has: the process's threads and GPU share, fetching the dataset
and partition zero-copy from the node's object store, and saying so when Ray
restarted it and it holds no data yet.
"""

from __future__ import annotations

import numpy as np
import ray

from simfl.core.determinism import pin_cpu_kernels
from simfl.core.resources import actor_device, torch_threads
from simfl.engine.client_work import ClientWorker
from simfl.engine.messages import ClientReply, EvalReply, TrainTask
from simfl.engine.scenario import Scenario


class ShardNotAttached(RuntimeError):
    """Raised by a client actor that Ray restarted and that has not been re-attached yet."""


@ray.remote
class ClientShard:
    """A client actor: a :class:`~simfl.engine.client_work.ClientWorker` behind Ray, refusing calls until attached."""

    def __init__(self, scenario: dict, shard: int) -> None:
        sc = Scenario.model_validate(scenario)
        pin_cpu_kernels(torch_threads(sc.resources.cpus_per_actor))
        node = ray.get_runtime_context().get_node_id()
        self.worker = ClientWorker(sc, shard, actor_device(sc.resources.gpus_per_actor), node)

    def attach(self, refs: dict, home: np.ndarray, states: dict[int, dict[str, int]]) -> dict:
        """Fetch the dataset and partition, build the model, take the home clients and their journaled states.

        Called after creation and again after Ray restarts this actor (or after a
        call to it was lost), so the constructor holds no object refs and nothing
        that grows with the population (Ray keeps constructor arguments for
        restarts, in the object store once they are large).
        """
        return self.worker.attach(ray.get(refs["dataset"]), ray.get(refs["partition"]), home.tolist(), states)

    def _attached(self) -> ClientWorker:
        if not self.worker.attached:
            raise ShardNotAttached(f"client shard {self.worker.shard} was restarted and holds no data yet")
        return self.worker

    def train(self, task: TrainTask, weights: np.ndarray, broadcast: dict | None = None) -> list[ClientReply]:
        """Train the task's clients (see :meth:`ClientWorker.train <simfl.engine.client_work.ClientWorker.train>`)."""
        return self._attached().train(task, weights, broadcast)

    def evaluate(self, round_: int, weights: np.ndarray, clients: list[int]) -> list[EvalReply]:
        """Evaluate the global model on the clients' local validation splits."""
        return self._attached().evaluate(round_, weights, clients)
