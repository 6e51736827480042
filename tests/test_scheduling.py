import numpy as np

from simfl.scheduling import RoundSchedule


def drain(schedule: RoundSchedule, order: list[int]) -> dict[int, list[int]]:
    """Let actors ask for work in the given repeating order until none is left."""
    taken: dict[int, list[int]] = {a: [] for a in set(order)}
    done = set()
    while len(done) < len(taken):
        for actor in order:
            chunk = schedule.next_for(actor)
            if chunk is None:
                done.add(actor)
            else:
                taken[actor].extend(chunk)
    return taken


def test_every_client_is_scheduled_exactly_once():
    owner = np.array([0, 1] * 50)
    sizes = np.arange(100) + 1
    clients = np.arange(0, 100, 3)
    taken = drain(RoundSchedule(clients, owner, sizes, 2), [0, 1])
    assert sorted(taken[0] + taken[1]) == clients.tolist()


def test_home_chunks_come_first_largest_first():
    owner = np.array([0] * 10 + [1] * 10)
    sizes = np.array(list(range(10, 0, -1)) * 2)
    schedule = RoundSchedule(np.arange(20), owner, sizes, 2, chunks_per_actor=5)
    first = schedule.next_for(0)
    assert all(owner[c] == 0 for c in first)
    assert sizes[first].min() >= sizes[owner == 0].max() - 1  # the two largest of actor 0's clients
    assert schedule.stolen == 0


def test_an_idle_actor_steals_from_the_busiest():
    # Actor 1 owns no client of this round: without stealing it would idle.
    owner = np.array([0] * 12 + [1] * 12)
    sizes = np.full(24, 10)
    clients = np.arange(12)
    taken = drain(RoundSchedule(clients, owner, sizes, 2), [0, 1])
    assert taken[1], "actor 1 took no work"
    assert all(owner[c] == 0 for c in taken[1])
    assert sorted(taken[0] + taken[1]) == clients.tolist()


def test_given_back_chunk_is_scheduled_again_first_at_home():
    owner = np.array([0, 0, 0, 0, 1])
    sizes = np.array([4, 3, 2, 1, 5])
    schedule = RoundSchedule(np.array([0, 1, 2, 3]), owner, sizes, 2, chunks_per_actor=2)
    lost = schedule.next_for(1)  # actor 1 has no client this round: it steals from actor 0
    assert all(owner[c] == 0 for c in lost) and schedule.stolen == 1
    schedule.give_back(lost)  # actor 1 died: the chunk goes back to actor 0's queue, in front
    assert schedule.next_for(0) == lost
