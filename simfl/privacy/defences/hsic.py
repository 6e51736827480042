"""Kernel dependence measures on mini-batches, differentiable: HSIC and its normalisations.

BiDO (``simfl.privacy.defences.bido``) penalises how much a hidden representation
depends on the input and rewards how much it depends on the label. A kernel
dependence measure estimates that from one batch alone, without a density
model or an extra network, and it is differentiable in the representation, so
it can sit in the training loss. Pure functions, written from the definitions;
kernels are (n, n) Gram matrices over one batch.

Two normalisations of HSIC (Gretton et al., 2005), because BiDO has two in simfl:

- :func:`normalized_cca_hsic`, what Peng et al.'s published BiDO code trains
  with (``hsic_normalized_cca``, after Fukumizu et al.'s normalised
  cross-covariance): tr(R_X R_Y), R = K̃(K̃ + εmI)⁻¹ with K̃ the centred Gram
  matrix. It uses the dimension-scaled Gaussian kernel
  (:func:`scaled_gaussian_kernel`) on X and Z and the linear kernel on one-hot
  labels (:func:`linear_label_kernel`), as their code does.
- :func:`normalized_hsic`, simfl's earlier variant: the cosine between centred
  kernels (CKA-like), with median-heuristic Gaussian kernels
  (:func:`gaussian_kernel`, :func:`label_kernel`) on all three.
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

    The same kernel as for features, so HSIC(Y, Z) and HSIC(X, Z) are on the
    same footing (simfl's earlier, ``cka`` variant of BiDO).
    """
    return gaussian_kernel(F.one_hot(y, num_classes).to(torch.get_default_dtype()), sigma)


def scaled_gaussian_kernel(x: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    """Gaussian Gram matrix with a fixed, dimension-scaled bandwidth: K_ij = exp(-||x_i - x_j||² / (2 σ² d)).

    ``x`` (n, ...) is flattened to d features. Peng et al.'s BiDO code uses
    this kernel on the input and on every hidden layer, with σ = 5: dividing the
    squared distance by d makes it a mean over features, so one σ fits layers
    of very different widths without looking at the batch. Unlike the median
    heuristic (:func:`gaussian_kernel`) the bandwidth does not follow the
    data's scale, so the kernel sees how spread the features are: the wide
    bandwidth keeps it close to a low-order (near-linear) kernel, whose few
    large eigenvalues are what the ε of :func:`normalized_cca_hsic` leaves in.
    """
    flat = x.flatten(1)  # (n, d), also for an empty batch
    d = flat.shape[1]
    flat = flat - flat.mean(0, keepdim=True)  # shift-free distances; centring keeps the Gram form accurate in float32
    sq = flat.pow(2).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T).clamp_min(0.0)
    return torch.exp(-dist / (2.0 * sigma**2 * d))


def linear_kernel(x: torch.Tensor) -> torch.Tensor:
    """Linear Gram matrix K = X Xᵀ of the n samples in ``x`` (n, ...), flattened."""
    flat = x.flatten(1)
    return flat @ flat.T


def linear_label_kernel(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Linear Gram matrix of the one-hot labels: K_ij = 1 if y_i = y_j, else 0.

    Peng et al.'s default label kernel (``ktype='linear'``). For labels it is
    the natural choice: a class is a category, not a point in space, and the
    linear kernel of one-hot codes is exactly "same class or not", with no
    bandwidth to choose; its centred form has rank (classes in the batch − 1),
    so under :func:`normalized_cca_hsic` the label side is close to a
    projection onto the class indicators.
    """
    return linear_kernel(F.one_hot(y, num_classes).to(torch.get_default_dtype()))


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


# Peng et al.'s ε: the ridge is ε·m·I, m the batch size.
NCCA_EPS = 1e-5


def normalized_cca_hsic(kx: torch.Tensor, ky: torch.Tensor, eps: float = NCCA_EPS) -> torch.Tensor:
    """Normalised-CCA HSIC of two (n, n) Gram matrices: tr(R_X R_Y), R = K̃ (K̃ + ε n I)⁻¹, K̃ = H K H.

    What Peng et al.'s BiDO trains with. Plain HSIC, tr(K̃_X K̃_Y), weighs every
    direction of the kernel feature space by its variance, so it grows with each
    side's spread; replacing K̃ by R whitens it: R has K̃'s eigenvectors with
    eigenvalues λ/(λ + εn) ∈ [0, 1), ≈ 1 for directions above the ridge and ≈ 0
    below it. The trace then counts how well the two sides' significant
    directions align (a sum of squared kernel canonical correlations), each
    counting about once however large its variance. The ridge is absolute,
    though: directions whose kernel variance falls below εn stop counting, so
    with a fixed bandwidth (:func:`scaled_gaussian_kernel`) a layer shrunk far
    below it scores near 0 (training hard on a1 alone does collapse a layer so).
    Values lie in [0, min(rank K̃_X, rank K̃_Y)] ≤ n − 1, not [0, 1]; with the
    linear label kernel the label side has rank (classes in the batch − 1).

    The ridge ε·n grows with the batch as their code has it (``epsilon * m``),
    so ε is per sample. Their code centres on one side only, R = K H (K H + εnI)⁻¹;
    the trace is the same: H·(K H) = (H K H)·H, so H f(K H) = f(H K H) H for
    f(A) = A (A + cI)⁻¹, and f(K H) H = f(K H), hence tr(f(K_X H) f(K_Y H)) =
    tr(f(H K_X H) f(H K_Y H)). With PSD kernels H K H + εnI has eigenvalues ≥ εn,
    so the solve is always well posed: a constant batch (K̃ = 0) gives 0, not
    NaN. Zero for n < 2 (one sample shows no dependence), still differentiable.
    """
    n = kx.shape[0]
    if n < 2:
        return _zero_like_graph(kx, ky)
    # The ridge is small (εn ≈ 3e-4 at n = 32), so R amplifies rounding in K by up to ~1/(εn): in
    # float32 the value carries relative errors ~1e-5-1e-4, from the kernel entries as much as from
    # the solve (a float64 solve on float32 kernels was no closer), so it stays in the kernels' dtype.
    ridge = eps * n * torch.eye(n, dtype=kx.dtype, device=kx.device)

    def whitened(k: torch.Tensor) -> torch.Tensor:
        kc = _centre(k)
        # (K̃ + cI)⁻¹ K̃ = K̃ (K̃ + cI)⁻¹ (they commute); a solve, not an explicit inverse.
        return torch.linalg.solve(kc + ridge, kc)

    rx, ry = whitened(kx), whitened(ky)
    # tr(R_X R_Y) = Σ_ij (R_X)_ij (R_Y)_ji.
    return (rx * ry.T).sum()
