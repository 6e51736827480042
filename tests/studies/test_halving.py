"""Successive halving with a fake evaluation: the grid, the rungs, who goes on, and who wins."""

from __future__ import annotations

import math

import pytest

from simfl.studies.halving import (
    Candidate,
    Result,
    keep_count,
    lr_grid,
    make_candidates,
    rank,
    rung_rounds,
    successive_halving,
)


def curve(values: list[float]) -> tuple[tuple[int, float], ...]:
    return tuple((r, v) for r, v in enumerate(values, start=1))


def result(lr: float, values: list[float], epochs: int = 1, rounds: int | None = None) -> Result:
    return Result(Candidate(lr, epochs), 1, rounds or len(values), curve(values))


class FakeRuns:
    """Utility rises linearly at a per-candidate speed to a per-candidate ceiling; every call is logged."""

    def __init__(self, speed, ceiling, fail=()):
        self.speed, self.ceiling, self.fail = speed, ceiling, set(fail)
        self.calls: list[tuple[int, int, list[Candidate]]] = []

    def __call__(self, rung, rounds, alive):
        self.calls.append((rung, rounds, list(alive)))
        return {c: curve([min(self.ceiling(c), self.speed(c) * r) for r in range(1, rounds + 1)])
                for c in alive if (c.lr, c.local_epochs) not in self.fail}


def test_default_grid_is_four_lrs_by_three_epochs_with_the_shipped_setting():
    assert lr_grid(0.01) == [0.0033, 0.01, 0.03, 0.1]
    assert lr_grid(0.05) == [0.017, 0.05, 0.15, 0.5]
    cands = make_candidates(0.01, 4)
    assert len(cands) == 12
    assert [c for c in cands if c.shipped] == [Candidate(0.01, 4, shipped=True)]
    assert {c.local_epochs for c in cands} == {1, 2, 4}


def test_the_shipped_setting_is_added_when_the_grid_lacks_it():
    cands = make_candidates(0.02, 3, lrs=[0.1, 0.01], epochs=[1])
    assert [(c.lr, c.local_epochs, c.shipped) for c in cands] == [(0.01, 1, False), (0.02, 3, True), (0.1, 1, False)]
    # An lr off the default grid's rounding stays exact: the shipped setting is measured as shipped.
    assert [c.lr for c in make_candidates(0.0123, 2) if c.shipped] == [0.0123]


def test_rungs_are_a_quarter_half_and_whole_budget():
    assert rung_rounds(12) == [3, 6, 12]
    assert rung_rounds(30) == [8, 15, 30]
    assert rung_rounds(2) == [1, 2]
    assert rung_rounds(1) == [1]
    with pytest.raises(ValueError):
        rung_rounds(0)
    assert [keep_count(n) for n in (1, 2, 3, 4, 12, 13)] == [1, 1, 1, 2, 4, 5]


def test_rank_by_rounds_to_target_then_final_utility():
    fast_low = result(0.1, [0.5, 0.91, 0.92])     # reaches 0.9 at round 2
    slow_high = result(0.2, [0.3, 0.6, 0.99])     # reaches at round 3
    never_high = result(0.3, [0.2, 0.5, 0.89])
    never_low = result(0.4, [0.1, 0.2, 0.3])
    tie_a = result(0.05, [0.5, 0.9, 0.90])        # reaches at 2 like fast_low, lower final
    failed = Result(Candidate(0.01, 1), 1, 3, ())
    ranked = rank([never_low, failed, slow_high, never_high, tie_a, fast_low], 0.9)
    assert [r.candidate.lr for r in ranked] == [0.1, 0.05, 0.2, 0.3, 0.4, 0.01]
    assert fast_low.rounds_to_target(0.9) == 2 and never_high.rounds_to_target(0.9) is None
    assert failed.failed and math.isnan(failed.final)


def test_equal_results_rank_in_grid_order():
    a, b = result(0.1, [0.5], epochs=2), result(0.1, [0.5], epochs=1)
    assert [r.candidate.local_epochs for r in rank([a, b], 0.9)] == [1, 2]


