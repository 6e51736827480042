"""BiDO-HSIC: the layer hooks, the objective under each measure, and that training moves the dependence it targets.

The dependence measures themselves are tested in ``test_hsic.py``.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import simfl.privacy.defences.bido as bido_module
from simfl.core.config import ModelConfig, TrainingConfig
from simfl.core.models import build_model
from simfl.core.training import to_input, train_client
from simfl.core.weights import FlatWeights
from simfl.privacy.defences.base import Defence, NoDefenceConfig, SearchKnob
from simfl.privacy.defences.bido import BiDO, BiDOConfig
from simfl.privacy.defences.hsic import (
    gaussian_kernel,
    label_kernel,
    linear_label_kernel,
    normalized_cca_hsic,
    normalized_hsic,
    scaled_gaussian_kernel,
)

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


# ---------------------------------------------------------------- hooks and model


def spy_hidden(monkeypatch):
    """Shapes of what BiDO's objective hands to the kernel (either measure's): x first, then each Z_j."""
    seen = []

    def spying(kernel):
        def spy(t, sigma=1.0):
            seen.append(tuple(t.shape))
            return kernel(t, sigma)
        return spy

    monkeypatch.setattr(bido_module, "gaussian_kernel", spying(gaussian_kernel))
    monkeypatch.setattr(bido_module, "scaled_gaussian_kernel", spying(scaled_gaussian_kernel))
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
@pytest.mark.parametrize("measure", ["ncca", "cka"])
def test_hooks_record_the_configured_layers(monkeypatch, arch, layers, shapes, measure):
    net = model(arch=arch)
    d = defence(layers=layers, measure=measure)
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


# Per layer: nCCA(X, Z) ≤ batch − 1, nCCA(Y, Z) ≤ classes − 1; the cosine-normalised HSIC ≤ 1.
def bounds(measure, batch, layers=4):
    return (layers * (batch - 1), layers * (SHAPE[2] - 1)) if measure == "ncca" else (layers, layers)


@pytest.mark.parametrize("measure", ["ncca", "cka"])
def test_objective_combines_the_terms(measure):
    net = model()
    d = defence(a1=0.3, a2=0.7, measure=measure)
    d.build(net)
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 4
    objective, ce, logits, logged = d.objective(net, net, x, y)
    torch.testing.assert_close(ce, F.cross_entropy(net(x), y))
    assert set(logged) == {"hsic_xz", "hsic_yz"}
    assert not logged["hsic_xz"].requires_grad and not logged["hsic_yz"].requires_grad
    top_xz, top_yz = bounds(measure, 8)
    assert 0 < float(logged["hsic_xz"]) <= top_xz + 1e-4 and 0 < float(logged["hsic_yz"]) <= top_yz + 1e-4
    torch.testing.assert_close(objective, ce + 0.3 * logged["hsic_xz"] - 0.7 * logged["hsic_yz"])
    objective.backward()
    assert all(p.grad is not None for p in net.encoder.parameters())
    assert all(torch.isfinite(p.grad).all() for p in net.encoder.parameters())


def hidden_of(net, x):
    """The convnet encoder's four ReLU outputs (what ``layers: all`` hooks), recomputed by hand."""
    out, hidden = x, []
    for layer in net.encoder:
        out = layer(out)
        if isinstance(layer, torch.nn.ReLU):
            hidden.append(out)
    return hidden


def test_ncca_is_the_default_and_the_published_measure():
    assert BiDOConfig().measure == "ncca"
    net = model()
    d = defence(a1=0.3, a2=0.7)
    d.build(net)
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 4
    objective, ce, _, logged = d.objective(net, net, x, y)
    kx = scaled_gaussian_kernel(x, 5.0)  # σ = 5, squared distance over the dimension
    ky = linear_label_kernel(y, SHAPE[2])  # linear kernel on one-hot labels
    kz = [scaled_gaussian_kernel(z, 5.0) for z in hidden_of(net, x)]
    xz = sum(normalized_cca_hsic(kx, k) for k in kz)
    yz = sum(normalized_cca_hsic(ky, k) for k in kz)
    torch.testing.assert_close(logged["hsic_xz"], xz.detach())
    torch.testing.assert_close(logged["hsic_yz"], yz.detach())


def test_cka_variant_is_exactly_the_earlier_bido():
    """``measure: cka`` must reproduce runs made before ``measure`` existed, bit for bit."""
    net = model()
    d = defence(a1=0.3, a2=0.7, measure="cka", kernel_sigma=2.0)
    d.build(net)
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 4
    objective, ce, _, logged = d.objective(net, net, x, y)
    kx = gaussian_kernel(x, 2.0)
    ky = label_kernel(y, SHAPE[2], 2.0)
    kz = [gaussian_kernel(z, 2.0) for z in hidden_of(net, x)]
    xz = torch.stack([normalized_hsic(kx, k) for k in kz]).sum()
    yz = torch.stack([normalized_hsic(ky, k) for k in kz]).sum()
    assert torch.equal(logged["hsic_xz"], xz.detach()) and torch.equal(logged["hsic_yz"], yz.detach())
    assert torch.equal(objective, ce + 0.3 * xz - 0.7 * yz)


