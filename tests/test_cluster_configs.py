"""The `ray up` configs in cluster/ are valid for the installed Ray and follow project rules.

Validation repeats what `ray up` does before it touches a cloud
(ray.autoscaler._private.commands._bootstrap_config): load the YAML with
yaml.safe_load, `prepare_config` (merge the provider's defaults.yaml, fold
setup_commands into head/worker setup, fill node-type worker bounds), then
`validate_config` (jsonschema against ray/autoscaler/ray-schema.json shipped in
the ray package, plus its cross-field checks). The only step skipped is the
provider's resource autodetection, which needs cloud credentials; the AWS config
states its resources explicitly, so that step cannot change the outcome.

The rules are checked on the merged config, because any start command a file
leaves out is taken from Ray's defaults, and the AWS default binds the
dashboard to 0.0.0.0.
"""

from __future__ import annotations

import copy
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from simfl.simulation.runner import RAY_SYSTEM_CONFIG

REPO = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO / "cluster"
EXPECTED = {"aws-gpu.yaml", "onprem.yaml"}
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def ray_up_validate(config: dict) -> dict:
    """The validation half of `ray up`; returns the merged config it would run."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def ray_starts(command: str) -> list[tuple[list[str], list[str]]]:
    """(what precedes `ray`, the arguments after `start`) of every `ray start` in a shell command line
    (`a; b && c` aware)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    segments: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set(";&|()<>"):
            segments.append([])
        else:
            segments[-1].append(token)
    return [
        (seg[:i], seg[i + 2 :])
        for seg in segments
        for i in range(len(seg) - 1)
        if Path(seg[i]).name == "ray" and seg[i + 1] == "start"
    ]


def ray_start_invocations(command: str) -> list[list[str]]:
    """Argument lists of every `ray start` in a shell command line."""
    return [args for _, args in ray_starts(command)]


def ray_start_environments(command: str) -> list[dict[str, str]]:
    """The ``NAME=value`` assignments in front of every `ray start` of a shell command line."""
    return [dict(token.split("=", 1) for token in before) for before, _ in ray_starts(command)]


def flag_values(args: list[str], flag: str) -> list[str]:
    """Values of `--flag=value` and `--flag value` in an argument list."""
    values = [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]
    values += [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]
    return values


def dashboard_violations(merged: dict) -> list[str]:
    """Head `ray start` commands that do not bind the dashboard to 127.0.0.1, or that no head starts."""
    commands = merged["head_start_ray_commands"] + merged["worker_start_ray_commands"]
    heads = [args for cmd in commands for args in ray_start_invocations(cmd) if "--head" in args]
    if not heads:
        return ["no `ray start --head` in head_start_ray_commands"]
    return [
        "ray start " + " ".join(args)
        for args in heads
        if flag_values(args, "--dashboard-host") != ["127.0.0.1"]
    ]


def cluster_files() -> list[Path]:
    """Every YAML in cluster/ plus the expected ones, so a missing file fails rather than vanishes."""
    return sorted({CLUSTER_DIR / name for name in EXPECTED} | set(CLUSTER_DIR.glob("*.yaml")))


def test_expected_cluster_configs_exist():
    missing = sorted(name for name in EXPECTED if not (CLUSTER_DIR / name).is_file())
    assert missing == [], f"missing from cluster/: {missing}"


def test_schema_ships_with_ray():
    # validate_config reads this file; a Ray upgrade that moves it must fail here, loudly.
    assert SCHEMA.is_file(), SCHEMA


@pytest.fixture(params=cluster_files(), ids=lambda p: p.name)
def config_file(request) -> Path:
    return request.param


def test_validates_like_ray_up(config_file):
    merged = ray_up_validate(load(config_file))
    assert merged["cluster_name"].startswith("simfl")


def test_dashboard_bound_to_loopback(config_file):
    assert dashboard_violations(ray_up_validate(load(config_file))) == []


def test_no_command_opens_dashboard_elsewhere(config_file):
    merged = ray_up_validate(load(config_file))
    every = [
        cmd
        for key in (
            "initialization_commands",
            "head_setup_commands",
            "worker_setup_commands",
            "head_start_ray_commands",
            "worker_start_ray_commands",
        )
        for cmd in merged[key]
    ]
    hosts = {h for cmd in every for args in ray_start_invocations(cmd) for h in flag_values(args, "--dashboard-host")}
    assert hosts <= {"127.0.0.1"}


def test_setup_installs_simfl_from_synced_checkout(config_file):
    merged = ray_up_validate(load(config_file))
    # `ray up` hands relative local paths to rsync unchanged, so they resolve against
    # the directory it runs in; the configs document running it from the repo root.
    mounts = {
        remote.rstrip("/"): (REPO / local).resolve()
        for remote, local in merged["file_mounts"].items()
        if not remote.startswith("~/ray_bootstrap")
    }
    checkout_mounts = [remote for remote, local in mounts.items() if local == REPO]
    assert checkout_mounts, f"no file_mounts entry syncs the repository root: {merged['file_mounts']}"
    assert (REPO / "pyproject.toml").is_file()

    for role in ("head_setup_commands", "worker_setup_commands"):
        installs = [shlex.split(cmd) for cmd in merged[role] if "pip install" in cmd]
        editable = [
            args[i + 1].rstrip("/")
            for args in installs
            for i, a in enumerate(args[:-1])
            if a in ("-e", "--editable")
        ]
        assert set(editable) & set(checkout_mounts), f"{role} does not `pip install -e` the synced checkout"


def test_cluster_ray_matches_launcher_and_project(config_file):
    pinned = f"ray[default]=={ray.__version__}"
    merged = ray_up_validate(load(config_file))
    for role in ("head_setup_commands", "worker_setup_commands"):
        assert any(pinned in shlex.split(cmd) for cmd in merged[role]), f"{role} must install {pinned}"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pinned in project["project"]["dependencies"]


@pytest.mark.parametrize(
    "break_config",
    [
        pytest.param(lambda c: c.update(setup_comands=c["setup_commands"]), id="unknown-top-level-key"),
        pytest.param(lambda c: c.update(idle_timeout_minutes="10"), id="number-given-as-string"),
    ],
)
def test_validator_rejects_broken_copy(config_file, break_config):
    config = load(config_file)
    ray_up_validate(config)
    broken = copy.deepcopy(config)
    break_config(broken)
    with pytest.raises(jsonschema.ValidationError):
        ray_up_validate(broken)


def test_dashboard_check_catches_ray_default_start_commands(config_file):
    # Without its own head_start_ray_commands a config inherits Ray's: AWS binds
    # the dashboard to 0.0.0.0, local leaves the host implicit. Both must be caught.
    config = load(config_file)
    del config["head_start_ray_commands"]
    assert dashboard_violations(ray_up_validate(config)) != []


def test_every_node_starts_ray_with_the_engines_settings(config_file):
    """The settings a local instance gets (simfl.simulation.runner.RAY_SYSTEM_CONFIG) on every node of a cluster too."""
    merged = ray_up_validate(load(config_file))
    expected = {f"RAY_{name}": str(value) for name, value in RAY_SYSTEM_CONFIG.items()}
    starts = [env for key in ("head_start_ray_commands", "worker_start_ray_commands")
              for cmd in merged[key] for env in ray_start_environments(cmd)]
    assert len(starts) == 2 and all(env == expected for env in starts), starts
