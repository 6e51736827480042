import numpy as np
import pytest
import torch

from simfl.core.aggregation import ServerOptimizer, weighted_mean
from simfl.core.config import AlgorithmConfig


def deltas(k=5, n=1000, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) * scale for _ in range(k)]


# ---------------------------------------------------------------- weighted_mean


def test_weighted_mean_matches_float64_reference():
    ds = deltas(k=6, scale=3.0)
    w = [17, 3, 250, 1, 64, 9]
    out = weighted_mean(ds, w)
    assert out.dtype == torch.float32
    ref = sum(d.double() * wi for d, wi in zip(ds, w)) / sum(w)
    torch.testing.assert_close(out, ref.float(), rtol=2e-7, atol=0)
    assert float((out.double() - ref).abs().max()) <= float(ref.abs().max()) * 2**-23


def test_weighted_mean_simple_values():
    a = torch.tensor([1.0, 0.0, -2.0])
    b = torch.tensor([3.0, 4.0, 2.0])
    assert torch.equal(weighted_mean([a, b], [1, 3]), torch.tensor([2.5, 3.0, 1.0]))
    assert torch.equal(weighted_mean([a], [7]), a)
    assert torch.equal(weighted_mean([a, b], [1.0, 1.0]), (a + b) / 2)


def test_weighted_mean_accumulates_in_float64():
    # float32 accumulation would lose the small values next to the large one
    big = torch.tensor([1e8], dtype=torch.float32)
    small = torch.tensor([1.0], dtype=torch.float32)
    out = weighted_mean([big, small, small, small, -big], [1, 1, 1, 1, 1])
    assert float(out) == pytest.approx(3.0 / 5.0, rel=1e-6)


def test_weighted_mean_leaves_inputs_unchanged():
    ds = deltas(k=8, n=5000, seed=3, scale=10.0)
    weighted_mean(ds, list(range(1, 9)))
    assert all(torch.equal(a, b) for a, b in zip(ds, deltas(k=8, n=5000, seed=3, scale=10.0), strict=True))


def test_weighted_mean_errors():
    with pytest.raises(ValueError):
        weighted_mean([], [])
    with pytest.raises(ValueError):
        weighted_mean(deltas(k=2, n=3), [1.0])


# ---------------------------------------------------------------- server optimiser