def test_search_knob_moves_a1_with_a2_tied():
    knob = BiDO.search_knob
    assert isinstance(knob, SearchKnob)
    assert knob.name == "a1" and set(knob.tied) == {"a2"} and knob.falls and knob.log
    assert 0 < knob.low < 0.01 and knob.high > 2  # spans Peng et al.'s a1 values, 0.01-2
    assert knob.settings(0.05) == pytest.approx({"a1": 0.05, "a2": 0.5})  # CelebA's published pair, ratio 10
    assert knob.settings(2.0) == pytest.approx({"a1": 2.0, "a2": 20.0})  # MNIST's
    for value in (knob.low, knob.high):
        cfg = BiDOConfig(**knob.settings(value))  # every point of the search is a valid config
        assert cfg.a2 == pytest.approx(10 * cfg.a1)


@pytest.mark.parametrize("measure", ["ncca", "cka"])
def test_gradient_view_at_batch_one_is_plain_cross_entropy(measure):
    """Why BiDO discloses nothing: with one sample HSIC is 0, so the shared gradient is CE's."""
    net = model()
    d = defence(a1=5.0, a2=5.0, measure=measure)
    d.build(net)
    flat = FlatWeights(net)
    x, y = torch.rand(1, 3, 16, 16), torch.tensor([2])
    gen = torch.Generator().manual_seed(0)
    defended = d.shared_gradient(net, flat, x, y, gen)
    plain = Defence(NoDefenceConfig(), SHAPE, 0).shared_gradient(net, flat, x, y, gen)
    assert defended.abs().sum() > 0
    torch.testing.assert_close(defended, plain)


# ---------------------------------------------------------------- training


def train(a1, a2, seed=0, measure="ncca"):
    """Train one client from the same initial weights; return the result, d(X, Z) and d(Y, Z) on held data."""
    net = model(seed)
    d = defence(a1=a1, a2=a2, measure=measure)  # kernel_sigma and layers at their defaults
    d.build(net)
    flat = FlatWeights(net)
    x, y = images(128, seed)
    cfg = TrainingConfig(local_epochs=3, batch_size=32, optimizer={"kind": "sgd", "lr": 0.05})
    result = train_client(net, flat, flat.snapshot(), x, y, cfg, torch.Generator().manual_seed(seed), defence=d)
    held_x, held_y = images(128, seed + 100)
    net.eval()
    with torch.no_grad():
        inputs = to_input(held_x)
        z = net.encoder(inputs)
        if measure == "ncca":
            kz = scaled_gaussian_kernel(z, d.sigma)
            xz = float(normalized_cca_hsic(scaled_gaussian_kernel(inputs, d.sigma), kz))
            yz = float(normalized_cca_hsic(linear_label_kernel(held_y, SHAPE[2]), kz))
        else:
            kz = gaussian_kernel(z, d.sigma)
            xz = float(normalized_hsic(gaussian_kernel(inputs, d.sigma), kz))
            yz = float(normalized_hsic(label_kernel(held_y, SHAPE[2], d.sigma), kz))
    return result, xz, yz


@pytest.mark.parametrize("measure, gain", [("ncca", 0.5), ("cka", 0.15)])
def test_bido_terms_change_the_dependence_they_target(measure, gain):
    # cka, checked for seeds 0-9: base nHSIC(X,Z) 0.50-0.66 vs 0.04-0.23 with a1; nHSIC(Y,Z) 0.44-0.63 vs 0.78-0.91
    # with a2. ncca, seeds 0-9: base nCCA(X,Z) 3.17-4.91 vs ≤ 0.001 with a1 (the latent collapses below the fixed
    # bandwidth); nCCA(Y,Z) 0.95-1.58 vs 2.61-2.85 (of at most 3) with a2.
    _, base_xz, base_yz = train(0.0, 0.0, measure=measure)
    _, forget_xz, _ = train(5.0, 0.0, measure=measure)
    _, _, keep_yz = train(0.0, 5.0, measure=measure)
    assert forget_xz < 0.5 * base_xz
    assert keep_yz > base_yz + gain


@pytest.mark.parametrize("measure", ["ncca", "cka"])
def test_train_client_logs_the_hsic_terms(measure):
    result, _, _ = train(0.05, 0.5, measure=measure)
    assert set(result.defence) == {"hsic_xz", "hsic_yz"}
    top_xz, top_yz = bounds(measure, 32)  # mean over steps of a sum over 4 layers
    assert 0 < result.defence["hsic_xz"] <= top_xz + 1e-4 and 0 < result.defence["hsic_yz"] <= top_yz + 1e-4
