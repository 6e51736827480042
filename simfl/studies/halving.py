"""Successive halving over the local learning rate and epochs: which settings go on, and which one wins.

A scenario's training settings decide whether its global model learns at all
(a shipped lr of 0.01 with few local steps left one user at 0.52 test accuracy
where central training reaches 0.99), so :mod:`simfl.calibrate` measures them
on the scenario's own data before anyone compares defences on it. This module
is the search alone, with no runs and no Ray: the candidates, the rungs, and
the ranking. A candidate's evaluation is a function handed in (the calibrate
driver runs Ray jobs; the tests pass a fake).

The grid: local learning rate ∈ {base/3, base, 3·base, 10·base} (each but the
base rounded to two significant digits) × local epochs ∈ {1, 2, 4}, where base
is the scenario's own lr; or the values given (``--lrs``, ``--epochs``). The
shipped setting (the scenario's own lr and epochs) is always a candidate,
added when the grid lacks it.

The schedule, for a round budget R: rungs of ⌈R/4⌉, ⌈R/2⌉ and R rounds
(equal rungs merged when R is small). Every candidate of a rung is a fresh run
of that many rounds (a run is not extended: ``--resume`` continues a run to
its own ``training.rounds``, never past it). After each rung but the last, the
best ⌈n/3⌉ of its n candidates go on, plus the shipped setting whatever its
rank, so that its result at the full budget is measured beside the winner's.

The ranking: candidates that reached the target utility first (at the earliest
evaluated round), then those that never did; within each, the higher final
utility; then the grid's order (so equal runs give the same choice). A failed
run ranks last and does not go on.

"Reached" and "final" are read off the trailing mean of the last ``window``
evaluated rounds (fewer while a run has fewer), not off single rounds: on
non-IID clients the global model's accuracy swings by 0.2–0.4 from one round
to the next (measured on noniid_500's synthetic data), so a first crossing
picks the luckiest spike (a candidate that "reached" 0.3 at round 9 ended at
0.13) and a last round is a coin toss. A candidate reaches the target at the
first round, from the ``window``-th on, whose trailing mean is at or above it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

LR_FACTORS = (1 / 3, 1.0, 3.0, 10.0)
EPOCHS = (1, 2, 4)
# Rung budgets: R / d for each divisor d, in this order.
RUNG_DIVISORS = (4, 2, 1)
# After a rung of n candidates, the best ceil(n / KEEP_DIVISOR) go on.
KEEP_DIVISOR = 3
# Evaluated rounds in the trailing mean that "reached" and "final" are read from.
WINDOW = 5

Curve = tuple[tuple[int, float], ...]  # (evaluated round, utility), in round order


@dataclass(frozen=True)
class Candidate:
    """One local training setting: learning rate and local epochs; ``shipped``: the scenario's own."""

    lr: float
    local_epochs: int
    shipped: bool = False

    @property
    def name(self) -> str:
        """A directory-safe name: ``lr0.03_ep2``."""
        return f"lr{self.lr:g}_ep{self.local_epochs}"


@dataclass(frozen=True)
class Result:
    """One candidate's run in one rung: the utility at every evaluated round (empty: the run failed).

    ``window``: evaluated rounds in the trailing mean read for "reached" and "final" (1: single rounds).
    """

    candidate: Candidate
    rung: int  # 1-based
    rounds: int  # the rung's budget
    curve: Curve
    window: int = 1

    @property
    def failed(self) -> bool:
        """The run gave no evaluation (it failed)."""
        return not self.curve

    def trailing(self) -> list[tuple[int, float]]:
        """(round, mean utility of the last ``window`` evaluated rounds up to it), from the ``window``-th
        evaluated round on (from the last one when the run has fewer)."""
        values = [u for _, u in self.curve]
        w = min(self.window, len(values))
        return [(self.curve[i][0], sum(values[i - w + 1 : i + 1]) / w) for i in range(w - 1, len(values))]

    @property
    def final(self) -> float:
        """The mean utility of the last ``window`` evaluated rounds; NaN for a failed run."""
        return self.trailing()[-1][1] if self.curve else math.nan

    def rounds_to_target(self, target: float) -> int | None:
        """The first evaluated round whose trailing mean reaches ``target``; None if none did."""
        return next((r for r, u in self.trailing() if u >= target), None)


