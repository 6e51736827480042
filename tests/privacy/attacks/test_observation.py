import dataclasses
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

from simfl.core.config import ModelConfig
from simfl.core.models import build_model
from simfl.core.weights import FlatWeights
from simfl.privacy.attacks import ATTACKS, Observation, observe_gradient, observe_update
from simfl.privacy.attacks.functional import stack, victim_simulator
from simfl.privacy.attacks.observation import local_batches


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
    for attack in ATTACKS.plugins.values():
        assert list(inspect.signature(attack()).parameters) == ["model", "flat", "observations", "seeds"]


def test_update_view_requires_its_hyperparameters():
    _, _, w, _, _ = setup()
    with pytest.raises(ValueError):
        Observation(weights=w, shared=w, view="update", batch_size=1, image_shape=(3, 8, 8), lr=0.1)
    with pytest.raises(ValueError):
        Observation(weights=w, shared=w[:-1], view="gradient", batch_size=1, image_shape=(3, 8, 8))
    with pytest.raises(ValueError):
        Observation(weights=w, shared=w, view="gradient", batch_size=2, image_shape=(3, 8, 8), labels=torch.tensor([1]))


def test_update_with_momentum_and_weight_decay_is_torch_sgd():
    model, flat, w, x, y = setup()
    upd = observe_update(model, flat, w, x, y, lr=0.1, local_steps=4, local_batch_size=3, momentum=0.9,
                         weight_decay=0.01)
    assert (upd.momentum, upd.weight_decay) == (0.9, 0.01)
    reference = build_model(ModelConfig(arch="convnet", width=4), 3, 8, 4)
    ref_flat = FlatWeights(reference)
    ref_flat.load(w)
    reference.train()
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for idx in local_batches(4, 3, 4):
        opt.zero_grad()
        F.cross_entropy(reference(x[idx]), y[idx]).backward()
        opt.step()
    assert torch.allclose(w + upd.shared, ref_flat.vector, atol=1e-6)
    # momentum and weight decay matter here: plain SGD ends elsewhere
    plain = observe_update(model, flat, w, x, y, lr=0.1, local_steps=4, local_batch_size=3)
    assert not torch.allclose(plain.shared, upd.shared, atol=1e-4)


def simulated(observations, images, labels, model, flat):
    """Each victim's simulated pseudo-gradient at the given images, vmapped as the attacks do."""
    stacked = stack(observations, flat)
    model.eval()
    simulate = victim_simulator(model, flat, stacked, F.cross_entropy)
    weights, weight_dim = stacked.weight_arg
    return stacked, vmap(simulate, in_dims=(weight_dim, 0, 0, 0))(weights, stacked.sgd, images, labels)


@pytest.mark.parametrize("same_weights", [True, False])
def test_simulator_replays_momentum_and_weight_decay_at_the_true_images(same_weights):
    model, flat, w, x, y = setup()
    other_w = w if same_weights else FlatWeights(build_model(ModelConfig(arch="convnet", width=4), 3, 8, 4)).vector
    x2, y2 = torch.rand(4, 3, 8, 8), torch.tensor([2, 2, 0, 1])
    sgd = dict(local_steps=3, local_batch_size=2, weight_decay=0.01)
    observations = [
        observe_update(model, flat, w, x, y, lr=0.1, momentum=0.9, **sgd),
        observe_update(model, flat, other_w, x2, y2, lr=0.05, momentum=0.5, **sgd),
    ]
    stacked, g = simulated(observations, torch.stack([x, x2]), torch.stack([y, y2]), model, flat)
    assert stacked.shared_weights == same_weights
    assert torch.allclose(g, stacked.target, atol=2e-5, rtol=1e-4)
    assert torch.allclose(F.cosine_similarity(g, stacked.target, dim=1), torch.ones(2), atol=1e-6)  # IG objective ~0
    assert ((g - stacked.target).pow(2).sum(1) < 1e-8).all()  # DLG objective ~0
    # the replay without momentum and weight decay does not explain the update
    plain = [dataclasses.replace(o, momentum=0.0, weight_decay=0.0) for o in observations]
    stacked, g = simulated(plain, torch.stack([x, x2]), torch.stack([y, y2]), model, flat)
    assert ((g - stacked.target).pow(2).sum(1) > 1.0).all()  # measured 6–21


def test_stack_detects_shared_weights_and_keeps_sgd_per_victim():
    model, flat, w, x, y = setup()
    a = observe_update(model, flat, w, x, y, lr=0.1, local_steps=1, local_batch_size=4, momentum=0.9)
    b = observe_update(model, flat, w, x.flip(0), y, lr=0.2, local_steps=1, local_batch_size=4, weight_decay=0.1)
    stacked = stack([a, b], flat)
    assert stacked.shared_weights and stacked.weight_arg[1] is None
    assert torch.equal(stacked.sgd, torch.tensor([[0.1, 0.9, 0.0], [0.2, 0.0, 0.1]]))
    c = dataclasses.replace(b, weights=w + 1e-6)
    assert not stack([a, c], flat).shared_weights and stack([a, c], flat).weight_arg[1] == 0
