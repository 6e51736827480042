"""Victim observations shared by the attack tests."""

import torch

from simfl.attacks import observe_gradient, observe_update
from simfl.config import ModelConfig
from simfl.models import build_model
from simfl.weights import FlatWeights


def victims(model, flat, view, batch=2, count=3, seed=100, lr=0.1):
    """Observations from ``count`` clients with different weights, images and labels (and local lr)."""
    out = []
    for v in range(count):
        torch.manual_seed(seed + v)
        w = FlatWeights(build_model(ModelConfig(arch="convnet", width=4), 3, 8, 4)).vector
        x, y = torch.rand(batch, 3, 8, 8), torch.randint(0, 4, (batch,))
        if view == "gradient":
            out.append(observe_gradient(model, flat, w, x, y))
        else:
            out.append(observe_update(model, flat, w, x, y, lr=lr * (v + 1), local_steps=2, local_batch_size=1))
    return out
