import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from simfl.core.config import ModelConfig
from simfl.core.models import build_model
from simfl.core.weights import FlatWeights
from simfl.privacy.attacks import ATTACKS, DLG, IDLG, InvertingGradients, get_attack, observe_gradient


def setup():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="convnet", width=4), 3, 8, 4)
    flat = FlatWeights(model)
    obs = observe_gradient(model, flat, flat.snapshot(), torch.rand(1, 3, 8, 8), torch.tensor([1]))
    return model, flat, obs


def test_registry_builds_configured_attacks():
    assert {"dlg", "idlg", "ig", "feature_decoder", "latent_decoder", "server_decoder", "lti", "feature_match",
            "decoded_ig"} == set(ATTACKS)
    assert get_attack("dlg", iterations=5) == DLG(iterations=5)
    assert isinstance(get_attack("idlg"), IDLG) and get_attack("idlg").analytic_labels
    assert get_attack("ig", tv_weight=0.2).tv_weight == 0.2
    assert isinstance(get_attack("ig"), InvertingGradients)
    with pytest.raises(KeyError):
        get_attack("gan")


def test_attacker_loss_hook_is_what_gets_differentiated():
    model, flat, obs = setup()
    plain = DLG(iterations=0)(model, flat, [obs], [0]).objective
    attack = DLG(iterations=0, loss_fn=lambda logits, t: 2 * F.cross_entropy(logits, t))
    doubled = attack(model, flat, [obs], [0]).objective
    assert not torch.allclose(plain, doubled)


class Scale(nn.Module):
    def forward(self, h):
        return 0.5 * h


def test_model_wrapper_models_a_defence_and_modes_are_restored():
    model, flat, obs = setup()
    seen = []

    def wrapper(m):
        defended = copy.deepcopy(m)
        defended.latent = Scale()  # a parameter-free defence keeps the parameter names
        seen.append(defended)
        return defended

    model.train()
    plain = InvertingGradients(iterations=0)(model, flat, [obs], [0]).objective
    wrapped = InvertingGradients(iterations=0, model_wrapper=wrapper)(model, flat, [obs], [0]).objective
    assert len(seen) == 1 and seen[0].training
    assert model.training
    assert not torch.allclose(plain, wrapped)


def test_batchnorm_models_are_attacked_in_eval_mode_without_touching_the_model():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="convnet", width=4, norm="batch"), 3, 8, 4)
    flat = FlatWeights(model)
    flat.vector[~flat.trainable] = torch.rand(int((~flat.trainable).sum())) + 0.5  # non-trivial running stats
    weights = flat.snapshot()
    obs = observe_gradient(model, flat, weights, torch.rand(2, 3, 8, 8), torch.tensor([0, 2]))
    flat.load(weights)
    # eval mode: running statistics are read from the weights, never updated in place (vmap cannot)
    result = InvertingGradients(iterations=2)(model, flat, [obs, obs], [0, 1])
    assert torch.isfinite(result.objective).all()
    assert torch.equal(flat.vector, weights)
