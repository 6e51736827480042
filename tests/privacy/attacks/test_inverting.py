import pytest
import torch
import torch.nn.functional as F
from attack_helpers import assert_batched_equals_single, blind
from attack_helpers import victims as shared_victims

from simfl.core.config import ModelConfig
from simfl.core.models import build_model
from simfl.core.weights import FlatWeights
from simfl.privacy.attacks import InvertingGradients, observe_gradient
from simfl.privacy.attacks.functional import stack, total_variation


def victims(model, flat, view, batch=2, count=3):
    return shared_victims(model, flat, view, batch, count, seed=200, lr=0.05)


def template(width=4, size=8):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="convnet", width=width), 3, size, 4)
    return model, FlatWeights(model)


@pytest.mark.parametrize("view", ["gradient", "update"])
def test_ig_batched_equals_single(view):
    model, flat = template()
    observations = victims(model, flat, view)
    assert_batched_equals_single(InvertingGradients(iterations=12, restarts=2), model, flat, observations, [4, 5, 6],
                                 objective_rtol=0)


@pytest.mark.parametrize("view", ["gradient", "update"])
def test_ig_batched_equals_single_with_shared_weights(view):
    # the engine's case: one global model, so the batched call runs one ordinary batch of convolutions
    model, flat = template()
    observations = shared_victims(model, flat, view, batch=2, count=3, seed=200, lr=0.05, same_weights=True)
    assert stack(observations, flat).shared_weights
    assert_batched_equals_single(InvertingGradients(iterations=12, restarts=2), model, flat, observations, [4, 5, 6],
                                 objective_rtol=0)


@pytest.mark.parametrize("same_weights", [True, False])
def test_ig_batched_equals_single_with_momentum_and_weight_decay(same_weights):
    model, flat = template()
    observations = shared_victims(model, flat, "update", batch=2, count=3, seed=200, lr=0.05, same_weights=same_weights,
                                  momentum=0.9, weight_decay=0.01)
    assert_batched_equals_single(InvertingGradients(iterations=12), model, flat, observations, [4, 5, 6],
                                 objective_rtol=0)


def test_ig_recovers_labels_when_unknown():
    model, flat = template()
    observations = victims(model, flat, "gradient", batch=1)
    result = InvertingGradients(iterations=1)(model, flat, blind(observations), [0, 1, 2])
    assert torch.equal(result.labels, torch.stack([o.labels for o in observations]))


def test_restarts_keep_each_victims_best():
    model, flat = template()
    observations = victims(model, flat, "gradient")
    one = InvertingGradients(iterations=10, restarts=1)(model, flat, observations, [1, 2, 3])
    three = InvertingGradients(iterations=10, restarts=3)(model, flat, observations, [1, 2, 3])
    # the first restart is the single run; later ones may only improve a victim's objective
    assert (three.objective <= one.objective).all()
    assert (three.objective < one.objective).any()


def test_ig_reconstructs_a_single_image():
    model, flat = template(width=8, size=16)
    torch.manual_seed(3)
    x = F.interpolate(torch.rand(1, 3, 4, 4), size=16, mode="bilinear")  # smooth, image-like
    obs = observe_gradient(model, flat, flat.snapshot(), x, torch.tensor([2]))
    result = InvertingGradients(iterations=150)(model, flat, [obs], [11])
    init = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(11))
    mse, mse_init = (result.images[0] - x).pow(2).mean(), (init - x).pow(2).mean()
    assert mse < 0.2 * mse_init, (mse, mse_init)
    assert result.images.min() >= 0 and result.images.max() <= 1


def test_total_variation_is_zero_only_for_flat_images():
    assert total_variation(torch.full((1, 3, 4, 4), 0.3)) == 0
    ramp = torch.arange(4.0).expand(1, 1, 4, 4)
    assert torch.isclose(total_variation(ramp), torch.tensor(1.0))
