"""Contracts every registered plugin keeps, checked for each one: a new defence or attack is covered here unchanged.

Defences: building draws no random numbers and gives the same weight layout in
every process; server state survives a checkpoint; ``share`` keeps the update's
shape; everything logged is a declared column; what an attacker is told is
well-formed. Attacks: built from their config, batched results equal single
ones, and adapting to a disclosure changes what they differentiate.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from attack_helpers import assert_batched_equals_single, victims

from simfl.core.config import ModelConfig, TrainingConfig
from simfl.core.models import build_model
from simfl.core.seeding import torch_generator
from simfl.core.training import train_client
from simfl.core.weights import FlatWeights
from simfl.data import Dataset
from simfl.engine.run_tables import CLIENT_DEFENCE_COLUMNS, ROUND_DEFENCE_COLUMNS, SCHEMAS
from simfl.engine.scenario import parse_scenario
from simfl.privacy.attacks import ATTACKS, adapt, build_attack, observe_gradient
from simfl.privacy.attacks.base import AuxData
from simfl.privacy.decoders import Decoder
from simfl.privacy.defences import DEFENCES, defended_model
from simfl.privacy.disclosure import Disclosure

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (3, 16, 4)
MODEL = ModelConfig(arch="convnet", width=8)
DEFENCE_KINDS = DEFENCES.kinds()
ATTACK_KINDS = ATTACKS.kinds()


def _dataset(n: int = 96) -> Dataset:
    g = np.random.default_rng(0)
    x = g.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    y = (np.arange(n) % SHAPE[2]).astype(np.int64)
    return Dataset.from_splits("t", [str(k) for k in range(SHAPE[2])], {s: (x, y) for s in ("train", "val", "test")})


def _built(kind: str):
    torch.manual_seed(0)
    model, defence = defended_model(MODEL, DEFENCES.configs[kind](), 0, SHAPE)
    return model, FlatWeights(model), defence


def _server_and_client(kind: str):
    server_model, server_flat, server = _built(kind)
    server.server_setup(_dataset(), server_model)
    model, flat, client = _built(kind)
    client.receive(server.broadcast(), torch.device("cpu"))
    return server_model, server, model, flat, client


def _same(a: object, b: object) -> bool:
    """Equal nested state: tensors element for element, mappings and sequences item by item."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _layout(kind: str) -> list:
    return [[name, offset, list(shape)] for name, offset, shape in _built(kind)[1].layout]


# ---------------------------------------------------------------- defences


@pytest.mark.parametrize("kind", DEFENCE_KINDS)
def test_building_a_defence_draws_no_random_numbers(kind):
    torch.manual_seed(0)
    build_model(MODEL, *SHAPE)
    plain = torch.random.get_rng_state()
    torch.manual_seed(0)
    defended_model(MODEL, DEFENCES.configs[kind](), 0, SHAPE)
    assert torch.equal(torch.random.get_rng_state(), plain)


def test_every_process_builds_the_same_weight_layout():
    script = ("import json, sys; sys.path.insert(0, 'tests'); from test_plugin_contracts import _layout, "
              "DEFENCE_KINDS; print(json.dumps({k: _layout(k) for k in DEFENCE_KINDS}))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == {k: _layout(k) for k in DEFENCE_KINDS}


@pytest.mark.parametrize("kind", DEFENCE_KINDS)
def test_server_state_round_trips_through_a_checkpoint(kind, tmp_path):
    server_model, server, _, _, _ = _server_and_client(kind)
    server.server_round(1, server_model, [{"samples": 8, "accuracy": 0.5}])
    torch.save(server.server_state(), tmp_path / "state.pt")
    restored_model, _, restored = _built(kind)
    restored.server_setup(_dataset(), restored_model)
    restored.load_server_state(torch.load(tmp_path / "state.pt", weights_only=True))
    assert _same(restored.server_state(), server.server_state())
    assert _same(restored.broadcast(), server.broadcast())


@pytest.mark.parametrize("kind", DEFENCE_KINDS)
def test_share_keeps_the_update_and_every_figure_is_a_declared_column(kind):
    server_model, server, model, flat, client = _server_and_client(kind)
    delta = torch.randn(len(flat))
    assert client.share(delta).shape == delta.shape
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (12, 16, 16, 3), dtype=torch.uint8, generator=g)
    y = torch.randint(0, SHAPE[2], (12,), generator=g)
    local = train_client(model, flat, flat.snapshot(), x, y, TrainingConfig(batch_size=4), g, client, {})
    assert local.delta.shape == (len(flat),)
    assert set(local.defence) == set(type(client).client_figures)
    figures = server.server_round(1, server_model, [{"samples": 12, "accuracy": local.accuracy, **local.defence}])
    assert set(figures) == set(type(server).round_figures)
    assert set(type(client).client_figures) <= set(CLIENT_DEFENCE_COLUMNS) <= set(SCHEMAS["clients"].names)
    assert set(type(client).round_columns()) <= set(ROUND_DEFENCE_COLUMNS) <= set(SCHEMAS["rounds"].names)


