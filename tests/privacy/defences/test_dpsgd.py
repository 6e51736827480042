"""DP-SGD through Opacus: accounting, determinism, clipping/noise, and Opacus object lifetime."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.grad_sample.gsm_exp_weights import GradSampleModuleExpandedWeights
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from simfl.core.config import ModelConfig, TrainingConfig
from simfl.core.models import build_model
from simfl.core.training import evaluate, make_optimizer, to_input, train_client
from simfl.core.weights import FlatWeights
from simfl.privacy.defences import make_defence
from simfl.privacy.defences.base import Defence, NoDefenceConfig
from simfl.privacy.defences.dpsgd import DPSGD, DPSGDConfig, epsilon, local_steps, sample_rate
from simfl.privacy.defences.opacus_parts import HostNoiseDPOptimizer

SHAPE = (3, 16, 4)  # channels, image size, classes
N, B = 64, 16  # B divides N: Opacus's PrivacyEngine rate 1/len(loader) is then our B/N
SIGMA, CLIP, DELTA = 1.1, 1.0, 1e-5

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),  # PrivacyEngine's hooks
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
]


def make(seed=0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(arch="convnet", width=8, norm="group"), *SHAPE)
    return model, FlatWeights(model)


def data(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, SHAPE[1], SHAPE[1], SHAPE[0]), dtype=torch.uint8, generator=g)
    y = torch.randint(0, SHAPE[2], (n,), generator=g)
    return x, y


def dpsgd(**knobs):
    knobs = {"noise_multiplier": SIGMA, "max_grad_norm": CLIP, "delta": DELTA, **knobs}
    return DPSGD(DPSGDConfig(**knobs), SHAPE, 0)


def training(**kw):
    kw.setdefault("batch_size", B)
    kw.setdefault("optimizer", {"kind": "sgd", "lr": 0.1, "momentum": 0.5, "weight_decay": 1e-3})
    return TrainingConfig(**kw)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- accounting


def test_epsilon_matches_opacus_accountant_and_privacy_engine():
    model, flat = make()
    x, y = data()
    cfg = training(local_epochs=1)
    dp = dpsgd()
    w0 = flat.snapshot()
    state = {}
    first = train_client(model, flat, w0, x, y, cfg, gen(1), defence=dp, state=state)
    second = train_client(model, flat, w0 + first.delta, x, y, cfg, gen(2), defence=dp, state=state)
    steps = 2 * (N // B)
    assert first.steps == second.steps == N // B
    assert state["dp_steps"] == steps
    assert second.defence["dp_steps"] == steps
    assert first.defence["dp_epsilon"] < second.defence["dp_epsilon"]

    # Opacus's accountant stepped once per optimiser step.
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=SIGMA, sample_rate=B / N)
    assert second.defence["dp_epsilon"] == pytest.approx(acc.get_epsilon(DELTA), rel=1e-12)

    # Opacus's own DP training on N samples, batch B, Poisson sampling: same steps, same ε.
    engine = PrivacyEngine(accountant="rdp")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    loader = DataLoader(TensorDataset(to_input(x), y), batch_size=B)
    net, opt, loader = engine.make_private(
        module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data_loader=loader,
        noise_multiplier=SIGMA, max_grad_norm=CLIP, poisson_sampling=True,
    )
    taken = 0
    while taken < steps:
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            opt.step()
            taken += 1
    assert taken == steps
    assert second.defence["dp_epsilon"] == pytest.approx(engine.get_epsilon(DELTA), rel=1e-12)


def test_prv_accountant():
    steps = 12
    acc = PRVAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=SIGMA, sample_rate=0.25)
    assert epsilon(SIGMA, 0.25, steps, DELTA, "prv") == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
    # A DPSGD set to PRV reports it; PRV is tighter than RDP here.
    dp = dpsgd(accountant="prv")
    dp.batches(N, training(), gen(0))
    state = {"dp_steps": steps - 4}
    out = dp.account(state, N, 4)
    assert out["dp_epsilon"] == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
    assert out["dp_epsilon"] < epsilon(SIGMA, 0.25, steps, DELTA, "rdp")


def test_epsilon_edges():
    assert epsilon(0.0, 0.25, 10, DELTA, "rdp") == math.inf
    assert epsilon(SIGMA, 0.25, 0, DELTA, "rdp") == 0.0
    # More steps, more noise, a lower rate: monotone as expected.
    e = epsilon(SIGMA, 0.25, 10, DELTA, "rdp")
    assert epsilon(SIGMA, 0.25, 20, DELTA, "rdp") > e
    assert epsilon(2 * SIGMA, 0.25, 10, DELTA, "rdp") < e
    assert epsilon(SIGMA, 0.1, 10, DELTA, "rdp") < e


def test_no_noise_reports_infinite_epsilon():
    model, flat = make()
    x, y = data()
    state = {}
    out = train_client(model, flat, flat.snapshot(), x, y, training(), gen(0), defence=dpsgd(noise_multiplier=0.0),
                       state=state)
    assert out.defence["dp_epsilon"] == math.inf
    assert state["dp_steps"] == N // B


# ---------------------------------------------------------------- batches


def test_poisson_batches():
    dp = dpsgd()
    cfg = training(local_epochs=3)
    batches = dp.batches(N, cfg, gen(0))
    assert len(batches) == local_steps(N, cfg) == 3 * (N // B)
    assert all(b.dtype == torch.long for b in batches)
    sizes = {len(b) for b in batches}
    assert len(sizes) > 1  # Poisson: the batch size varies
    # Same generator, same batches; and local_steps is honoured.
    again = dp.batches(N, cfg, gen(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    assert len(dp.batches(N, training(local_steps=7), gen(0))) == 7
    # Fewer samples than the batch size: rate 1, every sample in every batch.
    assert sample_rate(10, B) == 1.0
    assert all(torch.equal(b, torch.arange(10)) for b in dp.batches(10, cfg, gen(0)))
    # Many draws: mean batch size is the configured one.
    many = dp.batches(N, training(local_steps=2000), gen(1))
    assert sum(len(b) for b in many) / len(many) == pytest.approx(B, rel=0.03)


# ---------------------------------------------------------------- determinism and what DP changes


def test_deterministic_from_generator():
    model, flat = make()
    x, y = data()
    w0 = flat.snapshot()
    dp = dpsgd()
    a = train_client(model, flat, w0, x, y, training(), gen(5), defence=dp, state={})
    b = train_client(model, flat, w0, x, y, training(), gen(5), defence=dp, state={})
    c = train_client(model, flat, w0, x, y, training(), gen(6), defence=dp, state={})
    assert torch.equal(a.delta, b.delta)
    assert not torch.allclose(a.delta, c.delta)
    assert a.delta.abs().sum() > 0


def test_no_noise_no_clipping_is_plain_sgd_on_the_same_batches():
    model, flat = make()
    x, y = data()
    w0 = flat.snapshot()
    cfg = training(local_epochs=2)
    dp = dpsgd(noise_multiplier=0.0, max_grad_norm=1e9)
    out = train_client(model, flat, w0, x, y, cfg, gen(3), defence=dp, state={})

    # Reference: plain autograd SGD on the same Poisson batches. DP-SGD averages over
    # the *expected* batch size B, so the plain loss is the batch's summed CE / B.
    batches = dpsgd().batches(N, cfg, gen(3))
    assert len({len(b) for b in batches}) > 1  # the normalisation matters: batch sizes differ from B
    flat.load(w0)
    model.train()
    opt = make_optimizer(model, cfg)
    for idx in batches:
        if len(idx) == 0:
            continue
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(model(to_input(x[idx])), y[idx], reduction="sum") / B).backward()
        opt.step()
    plain = flat.vector - w0
    assert torch.allclose(out.delta, plain, rtol=1e-4, atol=1e-6)
    assert out.delta.abs().max() > 1e-3

    # Clipping (still no noise) is what changes it.
    clipped = train_client(model, flat, w0, x, y, cfg, gen(3), defence=dpsgd(noise_multiplier=0.0, max_grad_norm=0.01),
                           state={})
    assert (clipped.delta - plain).norm() > 0.5 * plain.norm()


def test_full_batch_without_noise_or_clipping_matches_plain_train_client():
    # Fewer samples than the batch size: rate 1, each DP batch is the full shard, as in plain training.
    model, flat = make()
    x, y = data(n=12)
    w0 = flat.snapshot()
    cfg = training(local_epochs=3)
    dp = train_client(model, flat, w0, x, y, cfg, gen(0), defence=dpsgd(noise_multiplier=0.0, max_grad_norm=1e9),
                      state={})
    plain = train_client(model, flat, w0, x, y, cfg, gen(0), defence=Defence(NoDefenceConfig(), SHAPE, 0))
    assert dp.steps == plain.steps == 3
    assert torch.allclose(dp.delta, plain.delta, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- the gradient view


def per_sample_clipped_mean(model, flat, x, y, clip):
    """Reference: each sample's gradient by plain autograd, clipped as Opacus does, averaged."""
    plain = Defence(NoDefenceConfig(), SHAPE, 0)
    rows = []
    for i in range(len(y)):
        g = plain.shared_gradient(model, flat, x[i : i + 1], y[i : i + 1], gen(0))
        rows.append(g * min(1.0, clip / (float(g.norm()) + 1e-6)))
    return torch.stack(rows).mean(0)


