"""Gaussian noise on what a client shares: from the client's (seed, client, round) generator, σ as said, both views."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from simfl.core.config import ModelConfig, TrainingConfig
from simfl.core.errors import UserError
from simfl.core.seeding import torch_generator
from simfl.core.training import train_client
from simfl.core.weights import FlatWeights
from simfl.engine.scenario import parse_scenario
from simfl.engine.victim import capture
from simfl.privacy.defences import DEFENCES, defended_model, make_defence
from simfl.privacy.defences.base import NoDefenceConfig
from simfl.privacy.defences.gaussian import GaussianNoise, GaussianNoiseConfig, add_noise
from simfl.privacy.defences.pruning import flat_segments, segment_mask

SHAPE = (3, 16, 4)  # channels, image size, classes
SEED = 7


def defended(sigma=0.01, norm="group"):
    torch.manual_seed(0)
    model, defence = defended_model(ModelConfig(arch="convnet", width=8, norm=norm),
                                    GaussianNoiseConfig(sigma=sigma), SEED, SHAPE)
    return model, FlatWeights(model), defence


def data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8, generator=g)
    return x, torch.randint(0, SHAPE[2], (n,), generator=g)


def client_generator(client, round_):
    """The generator a client actor trains with (``client_worker``): (seed, "client-train", client, round)."""
    return torch_generator(SEED, "client-train", client, round_)


def shared_update(defence, flat, delta, client, round_):
    """What ``train_client`` does around the update: ``begin`` with the client's generator, then ``share``."""
    defence.begin(None, flat, client_generator(client, round_), {})
    return defence.share(delta)


# ---------------------------------------------------------------- the noise


def test_the_update_noise_is_reproducible_from_seed_client_and_round_and_differs_otherwise():
    _, flat, defence = defended(sigma=0.1)
    delta = torch.zeros(len(flat))
    noise = shared_update(defence, flat, delta, client=3, round_=2)
    assert torch.equal(noise, shared_update(defence, flat, delta, client=3, round_=2))
    assert not torch.equal(noise, shared_update(defence, flat, delta, client=4, round_=2))
    assert not torch.equal(noise, shared_update(defence, flat, delta, client=3, round_=1))


