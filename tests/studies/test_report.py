"""Reports: every figure drawn with data in every panel, a table behind each, for a study, arms and one run."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.figure import Figure

from simfl.studies import figures
from simfl.studies.report import main, write_report
from simfl.studies.study import main as study_main

ROOT = Path(__file__).resolve().parents[2]


def images_in(report: Path) -> list[Path]:
    return [report.parent / m for m in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())]


def assert_readable_png(path: Path) -> None:
    img = mpimg.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 300
    assert np.asarray(img[..., :3]).std() > 0.05  # not a blank canvas


def test_study_report_has_every_figure_and_the_numbers_behind_them(tiny_study, tmp_path):
    study_dir = tiny_study["dir"]
    report = study_dir / "report.md"  # the study wrote it at its end
    text = report.read_text()
    figs = {p.name for p in images_in(report)}
    assert figs == {"privacy_utility.png", "attack_by_round.png", "populations.png", "reconstructions.png"}
    for png in images_in(report):
        assert_readable_png(png)
    for section in ("## Matched-utility comparison", "## Privacy-utility curves", "## Attack success by round",
                    "## Populations", "### Generalization gap", "## Example reconstructions", "## Cells"):
        assert section in text
    # The numbers in the tables are the study's own: the cells table's utility is each cell's final
    # client validation accuracy as the run recorded it.
    evals = pd.read_parquet(study_dir / "cells" / "none__seed-0" / "client_evals")
    evals = evals[evals["round"] == evals["round"].max()]
    evals = evals[evals["population"] != "new_scanner"]
    acc = (evals["accuracy"] * evals["samples"]).sum() / evals["samples"].sum()
    row = next(line for line in text.splitlines() if line.startswith("| none__seed-0 |"))
    assert f"| {acc:.3f} |" in row
    # Held-out probes reach the generalization gap for attack metrics too.
    gap = text.split("### Generalization gap")[1].split("##")[0]
    assert "attacker_acc:adaptive" in gap and "psnr:naive" in gap


def test_report_cli_rewrites_a_study_report_with_another_target(tiny_study):
    study_dir = tiny_study["dir"]
    proc = subprocess.run([sys.executable, "-m", "simfl.report", str(study_dir), "--target", "0.15"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "utility client_val = 0.15" in (study_dir / "report.md").read_text()


def test_report_on_a_single_run_and_on_arms(tiny_study, tmp_path):
    run_dir = tiny_study["dir"] / "cells" / "dp_lo__seed-0"
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    report = write_report(copy)
    names = {p.name for p in images_in(report)}
    assert {"privacy_utility.png", "attack_by_round.png", "populations.png", "reconstructions.png"} <= names
    for png in images_in(report):
        assert_readable_png(png)
    assert "| dp_lo__seed-0 |" not in report.read_text() and "| run | finished | dpsgd |" in report.read_text()

    # Arms: a parent directory as `simfl.run` writes for a scenario with arms.
    parent = tmp_path / "arms"
    parent.mkdir()
    scenario = yaml.safe_load((run_dir / "scenario.yaml").read_text())
    scenario["arms"] = {"plain": {"defence": "none"}, "dp": {}}
    (parent / "scenario.yaml").write_text(yaml.safe_dump(scenario))
    shutil.copytree(tiny_study["dir"] / "cells" / "none__seed-0", parent / "plain")
    shutil.copytree(run_dir, parent / "dp")
    text = write_report(parent).read_text()
    assert "| plain | finished | none |" in text and "| dp | finished | dpsgd |" in text


def test_report_cli_errors_are_one_line(tmp_path):
    assert main([str(tmp_path / "missing")]) == 2
    assert main([str(tmp_path)]) == 2
    assert main([str(tmp_path), "--target", "1.5"]) == 2


def test_figures_skip_empty_data_rather_than_draw_empty_panels(tmp_path):
    empty = pd.DataFrame(columns=["context", "defence", "setting", "metric", "knowledge", "round", "value", "low",
                                  "high", "utility", "utility_low", "utility_high", "population", "held_out"])
    assert figures.privacy_utility(empty, 0.5, "client_val", tmp_path / "a.png") is None
    assert figures.attack_by_round(empty, tmp_path / "b.png") is None
    assert figures.population_bars(empty, tmp_path / "c.png", "t") is None
    assert figures.reconstruction_grid([], tmp_path / "d.png") is None
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("n_metrics", [1, 4])
def test_population_bars_lay_out_only_as_many_panels_as_metrics(tmp_path, n_metrics):
    rows = [{"context": "all", "defence": d, "setting": d, "population": p, "held_out": p == "b", "metric": f"m{k}",
             "value": 0.5, "low": 0.4, "high": 0.6, "interval": "seeds"}
            for d in ("none", "dpsgd") for p in ("a", "b") for k in range(n_metrics)]
    drawn = []
    original = Figure.savefig

    def spy(fig, *args, **kwargs):
        drawn.extend(len(ax.patches) for ax in fig.axes)
        return original(fig, *args, **kwargs)

    Figure.savefig = spy
    try:
        figures.population_bars(pd.DataFrame(rows), tmp_path / "p.png", "title")
    finally:
        Figure.savefig = original
    assert drawn == [4] * n_metrics  # 2 defences x 2 populations per panel, no empty panel


@pytest.mark.timeout(600)
def test_leave_one_population_out_study_reports_each_split(ray_local, tmp_path):
    """Each population held out in turn: one context per split, its own population figure and gaps."""
    spec = {
        "name": "lopo",
        "base": str(ROOT / "scenarios" / "defences_smoke.yaml"),
        "set": {"arms": None, "training.rounds": 2, "training.clients_per_round": 6, "training.local_epochs": 1,
                "evaluation.every": 2, "attacks.methods": [{"kind": "idlg", "iterations": 5}],
                "attacks.victims": 2, "attacks.rounds": [2], "attacks.held_out_victims": 2,
                "resources": {"client_actors": 1, "cpus_per_actor": 0.5},
                "attacks.pool": {"actors": 1, "cpus_per_actor": 0.5}},
        "grid": {"split": "leave_one_population_out"},
    }
    path = tmp_path / "lopo.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "lopo"
    assert study_main([str(path), "--out", str(out), "--quiet"]) == 0
    pops = ["central_lab", "rural_clinic", "new_scanner"]
    report = out / "report.md"
    names = {p.name for p in images_in(report)}
    for stem in ("populations", "privacy_utility", "attack_by_round"):  # one figure per split, never pooled
        assert names >= {f"{stem}_out-{p}.png" for p in pops} and f"{stem}.png" not in names
    for png in images_in(report):
        assert_readable_png(png)
    cells = pd.read_parquet(out / "cells.parquet")
    assert sorted(cells["context"]) == sorted(f"out-{p}" for p in pops)
    metrics = pd.read_parquet(out / "metrics.parquet")
    for p in pops:
        # The held-out population is the probed one: its attack rows are flagged held out in its own split only.
        mine = metrics[(metrics["context"] == f"out-{p}") & (metrics["metric"] == "attacker_acc")
                       & metrics["population"].notna() & metrics["round"].isna()]
        assert set(mine[mine["held_out"] == True]["population"]) == {p}  # noqa: E712
    gap = report.read_text().split("### Generalization gap")[1].split("\n## ")[0]
    assert all(f"| out-{p} | none | none | local_val_accuracy |" in gap for p in pops)
