"""Third-party plugins as users install them: real distributions found through entry points, no edit to simfl.

tests/plugins/ holds two distributions with their own metadata:
``simfl-example-plugin`` (a defence, ``round_update``, and an attack,
``class_mean``) and ``simfl-broken-plugin`` (one entry point whose module
raises on import, one whose attack takes a kind simfl already has). Each is
installed with pip into a folder of its own, and simfl runs in subprocesses
with those folders on ``PYTHONPATH``, as it would with the plugins installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest.mock import ANY

import pandas as pd
import pytest
import yaml

from simfl.core.plugins import REPORTED

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "tests" / "plugins"
WARNINGS = [
    "simfl: warning: attack plugin 'clash' (simfl-broken-plugin 0.0.1) not loaded: ValueError: attack 'ig' is "
    "registered twice (simfl.privacy.attacks.inverting.InvertingGradients and simfl_broken_plugin.clash.Clash)",
    "simfl: warning: defence plugin 'raises' (simfl-broken-plugin 0.0.1) not loaded: RuntimeError: the broken "
    "plugin fails on import",
]
SCENARIO = {
    "name": "with_plugins",
    "populations": [{"name": "a", "clients": 4}],
    "defence": {"kind": "round_update", "step": 0.001},
    "attacks": {"methods": [{"kind": "class_mean", "per_class": False}, {"kind": "ig", "iterations": 3}]},
}
# The scenario's plugins and their knobs, validated (defaults filled in), as the JSON schema offers them, and a
# plugin's knob out of its range.
VALIDATE = """
import json, sys
from simfl.core.errors import UserError
from simfl.engine.scenario import Scenario, load_scenario
sc = load_scenario(sys.argv[1])
schema = json.dumps(Scenario.model_json_schema())
try:
    load_scenario(sys.argv[1], ["defence.step=-1"])
except UserError as exc:
    error = str(exc)
print(json.dumps({"defence": sc.defence.model_dump(), "methods": [m.model_dump() for m in sc.attacks.methods],
                  "in_schema": [kind in schema for kind in ("round_update", "class_mean")], "error": error}))