def test_shared_gradient_is_clipped():
    model, flat = make()
    xs, y = data(n=8)
    x = to_input(xs)
    # Channels-last strides, as the engine's batches come (Opacus's hooks-based
    # GradSampleModule gets conv per-sample gradients wrong on such input).
    assert not x.is_contiguous()
    tiny = 1e-3
    before = flat.snapshot()
    dp = dpsgd(noise_multiplier=0.0, max_grad_norm=tiny)
    shared = dp.shared_gradient(model, flat, x, y, gen(0))
    plain = Defence(NoDefenceConfig(), SHAPE, 0).shared_gradient(model, flat, x, y, gen(0))
    assert shared.shape == flat.vector.shape
    assert float(shared.norm()) <= tiny * (1 + 1e-4)
    assert float(plain.norm()) > 100 * tiny
    assert torch.allclose(shared, per_sample_clipped_mean(model, flat, x, y, tiny), rtol=1e-3, atol=1e-9)
    # Unclipped and noise-free, it is the plain batch gradient.
    loose = dpsgd(noise_multiplier=0.0, max_grad_norm=1e9).shared_gradient(model, flat, x, y, gen(0))
    assert torch.allclose(loose, plain, rtol=1e-4, atol=1e-6)
    # The model is left as found: same weights, train mode, no gradients of either kind.
    assert torch.equal(flat.vector, before)
    assert model.training
    for p in model.parameters():
        assert p.grad is None
        assert p.grad_sample is None


