import dataclasses

import pytest
import torch

from simfl.core.config import ModelConfig
from simfl.core.models import build_model
from simfl.core.weights import FlatWeights
from simfl.privacy.attacks import observe_gradient, observe_update, recover_labels
from simfl.privacy.attacks.labels import head_gradient, llg_labels, momentum_steps


def fresh(seed, classes):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(arch="convnet", width=4), 3, 8, classes)
    flat = FlatWeights(model)
    return model, flat, flat.snapshot()


def blind(obs):
    return dataclasses.replace(obs, labels=None)


def test_idlg_label_is_exact_for_single_images_in_both_views():
    for case in range(60):
        model, flat, w = fresh(case, classes=10)
        x, y = torch.rand(1, 3, 8, 8), torch.randint(0, 10, (1,))
        grad_obs = observe_gradient(model, flat, w, x, y)
        # several steps on one sample: every step's true-class row sum is negative, so their sum is too
        update_obs = observe_update(model, flat, w, x, y, lr=0.1, local_steps=3, local_batch_size=1)
        assert torch.equal(recover_labels(flat, blind(grad_obs)), y), case
        assert torch.equal(recover_labels(flat, blind(update_obs)), y), case


def test_known_labels_are_passed_through():
    model, flat, w = fresh(0, classes=4)
    y = torch.tensor([3, 3, 0])
    assert torch.equal(recover_labels(flat, observe_gradient(model, flat, w, torch.rand(3, 3, 8, 8), y)), y)


def test_update_proxy_is_the_gradient_for_one_full_batch_step():
    model, flat, w = fresh(1, classes=4)
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 1, 2])
    grad_w, grad_b = head_gradient(flat, observe_gradient(model, flat, w, x, y))
    upd_w, upd_b = head_gradient(flat, observe_update(model, flat, w, x, y, lr=0.5, local_steps=1, local_batch_size=4))
    assert torch.allclose(grad_w, upd_w, atol=1e-5) and torch.allclose(grad_b, upd_b, atol=1e-5)


def test_llg_counts_are_exact_under_uniform_predictions():
    # bias gradient = p̄ − counts/B with p̄ = 1/K for every class
    counts = torch.tensor([0, 3, 1, 0, 2])
    bias_grad = 1 / 5 - counts / 6
    assert llg_labels(bias_grad, 6).tolist() == [1, 1, 1, 2, 4, 4]


def batch_rate(classes, batch, view, cases=30):
    hits = 0
    for case in range(cases):
        model, flat, w = fresh(1000 + case, classes)
        x, y = torch.rand(batch, 3, 8, 8), torch.randint(0, classes, (batch,))
        if view == "gradient":
            obs = observe_gradient(model, flat, w, x, y)
        else:
            obs = observe_update(model, flat, w, x, y, lr=0.05, local_steps=2, local_batch_size=batch // 2)
        labels = recover_labels(flat, blind(obs))
        assert labels.shape == (batch,)
        hits += torch.equal(labels, y.sort().values)
    return hits / cases


def test_batch_label_multiset_is_usually_exact_on_fresh_models():
    # Measured on these seeds: 100% for B=4, K=10 in both views; 87% (gradient) / 80% (update) for B=8, K=4.
    assert batch_rate(10, 4, "gradient") >= 0.9
    assert batch_rate(10, 4, "update") >= 0.9
    assert batch_rate(4, 8, "gradient") >= 0.6


def test_momentum_steps_counts_the_gradients_an_update_sums():
    assert momentum_steps(4, 0.0) == 4.0
    assert momentum_steps(1, 0.9) == pytest.approx(1.0)
    assert momentum_steps(2, 0.5) == pytest.approx(1.0 + 1.5)
    # SGD with momentum on a constant gradient moves by exactly lr * g * momentum_steps.
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    for _ in range(5):
        opt.zero_grad()
        (2.0 * p).sum().backward()  # gradient 2, whatever p is
        opt.step()
    assert float(p.detach()) == pytest.approx(-0.1 * 2.0 * momentum_steps(5, 0.9))
