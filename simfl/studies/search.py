"""Matched utility by search: the knob value at which a defence reaches a target utility.

Comparing defences "at the same model utility" by interpolating along a grid
of knob settings fails in two ways: the grid may not bracket the target (the
defence then drops out, silently), and a curve through a few noisy points is
mostly seed noise. Instead, for each defence, seed and target, a study moves
the knob the defence declares monotone (:class:`simfl.privacy.defences.base.SearchKnob`)
until the run's utility is within a tolerance of the target, then attacks at
that setting. This module is the search alone: which knob value to try next
given the utilities seen so far. No runs, no Ray: :mod:`simfl.study` runs the
probes.

The search (regula falsi with bisection's guarantee), in the knob's own
coordinate (log when the knob is declared log-scaled):

1. the most private end of the bracket: if the defence already holds the
   target there, that is its setting (``status: at_bracket_end``; utility
   may stay above the target);
2. the least private end: if the defence misses the target even there, it
   cannot reach it (``status: unreachable``): the report names it excluded;
3. then points between the last probe above the target and the last below,
   by linear interpolation of utility, kept off the ends by a quarter of
   the interval (so noisy utilities cannot stall it), until a probe is
   within ``tolerance`` (``matched``) or the budget is spent (``nearest``:
   the probe closest to the target, its utility reported as achieved).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from simfl.privacy.defences.base import SearchKnob

Status = Literal["matched", "nearest", "at_bracket_end", "unreachable"]
# Interpolated points stay this share of the bracket away from its ends.
_MARGIN = 0.25


@dataclass(frozen=True)
class Probe:
    """One run of the search: the knob value tried and the utility it gave."""

    value: float
    utility: float


@dataclass
class Search:
    """The search for one defence, seed and target; feed it utilities, ask it what to try next."""

    knob: SearchKnob
    target: float
    tolerance: float
    budget: int
    probes: list[Probe] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.budget < 2:
            raise ValueError("a search needs a budget of at least 2 runs (the bracket's two ends)")
        if not self.knob.low < self.knob.high:
            raise ValueError(f"search bracket for {self.knob.name}: low {self.knob.low} must be below high "
                             f"{self.knob.high}")
        if self.knob.log and self.knob.low <= 0:
            raise ValueError(f"search bracket for {self.knob.name}: a log-scaled knob needs low > 0")

    # ------------------------------------------------------------ coordinates

    def _to(self, value: float) -> float:
        return math.log(value) if self.knob.log else value

    def _from(self, t: float) -> float:
        return math.exp(t) if self.knob.log else t

    @property
    def private_end(self) -> float:
        """The bracket end with most privacy (least utility)."""
        return self.knob.high if self.knob.falls else self.knob.low

    @property
    def utility_end(self) -> float:
        """The bracket end with least privacy (most utility)."""
        return self.knob.low if self.knob.falls else self.knob.high

    # ------------------------------------------------------------ the search

    def record(self, value: float, utility: float) -> None:
        """Add a finished probe."""
        self.probes.append(Probe(float(value), float(utility)))

    def _hit(self, p: Probe) -> bool:
        return abs(p.utility - self.target) <= self.tolerance

    def status(self) -> Status | None:
        """How the search ended; None while it goes on."""
        if not self.probes:
            return None
        first = self.probes[0]
        if first.utility >= self.target - self.tolerance:
            return "matched" if self._hit(first) else "at_bracket_end"
        if len(self.probes) >= 2 and self.probes[1].utility < self.target - self.tolerance:
            return "unreachable"
        if any(self._hit(p) for p in self.probes):
            return "matched"
        return "nearest" if len(self.probes) >= self.budget else None

    def next_value(self) -> float | None:
        """The knob value to try next; None when the search is over."""
        if self.status() is not None:
            return None
        if not self.probes:
            return self.private_end
        if len(self.probes) == 1:
            return self.utility_end
        above = [p for p in self.probes if p.utility > self.target]   # too little privacy
        below = [p for p in self.probes if p.utility < self.target]   # too much
        # The tightest bracket: the most private probe above the target, the least private below.
        a = min(above, key=lambda p: abs(self._to(p.value) - self._to(self.private_end)))
        b = min(below, key=lambda p: abs(self._to(p.value) - self._to(self.utility_end)))
        ta, tb = self._to(a.value), self._to(b.value)
        t = ta + (tb - ta) * (a.utility - self.target) / (a.utility - b.utility)
        lo, hi = min(ta, tb), max(ta, tb)
        margin = _MARGIN * (hi - lo)
        return self._from(min(max(t, lo + margin), hi - margin))

    def chosen(self) -> Probe | None:
        """The probe the defence is compared at; None when it cannot reach the target."""
        status = self.status()
        if status is None or status == "unreachable":
            return None
        if status == "at_bracket_end":
            return self.probes[0]
        return min(self.probes, key=lambda p: abs(p.utility - self.target))


def more_private(knob: SearchKnob, a: float, b: float) -> bool:
    """Whether knob value ``a`` is more private than ``b`` (how tuned recipes are ranked)."""
    return a > b if knob.falls else a < b