def mask(n=12, seed=0):
    m = torch.ones(n, dtype=torch.bool)
    m[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: n // 3]] = False  # buffers
    return m


@pytest.mark.parametrize("kind, extra", [("fedavg", {}), ("fedprox", {"mu": 0.1})])
def test_fedavg_and_fedprox_add_mean(kind, extra):
    trainable = mask()
    opt = ServerOptimizer(AlgorithmConfig(kind=kind, **extra), trainable)
    w = torch.randn(12)
    for seed in range(3):
        d = deltas(k=1, n=12, seed=seed)[0]
        new = opt.step(w, d)
        assert torch.equal(new, w + d)
        w = new
    assert torch.count_nonzero(opt.m) == 0  # no moments for plain averaging


def reddi(kind, weights, deltas_, trainable, lr, b1, b2, tau):
    """Reddi et al. (2021), Algorithm 2, in float64 with plain Python/numpy per step."""
    t = trainable.numpy()
    x = weights.double().numpy().copy()
    m = np.zeros(t.sum())
    v = np.full(t.sum(), tau**2)
    out = []
    for d in deltas_:
        d = d.double().numpy()
        new = x + d  # non-trainable entries: the plain average
        dt = d[t]
        m = b1 * m + (1 - b1) * dt
        if kind == "fedadam":
            v = b2 * v + (1 - b2) * dt**2
        else:
            v = v - (1 - b2) * dt**2 * np.sign(v - dt**2)
        new[t] = x[t] + lr * m / (np.sqrt(v) + tau)
        x = new
        out.append(x.copy())
    return out


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi"])
def test_adaptive_matches_reddi_algorithm_2(kind):
    n = 12
    trainable = mask(n)
    hp = {"server_lr": 0.05, "beta1": 0.8, "beta2": 0.95, "tau": 0.01}
    opt = ServerOptimizer(AlgorithmConfig(kind=kind, **hp), trainable)
    w0 = torch.randn(n, generator=torch.Generator().manual_seed(1))
    # second step has a small update so that Yogi's sign(v - d^2) takes both signs
    ds = [deltas(k=1, n=n, seed=2, scale=0.1)[0], deltas(k=1, n=n, seed=3, scale=0.005)[0]]
    ref = reddi(kind, w0, ds, trainable, hp["server_lr"], hp["beta1"], hp["beta2"], hp["tau"])
    w = w0
    for step, d in enumerate(ds):
        w = opt.step(w, d)
        assert w.dtype == torch.float32
        np.testing.assert_allclose(w.numpy(), ref[step], rtol=1e-5, atol=1e-6)
        # buffers (non-trainable) are plainly averaged
        assert torch.equal(w[~trainable], (w0 + sum(ds[: step + 1]))[~trainable])
    # the adaptive step is not the plain average on trainable entries
    assert not torch.allclose(w[trainable], (w0 + ds[0] + ds[1])[trainable])


def test_adam_first_step_by_hand():
    # one trainable scalar: m = (1-b1) d, v = b2 tau^2 + (1-b2) d^2, x += lr m / (sqrt v + tau)
    opt = ServerOptimizer(
        AlgorithmConfig(kind="fedadam", server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3),
        torch.tensor([True, False]),
    )
    new = opt.step(torch.tensor([1.0, 5.0]), torch.tensor([0.2, -1.0]))
    m = 0.1 * 0.2
    v = 0.99 * 1e-6 + 0.01 * 0.04
    assert float(new[0]) == pytest.approx(1.0 + 0.1 * m / (v**0.5 + 1e-3), rel=1e-6)
    assert float(new[1]) == 4.0
    assert float(opt.m[0]) == pytest.approx(m)
    assert float(opt.v[0]) == pytest.approx(v)


def test_yogi_differs_from_adam():
    trainable = torch.ones(6, dtype=torch.bool)
    hp = {"server_lr": 0.05, "tau": 0.01}
    adam = ServerOptimizer(AlgorithmConfig(kind="fedadam", **hp), trainable)
    yogi = ServerOptimizer(AlgorithmConfig(kind="fedyogi", **hp), trainable)
    w = torch.zeros(6)
    d = torch.linspace(-0.5, 0.5, 6)
    assert not torch.allclose(adam.step(w, d), yogi.step(w, d))


def test_initial_state():
    trainable = mask(9)
    opt = ServerOptimizer(AlgorithmConfig(kind="fedadam", tau=0.02), trainable)
    assert opt.m.shape == opt.v.shape == (int(trainable.sum()),)
    assert torch.count_nonzero(opt.m) == 0
    torch.testing.assert_close(opt.v, torch.full_like(opt.v, 0.02**2))


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi"])
def test_state_dict_round_trip_continues_identically(kind):
    trainable = mask(30)
    cfg = AlgorithmConfig(kind=kind, server_lr=0.1)
    a = ServerOptimizer(cfg, trainable)
    ds = deltas(k=4, n=30, seed=9, scale=0.2)
    w = torch.randn(30)
    for d in ds[:2]:
        w = a.step(w, d)
    state = a.state_dict()
    b = ServerOptimizer(cfg, trainable)
    b.load_state_dict(state)
    wa = wb = w
    for d in ds[2:]:
        wa = a.step(wa, d)
        wb = b.step(wb, d)
        assert torch.equal(wa, wb)
    # state_dict returns copies, not the live moments
    before = state["m"].clone()
    a.step(wa, ds[0])
    assert torch.equal(state["m"], before)
    # a fresh optimiser without the state diverges
    fresh = ServerOptimizer(cfg, trainable)
    b2 = ServerOptimizer(cfg, trainable)
    b2.load_state_dict(state)
    assert not torch.equal(fresh.step(w, ds[2]), b2.step(w, ds[2]))


def test_step_does_not_modify_inputs():
    trainable = mask(12)
    opt = ServerOptimizer(AlgorithmConfig(kind="fedyogi"), trainable)
    w = torch.randn(12)
    d = torch.randn(12)
    w0, d0 = w.clone(), d.clone()
    opt.step(w, d)
    assert torch.equal(w, w0) and torch.equal(d, d0)
