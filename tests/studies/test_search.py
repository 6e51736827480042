"""The search for a matched utility: found within tolerance on monotone toys, unreachable targets named."""

from __future__ import annotations

import math

import pytest

from simfl.privacy.defences.base import SearchKnob
from simfl.studies.search import Search, more_private


def run(search: Search, utility) -> Search:
    """Drive the search on a utility function of the knob, as a study drives it on runs."""
    while (value := search.next_value()) is not None:
        search.record(value, utility(value))
    return search


def test_finds_the_knob_within_tolerance_on_a_monotone_toy():
    # Utility falls linearly with a noise-like knob; the target 0.6 is reached at k = 4.
    search = run(Search(SearchKnob("sigma", 0.0, 10.0, log=False), 0.6, 0.005, budget=8), lambda k: 1 - k / 10)
    assert search.status() == "matched"
    assert search.chosen().value == pytest.approx(4.0, abs=0.05)
    assert abs(search.chosen().utility - 0.6) <= 0.005
    assert len(search.probes) <= 8


def test_log_knob_on_a_curved_monotone_toy():
    # Utility as a logistic in log σ, crossing 0.8 at σ = e^{log(0.3) + log(3)}: solved below.
    def utility(sigma: float) -> float:
        return 1 / (1 + math.exp(3 * (math.log(sigma) - math.log(0.3))))

    search = run(Search(SearchKnob("sigma", 0.01, 10.0), 0.2, 0.01, budget=8), utility)
    truth = 0.3 * math.exp(math.log(4) / 3)  # 1/(1+x^3)=0.2 with x = σ/0.3
    assert search.status() == "matched"
    assert abs(utility(search.chosen().value) - 0.2) <= 0.01
    assert search.chosen().value == pytest.approx(truth, rel=0.1)


def test_first_probes_are_the_bracket_ends_most_private_first():
    search = Search(SearchKnob("sigma", 0.1, 5.0), 0.5, 0.01, budget=5)
    assert search.next_value() == 5.0
    search.record(5.0, 0.1)
    assert search.next_value() == 0.1


def test_unreachable_target_is_reported_and_nothing_is_chosen():
    search = run(Search(SearchKnob("sigma", 0.1, 5.0), 0.9, 0.01, budget=6), lambda k: 0.5 - 0.01 * k)
    assert search.status() == "unreachable"
    assert search.chosen() is None
    assert len(search.probes) == 2  # both ends, then it stops: no budget wasted


def test_target_held_at_the_most_private_end():
    search = run(Search(SearchKnob("sigma", 0.1, 5.0), 0.3, 0.01, budget=6), lambda k: 0.9)
    assert search.status() == "at_bracket_end"
    assert search.chosen().value == 5.0 and len(search.probes) == 1


def test_budget_spent_gives_the_nearest_probe():
    # A step in utility: no knob value lands within tolerance.
    search = run(Search(SearchKnob("f", 0.0, 1.0, log=False), 0.5, 0.001, budget=4), lambda k: 0.9 if k < 0.37 else 0.1)
    assert search.status() == "nearest"
    assert len(search.probes) == 4
    assert search.chosen() == min(search.probes, key=lambda p: abs(p.utility - 0.5))


def test_knob_where_utility_rises_with_the_knob():
    # e.g. a kept fraction: more kept, more utility; the most private end is the low one.
    knob = SearchKnob("keep", 0.01, 1.0, falls=False, log=False)
    search = run(Search(knob, 0.5, 0.005, budget=8), lambda k: k)
    assert search.probes[0].value == 0.01
    assert search.chosen().value == pytest.approx(0.5, abs=0.01)
    assert more_private(knob, 0.2, 0.3) and not more_private(SearchKnob("s", 0.1, 1.0), 0.2, 0.3)


def test_tied_knobs_move_together():
    assert SearchKnob("a1", 0.01, 1.0, tied={"a2": 10.0}).settings(0.2) == {"a1": 0.2, "a2": 2.0}


@pytest.mark.parametrize("knob, message", [
    (SearchKnob("s", 1.0, 0.5), "must be below"),
    (SearchKnob("s", 0.0, 1.0, log=True), "log-scaled"),
])
def test_bad_brackets_are_rejected(knob, message):
    with pytest.raises(ValueError, match=message):
        Search(knob, 0.5, 0.01, budget=4)
