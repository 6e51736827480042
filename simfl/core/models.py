"""Model factory: every model is encoder → latent → head.

The split is what later defences need: a latent-perturbation defence replaces
``latent`` (an identity by default), BiDO reads the encoder's features, and an
attacker knows where the head starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from simfl.core.config import ModelConfig


def norm_layer(kind: str) -> Callable[[int], nn.Module]:
    """BatchNorm, GroupNorm (what Opacus and vmap-based attacks need) or nothing."""
    if kind == "batch":
        return nn.BatchNorm2d
    if kind == "group":
        return lambda channels: nn.GroupNorm(math.gcd(channels, 8), channels)
    return lambda channels: nn.Identity()


def pool_windows(size: int, out: int) -> tuple[list[int], list[int]]:
    """Start and end of each of ``out`` adaptive-pooling windows over ``size`` (PyTorch's rule)."""
    starts = [(i * size) // out for i in range(out)]
    ends = [-(-((i + 1) * size) // out) for i in range(out)]
    return starts, ends


def _window_matrix(size: int, out: int, like: torch.Tensor) -> torch.Tensor:
    """(out, size): row i averages window i (the general, overlapping-and-uneven case)."""
    starts, ends = pool_windows(size, out)
    m = torch.zeros(out, size, dtype=like.dtype, device=like.device)
    for i, (s, e) in enumerate(zip(starts, ends, strict=True)):
        m[i, s:e] = 1.0 / (e - s)
    return m


class AvgPoolTo(nn.Module):
    """Average pooling to a fixed output size, with kernels that are deterministic on CUDA.

    ``nn.AdaptiveAvgPool2d`` computes the same windows, but its CUDA backward
    accumulates with atomics and raises under ``torch.use_deterministic_algorithms``
    (which every GPU actor turns on). The windows are fixed once the input size
    is, so the same average is taken by deterministic kernels instead:

    - 1×1 output: a mean over the spatial axes (what ``adaptive_avg_pool2d`` itself does then);
    - windows of one size at one stride (7→2 is k 4 at stride 3; every shipped
      model at 28 and 32 px): ``avg_pool2d``, whose CPU results are bit-identical
      to adaptive pooling for these sizes (tested);
    - anything else (e.g. 11→4, windows 3, 4, 4, 3): two small averaging matmuls.
    """

    def __init__(self, output_size: int) -> None:
        super().__init__()
        self.output_size = output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Average-pool the last two dims of ``x`` to ``output_size`` square."""
        out = self.output_size
        h, w = x.shape[-2:]
        if out == 1:
            return x.mean((-2, -1), keepdim=True)
        kernel, stride = [], []
        for size in (h, w):
            starts, ends = pool_windows(size, out)
            sizes = {e - s for s, e in zip(starts, ends, strict=True)}
            steps = {b - a for a, b in zip(starts, starts[1:], strict=False)}
            if len(sizes) != 1 or len(steps) != 1:
                return torch.einsum("...hw,ih,jw->...ij", x, _window_matrix(h, out, x), _window_matrix(w, out, x))
            kernel.append(sizes.pop())
            stride.append(steps.pop())
        return F.avg_pool2d(x, kernel, stride)

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"output_size={self.output_size}"


class SplitNet(nn.Module):
    """``head(latent(encoder(x)))`` with the latent exposed as a swappable module."""

    def __init__(self, encoder: nn.Module, latent_dim: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.latent: nn.Module = nn.Identity()  # a defence may swap in its own layer
        self.head = nn.Linear(latent_dim, num_classes)
        self.latent_dim = latent_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The (perturbed) latent the head sees: ``latent(encoder(x))``."""
        return self.latent(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: ``head(latent(encoder(x)))``."""
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
        AvgPoolTo(2),
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
        AvgPoolTo(5),
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
    from torchvision.models import resnet18  # noqa: PLC0415  (lazy: seconds per Ray worker, and most runs never use it)

    net = resnet18(weights=None, norm_layer=norm_layer(norm))
    stride = 1 if image_size <= 32 else 2
    net.conv1 = nn.Conv2d(channels, 64, 3, stride=stride, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.avgpool = AvgPoolTo(1)  # torchvision's AdaptiveAvgPool2d(1): the same mean, without the deny-listed module
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
