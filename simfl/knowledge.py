"""What an attacker knows of the defence: the naive and the adaptive attacker, and when they are one.

Every attack runs naive (unaware of the defence) and, where the defence
discloses something, adaptive. Where the naive attacker already computes
exactly what the victim did, it *is* the adaptive one: the tidy metrics then
give it under both names, and the arms summary prints it once as
"naive = adaptive". That rule lives here only, as one function of the run's
scenario, so that each defence can later declare it for itself.
"""

from __future__ import annotations

from collections.abc import Iterable

from simfl.config import Scenario


def naive_attacker_is_exact(scenario: Scenario) -> bool:
    """True where the naive attacker computes exactly what the victim did, so no adaptive one can do better.

    No defence; or BiDO in the gradient view at batch size 1, where its HSIC
    terms vanish (one sample shows no dependence).
    """
    kind = scenario.defence.kind
    return kind == "none" or (
        kind == "bido" and scenario.attacks is not None and scenario.attacks.view == "gradient"
        and scenario.attacks.batch_size == 1)


def naive_first(knowledges: Iterable[str]) -> list[str]:
    """The distinct attacker knowledge levels, naive first (as every table and figure shows them)."""
    return sorted(set(knowledges), key=lambda k: (k != "naive", k))
