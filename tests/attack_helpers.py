"""Victim observations and checks shared by the attack tests."""

import dataclasses

import torch

from simfl.core.config import ModelConfig
from simfl.core.models import build_model
from simfl.core.weights import FlatWeights
from simfl.privacy.attacks import observe_gradient, observe_update


def victims(model, flat, view, batch=2, count=3, seed=100, lr=0.1, same_weights=False, momentum=0.0,
            weight_decay=0.0):
    """Observations from ``count`` clients with different images and labels (and local lr).

    Weights differ per client unless ``same_weights`` (the engine's case: every
    victim of a round starts from the same global weights). Update-view victims
    use ``momentum`` and ``weight_decay`` as given, scaled up per victim.
    """
    torch.manual_seed(seed)
    common = FlatWeights(build_model(ModelConfig(arch="convnet", width=4), 3, 8, 4)).vector
    out = []
    for v in range(count):
        torch.manual_seed(seed + v)
        w = FlatWeights(build_model(ModelConfig(arch="convnet", width=4), 3, 8, 4)).vector
        if same_weights:
            w = common.clone()
        x, y = torch.rand(batch, 3, 8, 8), torch.randint(0, 4, (batch,))
        if view == "gradient":
            out.append(observe_gradient(model, flat, w, x, y))
        else:
            out.append(observe_update(model, flat, w, x, y, lr=lr * (v + 1), local_steps=2, local_batch_size=1,
                                      momentum=momentum * (1 + v / 10), weight_decay=weight_decay * (v + 1)))
    return out


def blind(observations):
    """The same observations with the labels hidden: the attacker must recover them."""
    return [dataclasses.replace(o, labels=None) for o in observations]


def assert_batched_equals_single(attack, model, flat, observations, seeds, objective_rtol=1e-5, images_atol=1e-5):
    together = attack(model, flat, observations, seeds)
    assert together.images.shape == (len(observations), observations[0].batch_size, 3, 8, 8)
    for v, (obs, seed) in enumerate(zip(observations, seeds, strict=True)):
        alone = attack(model, flat, [obs], [seed])
        # equal up to float rounding of the vmapped convolutions (not bitwise)
        assert torch.allclose(together.images[v], alone.images[0], atol=images_atol, rtol=0), v
        assert torch.allclose(together.objective[v], alone.objective[0], atol=1e-5, rtol=objective_rtol,
                              equal_nan=True), v
        assert torch.equal(together.labels[v], alone.labels[0]), v
        assert together.iterations[v] == alone.iterations[0], v
