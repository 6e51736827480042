"""Learning to Invert: trained on simulated shares of the server's data, it inverts a victim's share."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from simfl.core.config import ModelConfig
from simfl.core.errors import UserError
from simfl.core.models import build_model
from simfl.core.weights import FlatWeights
from simfl.data.synthetic import make_dataset
from simfl.engine.scenario import parse_scenario
from simfl.privacy.attacks import ATTACKS, adapt, build_attack, observe_gradient
from simfl.privacy.attacks.base import AuxData
from simfl.privacy.attacks.lti import CountSketch, plain_share
from simfl.privacy.defences import defended_model
from simfl.privacy.defences.latent import LatentConfig, latent_off, noise_layer
from simfl.privacy.disclosure import Disclosure
from simfl.privacy.metrics import mse


@pytest.fixture(scope="module")
def setup():
    ds = make_dataset(train_size=20, val_size=300, test_size=10, image_size=16, num_classes=4, seed=0)
    aux = AuxData(torch.from_numpy(ds.val_x), torch.from_numpy(ds.val_y), seed=0)
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="convnet", width=8), 3, 16, 4)
    flat = FlatWeights(model)
    weights = flat.snapshot()
    x = torch.from_numpy(ds.train_x[:6]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(ds.train_y[:6])
    observations = [observe_gradient(model, flat, weights, x[i : i + 1], y[i : i + 1]) for i in range(6)]
    observations = [dataclasses.replace(o, weights=observations[0].weights) for o in observations]
    return aux, model, flat, observations, x


def test_it_inverts_better_than_the_mean_image(setup):
    aux, model, flat, observations, x = setup
    attack = build_attack(ATTACKS.configs["lti"](samples=300, steps=400), aux)
    result = attack(model, flat, observations, list(range(6)))
    assert result.images.shape == (6, 1, 3, 16, 16)
    mean_image = aux.inputs().mean(0, keepdim=True).expand_as(x)
    assert mse(result.images[:, 0], x).mean() < mse(mean_image, x).mean()
    again = attack(model, flat, observations, list(range(6)))
    assert torch.equal(result.images, again.images)  # trained from the scenario's seed alone


def test_the_adaptive_attacker_trains_on_the_defences_own_shares(setup):
    aux, model, flat, observations, _ = setup
    calls = []

    def defended_share(m, f, x, y, gen):
        calls.append(len(y))
        return plain_share(m, f, x, y, gen) * 0.5

    attack = build_attack(ATTACKS.configs["lti"](samples=5, steps=2), aux)
    assert attack.shared_gradient is None  # naive: plain gradients
    informed = adapt(attack, Disclosure(shared_gradient=defended_share))
    informed(model, flat, observations[:1], [0])
    assert calls == [1] * 5  # one simulated share per training example, of the victims' batch size


def test_the_count_sketch_is_a_fixed_linear_map():
    sketch = CountSketch(50, 8, seed=3, device=torch.device("cpu"))
    u, v = torch.randn(50), torch.randn(50)
    assert torch.allclose(sketch(u + 2 * v), sketch(u) + 2 * sketch(v), atol=1e-6)
    assert torch.equal(sketch.bucket, CountSketch(50, 8, seed=3, device=torch.device("cpu")).bucket)


def test_lti_needs_the_gradient_view():
    with pytest.raises(UserError, match="lti needs attacks.view: gradient"):
        parse_scenario({"populations": [{"name": "a", "clients": 2}],
                        "attacks": {"view": "update", "methods": ["lti"]}})


def test_the_naive_attacker_on_the_latent_defence_simulates_the_undefended_model(setup):
    """Naive lti computes plain shares with the noise layer off: no draw from a generator left on the model."""
    aux, _, _, _, x = setup
    model, defence = defended_model(ModelConfig(arch="convnet", width=8), LatentConfig(), 0, (3, 16, 4))
    flat = FlatWeights(model)
    plain = latent_off(model)
    observations = [observe_gradient(plain, FlatWeights(plain), flat.snapshot(), x[i : i + 1],
                                     torch.tensor([i % 4])) for i in range(2)]
    naive = adapt(build_attack(ATTACKS.configs["lti"](samples=20, steps=5), aux), defence.naive_view())
    results = []
    for leftover in (None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)):
        noise_layer(model).generator = leftover  # what an earlier attack or job may have left on the model
        torch.manual_seed(len(results))
        results.append(naive(model, flat, observations, [0, 1]).images)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    undefended = build_attack(ATTACKS.configs["lti"](samples=20, steps=5), aux)(plain, FlatWeights(plain),
                                                                                observations, [0, 1])
    assert torch.equal(results[0], undefended.images)
