"""Learned feature inversion: decoders fitted on the server's data, applied to layer inputs read off gradients."""

from __future__ import annotations

import pytest
import torch

from simfl.core.config import ModelConfig
from simfl.core.errors import UserError
from simfl.core.weights import FlatWeights
from simfl.data.synthetic import make_dataset
from simfl.engine.scenario import parse_scenario
from simfl.privacy import decoders
from simfl.privacy.attacks import ATTACKS, adapt, build_attack, observe_gradient
from simfl.privacy.attacks.analytic import linear_layers, recover
from simfl.privacy.attacks.base import AuxData
from simfl.privacy.attacks.learned import layer_inputs
from simfl.privacy.decoders import Decoder
from simfl.privacy.defences import defended_model
from simfl.privacy.defences.base import NoDefenceConfig
from simfl.privacy.defences.latent import LatentConfig
from simfl.privacy.disclosure import Disclosure
from simfl.privacy.metrics import mse

SIZE = 16


@pytest.fixture(scope="module")
def data():
    ds = make_dataset(train_size=40, val_size=400, test_size=10, image_size=SIZE, num_classes=4, seed=0)
    aux = AuxData(torch.from_numpy(ds.val_x), torch.from_numpy(ds.val_y), seed=0)
    victims = torch.from_numpy(ds.train_x[:6]).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(ds.train_y[:6])
    return aux, victims, ds


def _setup(defence_cfg, data):
    _, victims, ds = data
    server_model, server = defended_model(ModelConfig(arch="convnet", width=8), defence_cfg, 0, (3, SIZE, 4))
    server.server_setup(ds, server_model)
    torch.manual_seed(0)
    model, defence = defended_model(ModelConfig(arch="convnet", width=8), defence_cfg, 0, (3, SIZE, 4))
    defence.receive(server.broadcast(), torch.device("cpu"))
    flat = FlatWeights(model)
    weights = flat.snapshot()
    x, y = victims
    gen = torch.Generator().manual_seed(3)
    observations = [observe_gradient(model, flat, weights, x[i : i + 1], y[i : i + 1], defence, gen)
                    for i in range(len(y))]
    for obs in observations[1:]:  # one round: every victim starts from the same weights tensor
        object.__setattr__(obs, "weights", observations[0].weights)
    return model, flat, observations


def test_the_feature_decoder_reconstructs_better_than_the_mean_image(data):
    aux, victims, _ = data
    model, flat, observations = _setup(NoDefenceConfig(), data)
    attack = build_attack(ATTACKS.configs["feature_decoder"](steps=300), aux)
    result = attack(model, flat, observations, list(range(len(observations))))
    truth = victims[0]
    assert result.images.shape == (6, 1, 3, SIZE, SIZE) and torch.isfinite(result.images).all()
    mean_image = aux.inputs().mean(0, keepdim=True).expand_as(truth)
    assert mse(result.images[:, 0], truth).mean() < mse(mean_image, truth).mean()
    assert torch.isnan(result.objective).all()  # no objective over images: nothing to compare at the truth


def test_layer_inputs_are_what_recovery_reads_off_a_gradient(data):
    aux, victims, _ = data
    model, flat, observations = _setup(NoDefenceConfig(), data)
    first = linear_layers(model)[0]
    features = layer_inputs(model, flat, observations[0].weights, victims[0][:1], first)
    assert torch.allclose(features[0].double(), recover(model, flat, observations[0]).inputs[first], atol=1e-5)


def test_against_the_latent_defence_the_informed_decoder_removes_the_noise(data):
    aux, victims, _ = data
    cfg = LatentConfig(lam=0.0, sigma_init=1.5, sigma_max=3.0)
    model, flat, observations = _setup(cfg, data)
    naive = build_attack(ATTACKS.configs["latent_decoder"](steps=300), aux)
    informed = adapt(naive, Disclosure())
    assert informed.informed and not naive.informed
    seeds = list(range(len(observations)))
    naive_mse = mse(naive(model, flat, observations, seeds).images[:, 0], victims[0]).mean()
    informed_mse = mse(informed(model, flat, observations, seeds).images[:, 0], victims[0]).mean()
    assert informed_mse < naive_mse


def test_the_server_decoder_applies_only_when_disclosed_and_decodes_z_prime(data):
    aux, victims, _ = data
    model, flat, observations = _setup(NoDefenceConfig(), data)
    attack = build_attack(ATTACKS.configs["server_decoder"]())
    assert not attack.applies()
    torch.manual_seed(1)
    decoder = Decoder(model.latent_dim, 3, SIZE)
    told = adapt(attack, Disclosure(decoder=decoder))
    assert told.applies()
    result = told(model, flat, observations[:2], [0, 1])
    with torch.no_grad():
        expected = decoder(recover(model, flat, observations[1]).latent.float().unsqueeze(0))
    assert torch.allclose(result.images[1], expected)


def test_learned_attacks_need_batch_size_one():
    with pytest.raises(UserError, match="feature_decoder needs attacks.batch_size: 1"):
        parse_scenario({"populations": [{"name": "a", "clients": 2}],
                        "attacks": {"batch_size": 2, "methods": ["feature_decoder"]}})


def test_a_decoder_fitted_twice_on_the_same_inputs_is_fitted_once_with_the_same_result(data, monkeypatch):
    # decoded_ig's decoder is feature_decoder's (same layer, steps, seed and purpose): the second fit is the first.
    aux, victims, _ = data
    model, flat, observations = _setup(NoDefenceConfig(), data)
    fits = []
    real_fit = decoders._fit
    monkeypatch.setattr(decoders, "_fit", lambda *a: fits.append(a[-1]) or real_fit(*a))
    monkeypatch.setattr(decoders, "_FITTED", type(decoders._FITTED)())
    seeds = list(range(len(observations)))
    alone = build_attack(ATTACKS.configs["feature_decoder"](steps=40), aux)(model, flat, observations, seeds)
    assert fits == ["attack-FeatureDecoder"]
    ig = build_attack(ATTACKS.configs["decoded_ig"](iterations=1, decoder_steps=40), aux)
    ig(model, flat, observations, seeds)
    again = build_attack(ATTACKS.configs["feature_decoder"](steps=40), aux)(model, flat, observations, seeds)
    assert fits == ["attack-FeatureDecoder"]  # neither decoded_ig nor the second attack fitted again
    assert torch.equal(alone.images, again.images)
    # What a fit depends on changes the key: more steps, another seed, other inputs.
    build_attack(ATTACKS.configs["feature_decoder"](steps=41), aux)(model, flat, observations, seeds)
    other = AuxData(aux.images, aux.labels, seed=1)
    build_attack(ATTACKS.configs["feature_decoder"](steps=40), other)(model, flat, observations, seeds)
    assert len(fits) == 3
    # A hit is exactly what fitting again from scratch gives.
    features = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    images = torch.rand(50, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    hit = decoders.fit_decoder(features.clone(), images, 20, 1e-3, 16, 0, "p")
    assert decoders.fit_decoder(features, images.clone(), 20, 1e-3, 16, 0, "p") is hit
    fresh = real_fit(features, images, 20, 1e-3, 16, 0, "p")
    assert all(torch.equal(a, b) for a, b in zip(hit.state_dict().values(), fresh.state_dict().values(), strict=True))
