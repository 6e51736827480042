"""Hilbert–Schmidt independence criterion (HSIC) on mini-batches, differentiable.

BiDO (``simfl.defences.bido``) penalises how much a hidden representation
depends on the input and rewards how much it depends on the label. HSIC
measures that dependence from a batch alone, without a density model or an
extra network, and it is differentiable in the representation, so it can sit
in the training loss. Pure functions, written from the definitions
(Gretton et al., 2005): kernels are (n, n) Gram matrices over one batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Floors that keep a degenerate batch (all samples equal) finite instead of NaN.
_MIN_BANDWIDTH = 1e-12
_MIN_SELF_HSIC = 1e-12


def gaussian_kernel(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Gaussian Gram matrix of the n samples in ``x`` (n, ...), flattened: (n, n).

    K_ij = exp(-||x_i - x_j||² / (2 σ² m)), m the median off-diagonal squared
    distance. The median heuristic puts the bandwidth on the data's own scale,
    so one ``sigma`` serves pixels, conv feature maps and latents alike; m is
    detached because it sets the kernel's scale, not something to optimise
    (otherwise the loss could move HSIC by merely rescaling features).
    """
    n = x.shape[0]
    flat = x.reshape(n, -1)
    # Distances do not change under a shift; centring first keeps the Gram-matrix
    # form below from cancelling large norms in float32.
    flat = flat - flat.mean(0, keepdim=True)
    sq = flat.pow(2).sum(1)
    # Gram form: memory O(n² + n·d), not O(n²·d) as pairwise differences would take.
    dist = (sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T).clamp_min(0.0)
    if n > 1:
        i, j = torch.triu_indices(n, n, offset=1, device=x.device)
        median = dist.detach()[i, j].median().clamp_min(_MIN_BANDWIDTH)
    else:  # one sample: no pair to measure, any bandwidth gives K = [[1]]
        median = torch.ones((), dtype=dist.dtype, device=dist.device)
    return torch.exp(-dist / (2.0 * sigma**2 * median))


def label_kernel(y: torch.Tensor, num_classes: int, sigma: float = 1.0) -> torch.Tensor:
    """Gaussian Gram matrix of integer labels ``y`` (n,) via their one-hot vectors.

    The same kernel as for features, so HSIC(Y, Z) and HSIC(X, Z) are on the same footing.
    """
    return gaussian_kernel(F.one_hot(y, num_classes).to(torch.get_default_dtype()), sigma)


def _centre(k: torch.Tensor) -> torch.Tensor:
    """H K H with H = I − 11ᵀ/n, by subtracting row, column and grand means (no n×n H formed)."""
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def _zero_like_graph(kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    """A 0 that stays connected to the inputs' graph, so ``backward`` on it works."""
    return (kx * 0.0).sum() + (ky * 0.0).sum()


def hsic(kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    """Biased empirical HSIC, tr(Kx H Ky H) / (n − 1)², from two (n, n) Gram matrices.

    Zero for n < 2: one sample carries no evidence of dependence (and the
    centred kernel of one sample is 0 anyway).
    """
    n = kx.shape[0]
    if n < 2:
        return _zero_like_graph(kx, ky)
    # tr(Kx H Ky H) = <H Kx H, Ky>_F for symmetric Ky, since H is symmetric and idempotent.
    return (_centre(kx) * ky).sum() / (n - 1) ** 2


def normalized_hsic(kx: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    """HSIC(X, Y) / sqrt(HSIC(X, X) · HSIC(Y, Y)): dependence in [0, 1], free of the kernels' scale.

    Unnormalised HSIC grows with each variable's own spread, so a loss on it
    could be lowered by collapsing a layer rather than by forgetting the input;
    the ratio (a cosine between centred kernels) cannot. With PSD kernels it is
    ≥ 0 and, by Cauchy–Schwarz, ≤ 1 (up to rounding). The self terms are
    floored at a small epsilon so that a constant batch gives 0 rather than NaN.
    Zero for n < 2 (HSIC of one sample is 0), still differentiable.
    """
    if kx.shape[0] < 2:
        return _zero_like_graph(kx, ky)
    xy = hsic(kx, ky)
    xx = hsic(kx, kx).clamp_min(_MIN_SELF_HSIC)
    yy = hsic(ky, ky).clamp_min(_MIN_SELF_HSIC)
    return xy / torch.sqrt(xx * yy)
