import math

import pytest
import torch
import torch.nn.functional as F

from simfl.core.config import ModelConfig, TrainingConfig
from simfl.core.models import build_model
from simfl.core.training import batch_order, evaluate, make_optimizer, to_input, train_client
from simfl.core.weights import FlatWeights

SIZE = 8


def make(norm="group", seed=0, classes=2):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(arch="convnet", norm=norm, width=4), channels=1, image_size=SIZE,
                        num_classes=classes)
    return model, FlatWeights(model)



def toy(n=40, seed=0):
    """Two separable classes of tiny uint8 images, with noise: class 0 is bright on the
    left half, class 1 bright on the right half (a spatial pattern that no norm layer removes)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    left = torch.zeros(SIZE, SIZE)
    left[:, : SIZE // 2] = 1
    pattern = torch.where((y == 0).view(n, 1, 1), left, 1 - left) * 150 + 50
    noise = torch.randint(-40, 41, (n, SIZE, SIZE), generator=g)
    x = (pattern + noise).clamp(0, 255).to(torch.uint8).unsqueeze(-1)
    return x, y.long()


def cfg(**kw):
    kw.setdefault("batch_size", 8)
    kw.setdefault("optimizer", {"kind": "sgd", "lr": 0.1})
    return TrainingConfig(**kw)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- helpers


def test_to_input():
    x = torch.tensor([[[[0, 255, 51]]]], dtype=torch.uint8)  # N=1, H=1, W=1, C=3
    out = to_input(x)
    assert out.shape == (1, 3, 1, 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 1.0, 0.2]))
    x = torch.randint(0, 256, (2, 5, 4, 3), dtype=torch.uint8)
    assert torch.equal(to_input(x), x.permute(0, 3, 1, 2).float() / 255)
    assert x.dtype == torch.uint8  # input untouched


def test_batch_order_epochs():
    c = cfg(batch_size=4, local_epochs=3)
    batches = batch_order(10, c, gen())
    assert len(batches) == 3 * math.ceil(10 / 4)
    assert [len(b) for b in batches] == [4, 4, 2] * 3
    for e in range(3):
        epoch = torch.cat(batches[3 * e : 3 * e + 3])
        assert torch.equal(epoch.sort().values, torch.arange(10))  # each epoch is a permutation
    assert not torch.equal(torch.cat(batches[0:3]), torch.cat(batches[3:6]))  # reshuffled each epoch


def test_batch_order_local_steps_span_epochs():
    c = cfg(batch_size=4, local_steps=7)
    batches = batch_order(10, c, gen())
    assert len(batches) == 7
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2, 4]


def test_batch_order_depends_only_on_generator():
    c = cfg(batch_size=3, local_epochs=2)
    a = batch_order(11, c, gen(5))
    b = batch_order(11, c, gen(5))
    d = batch_order(11, c, gen(6))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not all(torch.equal(u, v) for u, v in zip(a, d, strict=True))


def test_make_optimizer():
    model, _ = make()
    sgd = make_optimizer(model, cfg(optimizer={"kind": "sgd", "lr": 0.3, "momentum": 0.9, "weight_decay": 0.01}))
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.3, 0.9, 0.01)
    adam = make_optimizer(model, cfg(optimizer={"kind": "adam", "lr": 0.002}))
    assert isinstance(adam, torch.optim.Adam)
    assert adam.param_groups[0]["lr"] == 0.002
    assert sum(len(g["params"]) for g in adam.param_groups) == len(list(model.parameters()))


# ---------------------------------------------------------------- train_client


def test_same_seed_bit_identical_different_seed_differs():
    model, flat = make("batch")
    global_w = flat.snapshot()
    x, y = toy()
    c = cfg(local_epochs=2, optimizer={"kind": "sgd", "lr": 0.1, "momentum": 0.9})
    a = train_client(model, flat, global_w, x, y, c, gen(1))
    b = train_client(model, flat, global_w, x, y, c, gen(1))
    d = train_client(model, flat, global_w, x, y, c, gen(2))
    assert torch.equal(a.delta, b.delta)
    assert a.loss == b.loss and a.accuracy == b.accuracy and a.steps == b.steps
    assert not torch.equal(a.delta, d.delta)
    # a different model instance built from the same global weights agrees too
    other, other_flat = make("batch", seed=99)
    e = train_client(other, other_flat, global_w, x, y, c, gen(1))
    assert torch.equal(a.delta, e.delta)


def test_result_fields_and_delta_is_final_minus_global():
    model, flat = make("batch")
    global_w = flat.snapshot()
    keep = global_w.clone()
    x, y = toy(n=20)
    res = train_client(model, flat, global_w, x, y, cfg(local_epochs=2), gen())
    assert torch.equal(global_w, keep)  # the global weights are not modified
    assert res.delta.dtype == torch.float32
    assert res.delta.shape == global_w.shape
    assert torch.equal(res.delta, flat.vector - global_w)
    assert res.samples == 20
    assert res.steps == 2 * math.ceil(20 / 8)
    assert 0.0 <= res.accuracy <= 1.0
    assert res.loss > 0 and math.isfinite(res.loss)
    assert res.time_s >= 0
    # batch norm statistics are part of the update
    assert res.delta[~flat.trainable].abs().sum() > 0
    assert res.delta[flat.trainable].abs().sum() > 0


def test_starts_from_global_weights_not_current():
    model, flat = make()
    global_w = flat.snapshot()
    x, y = toy(n=16)
    c = cfg(local_steps=3)
    a = train_client(model, flat, global_w, x, y, c, gen())
    flat.vector.add_(1.0)  # leftover local state from another client must not matter
    b = train_client(model, flat, global_w, x, y, c, gen())
    assert torch.equal(a.delta, b.delta)


@pytest.mark.parametrize("steps", [1, 4, 9])
def test_local_steps_exact(steps):
    model, flat = make()
    x, y = toy(n=20)
    res = train_client(model, flat, flat.snapshot(), x, y, cfg(local_steps=steps), gen())
    assert res.steps == steps


@pytest.mark.parametrize("n, bs, epochs", [(20, 8, 1), (20, 8, 3), (16, 8, 2), (5, 8, 2)])
def test_epochs_steps(n, bs, epochs):
    model, flat = make()
    x, y = toy(n=n)
    res = train_client(model, flat, flat.snapshot(), x, y, cfg(batch_size=bs, local_epochs=epochs), gen())
    assert res.steps == math.ceil(n / bs) * epochs


def test_counts_steps_through_optimizer(monkeypatch):
    model, flat = make()
    x, y = toy(n=20)
    calls = []
    orig = torch.optim.SGD.step

    def counting(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", counting)
    res = train_client(model, flat, flat.snapshot(), x, y, cfg(local_epochs=2), gen())
    assert len(calls) == res.steps == 6


def test_learns_separable_toy_problem():
    model, flat = make()
    global_w = flat.snapshot()
    x, y = toy(n=64)
    loss0, correct0, n0 = evaluate(model, x, y, batch_size=32)
    sgd = {"kind": "sgd", "lr": 0.2, "momentum": 0.9}
    res = train_client(model, flat, global_w, x, y, cfg(local_epochs=6, optimizer=sgd), gen())
    loss1, correct1, n1 = evaluate(model, x, y, batch_size=32)
    assert n0 == n1 == 64
    assert loss1 / n1 < 0.5 * (loss0 / n0)
    assert loss1 / n1 < 0.3
    assert correct1 / n1 >= 0.95
    # the first epoch's loss is worse than one epoch's training from the trained weights
    tail = train_client(model, flat, flat.snapshot(), x, y, cfg(local_epochs=1), gen(3))
    assert tail.loss < res.loss


def test_fedprox_large_mu_shrinks_update():
    x, y = toy(n=64)
    opt = {"kind": "sgd", "lr": 0.1}
    norms = {}
    for mu in (0.0, 10.0):  # lr * mu = 1: the proximal step pulls fully back to the anchor
        model, flat = make()
        c = cfg(local_epochs=4, optimizer=opt, algorithm={"kind": "fedprox", "mu": mu})
        res = train_client(model, flat, flat.snapshot(), x, y, c, gen(7))
        norms[mu] = float(res.delta.norm())
    model, flat = make()
    plain = train_client(model, flat, flat.snapshot(), x, y, cfg(local_epochs=4, optimizer=opt), gen(7))
    assert float(plain.delta.norm()) == norms[0.0]  # mu=0 is plain FedAvg
    assert norms[10.0] < 0.35 * norms[0.0]


def test_fedprox_first_step_equals_fedavg():
    # at the anchor the proximal gradient is zero, so one step is the plain step
    x, y = toy(n=16)
    m1, f1 = make()
    a = train_client(m1, f1, f1.snapshot(), x, y, cfg(local_steps=1), gen())
    m2, f2 = make()
    b = train_client(m2, f2, f2.snapshot(), x, y, cfg(local_steps=1, algorithm={"kind": "fedprox", "mu": 5.0}), gen())
    torch.testing.assert_close(a.delta, b.delta, rtol=0, atol=1e-7)


def test_reported_loss_and_accuracy_are_sample_weighted():
    # one step on all data: loss/accuracy are those of the starting model on the batch
    model, flat = make()
    global_w = flat.snapshot()
    x, y = toy(n=12)
    model.train()
    with torch.no_grad():
        logits = model(to_input(x))
    expected_loss = float(F.cross_entropy(logits, y))
    expected_acc = float((logits.argmax(1) == y).float().mean())
    res = train_client(model, flat, global_w, x, y, cfg(batch_size=12, local_steps=1), gen())
    assert res.loss == pytest.approx(expected_loss, rel=1e-5)
    assert res.accuracy == pytest.approx(expected_acc)


# ---------------------------------------------------------------- evaluate


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_evaluate_counts_match_direct_computation(norm):
    model, flat = make(norm, classes=3)
    x = torch.randint(0, 256, (37, SIZE, SIZE, 1), dtype=torch.uint8)
    y = torch.randint(0, 3, (37,))
    # move BatchNorm statistics off their defaults so eval mode matters
    with torch.no_grad():
        model.train()(to_input(x) * 2)
    loss, correct, n = evaluate(model, x, y, batch_size=10)
    assert not model.training
    with torch.no_grad():
        logits = model(to_input(x))
    assert n == 37
    assert correct == int((logits.argmax(1) == y).sum())
    assert loss == pytest.approx(float(F.cross_entropy(logits, y, reduction="sum")), rel=1e-5)
    # pooling shards gives the whole
    l1, c1, n1 = evaluate(model, x[:20], y[:20], batch_size=7)
    l2, c2, n2 = evaluate(model, x[20:], y[20:], batch_size=64)
    assert (c1 + c2, n1 + n2) == (correct, n)
    assert l1 + l2 == pytest.approx(loss, rel=1e-5)


def test_evaluate_empty():
    model, _ = make()
    x = torch.zeros((0, SIZE, SIZE, 1), dtype=torch.uint8)
    assert evaluate(model, x, torch.zeros(0, dtype=torch.long), batch_size=4) == (0.0, 0, 0)


def test_evaluate_leaves_weights_alone():
    model, flat = make("batch")
    before = flat.snapshot()
    x, y = toy(n=10)
    evaluate(model, x, y, batch_size=4)
    assert torch.equal(flat.vector, before)
