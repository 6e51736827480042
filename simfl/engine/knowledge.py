"""What an attacker knows of the defence: the naive and the adaptive attacker, and when they are one.

Every attack runs naive (unaware of the defence) and, where the defence
discloses something, adaptive. Where the naive attacker already computes
exactly what the victim did, it *is* the adaptive one: the tidy metrics then
give it under both names, and the arms summary prints it once as
"naive = adaptive". Each defence declares when that holds
(``Defence.naive_is_exact``); this asks the run's defence.
"""

from __future__ import annotations

from collections.abc import Iterable

from simfl.engine.scenario import Scenario
from simfl.privacy.defences import DEFENCES


def naive_attacker_is_exact(scenario: Scenario) -> bool:
    """True where the naive attacker computes exactly what the victim did, so no adaptive one can do better.

    As the run's defence declares it: always without a defence; for BiDO in the
    gradient view at batch size 1, where its HSIC terms vanish.
    """
    return DEFENCES[scenario.defence.kind].naive_is_exact(scenario.attacks)


def naive_first(knowledges: Iterable[str]) -> list[str]:
    """The distinct attacker knowledge levels, naive first (as every table and figure shows them)."""
    return sorted(set(knowledges), key=lambda k: (k != "naive", k))