def test_shared_gradient_noise():
    model, flat = make()
    xs, y = data(n=4)
    x = to_input(xs)
    clip = 0.01
    clean = dpsgd(noise_multiplier=0.0, max_grad_norm=clip).shared_gradient(model, flat, x, y, gen(0))
    dp = dpsgd(noise_multiplier=2.0, max_grad_norm=clip)
    noisy = dp.shared_gradient(model, flat, x, y, gen(1))
    assert torch.equal(noisy, dp.shared_gradient(model, flat, x, y, gen(1)))
    assert not torch.equal(noisy, dp.shared_gradient(model, flat, x, y, gen(2)))
    noise = noisy - clean
    expected = 2.0 * clip / len(y)  # σ·C / B per coordinate
    assert noise.numel() > 10_000
    assert float(noise.std()) == pytest.approx(expected, rel=0.05)
    assert abs(float(noise.mean())) < 5 * expected / math.sqrt(noise.numel())


def test_registry_and_disclosure():
    dp = make_defence(DPSGDConfig(), SHAPE, 0)
    assert isinstance(dp, DPSGD)
    assert (dp.noise_multiplier, dp.max_grad_norm, dp.delta, dp.accountant) == (1.0, 1.0, 1e-5, "rdp")
    assert dpsgd(max_grad_norm=0.7).disclosure().clip_norm == 0.7


# ---------------------------------------------------------------- Opacus objects and their state


def test_opacus_module_built_once_and_clients_in_a_row():
    model, flat = make()
    dp = dpsgd()
    module = dp.training_module(model)
    assert dp.training_module(model) is module
    assert dpsgd().training_module(model) is module  # a second defence object shares it

    w0 = flat.snapshot()
    xa, ya = data(n=64, seed=1)
    xb, yb = data(n=40, seed=2)
    cfg = training()
    first = train_client(model, flat, w0, xa, ya, cfg, gen(1), defence=dp, state={})
    # In between: evaluation, the gradient view, and a stray forward/backward through the
    # wrapper with no optimiser step (left-over per-sample gradients).
    evaluate(model, xa, ya, 16)
    dp.shared_gradient(model, flat, to_input(xb[:3]), yb[:3], gen(0))
    model.train()
    F.cross_entropy(module(to_input(xa[:5])), ya[:5]).backward()
    assert model.head.weight.grad_sample is not None
    second = train_client(model, flat, w0, xb, yb, cfg, gen(2), defence=dp, state={})
    again = train_client(model, flat, w0, xa, ya, cfg, gen(1), defence=dp, state={})
    assert torch.equal(first.delta, again.delta)  # nothing stale changed the first client's training
    assert second.steps == local_steps(40, cfg)
    assert dp.training_module(model) is module
    assert all(p.grad_sample is None for p in model.parameters())


