"""Kernel dependence measures: simfl's cosine-normalised HSIC, Peng et al.'s normalised-CCA HSIC, their kernels."""

import numpy as np
import pytest
import torch

from simfl.privacy.defences.hsic import (
    NCCA_EPS,
    gaussian_kernel,
    hsic,
    label_kernel,
    linear_kernel,
    linear_label_kernel,
    normalized_cca_hsic,
    normalized_hsic,
    scaled_gaussian_kernel,
)

# ---------------------------------------------------------------- cosine-normalised HSIC (simfl's cka variant)


def test_normalized_hsic_of_a_variable_with_itself_is_one():
    x = torch.randn(32, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    k = gaussian_kernel(x)
    assert k.shape == (32, 32)
    torch.testing.assert_close(torch.diagonal(k), torch.ones(32))
    assert float(normalized_hsic(k, k)) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_normalized_hsic_separates_dependent_from_independent(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 3, generator=g)
    independent = torch.randn(64, 3, generator=g)
    kx = gaussian_kernel(x)
    free = float(normalized_hsic(kx, gaussian_kernel(independent)))
    squared = float(normalized_hsic(kx, gaussian_kernel(x**2)))  # dependent, uncorrelated
    monotone = float(normalized_hsic(kx, gaussian_kernel(torch.tanh(x))))
    assert 0 <= free < 0.15  # biased estimator: small but positive at n = 64
    assert squared > 2 * free
    assert monotone > 0.8


def test_hsic_is_invariant_to_a_consistent_permutation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 5, generator=g)
    y = torch.sin(x[:, :2]) + 0.1 * torch.randn(20, 2, generator=g)
    perm = torch.randperm(20, generator=g)
    kx, ky = gaussian_kernel(x), gaussian_kernel(y)
    kxp, kyp = gaussian_kernel(x[perm]), gaussian_kernel(y[perm])
    torch.testing.assert_close(hsic(kxp, kyp), hsic(kx, ky))
    torch.testing.assert_close(normalized_hsic(kxp, kyp), normalized_hsic(kx, ky))
    # nCCA amplifies the kernels' float32 rounding (permuted, summed in another order) by up to ~1/(εn).
    torch.testing.assert_close(normalized_cca_hsic(kxp, kyp), normalized_cca_hsic(kx, ky), rtol=1e-4, atol=0)
    # ...but not to permuting one side only: that breaks the pairing.
    assert float(normalized_hsic(kxp, ky)) < 0.8 * float(normalized_hsic(kx, ky))


def test_one_sample_gives_zero_and_backward_works():
    ky = label_kernel(torch.tensor([2]), 4)
    for measure, other in ((hsic, ky), (normalized_hsic, ky), (normalized_hsic, None)):
        x = torch.randn(1, 6, requires_grad=True)
        k = gaussian_kernel(x)
        value = measure(k, k if other is None else other)
        assert value.item() == 0.0
        value.backward()
        assert x.grad is not None and torch.all(x.grad == 0)


def test_constant_batch_is_finite():
    k = gaussian_kernel(torch.ones(8, 5))  # all distances 0: bandwidth floored, K = 1
    value = normalized_hsic(k, label_kernel(torch.arange(8) % 4, 4))
    assert torch.isfinite(value) and float(value) == 0.0


# ---------------------------------------------------------------- kernels of the published BiDO