@dataclass(frozen=True)
class Halving:
    """What the search did: each rung's results, best first, and the winner of the last rung."""

    target: float
    budget: int
    rungs: list[list[Result]]
    window: int = 1

    @property
    def best(self) -> Result | None:
        """The top of the last rung run; None when every run of it failed."""
        top = self.rungs[-1][0] if self.rungs and self.rungs[-1] else None
        return None if top is None or top.failed else top

    @property
    def total_rounds(self) -> int:
        """Rounds trained over every run of every rung."""
        return sum(r.rounds for rung in self.rungs for r in rung)

    def last(self, candidate: Candidate) -> Result:
        """The candidate's result in the last rung it ran."""
        return next(r for rung in reversed(self.rungs) for r in rung if r.candidate == candidate)

    def candidates(self) -> list[Candidate]:
        """Every candidate, in the grid's order (the first rung's)."""
        return sorted((r.candidate for r in self.rungs[0]), key=lambda c: (c.lr, c.local_epochs))


def round_lr(value: float) -> float:
    """A learning rate to two significant digits (0.0333… → 0.033)."""
    return float(f"{value:.2g}")


def lr_grid(base: float) -> list[float]:
    """The default learning rates around ``base``: base/3, base, 3·base, 10·base; base kept exact."""
    return sorted({base if f == 1.0 else round_lr(base * f) for f in LR_FACTORS})


def make_candidates(base_lr: float, base_epochs: int, lrs: Sequence[float] | None = None,
                    epochs: Sequence[int] | None = None) -> list[Candidate]:
    """The grid ``lrs × epochs`` (defaults: :func:`lr_grid`, :data:`EPOCHS`) with the shipped setting in it.

    Sorted by (lr, epochs); exactly one candidate is ``shipped``.
    """
    lr_values = lr_grid(base_lr) if lrs is None else sorted(set(lrs))
    epoch_values = sorted(set(EPOCHS if epochs is None else epochs))
    grid = {(lr, e) for lr in lr_values for e in epoch_values} | {(base_lr, base_epochs)}
    return [Candidate(lr, e, shipped=(lr, e) == (base_lr, base_epochs)) for lr, e in sorted(grid)]


def rung_rounds(budget: int) -> list[int]:
    """Each rung's rounds for a budget of ``budget``: ⌈R/4⌉, ⌈R/2⌉, R, equal ones merged."""
    if budget < 1:
        raise ValueError(f"a round budget must be at least 1 (got {budget})")
    return sorted({math.ceil(budget / d) for d in RUNG_DIVISORS})


def keep_count(n: int) -> int:
    """How many of a rung's ``n`` candidates go on (before the shipped one is added back)."""
    return math.ceil(n / KEEP_DIVISOR)


def rank(results: Sequence[Result], target: float) -> list[Result]:
    """Best first: reached the target (earliest round first), then not; higher final utility; grid order."""
    def key(r: Result) -> tuple[int, float, float, float, int]:
        if r.failed or math.isnan(r.final):
            return (2, 0.0, 0.0, r.candidate.lr, r.candidate.local_epochs)
        reached = r.rounds_to_target(target)
        return (0 if reached is not None else 1, float(reached or 0), -r.final, r.candidate.lr,
                r.candidate.local_epochs)
    return sorted(results, key=key)


Evaluate = Callable[[int, int, list[Candidate]], dict[Candidate, Curve]]


def successive_halving(candidates: Sequence[Candidate], budget: int, target: float,
                       evaluate: Evaluate, window: int = WINDOW) -> Halving:
    """Run the rungs: ``evaluate(rung, rounds, candidates)`` gives each candidate's curve (missing: failed);
    ``window``: see :class:`Result`."""
    if not candidates:
        raise ValueError("no candidates to calibrate")
    alive = list(candidates)
    rungs: list[list[Result]] = []
    schedule = rung_rounds(budget)
    for k, rounds in enumerate(schedule, start=1):
        curves = evaluate(k, rounds, alive)
        ranked = rank([Result(c, k, rounds, tuple(curves.get(c, ())), window) for c in alive], target)
        rungs.append(ranked)
        if k == len(schedule):
            break
        going = [r.candidate for r in ranked[:keep_count(len(ranked))] if not r.failed]
        going += [r.candidate for r in ranked if r.candidate.shipped and not r.failed and r.candidate not in going]
        if not going:
            break
        alive = sorted(going, key=lambda c: (c.lr, c.local_epochs))
    return Halving(target, budget, rungs, window)
