"""BiDO-HSIC: the HSIC estimator, the layer hooks, and that training with it moves the dependence it targets."""

import copy

import pytest
import torch
import torch.nn.functional as F

import simfl.defences.bido as bido_module
from simfl.config import ModelConfig, TrainingConfig
from simfl.defences.base import Defence, NoDefenceConfig
from simfl.defences.bido import BiDO, BiDOConfig
from simfl.defences.hsic import gaussian_kernel, hsic, label_kernel, normalized_hsic
from simfl.models import build_model
from simfl.training import to_input, train_client
from simfl.weights import FlatWeights

SHAPE = (3, 16, 4)  # channels, image size, classes


def model(seed=0, arch="convnet"):
    torch.manual_seed(seed)
    kw = {"width": 8} if arch == "convnet" else {}
    return build_model(ModelConfig(arch=arch, **kw), *SHAPE)


def defence(**knobs):
    return BiDO(BiDOConfig(**knobs), SHAPE, 0)


def images(n, seed):
    """uint8 NHWC images of 4 classes: a fixed per-class pattern plus per-image noise."""
    means = torch.rand(4, 16, 16, 3, generator=torch.Generator().manual_seed(1234)) * 255
    y = torch.arange(n) % 4
    noise = torch.rand(n, 16, 16, 3, generator=torch.Generator().manual_seed(seed)) * 128
    return (means[y] * 0.5 + noise).clamp(0, 255).to(torch.uint8), y


# ---------------------------------------------------------------- HSIC


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


# ---------------------------------------------------------------- hooks and model


def spy_hidden(monkeypatch):
    """Shapes of what BiDO's objective hands to the kernel: x first, then each Z_j."""
    seen = []

    def spy(t, sigma=1.0):
        seen.append(tuple(t.shape))
        return gaussian_kernel(t, sigma)

    monkeypatch.setattr(bido_module, "gaussian_kernel", spy)
    return seen


@pytest.mark.parametrize(
    "arch, layers, shapes",
    [
        ("convnet", "all", [(6, 8, 16, 16), (6, 16, 8, 8), (6, 32, 4, 4), (6, 128)]),
        ("convnet", "latent", [(6, 128)]),
        ("lenet", "all", [(6, 6, 16, 16), (6, 16, 4, 4), (6, 120), (6, 84)]),
        ("lenet", "latent", [(6, 84)]),
    ],
)
def test_hooks_record_the_configured_layers(monkeypatch, arch, layers, shapes):
    net = model(arch=arch)
    d = defence(layers=layers)
    d.build(net)
    d.build(net)  # building twice must not hook twice
    seen = spy_hidden(monkeypatch)
    x, y = torch.rand(6, 3, 16, 16), torch.arange(6) % 4
    d.objective(net, net, x, y)
    assert seen[0] == (6, 3, 16, 16)  # the input X
    assert seen[1:] == shapes
    assert d._records == []  # released after use


def test_hooks_record_nothing_outside_the_objective():
    net = model()
    d = defence()
    d.build(net)
    x = torch.rand(4, 3, 16, 16)
    net(x)
    with torch.no_grad():
        net.eval()
        net(x)
    params = {name: p.detach().clone() for name, p in net.named_parameters()}
    torch.func.functional_call(net, params, (x,))
    assert d._records == []
    assert not d._recording


def test_objective_on_an_unbuilt_model_fails_loudly():
    net = model()
    with pytest.raises(RuntimeError, match="build"):
        defence().objective(net, net, torch.rand(4, 3, 16, 16), torch.arange(4))


def test_deepcopied_model_still_reports_to_the_defence():
    d = defence(layers="latent")
    net = d.build(model())
    twin = copy.deepcopy(net)
    objective, ce, logits, logged = d.objective(twin, twin, torch.rand(4, 3, 16, 16), torch.arange(4))
    assert logged["hsic_xz"] > 0


