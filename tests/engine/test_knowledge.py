"""Unit tests of simfl.engine.knowledge: when the naive attacker is exact, and the order attackers are shown in."""

from __future__ import annotations

from pathlib import Path

import pytest

from simfl.engine.knowledge import naive_attacker_is_exact, naive_first
from simfl.engine.scenario import load_scenario

SMOKE = Path(__file__).resolve().parents[2] / "scenarios" / "defences_smoke.yaml"
# Some of the smoke scenario's attacks need batch size 1 and the gradient view; these keep the ones that don't.
ANY_VIEW = "attacks.methods=[{kind: ig}, {kind: idlg}]"


@pytest.mark.parametrize(("overrides", "exact"), [
    (["defence.kind=none"], True),
    (["defence.kind=none", "attacks=null"], True),
    (["defence.kind=bido"], True),  # gradient view, batch size 1: the HSIC terms vanish
    (["defence.kind=bido", "attacks.batch_size=4", ANY_VIEW], False),
    (["defence.kind=bido", "attacks.view=update", ANY_VIEW], False),
    (["defence.kind=bido", "attacks=null"], False),
    (["defence.kind=dpsgd"], False),
    (["defence.kind=latent"], False),
])
def test_naive_attacker_is_exact(overrides, exact):
    assert naive_attacker_is_exact(load_scenario(SMOKE, ["arms=null", *overrides])) is exact


def test_every_arm_of_the_defence_comparison():
    sc = load_scenario(SMOKE)
    exact = {name: naive_attacker_is_exact(arm) for name, arm in sc.arm_scenarios().items()}
    assert exact == {"none": True, "dpsgd": False, "bido": True, "latent": False, "latent_local": False}


def test_naive_first():
    assert naive_first(["adaptive", "naive", "adaptive"]) == ["naive", "adaptive"]
    assert naive_first(["zeta", "adaptive"]) == ["adaptive", "zeta"]
    assert naive_first([]) == []
