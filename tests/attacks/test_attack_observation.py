import dataclasses
import inspect

import pytest
import torch
import torch.nn.functional as F

from simfl.attacks import ATTACKS, Observation, observe_gradient, observe_update
from simfl.attacks.observation import local_batches
from simfl.config import ModelConfig
from simfl.models import build_model
from simfl.weights import FlatWeights


def setup(seed=0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(arch="convnet", width=4), 3, 8, 4)
    flat = FlatWeights(model)
    return model, flat, flat.snapshot(), torch.rand(4, 3, 8, 8), torch.tensor([0, 3, 1, 3])


def test_gradient_view_is_the_victims_mean_ce_gradient():
    model, flat, w, x, y = setup()
    obs = observe_gradient(model, flat, w, x, y)
    flat.load(w)
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert torch.allclose(obs.shared[flat.trainable], torch.cat([g.reshape(-1) for g in grads]))
    assert not obs.shared[~flat.trainable].any()
    assert torch.equal(obs.weights, w) and obs.batch_size == 4 and obs.image_shape == (3, 8, 8)


def test_uint8_shards_are_converted_like_training_input():
    model, flat, w, _, y = setup()
    raw = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)
    from_raw = observe_gradient(model, flat, w, raw, y)
    from_float = observe_gradient(model, flat, w, raw.permute(0, 3, 1, 2).float() / 255, y)
    assert torch.allclose(from_raw.shared, from_float.shared)


def test_one_full_batch_step_update_is_minus_lr_gradient():
    model, flat, w, x, y = setup()
    grad = observe_gradient(model, flat, w, x, y).shared
    upd = observe_update(model, flat, w, x, y, lr=0.1, local_steps=1, local_batch_size=4)
    assert torch.allclose(upd.shared, -0.1 * grad, atol=1e-7)
    assert (upd.lr, upd.local_steps, upd.local_batch_size) == (0.1, 1, 4)


def test_multi_step_update_follows_sequential_batches():
    model, flat, w, x, y = setup()
    upd = observe_update(model, flat, w, x, y, lr=0.1, local_steps=3, local_batch_size=2)
    current = w.clone()
    for idx in local_batches(4, 2, 3):
        current -= 0.1 * observe_gradient(model, flat, current, x[idx], y[idx]).shared
    assert torch.allclose(w + upd.shared, current, atol=1e-6)


def test_local_batches_wrap_with_fixed_size():
    assert [b.tolist() for b in local_batches(5, 2, 4)] == [[0, 1], [2, 3], [4, 0], [1, 2]]
    assert [b.tolist() for b in local_batches(2, 8, 2)] == [[0, 1], [0, 1]]


def test_observations_never_hold_images():
    model, flat, w, x, y = setup()
    obs = observe_gradient(model, flat, w, x, y)
    for field in dataclasses.fields(Observation):
        value = getattr(obs, field.name)
        assert not (isinstance(value, torch.Tensor) and value.shape[-3:] == x.shape[-3:]), field.name
    for attack in ATTACKS.values():
        assert list(inspect.signature(attack()).parameters) == ["model", "flat", "observations", "seeds"]


def test_update_view_requires_its_hyperparameters():
    _, _, w, _, _ = setup()
    with pytest.raises(ValueError):
        Observation(weights=w, shared=w, view="update", batch_size=1, image_shape=(3, 8, 8), lr=0.1)
    with pytest.raises(ValueError):
        Observation(weights=w, shared=w[:-1], view="gradient", batch_size=1, image_shape=(3, 8, 8))
    with pytest.raises(ValueError):
        Observation(weights=w, shared=w, view="gradient", batch_size=2, image_shape=(3, 8, 8), labels=torch.tensor([1]))
