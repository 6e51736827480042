"""``simfl.simulate``: the command line's checks and results, from Python."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from engine_helpers import SMOKE_FAST, VOLATILE, final_weights, run_smoke, table

import simfl
from simfl.engine.scenario import load_scenario
from simfl.simulation.runner import main, scenario_from

SMOKE = "scenarios/smoke.yaml"
# The scenario's file, as a mapping and validated: simulate takes each.
SOURCES = {"file": SMOKE, "mapping": yaml.safe_load(Path(SMOKE).read_text()), "scenario": load_scenario(SMOKE)}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(("overrides", "key"), [
    (["training.lr=0.1"], "training.lr: unknown key"),
    ({"training.rounds": "ten"}, "training.rounds"),
    ({"populations.0.label_skew.alpha": 0}, "populations.0.label_skew.alpha"),
])
def test_bad_input_is_the_command_lines_one_line_and_writes_nothing(tmp_path, capsys, source, overrides, key):
    out = tmp_path / "runs"
    sets = [f"output.dir={out}"]
    items = ([*overrides, *sets] if isinstance(overrides, list)
             else {**overrides, "output.dir": str(out)})
    with pytest.raises(simfl.UserError) as err:
        simfl.simulate(SOURCES[source], items)
    message = str(err.value)
    assert key in message and "\n" not in message
    cli_sets = [f"{k}={v}" for k, v in overrides.items()] if isinstance(overrides, dict) else overrides
    assert main([SMOKE, *(a for s in [*cli_sets, *sets] for a in ("--set", s))]) == 2
    assert capsys.readouterr().err == f"simfl: error: {message}\n"
    assert not out.exists()


def test_a_key_in_the_scenario_mapping_itself_is_checked(tmp_path):
    raw = {**SOURCES["mapping"], "bogus": 1, "output": {"dir": str(tmp_path / "runs")}}
    with pytest.raises(simfl.UserError, match="^scenario: bogus: unknown key"):
        simfl.simulate(raw)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("source", SOURCES)
def test_a_mapping_of_overrides_is_laid_over_the_scenario_as_written_like_set(tmp_path, source):
    # Switching a plugin's kind: laid over the validated scenario (every knob of the old kind filled in), the
    # old knobs would be unknown keys of the new kind; laid over the scenario as written, both spellings agree.
    path = tmp_path / "noised.yaml"
    path.write_text(yaml.safe_dump({**SOURCES["mapping"], "defence": {"kind": "gaussian_noise", "sigma": 0.01}}))
    noised = {"file": path, "mapping": yaml.safe_load(path.read_text()), "scenario": load_scenario(path)}[source]
    keyed = scenario_from(noised, {"defence": {"kind": "pruning"}, "training.rounds": 2})
    assert keyed == scenario_from(noised, ["defence={kind: pruning}", "training.rounds=2"])
    assert keyed.defence.kind == "pruning" and keyed.training.rounds == 2


def test_resume_takes_no_scenario_and_needs_a_run_directory(tmp_path):
    with pytest.raises(simfl.UserError, match="drop the scenario and --set"):
        simfl.simulate(SMOKE, resume=tmp_path)
    with pytest.raises(simfl.UserError, match=r"not a run directory \(no scenario.yaml\)"):
        simfl.simulate(resume=tmp_path)
    with pytest.raises(simfl.UserError, match="expected a YAML file, a mapping or a Scenario, not int"):
        simfl.simulate(3)  # type: ignore[arg-type]


def test_simulate_writes_what_the_command_line_writes(ray_local, tmp_path):
    cli = run_smoke(tmp_path, "cli")
    sets = [s for s in SMOKE_FAST if s not in ("--set", "--quiet")]
    run = simfl.simulate(SMOKE, [*sets, f"output.dir={tmp_path}", "output.name=api"])
    assert run.path == tmp_path / "api"
    assert torch.equal(final_weights(run.path), final_weights(cli))
    for name in ("rounds", "clients", "evals", "client_evals"):
        ours = run.table(name).drop(columns=[c for c in VOLATILE if c in run.table(name).columns])
        keys = [c for c in ("round", "client_id", "population", "scope") if c in ours.columns]
        pd.testing.assert_frame_equal(ours.sort_values(keys).reset_index(drop=True), table(cli, name),
                                      check_exact=True)
    assert run.attacks.empty
