"""Acquisition shift: make each hospital's scanner or microscope look different.

Real sites differ in stain and colour balance, exposure, focus, sensor noise and
resolution; that feature shift, on top of label skew, is what makes federated
clients non-IID in biomedical imaging. A population has a mean device
(:class:`simfl.core.config.ShiftConfig`) and each client's device varies around it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from simfl.core.config import ShiftConfig
from simfl.core.seeding import rng

# Images per torch pass: bounds the float32 working set (~75 MB at 28x28x3) whatever the batch.
_CHUNK = 8192


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy fields with == is ambiguous
class Devices:
    """One acquisition device per row."""

    gain: np.ndarray  # (n, C) float32, multiplicative per channel
    brightness: np.ndarray  # (n,) float32, additive offset on the [0, 1] scale
    contrast: np.ndarray  # (n,) float32, factor about each image's own mean

    def __len__(self) -> int:
        return int(len(self.brightness))


def draw_devices(shift: ShiftConfig, seed: int, purpose: str, ids: np.ndarray, channels: int) -> Devices:
    """One device per id, each from its own ``rng(seed, purpose, id)``.

    Per-id streams make a client's device a function of (seed, id) alone, so it
    is the same whichever subset of clients an actor draws. Log gain per channel
    ~ N(log color, color_jitter^2); brightness ~ N(brightness, jitter^2); log
    contrast ~ N(log contrast, jitter^2). Five normals are drawn per id whatever
    ``channels`` is, so grayscale and RGB devices share brightness and contrast;
    a grayscale gain is the mean of ``color`` jittered by the first normal.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    z = np.zeros((len(ids), 5))
    if shift.color_jitter > 0 or shift.jitter > 0:
        for row, i in enumerate(ids):
            z[row] = rng(seed, purpose, int(i)).standard_normal(5)
    color = np.asarray(shift.color, dtype=np.float64)
    if channels == 1:
        gain = color.mean() * np.exp(shift.color_jitter * z[:, :1])
    else:
        gain = color * np.exp(shift.color_jitter * z[:, :3])
    return Devices(
        gain=gain.astype(np.float32),
        brightness=(shift.brightness + shift.jitter * z[:, 3]).astype(np.float32),
        contrast=(shift.contrast * np.exp(shift.jitter * z[:, 4])).astype(np.float32),
    )


def _blur_matrix(length: int, sigma: float) -> np.ndarray:
    """1-D Gaussian blur with reflect padding as a matrix; radius 3 sigma, capped by the size."""
    radius = min(math.ceil(3 * sigma), length - 1)
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    src = np.arange(length)[:, None] + taps[None, :]
    src = np.where(src < 0, -src, np.where(src > length - 1, 2 * (length - 1) - src, src))
    m = np.zeros((length, length))
    np.add.at(m, (np.repeat(np.arange(length), len(taps)), src.reshape(-1)), np.tile(kernel, length))
    return m


def _resample_matrix(length: int, factor: int) -> np.ndarray:
    """Area-average down by ``factor`` then nearest-neighbour up, as a (length, length) matrix.

    Windows are those of ``adaptive_avg_pool``, so they are exact ``factor``
    blocks when ``factor`` divides ``length``; nearest source is torch's
    ``floor(dst * small / length)``.
    """
    small = math.ceil(length / factor)
    down = np.zeros((small, length))
    for i in range(small):
        lo, hi = (i * length) // small, -((-(i + 1) * length) // small)
        down[i, lo:hi] = 1.0 / (hi - lo)
    up = np.zeros((length, small))
    up[np.arange(length), (np.arange(length) * small) // length] = 1.0
    return up @ down


def _spatial_matrix(length: int, shift: ShiftConfig) -> np.ndarray | None:
    """Blur then resample along one axis as one matrix, or None when both are off."""
    if shift.blur == 0 and shift.downsample == 1:
        return None
    m = np.eye(length)
    if shift.blur > 0:
        m = _blur_matrix(length, shift.blur) @ m
    if shift.downsample > 1:
        m = _resample_matrix(length, shift.downsample) @ m
    return m


def apply_shift(images: np.ndarray, shift: ShiftConfig, devices: Devices, noise_seed: int) -> np.ndarray:
    """Render ``images`` (n, H, W, C) uint8 as seen by ``devices`` (one row per image).

    Order: per-channel gain, contrast about the image's mean (over all pixels
    and channels, so colour balance is kept), brightness, Gaussian blur
    (separable, reflect padding), downsample by area averaging then
    nearest-neighbour upsample back (blocky, like a low-resolution sensor;
    exact f x f blocks when f divides the size), Gaussian pixel noise from
    ``noise_seed``, clip to [0, 1], round to uint8. The identity shift returns
    ``images`` itself (not a copy).

    For speed the linear steps are regrouped, with the same result: blur and
    resampling are one matrix per axis whose rows sum to 1, so they commute
    with the per-image affine map ``a * x + o`` that gain, contrast and
    brightness reduce to; the contrast mean is taken before blurring, as the
    order above requires.
    """
    if shift.is_identity:
        return images
    n, h, w, c = images.shape
    if len(devices) != n or devices.gain.shape[1] != c:
        raise ValueError(
            f"devices have {len(devices)} rows x {devices.gain.shape[1]} channels; images are {n} x {c}"
        )
    mh_np, mw_np = _spatial_matrix(h, shift), _spatial_matrix(w, shift)
    mh = None if mh_np is None else torch.tensor(mh_np, dtype=torch.float32)
    mw_t = None if mw_np is None else torch.tensor(mw_np.T, dtype=torch.float32)
    gen = torch.Generator().manual_seed(noise_seed)
    noise = torch.empty((min(n, _CHUNK), c, h, w)) if shift.noise > 0 else None
    out = np.empty_like(images)
    for s in range(0, n, _CHUNK):
        e = min(s + _CHUNK, n)
        # torch must not wrap a read-only array (Ray's object store): copy those bytes first.
        chunk = images[s:e] if images.flags.writeable else images[s:e].copy()
        # Work on the 0..255 scale in NCHW float: brightness and noise are scaled by 255 instead.
        x = torch.from_numpy(chunk).permute(0, 3, 1, 2)
        x = x.to(torch.float32, memory_format=torch.contiguous_format)
        gain = torch.tensor(devices.gain[s:e], dtype=torch.float32)
        contrast = torch.tensor(devices.contrast[s:e], dtype=torch.float32)[:, None]
        # gain, then contrast c about mean m, then + brightness b  ==  (c * gain) * x + (1 - c) * m + b
        m = (x.mean(dim=(2, 3)) * gain).mean(dim=1, keepdim=True)
        scale = contrast * gain
        brightness = torch.tensor(devices.brightness[s:e], dtype=torch.float32)[:, None]
        offset = (1 - contrast) * m + 255 * brightness
        if mw_t is not None:
            x = x @ mw_t
        if mh is not None:
            x = torch.matmul(mh, x)
        x.mul_(scale[:, :, None, None]).add_(offset[:, :, None, None])
        if noise is not None:
            x.add_(noise[: e - s].normal_(0.0, 255 * shift.noise, generator=gen))
        x.clamp_(0, 255).round_()
        torch.from_numpy(out[s:e]).copy_(x.permute(0, 2, 3, 1))
    return out