def test_torchs_global_rng_is_neither_used_nor_moved():
    _, flat, defence = defended(sigma=0.1)
    delta = torch.zeros(len(flat))
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = shared_update(defence, flat, delta, client=0, round_=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(999)
    assert torch.equal(shared_update(defence, flat, delta, client=0, round_=1), first)


def test_the_empirical_std_is_sigma_on_a_large_tensor():
    model = nn.Sequential(nn.Linear(400, 200), nn.Linear(200, 10))  # ~82k parameter entries
    defence = GaussianNoise(GaussianNoiseConfig(sigma=0.05), SHAPE, SEED)
    defence.build(model)  # type: ignore[arg-type]  # any module: build only reads the layout
    flat = FlatWeights(model)
    noise = shared_update(defence, flat, torch.zeros(len(flat)), client=0, round_=1)
    assert noise.numel() > 80_000
    assert float(noise.std()) == pytest.approx(0.05, rel=0.02)
    assert abs(float(noise.mean())) < 5 * 0.05 / math.sqrt(noise.numel())


def test_buffers_get_no_noise_and_the_parameters_all_do():
    _, flat, defence = defended(sigma=0.1, norm="batch")
    delta = torch.randn(len(flat), generator=torch.Generator().manual_seed(1))
    noisy = shared_update(defence, flat, delta, client=0, round_=1)
    buffers = ~flat.trainable
    assert buffers.any() and torch.equal(noisy[buffers], delta[buffers])  # BatchNorm running statistics
    assert bool((noisy[flat.trainable] != delta[flat.trainable]).all())


def test_sigma_zero_is_the_identity_and_draws_nothing():
    _, flat, defence = defended(sigma=0.0)
    delta = torch.randn(len(flat), generator=torch.Generator().manual_seed(2))
    gen = client_generator(0, 1)
    state = gen.get_state()
    defence.begin(None, flat, gen, {})
    assert torch.equal(defence.share(delta), delta)
    assert torch.equal(gen.get_state(), state)


def test_add_noise_draws_in_order_from_the_given_generator():
    v = torch.arange(6, dtype=torch.float32)
    mask = torch.tensor([True, False, True, True, False, True])
    out = add_noise(v, mask, 0.5, torch.Generator().manual_seed(0))
    expected = v.clone()
    expected[mask] += 0.5 * torch.randn(4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, expected)
    assert torch.equal(v, torch.arange(6, dtype=torch.float32))  # a copy


# ---------------------------------------------------------------- both views, as the engine derives them


def test_training_shares_the_true_update_plus_the_clients_noise():
    model, flat, defence = defended(sigma=0.02)
    plain_model, plain_flat, _ = defended(sigma=0.0)
    x, y = data(n=16)
    weights, cfg = flat.snapshot(), TrainingConfig(batch_size=4)
    local = train_client(model, flat, weights, x, y, cfg, client_generator(5, 3), defence, {})
    true = train_client(plain_model, plain_flat, weights, x, y, cfg, client_generator(5, 3), None, {})
    noise = local.delta - true.delta
    assert torch.equal(noise[~flat.trainable], torch.zeros(int((~flat.trainable).sum())))
    assert float(noise[flat.trainable].std()) == pytest.approx(0.02, rel=0.05)
    assert set(local.defence) == set(GaussianNoise.client_figures)
    ratio = float(noise[flat.trainable].norm() / true.delta[flat.trainable].norm())
    assert local.defence["noise_norm_ratio"] == pytest.approx(ratio, rel=1e-3)
    again = train_client(model, flat, weights, x, y, cfg, client_generator(5, 3), defence, {})
    other = train_client(model, flat, weights, x, y, cfg, client_generator(6, 3), defence, {})
    assert torch.equal(again.delta, local.delta)
    assert not torch.equal(other.delta, local.delta)


def test_the_gradient_view_is_the_plain_gradient_plus_noise_from_its_generator():
    model, flat, defence = defended(sigma=0.05)
    plain = make_defence(NoDefenceConfig(), SHAPE, SEED)
    x, y = data(n=2)
    images = x.permute(0, 3, 1, 2).float() / 255
    clean = plain.shared_gradient(model, flat, images, y, torch.Generator().manual_seed(0))
    noisy = defence.shared_gradient(model, flat, images, y, torch.Generator().manual_seed(0))
    mask = segment_mask(flat_segments(flat), len(flat), flat.vector.device)
    assert torch.equal(noisy, add_noise(clean, mask, 0.05, torch.Generator().manual_seed(0)))


def test_the_captured_gradient_is_reproducible_from_seed_client_and_round():
    sc = parse_scenario({"populations": [{"name": "a", "clients": 4}], "seed": SEED,
                         "defence": {"kind": "gaussian_noise", "sigma": 0.05}, "attacks": {"labels": "known"}})
    model, flat, defence = defended(sigma=0.05)
    x, y = data(n=1)  # one image: every (client, round) picks it, so the shares differ by their noise alone
    weights = flat.snapshot()

    def observed(client, round_):
        victim = capture(model, flat, weights, x, y, sc.attacks, sc.training, None, SEED, client, round_, defence)
        return victim.observation.shared

    first = observed(1, 2)
    assert torch.equal(first, observed(1, 2))
    assert not torch.equal(first, observed(2, 2))
    assert not torch.equal(first, observed(1, 3))
    assert float((first - observed(2, 2))[flat.trainable].std()) == pytest.approx(0.05 * math.sqrt(2), rel=0.05)


# ---------------------------------------------------------------- attackers, config, search


def test_the_naive_attacker_is_not_exact_and_the_adaptive_one_is_the_naive_one():
    sc = parse_scenario({"populations": [{"name": "a", "clients": 2}], "defence": "gaussian_noise", "attacks": {}})
    assert GaussianNoise.naive_is_exact(sc.attacks) is False
    _, _, defence = defended()
    assert defence.disclosure() is None and defence.naive_view() is None


def test_config_defaults_and_registry():
    assert DEFENCES["gaussian_noise"] is GaussianNoise and DEFENCES.configs["gaussian_noise"] is GaussianNoiseConfig
    assert GaussianNoiseConfig().knobs() == {"sigma": 0.01}


@pytest.mark.parametrize(
    ("defence", "message"),
    [
        ({"kind": "gaussian_noise", "sigma": -1.0}, "defence.sigma: Input should be greater than or equal to 0"),
        ({"kind": "gaussian_noise", "sigma": float("inf")}, "defence.sigma: Input should be a finite number"),
        ({"kind": "gaussian_noise", "sigma": "0.1"}, "defence.sigma"),
        ({"kind": "gaussian_noise", "fraction": 0.5},
         "defence.fraction: unknown key (not a setting of gaussian_noise)"),
        ({"kind": "gaussian"}, "defence.kind"),
    ],
)
def test_bad_knobs_are_rejected_naming_their_key(defence, message):
    with pytest.raises(UserError) as info:
        parse_scenario({"populations": [{"name": "a", "clients": 2}], "defence": defence})
    assert message in str(info.value)


def test_the_search_knob_is_declared_within_the_knobs_domain():
    knob = GaussianNoise.search_knob
    assert knob is not None and knob.name == "sigma" and knob.name in GaussianNoiseConfig.model_fields
    assert knob.falls and knob.log and 0 < knob.low < knob.high
    for value in (knob.low, knob.high):
        GaussianNoiseConfig(**knob.settings(value))
