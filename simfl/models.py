"""Model factory: every model is encoder → latent → head.

The split is what later defences need: a latent-perturbation defence replaces
``latent`` (an identity by default), BiDO reads the encoder's features, and an
attacker knows where the head starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from simfl.config import ModelConfig


def norm_layer(kind: str) -> Callable[[int], nn.Module]:
    """BatchNorm, GroupNorm (what Opacus and vmap-based attacks need) or nothing."""
    if kind == "batch":
        return nn.BatchNorm2d
    if kind == "group":
        return lambda channels: nn.GroupNorm(math.gcd(channels, 8), channels)
    return lambda channels: nn.Identity()


class SplitNet(nn.Module):
    """``head(latent(encoder(x)))`` with the latent exposed as a swappable module."""

    def __init__(self, encoder: nn.Module, latent_dim: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.latent = nn.Identity()
        self.head = nn.Linear(latent_dim, num_classes)
        self.latent_dim = latent_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.latent(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _convnet(channels: int, width: int, latent_dim: int, norm: str) -> nn.Module:
    make_norm = norm_layer(norm)
    w = width

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), make_norm(cout), nn.ReLU()]

    return nn.Sequential(
        *block(channels, w),
        nn.MaxPool2d(2),
        *block(w, 2 * w),
        nn.MaxPool2d(2),
        *block(2 * w, 4 * w),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * w, latent_dim),
        nn.ReLU(),
    )


def _lenet(channels: int, latent_dim: int, norm: str) -> nn.Module:
    make_norm = norm_layer(norm)
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5, padding=2),
        make_norm(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        make_norm(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(5),
        nn.Flatten(),
        nn.Linear(400, 120),
        nn.ReLU(),
        nn.Linear(120, latent_dim),
        nn.ReLU(),
    )


def _resnet18(channels: int, image_size: int, latent_dim: int, norm: str) -> nn.Module:
    """torchvision's ResNet-18 with a 3×3 stem and no max-pool, as usual for small images.

    At 28–32 px the stem keeps full resolution; at 64 px and above it strides by 2
    so that compute stays close to the 32 px case.
    """
    net = torchvision.models.resnet18(weights=None, norm_layer=norm_layer(norm))
    stride = 1 if image_size <= 32 else 2
    net.conv1 = nn.Conv2d(channels, 64, 3, stride=stride, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    if latent_dim == 512:
        return net
    return nn.Sequential(net, nn.Linear(512, latent_dim), nn.ReLU())


DEFAULT_LATENT = {"convnet": 128, "lenet": 84, "resnet18": 512}


def build_model(cfg: ModelConfig, channels: int, image_size: int, num_classes: int) -> SplitNet:
    """Build the scenario's model; weights are initialised from torch's global RNG."""
    latent = cfg.latent_dim or DEFAULT_LATENT[cfg.arch]
    if cfg.arch == "convnet":
        encoder = _convnet(channels, cfg.width, latent, cfg.norm)
    elif cfg.arch == "lenet":
        encoder = _lenet(channels, latent, cfg.norm)
    else:
        encoder = _resnet18(channels, image_size, latent, cfg.norm)
    return SplitNet(encoder, latent, num_classes)
