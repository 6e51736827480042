"""Networks from a vector (a latent, recovered features, a sketch of a gradient) back to an image.

The latent defence trains one against its own noise on the server (its
adversary's proxy, ``simfl.privacy.defences.latent``); the learned attacks
(``simfl.privacy.attacks.learned``, ``simfl.privacy.attacks.lti``) train them on the server's
auxiliary data to invert what a victim gave away. One architecture and one
fitting loop for all, so that an attack is never handicapped by a weaker
decoder than the defence trained against.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from simfl.core.seeding import torch_generator


class Decoder(nn.Module):
    """Vector → image in [0, 1]: a linear layer to (2·width, size/4, size/4), then two transposed convolutions."""

    def __init__(self, latent_dim: int, channels: int, size: int, width: int = 32) -> None:
        super().__init__()
        self.size = size
        self.base = -(-size // 4)
        self.width = width
        self.fc = nn.Linear(latent_dim, 2 * width * self.base * self.base)
        self.up = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1),
            nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 4, 2, 1),
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, C, size, size) in [0, 1] from latents (B, D)."""
        out = self.up(self.fc(z).view(-1, 2 * self.width, self.base, self.base))
        return out[..., : self.size, : self.size]


def seeded_decoder(latent_dim: int, channels: int, size: int, seed: int, purpose: str) -> Decoder:
    """A decoder initialised from (seed, purpose) alone, leaving the caller's global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(torch_generator(seed, purpose).initial_seed())
        return Decoder(latent_dim, channels, size)


# Fitted decoders by what determines them (see fit_decoder). Written here because functools' caches key on
# object identity or hashability, and tensors must be keyed by their contents. A few entries: an attack job
# fits at most one decoder per layer and attacker view; a new round's weights never hit an old entry.
_FITTED: OrderedDict[tuple, Decoder] = OrderedDict()
_FITTED_MAX = 4


def _digest(t: torch.Tensor) -> str:
    return hashlib.blake2b(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes(),
                           digest_size=16).hexdigest()


def fit_decoder(
    inputs: torch.Tensor, images: torch.Tensor, steps: int, lr: float, batch: int, seed: int, purpose: str
) -> Decoder:
    """A decoder fitted by Adam on MSE from ``inputs`` (N, D) to ``images`` (N, C, H, W), from (seed, purpose).

    Inputs are standardised per feature first (the fitted decoder keeps the
    statistics), so that features of any scale train alike. The fit is a pure
    function of its arguments, so a second call with the same ones (the naive and
    the adaptive attacker where the defence changes nothing they read, or
    ``decoded_ig``'s decoder beside ``feature_decoder``'s) gets the decoder fitted
    first: the same result without training it again. Returned decoders are frozen.
    """
    key = (_digest(inputs), tuple(inputs.shape), _digest(images), tuple(images.shape), str(inputs.device),
           inputs.dtype, steps, lr, batch, seed, purpose)
    if key in _FITTED:
        _FITTED.move_to_end(key)
        return _FITTED[key]
    decoder = _fit(inputs, images, steps, lr, batch, seed, purpose)
    _FITTED[key] = decoder
    if len(_FITTED) > _FITTED_MAX:
        _FITTED.popitem(last=False)
    return decoder


def _fit(inputs: torch.Tensor, images: torch.Tensor, steps: int, lr: float, batch: int, seed: int,
         purpose: str) -> Decoder:
    mean, std = inputs.mean(0), inputs.std(0).clamp_min(1e-6)
    decoder = seeded_decoder(inputs.shape[1], images.shape[1], images.shape[-1], seed, purpose).to(inputs.device)
    decoder.register_buffer("in_mean", mean)
    decoder.register_buffer("in_std", std)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
    gen = torch_generator(seed, purpose, 1)
    scaled = (inputs - mean) / std
    for _ in range(steps):
        idx = torch.randint(0, len(inputs), (min(batch, len(inputs)),), generator=gen).to(inputs.device)
        loss = F.mse_loss(decoder(scaled[idx]), images[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return decoder.eval().requires_grad_(False)


def decode(decoder: Decoder, inputs: torch.Tensor) -> torch.Tensor:
    """Images from raw inputs, standardised as when the decoder was fitted."""
    mean, std = cast(torch.Tensor, decoder.in_mean), cast(torch.Tensor, decoder.in_std)
    with torch.no_grad():
        return decoder((inputs - mean) / std)