"""


def _install(source: Path, into: Path) -> None:
    """pip-install the distribution at ``source`` into the folder ``into`` (built from a copy: the tree stays clean)."""
    copy = into.parent / f"{source.name}-src"
    shutil.copytree(source, copy)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--disable-pip-version-check", "--target", str(into), str(copy)],
                   check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """The folders the example and the broken plugin are installed in (about 4 s each here)."""
    tmp = tmp_path_factory.mktemp("plugins")
    folders = {"example": tmp / "example", "broken": tmp / "broken"}
    _install(PLUGINS / "simfl_example_plugin", folders["example"])
    _install(PLUGINS / "simfl_broken_plugin", folders["broken"])
    return folders


def _simfl(args: list[str], *path: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python args`` in the repository, with the plugin folders ``path`` on PYTHONPATH."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, path)))
    env.pop(REPORTED, None)  # as a process started from a shell: nothing reported yet
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_a_scenario_with_the_plugins_kinds_validates(installed, tmp_path):
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(SCENARIO))
    out = _simfl(["-c", VALIDATE, str(path)], installed["example"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr == ""  # nothing broken: nothing said
    parsed = json.loads(out.stdout)
    assert parsed["defence"] == {"kind": "round_update", "step": 0.001}
    assert parsed["methods"] == [{"kind": "class_mean", "per_class": False},
                                 {"kind": "ig", "iterations": 3, "lr": 0.1, "tv_weight": 0.1, "restarts": 1}]
    assert parsed["in_schema"] == [True, True]
    assert parsed["error"] == "scenario: defence.step: Input should be greater than 0 (got -1)"  # like a built-in's


def test_the_scenario_reference_lists_the_plugins_kinds_and_knobs(installed):
    script = "import sys; sys.path.insert(0, 'scripts'); from scenario_reference import reference; print(reference())"
    out = _simfl(["-c", script], installed["example"])
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.stdout.splitlines()]
    # Each kind's row (its config's docstring), then one row per knob with its default and description.
    kind = rows.index(["`round_update`", "", "", ANY])
    assert "rounds every parameter entry it shares" in rows[kind][3]
    knob = rows[kind + 1]
    assert knob[:2] == ["", "`step`"] and "0.0001" in knob[2] and knob[3].startswith("quantisation step")
    kind = rows.index(["`class_mean`", "", "", ANY])
    assert "mean of the server's images of each recovered label" in rows[kind][3]
    knob = rows[kind + 1]
    assert knob[:2] == ["", "`per_class`"] and "true" in knob[2] and knob[3].startswith("average the server's")


def test_the_plugin_contracts_hold_for_the_installed_plugins(installed):
    out = _simfl(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_plugin_contracts.py",
                  "-k", "round_update or class_mean"], installed["example"])
    assert out.returncode == 0, out.stdout[-5000:]
    # Four contracts for every defence and four for every attack, each run for the plugin's kind.
    assert "8 passed" in out.stdout.splitlines()[-1], out.stdout[-2000:]


def test_a_broken_plugin_names_itself_in_one_line_and_the_rest_still_load(installed):
    script = ("from simfl.engine.scenario import parse_scenario; from simfl.privacy.attacks import ATTACKS; "
              "sc = parse_scenario({'populations': [{'name': 'a', 'clients': 2}], 'defence': 'round_update', "
              "'attacks': {'methods': ['class_mean', 'ig']}}); "
              "print(sc.defence.kind, [m.kind for m in sc.attacks.methods], ATTACKS['ig'].__module__)")
    out = _simfl(["-c", script], installed["example"], installed["broken"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["round_update", "['class_mean',", "'ig']", "simfl.privacy.attacks.inverting"]
    assert out.stderr.splitlines() == WARNINGS


def test_a_scenario_naming_a_broken_plugin_gets_the_unknown_kind_error(installed, tmp_path):
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump({**SCENARIO, "defence": "half_loaded"}))  # the kind its failed module registered
    out = _simfl(["-m", "simfl.run", str(path)], installed["example"], installed["broken"])
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        *WARNINGS,
        "simfl: error: scenario: defence.kind: unknown defence; choose one of: none, bido, dpsgd, pruning, "
        "gaussian_noise, latent, round_update (plugins that failed to load: 'raises' (simfl-broken-plugin 0.0.1)) "
        "(got 'half_loaded')",
    ]
    assert not (ROOT / "runs" / "with_plugins").exists()


TINY_RUN = [
    "--set", "arms=null",
    "--set", "defence={kind: round_update, step: 0.0001}",
    "--set", "attacks.methods=[class_mean]",
    "--set", "data.synthetic={num_classes: 8, val_size: 300, test_size: 300}",
    "--set", "training.rounds=2", "--set", "training.clients_per_round=4", "--set", "training.local_epochs=1",
    "--set", "evaluation.every=2", "--set", "checkpoint.every=2",
    "--set", "attacks.rounds=[2]", "--set", "attacks.victims=3",
    "--set", "resources={client_actors: 1, cpus_per_actor: 0.5}",
    "--set", "attacks.pool={actors: 1, cpus_per_actor: 0.5}",
    "--num-cpus", "2", "--no-dashboard", "--quiet",
]


@pytest.mark.engine
@pytest.mark.timeout(900)
def test_a_run_uses_the_plugins_in_its_ray_workers(installed, tmp_path):
    out = _simfl(["-m", "simfl.run", "scenarios/defences_smoke.yaml", "--set", f"output.dir={tmp_path}",
                  "--set", "output.name=plug", *TINY_RUN], installed["example"], installed["broken"], timeout=900)
    assert out.returncode == 0, out.stderr[-5000:]
    # The broken plugin is reported once, by the driver: not again by each Ray worker loading it.
    assert [line for line in out.stderr.splitlines() if "simfl: warning" in line] == WARNINGS
    run = tmp_path / "plug"
    assert yaml.safe_load((run / "scenario.yaml").read_text())["defence"] == {"kind": "round_update", "step": 0.0001}
    # The clients (in the client actors) rounded what they shared, and logged it.
    clients = pd.read_parquet(run / "clients")
    assert len(clients) == 8 and clients["round_zeroed"].between(0, 1).all()
    # The attacker actor ran the plugin's attack: where it read the label right, its image is the class's mean,
    # exactly the class-mean baseline the engine scores beside every attack.
    attacks = pd.read_parquet(run / "attacks")
    assert set(attacks["attack"]) == {"class_mean"} and len(attacks) >= 3
    right = attacks[attacks["label_accuracy"] == 1.0]
    assert len(right) > 0
    assert (right["mse"] - right["class_mean_mse"]).abs().max() < 1e-6