def test_scaled_gaussian_kernel_divides_the_squared_distance_by_the_dimension():
    x = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    flat = x.reshape(5, -1).numpy()
    d = flat.shape[1]  # 6
    dist = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1)
    expected = np.exp(-dist / (2 * 3.0**2 * d))
    np.testing.assert_allclose(scaled_gaussian_kernel(x, 3.0).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_linear_label_kernel_is_same_class_or_not():
    y = torch.tensor([0, 2, 0, 1, 2])
    expected = (y[:, None] == y[None, :]).to(torch.get_default_dtype())
    assert torch.equal(linear_label_kernel(y, 3), expected)
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    assert torch.equal(linear_kernel(x), torch.tensor([[5.0, -2.0], [-2.0, 1.0]]))


# ---------------------------------------------------------------- normalised-CCA HSIC (the published measure)


def ncca_by_hand(kx: np.ndarray, ky: np.ndarray, eps: float) -> float:
    """Peng et al.'s formula, step by step as their code has it (one-sided centring K H, explicit inverses)."""
    m = kx.shape[0]
    h = np.eye(m) - np.ones((m, m)) / m  # centring matrix
    kxc, kyc = kx @ h, ky @ h  # centred on the right only
    rx = kxc @ np.linalg.inv(kxc + eps * m * np.eye(m))  # ridge ε·m·I
    ry = kyc @ np.linalg.inv(kyc + eps * m * np.eye(m))
    return float(np.sum(rx * ry.T))  # = tr(Rx Ry)


KX3 = np.array([[1.0, 0.5, 0.2], [0.5, 1.0, 0.3], [0.2, 0.3, 1.0]])
KY3 = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # linear kernel of one-hot labels (0, 0, 1)


@pytest.mark.parametrize("eps", [NCCA_EPS, 1e-2, 0.1])
def test_ncca_matches_the_formula_worked_by_hand(eps):
    expected = ncca_by_hand(KX3, KY3, eps)
    got = normalized_cca_hsic(torch.tensor(KX3), torch.tensor(KY3), eps=eps)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(expected, rel=1e-10)
    assert 0 < expected < 1  # both centred kernels have rank ≤ 2, the label one rank 1: value ≤ 1


@pytest.mark.parametrize("eps", [NCCA_EPS, 0.1])
def test_ncca_closed_form(eps):
    # Kx = I: centred H, eigenvalues 1 (×3), so Rx = H/(1 + 4ε). Labels (0, 0, 1, 1), linear kernel: centred
    # 2·u uᵀ with u = (1, 1, −1, −1)/2, so Ry = 2/(2 + 4ε)·u uᵀ. tr(Rx Ry) = 2/((2 + 4ε)(1 + 4ε)) since Hu = u.
    kx = torch.eye(4, dtype=torch.float64)
    ky = linear_label_kernel(torch.tensor([0, 0, 1, 1]), 2).double()
    c = 4 * eps
    assert float(normalized_cca_hsic(kx, ky, eps=eps)) == pytest.approx(2 / ((2 + c) * (1 + c)), rel=1e-12)


def test_ncca_with_itself_counts_the_significant_directions():
    # Label side: rank (classes − 1) after centring, every eigenvalue far above the ridge, so tr(R²) ≈ 3.
    ky = linear_label_kernel(torch.arange(32) % 4, 4)
    assert float(normalized_cca_hsic(ky, ky)) == pytest.approx(3.0, abs=1e-3)
    # One class only: the centred kernel is 0, nothing to depend on.
    one = linear_label_kernel(torch.zeros(8, dtype=torch.long), 4)
    assert float(normalized_cca_hsic(one, one)) == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_ncca_separates_dependent_from_independent(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 3, generator=g)
    kx = scaled_gaussian_kernel(x)

    def dep(z):
        return float(normalized_cca_hsic(kx, scaled_gaussian_kernel(z)))

    free = dep(torch.randn(64, 3, generator=g))
    noisy = dep(x + 0.3 * torch.randn(64, 3, generator=g))
    squared = dep(x**2)  # dependent, uncorrelated
    assert 0 <= free < squared < noisy < dep(x)
    assert noisy > 3 * free
    # Labels: features that carry the class against features that do not.
    y = torch.arange(64) % 4
    ky = linear_label_kernel(y, 4)
    centres = 3 * torch.randn(4, 5, generator=g)
    carried = float(normalized_cca_hsic(ky, scaled_gaussian_kernel(centres[y] + torch.randn(64, 5, generator=g))))
    unrelated = float(normalized_cca_hsic(ky, scaled_gaussian_kernel(torch.randn(64, 5, generator=g))))
    assert carried > 2.5 > 2 * unrelated  # ≤ 3 = classes − 1


@pytest.mark.parametrize("n", [0, 1])
def test_ncca_under_two_samples_is_zero_and_differentiable(n):
    x = torch.randn(n, 6, requires_grad=True)
    value = normalized_cca_hsic(scaled_gaussian_kernel(x), linear_label_kernel(torch.zeros(n, dtype=torch.long), 4))
    assert value.item() == 0.0
    value.backward()
    assert x.grad is not None and torch.all(x.grad == 0)


def test_ncca_on_degenerate_batches_is_finite_with_finite_gradients():
    # All samples equal (K = 1, centred 0) or all in one class: 0, and backward stays finite.
    x = torch.ones(8, 5, requires_grad=True)
    y = torch.arange(8) % 4
    for kx, ky in ((scaled_gaussian_kernel(x), linear_label_kernel(y, 4)),
                   (scaled_gaussian_kernel(x), scaled_gaussian_kernel(x))):
        value = normalized_cca_hsic(kx, ky)
        assert torch.isfinite(value) and float(value.detach()) == 0.0
        (grad,) = torch.autograd.grad(value, x)
        assert torch.isfinite(grad).all()
    z = torch.randn(8, 5, requires_grad=True)
    value = normalized_cca_hsic(scaled_gaussian_kernel(z), linear_label_kernel(torch.zeros(8, dtype=torch.long), 4))
    assert float(value.detach()) == 0.0
    (grad,) = torch.autograd.grad(value, z)
    assert torch.isfinite(grad).all()


def test_ncca_gradient_is_correct():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    ky = linear_label_kernel(torch.tensor([0, 1, 2, 0, 1, 2]), 3).double()

    def f(z):
        return normalized_cca_hsic(scaled_gaussian_kernel(x, 1.0), scaled_gaussian_kernel(z, 1.0)) \
            + normalized_cca_hsic(ky, scaled_gaussian_kernel(z, 1.0), eps=1e-2)

    z = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (z,))