@pytest.mark.parametrize("kind", DEFENCE_KINDS)
def test_what_an_attacker_is_told_is_well_formed(kind):
    _, server, model, flat, client = _server_and_client(kind)
    names = [name for name, _ in model.named_parameters()]
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 256, (1, 16, 16, 3), dtype=torch.uint8, generator=g), torch.tensor([1])
    obs = dataclasses.replace(observe_gradient(model, flat, flat.snapshot(), x, y, client, g), labels=None)
    for told in (client.naive_view(), client.disclosure(server.broadcast())):
        assert told is None or isinstance(told, Disclosure)
        if told is None:
            continue
        if told.model_wrapper is not None:
            wrapped = told.model_wrapper(model)
            assert [n for n, _ in wrapped.named_parameters()] == names  # the shared weights' names, nothing more
        result = adapt(build_attack(ATTACKS.configs["ig"](iterations=1)), told)(model, flat, [obs], [0])
        assert torch.isfinite(result.objective).all()
    # Whether the naive attacker is exact is declared, and a scenario can say it for every kind.
    sc = parse_scenario({"populations": [{"name": "a", "clients": 2}], "defence": kind, "attacks": {}})
    assert isinstance(type(client).naive_is_exact(sc.attacks), bool)


# ---------------------------------------------------------------- attacks


AUX = AuxData(torch.randint(0, 256, (40, 8, 8, 3), dtype=torch.uint8), torch.arange(40) % 4, seed=0)


def _small(kind: str):
    """The attack at a small budget, with the server's data, made applicable where it needs a disclosure."""
    config = ATTACKS.configs[kind]
    budget = {k: 3 for k in ("iterations", "steps") if k in config.model_fields}
    attack = build_attack(config(**budget), AUX)
    if not attack.applies():  # e.g. the server's decoder: only where the defence discloses one
        torch.manual_seed(0)
        attack = adapt(attack, Disclosure(decoder=Decoder(128, 3, 8)))
    assert attack.applies(), kind
    return attack


def _small_model():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="convnet", width=4), 3, 8, 4)
    return model, FlatWeights(model)


@pytest.mark.parametrize("kind", ATTACK_KINDS)
def test_an_attack_is_built_from_its_config_and_its_defaults_are_real(kind):
    attack = build_attack(ATTACKS.configs[kind]())
    assert isinstance(attack, ATTACKS[kind])
    for knob, value in ATTACKS.configs[kind]().knobs().items():
        assert getattr(attack, knob) == value, knob


@pytest.mark.parametrize("kind", ATTACK_KINDS)
def test_batched_attack_equals_the_same_attack_alone(kind):
    model, flat = _small_model()
    observations = victims(model, flat, "gradient", batch=1, count=3)
    assert_batched_equals_single(_small(kind), model, flat, observations, [1, 2, 3])


@pytest.mark.parametrize("kind", ATTACK_KINDS)
def test_adapting_takes_every_disclosed_part_the_attack_has(kind):
    attack = _small(kind)
    assert adapt(attack, None) is attack
    told = Disclosure(loss_fn=lambda logits, t: F.cross_entropy(logits, t, label_smoothing=0.5), clip_norm=0.5,
                      decoder=Decoder(128, 3, 8))
    adapted = adapt(attack, told)
    for name in {f.name for f in dataclasses.fields(attack)} & {f.name for f in dataclasses.fields(told)}:
        if name != "knows_defence":
            assert getattr(adapted, name) is getattr(told, name), name
    if hasattr(attack, "informed"):
        assert adapted.informed and not adapt(attack, dataclasses.replace(told, knows_defence=False)).informed
    if hasattr(attack, "loss_fn"):  # a gradient-matching attack then differentiates what it was told
        model, flat = _small_model()
        obs = victims(model, flat, "gradient", batch=1, count=1)
        smoothed = adapt(attack, Disclosure(loss_fn=told.loss_fn))
        assert not torch.allclose(attack(model, flat, obs, [0]).objective, smoothed(model, flat, obs, [0]).objective)


@pytest.mark.parametrize("kind", ATTACK_KINDS)
def test_the_objective_at_the_true_images_is_finite_or_declared_absent(kind):
    model, flat = _small_model()
    observations = victims(model, flat, "gradient", batch=1, count=2)
    attack = _small(kind)
    at_found = attack(model, flat, observations, [0, 1])
    truth = torch.rand(2, 1, 3, 8, 8)
    at_truth = attack.objective_at(model, flat, observations, truth)
    assert at_truth.shape == (2,)
    # Both are numbers, or both absent (NaN) for attacks without an objective over images.
    assert torch.equal(torch.isnan(at_truth), torch.isnan(at_found.objective.cpu()))


def test_generators_for_contract_runs_are_seeded():
    # The contracts above compare runs; they rely on (seed, purpose, keys) generators being reproducible.
    assert torch.equal(torch.rand(3, generator=torch_generator(0, "x", 1)),
                       torch.rand(3, generator=torch_generator(0, "x", 1)))
