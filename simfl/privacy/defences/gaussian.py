"""Gaussian noise on what a client shares: N(0, σ²) added to every shared parameter entry.

The noise defence of Zhu et al., "Deep Leakage from Gradients" (NeurIPS 2019,
§5 "Defense Strategies", noisy gradients), as breaching implements it (its
users' ``local_diff_privacy.gradient_noise``: ``grad += Normal(0, scale)``
per parameter gradient). ``sigma`` is **absolute**: the standard deviation of
the noise on each entry, in the units of what is shared, not scaled by the
update's norm, a clipping bound or the learning rate. DLG quotes its settings
as variances, 10⁻⁴ to 10⁻¹, i.e. σ from 0.01 to about 0.32. No clipping, so
no (ε, δ) guarantee: that is DP-SGD (``defence: dpsgd``).

It acts on what a client shares in both views: the update (local − global,
:meth:`GaussianNoise.share`) and the gradient
(:meth:`GaussianNoise.shared_gradient`); local training itself is plain. The
same σ is added in either view, so relative to the signal it is a larger
perturbation of an update (whose entries are of the order of learning rate ×
gradient) than of a gradient. The float buffers (BatchNorm running statistics)
that the update view also carries get no noise: they are not gradients, and
noise could make a running variance negative.

Randomness: the client's own (seed, client, round) generator, the one local
training and the gradient view already derive (``simfl.core.seeding``), never
torch's global RNG. In the update view, :meth:`GaussianNoise.begin` keeps the
generator local training was given and :meth:`GaussianNoise.share` draws from
it after training; in the gradient view the noise is drawn from the generator
:meth:`GaussianNoise.shared_gradient` is called with. Draws are made on the
CPU and moved, so the noise does not depend on the device (see
``opacus_parts.HostNoiseDPOptimizer``).

Attackers. The naive attacker is not exact: it matches a noise-free simulated
gradient to a noisy one (:meth:`GaussianNoise.naive_is_exact`). An adaptive
attacker does no better: the noise realisation is unknown to it, and its mean
is zero, so the best model of the victim's share is the noise-free one, which
the naive attacker already computes (as DP-SGD's adaptive attacker models its
noise by its mean, none). :meth:`GaussianNoise.disclosure` is therefore None:
the adaptive attacker equals the naive one. (A learned attack, ``lti``, could
still train on noisy shares through ``Disclosure.shared_gradient``; disclosing
it would also rerun every optimisation attack as "adaptive", identical to its
naive run, so it is left out.)
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, NonNegativeFloat
from torch import nn

from simfl.core.plugins import PluginConfig
from simfl.core.seeding import torch_generator
from simfl.core.weights import FlatWeights
from simfl.privacy.defences.base import DEFENCES, SearchKnob
from simfl.privacy.defences.pruning import SharedEntriesDefence, segment_mask


def add_noise(vector: torch.Tensor, mask: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """A copy of ``vector`` with N(0, σ²) noise on the entries ``mask`` selects, drawn in order on the CPU.

    σ = 0 returns an unchanged copy and draws nothing.
    """
    out = vector.clone()
    if sigma == 0:
        return out
    count = int(mask.sum())
    noise = torch.randn(count, generator=generator, dtype=vector.dtype) * sigma
    out[mask] += noise.to(vector.device)
    return out


class GaussianNoiseConfig(PluginConfig):
    """``gaussian_noise``: each client adds N(0, σ²) to every parameter entry it shares (σ absolute, as in DLG)."""

    kind: Literal["gaussian_noise"] = "gaussian_noise"
    sigma: NonNegativeFloat = Field(
        0.01, allow_inf_nan=False,
        description="std of the Gaussian noise added to every shared parameter entry, absolute (in the units of the "
        "shared gradient or update); 0: none",
    )


@DEFENCES.register(GaussianNoiseConfig)
class GaussianNoise(SharedEntriesDefence):
    """N(0, σ²) on every parameter entry a client shares (see the module docstring).

    Logged per client (``share``): ``noise_norm_ratio``, ‖noise‖ / ‖update‖ over
    the parameters (0 without noise, ∞ for a zero update with noise): how far
    the noise buries the update the server aggregates.
    """

    client_figures: ClassVar[dict[str, tuple[str, ...]]] = {"noise_norm_ratio": ("mean", "max")}
    # Utility falls as σ grows; searched in log space, as σ matters by its order of magnitude. Measured on
    # the default convnet and training (lr 0.05, one epoch of 64 images in batches of 32), an update entry's RMS is
    # ~3e-4: at σ = 1e-6 the noise's norm is ~0.4% of the update's, while at σ = 0.1 each round adds
    # noise several times the weights' own entries (median |w| ~0.02), so the target utility lies between.
    search_knob: ClassVar[SearchKnob | None] = SearchKnob("sigma", 1e-6, 0.1, falls=True, log=True)

    def __init__(self, cfg: GaussianNoiseConfig, shape: tuple[int, int, int], seed: int) -> None:
        super().__init__(cfg, shape, seed)
        self.sigma = float(cfg.sigma)
        self._generator: torch.Generator | None = None  # the current client's, from begin; used once by share

    # ------------------------------------------------------------ client side

    def _mask(self, length: int, device: torch.device) -> torch.Tensor:
        return segment_mask(self._layout(), length, device)

    def begin(self, model: nn.Module, flat: FlatWeights, generator: torch.Generator, state: dict[str, Any]) -> None:
        """Before a client's work: keep its (seed, client, round) generator for :meth:`share`, and ``flat``'s layout."""
        self._bind(flat)
        self._generator = generator

    def share(self, delta: torch.Tensor) -> torch.Tensor:
        """The update plus N(0, σ²) on every parameter entry, from the generator :meth:`begin` kept; logs the ratio.

        The generator is used once: a later ``share`` without its own ``begin``
        (outside :func:`~simfl.core.training.train_client`, which always calls both)
        draws from (seed, "gaussian-noise-unbound"), reproducible but the same for every such call.
        """
        generator = self._generator or torch_generator(self.seed, "gaussian-noise-unbound")
        self._generator = None
        mask = self._mask(len(delta), delta.device)
        noisy = add_noise(delta, mask, self.sigma, generator)
        update, noise = float(delta[mask].norm()), float((noisy - delta)[mask].norm())
        self._figures = {"noise_norm_ratio": noise / update if update > 0 else (math.inf if noise > 0 else 0.0)}
        return noisy

    def shared_gradient(
        self, model: nn.Module, flat: FlatWeights, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
        state: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """The gradient of the client's objective on (x, y), plus N(0, σ²) per parameter entry from ``generator``."""
        self._bind(flat)
        gradient = super().shared_gradient(model, flat, x, y, generator, state)
        self._generator = None  # begin (inside the gradient above) kept it; this noise is drawn explicitly below
        return add_noise(gradient, self._mask(len(gradient), gradient.device), self.sigma, generator)
