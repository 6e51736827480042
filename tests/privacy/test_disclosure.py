"""The adaptive-attacker hook: an attacker told how a defence works beats one that is not."""

import copy

import torch
from torch import nn

from simfl.core.config import ModelConfig
from simfl.core.models import build_model
from simfl.core.weights import FlatWeights
from simfl.privacy.attacks import InvertingGradients, adapt, get_attack, observe_gradient
from simfl.privacy.disclosure import Disclosure
from simfl.privacy.metrics import psnr


class SecretScale(nn.Module):
    """A toy defence: the latent is scaled by a secret per-unit factor (no parameters, so names stay)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = torch.linspace(-3.0, 3.0, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.scale


def defended(model: nn.Module) -> nn.Module:
    out = copy.deepcopy(model)
    out.latent = SecretScale(model.latent_dim)
    return out


def test_adapt_without_disclosure_is_the_same_attack():
    attack = get_attack("ig", iterations=3)
    assert adapt(attack, None) is attack
    assert adapt(attack, Disclosure()) == attack


def test_adapt_passes_what_is_disclosed_and_keeps_the_rest():
    attack = get_attack("dlg", iterations=3)
    adapted = adapt(attack, Disclosure(model_wrapper=defended))
    assert adapted.model_wrapper is defended and adapted.loss_fn is attack.loss_fn and adapted.iterations == 3


def test_the_adaptive_attacker_reconstructs_what_the_oblivious_one_cannot():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="convnet", norm="none", width=4), 3, 8, 4)
    flat = FlatWeights(model)
    weights = flat.snapshot()
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([1, 3])
    victim_model = defended(model)  # the client trains through the defence
    victim_flat = FlatWeights(victim_model)
    observations = [observe_gradient(victim_model, victim_flat, weights, x[i : i + 1], y[i : i + 1]) for i in range(2)]
    attack = InvertingGradients(iterations=300, tv_weight=0.01)
    oblivious = attack(model, flat, observations, [1, 2])
    adaptive = adapt(attack, Disclosure(model_wrapper=defended))(model, flat, observations, [1, 2])
    assert (adaptive.objective < oblivious.objective).all()
    gain = psnr(adaptive.images[:, 0], x) - psnr(oblivious.images[:, 0], x)
    assert (gain > 1.0).all(), gain
