"""The arms summary, read from hand-written arm directories: every figure worked out by hand."""

from __future__ import annotations

import shutil

import pytest
from analysis_helpers import SMOKE, attack_row, make_run, naive_attacks

from simfl.results.summary import arms_table

# Arm none: the hand-written run of analysis_helpers (naive attacks only, training population A plus a
# held-out probe in C). Arm latent: the same, and an adaptive ig attacker on A (acc .5, MSE .8, PSNR 6, SSIM 0).
# Arm bido: no attacks. Arm dpsgd: never started.
ADAPTIVE = [attack_row(1, "A", "ig", "adaptive", False, 0.9, 5.0, 0.0),
            attack_row(2, "A", "ig", "adaptive", True, 0.7, 7.0, 0.0)]
HEAD = "| 0.750 | 0.733 | 2.50"  # client val acc: (10·0.5 + 30·0.9 + 20·0.6) / 60 over the training clients
# Wilson 2/4 = [0.15, 0.85], 3/4 = [0.30, 0.95]; ig's normal intervals: half-width 1.96 s / 2 with
# s = 0.0577 (MSE), 1.155 (PSNR), 0.1155 (SSIM).
GI = "| gi | {} | 4 | 0.50 [0.15, 0.85] | 0.050 [0.050, 0.050] | 25.0 [25.0, 25.0] | 0.30 [0.30, 0.30] |"
IG = "| ig | {} | 4 | 0.75 [0.30, 0.95] | 0.150 [0.093, 0.207] | 21.0 [19.9, 22.1] | 0.50 [0.39, 0.61] |"


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    parent = tmp_path_factory.mktemp("arms")
    shutil.copy(SMOKE, parent / "scenario.yaml")
    make_run(parent, naive_attacks(), name="none")
    make_run(parent, naive_attacks() + ADAPTIVE, "defence.kind=latent", name="latent")
    make_run(parent, [], "defence.kind=bido", name="bido")
    return arms_table(parent).splitlines()


def test_rows_per_arm_attack_and_attacker(table):
    assert table[:2] == [
        "| arm | defence | test acc | client val acc | ε (max) | attack | attacker | images | attacker acc | MSE "
        "| PSNR | SSIM |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    assert table[2:8] == [
        f"| none | none {HEAD} {GI.format('naive = adaptive')}",  # the naive attacker is exact: one row
        f"| none | none {HEAD} {IG.format('naive = adaptive')}",
        f"| bido | bido {HEAD} | – | – | – | – | – | – | – |",
        f"| latent | latent {HEAD} {GI.format('naive')}",
        f"| latent | latent {HEAD} | ig | adaptive | 2 | 0.50 [0.09, 0.91] | 0.800 [0.604, 0.996] | 6.0 [4.0, 8.0] "
        "| 0.00 [0.00, 0.00] |",
        f"| latent | latent {HEAD} {IG.format('naive')}",
    ]


def test_held_out_probes_are_left_out_and_said_so(table):
    assert table[8:10] == ["", "Means over every attacked image, with 95 % intervals (Wilson for attacker accuracy; "
                           "normal approximation for the others). The rows without an attack score image-free "
                           "guesses on the same victims: an attack shows the instance only where it beats the class "
                           "mean of the label, which batch-size-1 gradients give away. Held-out probes are left out "
                           "here: see `python -m simfl.studies.report`."]


def test_worst_case_over_attacks_and_attackers(table):
    assert table[10:] == [
        "", "Worst case over attacks and attacker knowledge (what a defence must be judged by), with the attack that "
        "reached it:", "",
        "| arm | defence | test acc | ε (max) | worst attacker acc | worst PSNR | worst SSIM | lowest MSE |",
        "|---|---|---|---|---|---|---|---|",
        "| none | none | 0.750 | 2.50 | 0.750 (ig) | 25.00 (gi) | 0.500 (ig) | 0.0500 (gi) |",
        "| latent | latent | 0.750 | 2.50 | 0.750 (ig, naive) | 25.00 (gi, naive) | 0.500 (ig, naive) "
        "| 0.0500 (gi, naive) |",
    ]


def test_image_free_guesses_stand_beside_the_attacks(tmp_path):
    # Two attacks on the same two images (rounds 1 and 2 of client 0): each image's guesses are counted once.
    # Global mean: (F, .3, 10, .1) and (F, .5, 8, .3); class mean: (T, .2, 12, .2) and (T, .2, 14, .4).
    guesses = {1: {"mean_attacker_correct": False, "mean_mse": 0.3, "mean_psnr": 10.0, "mean_ssim": 0.1,
                   "class_mean_attacker_correct": True, "class_mean_mse": 0.2, "class_mean_psnr": 12.0,
                   "class_mean_ssim": 0.2},
               2: {"mean_attacker_correct": False, "mean_mse": 0.5, "mean_psnr": 8.0, "mean_ssim": 0.3,
                   "class_mean_attacker_correct": True, "class_mean_mse": 0.2, "class_mean_psnr": 14.0,
                   "class_mean_ssim": 0.4}}
    rows = [{**attack_row(r, "A", attack, "naive", True, 0.1, 20.0), "image": 0, **guesses[r]}
            for attack in ("ig", "gi") for r in (1, 2)]
    parent = tmp_path / "arms"
    parent.mkdir()
    shutil.copy(SMOKE, parent / "scenario.yaml")
    make_run(parent, rows, name="none")
    lines = arms_table(parent).splitlines()
    assert lines[4:6] == [
        f"| none | none {HEAD} | (global mean image) | no attack | 2 | 0.00 [0.00, 0.66] | 0.400 [0.204, 0.596] "
        "| 9.0 [7.0, 11.0] | 0.20 [0.00, 0.40] |",
        f"| none | none {HEAD} | (class mean of the label) | no attack | 2 | 1.00 [0.34, 1.00] "
        "| 0.200 [0.200, 0.200] | 13.0 [11.0, 15.0] | 0.30 [0.10, 0.50] |",
    ]