def test_model_untouched_outside_dp_training():
    # The wrapper keeps no hooks on the model: plain autograd computes no per-sample
    # gradients, and torch.func transforms (what the attacks use) still work on it.
    model, flat = make()
    x, y = data(n=16)
    train_client(model, flat, flat.snapshot(), x, y, training(), gen(0), defence=dpsgd(), state={})
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in model.modules())
    model.train()
    images = to_input(x[:4])
    loss = F.cross_entropy(model(images), y[:4])
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert all(p.grad_sample is None for p in model.parameters())
    params = {name: p.detach() for name, p in model.named_parameters()}
    per_sample = torch.func.vmap(
        torch.func.grad(lambda p, xi, yi: F.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), yi[None])),
        in_dims=(None, 0, 0),
    )(params, images, y[:4])
    assert torch.allclose(per_sample["head.weight"].mean(0), grads[-2], atol=1e-6)


def test_resnet18_with_group_norm():
    # torchvision's ResNet modifies layer outputs in place (ReLU(inplace=True), out += identity).
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet18", norm="group", latent_dim=32), 3, 8, 4)
    flat = FlatWeights(model)
    xs, y = data(n=2)
    x = to_input(xs[:, :8, :8])
    loose = dpsgd(noise_multiplier=0.0, max_grad_norm=1e9).shared_gradient(model, flat, x, y, gen(0))
    plain = Defence(NoDefenceConfig(), SHAPE, 0).shared_gradient(model, flat, x, y, gen(0))
    assert torch.allclose(loose, plain, rtol=1e-3, atol=1e-6)


def test_batch_norm_refused_by_the_wrapper_and_swapped_for_group_norm_by_the_factory():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="convnet", width=8, norm="batch"), *SHAPE)
    with pytest.raises(Exception, match="BatchNorm"):
        dpsgd().training_module(model)
    built = dpsgd().build(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in built.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in built.modules()) == 3
    flat = FlatWeights(built)
    assert not any("running" in name for name, _, _ in flat.layout)
    x, y = data(n=16)
    local = train_client(built, flat, flat.snapshot(), x, y, TrainingConfig(batch_size=4),
                         torch.Generator().manual_seed(0), dpsgd(), {})
    assert torch.isfinite(local.delta).all() and local.defence["dp_epsilon"] > 0


def test_an_empty_poisson_batch_still_takes_opacus_noise_only_step():
    """The accountant counts every sampled step, so an empty batch must still release its noise."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="convnet", width=8, norm="group"), 3, 16, 4)
    flat = FlatWeights(model)
    dp = DPSGD(DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0), (3, 16, 4), 0)
    dp.training_module(model)
    optimizer = dp.optimizer(model, TrainingConfig(batch_size=4, optimizer={"kind": "sgd", "lr": 0.05}),
                             torch.Generator().manual_seed(0), 20)
    # After a real step, as inside a client's local training.
    module = dp.training_module(model)
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(module(torch.rand(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    before = flat.snapshot()
    dp.empty_step(model, optimizer)
    moved = (flat.vector - before)[flat.trainable]
    # Noise only: lr · σC / B per coordinate (B = expected batch 4).
    assert float(moved.std()) == pytest.approx(0.05 * 1.0 / 4, rel=0.05)
    assert abs(float(moved.mean())) < 1e-3


@pytest.mark.parametrize("sigma", [0.0, SIGMA])
def test_host_noise_optimizer_is_opacus_dp_optimizer_on_the_cpu(sigma):
    """The noise is drawn on the CPU so a GPU gives the same draws; on the CPU it is Opacus's step exactly."""
    x, y = data(8)
    results = []
    for cls in (DPOptimizer, HostNoiseDPOptimizer):
        model, flat = make()
        module = GradSampleModuleExpandedWeights(model, loss_reduction="mean")
        opt = cls(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=sigma, max_grad_norm=CLIP,
                  expected_batch_size=8, loss_reduction="mean", generator=torch.Generator().manual_seed(3))
        F.cross_entropy(module(to_input(x)), y).backward()
        opt.step()
        results.append(flat.snapshot())
    assert torch.equal(results[0], results[1])


def test_opacus_is_imported_only_by_a_process_that_uses_dp_sgd():
    # Every actor imports the defence registry; Opacus's own import costs seconds of CPU per actor start.
    probe = ("import sys; import simfl.simulation.actors.coordinator, simfl.simulation.actors.client; "
             "print('opacus' in sys.modules); "
             "from simfl.privacy.defences.dpsgd import epsilon; epsilon(1.0, 0.1, 10, 1e-5); "
             "print('opacus' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"]
