"""The typed messages of a round: what the coordinator sends a client shard and what comes back.

Plain frozen dataclasses (Ray pickles them as they are), so a field cannot be
misspelt as a string key and every side agrees on what a reply holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from simfl.engine.victim import Victim


@dataclass(frozen=True)
class TrainTask:
    """Train ``clients`` for ``round`` (weights and the defence broadcast travel beside it, once per round)."""

    round: int
    clients: list[int]
    states: dict[int, dict] = field(default_factory=dict)  # states of clients the shard lacks a current copy of
    victims: list[int] = field(default_factory=list)  # clients attacked this round
    probe: bool = False  # held-out clients probed as victims: nothing trained for real, nothing kept


@dataclass(frozen=True)
class ClientReply:
    """One client's local training: its update (None for a probe), figures, state, and its victim if attacked."""

    client_id: int
    delta: np.ndarray | None
    samples: int
    steps: int
    loss: float
    accuracy: float
    time_s: float
    state: dict
    actor: int
    node_id: str
    victim: Victim | None = None
    defence: dict[str, float] = field(default_factory=dict)  # the defence's declared client figures
    attempt: int = 1  # set by the transport: 2 and more when the first actor died mid-round


@dataclass(frozen=True)
class EvalReply:
    """The global model on one client's local validation split: summed loss, correct count, samples."""

    client_id: int
    samples: int
    loss_sum: float
    correct: int
