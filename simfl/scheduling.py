"""Which actor trains which of a round's clients, and when.

Each client has a home actor (which holds its data and state), but a random
cohort rarely splits evenly across homes: with 50 clients on 2 actors one gets
29 and the other 21, and the round waits for the slower. So the cohort is cut
into small chunks; an actor works through its own chunks largest first, then
takes the smallest remaining chunk of whichever actor has the most work left.
Results do not depend on who trains a client, so this only changes speed.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np


class RoundSchedule:
    """Work queue of one round: home chunks first, then stealing."""

    def __init__(self, clients: np.ndarray, owner: np.ndarray, sizes: np.ndarray, n_actors: int,
                 chunks_per_actor: int = 4) -> None:
        self.sizes = sizes
        self.owner = owner
        per_chunk = max(1, math.ceil(len(clients) / (n_actors * chunks_per_actor)))
        self.queues: list[deque[list[int]]] = []
        for actor in range(n_actors):
            mine = clients[owner[clients] == actor]
            mine = mine[np.argsort(-sizes[mine], kind="stable")]
            self.queues.append(deque(mine[i : i + per_chunk].tolist() for i in range(0, len(mine), per_chunk)))
        self.stolen = 0

    def _load(self, actor: int) -> int:
        return sum(int(self.sizes[c]) for chunk in self.queues[actor] for c in chunk)

    def next_for(self, actor: int) -> list[int] | None:
        """The next chunk for ``actor``, or None when no work is left anywhere."""
        if self.queues[actor]:
            return self.queues[actor].popleft()
        victim = max(range(len(self.queues)), key=self._load)
        if not self.queues[victim]:
            return None
        self.stolen += 1
        return self.queues[victim].pop()

    def give_back(self, chunk: list[int]) -> None:
        """Return a chunk whose actor died; it goes first in its home actor's queue."""
        self.queues[int(self.owner[chunk[0]])].appendleft(chunk)