def test_build_keeps_the_weight_layout_and_draws_no_random_numbers():
    plain = model(seed=3)
    after_plain = torch.rand(4)
    torch.manual_seed(3)
    built = defence().build(build_model(ModelConfig(arch="convnet", width=8), *SHAPE))
    after_built = torch.rand(4)
    assert torch.equal(after_plain, after_built)
    a, b = FlatWeights(plain), FlatWeights(built)
    assert len(a) == len(b)
    assert ([(name, off, shape) for name, off, shape in a.layout]
            == [(name, off, shape) for name, off, shape in b.layout])
    assert torch.equal(a.vector, b.vector)
    assert list(plain.state_dict()) == list(built.state_dict())


# ---------------------------------------------------------------- objective


def test_objective_combines_the_terms():
    net = model()
    d = defence(a1=0.3, a2=0.7)
    d.build(net)
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 4
    objective, ce, logits, logged = d.objective(net, net, x, y)
    torch.testing.assert_close(ce, F.cross_entropy(net(x), y))
    assert set(logged) == {"hsic_xz", "hsic_yz"}
    assert not logged["hsic_xz"].requires_grad and not logged["hsic_yz"].requires_grad
    assert 0 < float(logged["hsic_xz"]) <= 4 + 1e-4 and 0 < float(logged["hsic_yz"]) <= 4 + 1e-4  # 4 layers
    torch.testing.assert_close(objective, ce + 0.3 * logged["hsic_xz"] - 0.7 * logged["hsic_yz"])
    objective.backward()
    assert all(p.grad is not None for p in net.encoder.parameters())


def test_gradient_view_at_batch_one_is_plain_cross_entropy():
    """Why BiDO discloses nothing: with one sample HSIC is 0, so the shared gradient is CE's."""
    net = model()
    d = defence(a1=5.0, a2=5.0)
    d.build(net)
    flat = FlatWeights(net)
    x, y = torch.rand(1, 3, 16, 16), torch.tensor([2])
    gen = torch.Generator().manual_seed(0)
    defended = d.shared_gradient(net, flat, x, y, gen)
    plain = Defence(NoDefenceConfig(), SHAPE, 0).shared_gradient(net, flat, x, y, gen)
    assert defended.abs().sum() > 0
    torch.testing.assert_close(defended, plain)


# ---------------------------------------------------------------- training


def train(a1, a2, seed=0):
    """Train one client from the same initial weights; return the result, nHSIC(X, Z) and nHSIC(Y, Z) on held data."""
    net = model(seed)
    d = defence(a1=a1, a2=a2)  # kernel_sigma and layers at their defaults
    d.build(net)
    flat = FlatWeights(net)
    x, y = images(128, seed)
    cfg = TrainingConfig(local_epochs=3, batch_size=32, optimizer={"kind": "sgd", "lr": 0.05})
    result = train_client(net, flat, flat.snapshot(), x, y, cfg, torch.Generator().manual_seed(seed), defence=d)
    held_x, held_y = images(128, seed + 100)
    net.eval()
    with torch.no_grad():
        inputs = to_input(held_x)
        kz = gaussian_kernel(net.encoder(inputs), d.sigma)
        xz = float(normalized_hsic(gaussian_kernel(inputs, d.sigma), kz))
        yz = float(normalized_hsic(label_kernel(held_y, SHAPE[2], d.sigma), kz))
    return result, xz, yz


def test_bido_terms_change_the_dependence_they_target():
    # Checked for seeds 0-9: base nHSIC(X,Z) 0.50-0.66 vs 0.04-0.23 with a1; nHSIC(Y,Z) 0.44-0.63 vs 0.78-0.91 with a2.
    _, base_xz, base_yz = train(0.0, 0.0)
    _, forget_xz, _ = train(5.0, 0.0)
    _, _, keep_yz = train(0.0, 5.0)
    assert forget_xz < 0.5 * base_xz
    assert keep_yz > base_yz + 0.15


def test_train_client_logs_the_hsic_terms():
    result, _, _ = train(0.05, 0.5)
    assert set(result.defence) == {"hsic_xz", "hsic_yz"}
    assert all(0 < v <= 4 + 1e-4 for v in result.defence.values())  # mean over steps of a sum over 4 layers