def test_halving_keeps_a_third_plus_the_shipped_setting_and_respects_the_budget():
    cands = make_candidates(0.01, 4)
    # Faster with larger lr·epochs, except the largest lr diverges to a low ceiling.
    runs = FakeRuns(speed=lambda c: c.lr * c.local_epochs, ceiling=lambda c: 0.3 if c.lr >= 0.1 else 0.95)
    h = successive_halving(cands, 12, 0.9, runs)
    assert [(rung, rounds, len(alive)) for rung, rounds, alive in runs.calls] == [(1, 3, 12), (2, 6, 5), (3, 12, 3)]
    assert [len(r) for r in h.rungs] == [12, 5, 3]
    # Every run within the budget, and the total is what the rungs add up to.
    assert max(rounds for _, rounds, _ in runs.calls) == 12
    assert h.total_rounds == 12 * 3 + 5 * 6 + 3 * 12
    # The shipped setting ran at every rung although it was not among the best.
    shipped = Candidate(0.01, 4, shipped=True)
    assert all(shipped in alive for _, _, alive in runs.calls)
    assert shipped not in [r.candidate for r in h.rungs[0][:4]]
    assert h.best is not None and h.best.candidate == Candidate(0.03, 4)
    # 0.12 per round up to 0.95: round 8 is the first single round at 0.9, round 11 the first whose
    # trailing mean of 5 (0.84 and four 0.95) is.
    assert h.best.rounds_to_target(0.9) == 11 and h.window == 5
    assert h.last(shipped).rounds == 12 and h.last(Candidate(0.0033, 1)).rounds == 3


def test_halving_is_deterministic():
    cands = make_candidates(0.05, 2)
    def fake():
        return FakeRuns(speed=lambda c: 0.1, ceiling=lambda c: 0.5)  # every candidate alike: grid order decides
    a = successive_halving(cands, 8, 0.9, fake())
    b = successive_halving(list(reversed(cands)), 8, 0.9, fake())
    assert a.rungs == b.rungs
    assert a.best is not None and a.best.candidate == Candidate(0.017, 1)


def test_a_failed_run_ranks_last_and_does_not_go_on():
    cands = make_candidates(0.01, 1, lrs=[0.01, 0.1, 1.0], epochs=[1])
    runs = FakeRuns(speed=lambda c: c.lr, ceiling=lambda c: 0.95, fail={(1.0, 1)})
    h = successive_halving(cands, 4, 0.9, runs)
    assert h.rungs[0][-1].candidate.lr == 1.0 and h.rungs[0][-1].failed
    assert [c.lr for c in runs.calls[1][2]] == [0.01, 0.1]  # the best (0.1) and the shipped one
    assert h.best is not None and h.best.candidate.lr == 0.1


def test_every_run_failing_has_no_best():
    cands = make_candidates(0.01, 1, lrs=[0.01], epochs=[1])
    runs = FakeRuns(speed=lambda c: 0.1, ceiling=lambda c: 0.5, fail={(0.01, 1)})
    h = successive_halving(cands, 4, 0.9, runs)
    assert h.best is None and len(h.rungs) == 1


def test_a_single_spike_does_not_reach_the_target_and_final_is_the_trailing_mean():
    spiky = Result(Candidate(0.1, 1), 1, 10, curve([0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9, 0.1]), window=5)
    steady = Result(Candidate(0.01, 1), 1, 10, curve([0.1, 0.2, 0.3, 0.35, 0.35, 0.35, 0.35, 0.35, 0.35, 0.3]),
                    window=5)
    assert spiky.rounds_to_target(0.3) is None and spiky.final == pytest.approx(0.26)
    assert steady.rounds_to_target(0.3) == 6 and steady.final == pytest.approx(0.34)
    assert [r.candidate for r in rank([spiky, steady], 0.3)] == [steady.candidate, spiky.candidate]
    # Read off single rounds (window 1), the spike would have won.
    single = [Result(r.candidate, 1, 10, r.curve, window=1) for r in (spiky, steady)]
    assert single[0].rounds_to_target(0.3) == 9 and single[1].rounds_to_target(0.3) == 3
    assert single[0].final == 0.1


def test_a_run_shorter_than_the_window_is_read_off_all_its_rounds():
    short = Result(Candidate(0.1, 1), 1, 3, curve([0.2, 0.4, 0.9]), window=5)
    assert short.trailing() == [(3, pytest.approx(0.5))]
    assert short.final == pytest.approx(0.5) and short.rounds_to_target(0.5) == 3
    assert short.rounds_to_target(0.6) is None
