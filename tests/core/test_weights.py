import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from simfl.core.config import ModelConfig
from simfl.core.models import build_model
from simfl.core.weights import FlatWeights


def make(norm="batch", seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(arch="convnet", norm=norm, width=4), channels=3, image_size=16, num_classes=3)


def within(vector: torch.Tensor, t: torch.Tensor) -> bool:
    """True if ``t`` is a view into ``vector``'s storage."""
    start = vector.untyped_storage().data_ptr()
    end = start + vector.numel() * vector.element_size()
    return t.untyped_storage().data_ptr() == start and start <= t.data_ptr() < end


def test_sizes_and_trainable_mask():
    model = make("batch")
    n_params = sum(p.numel() for p in model.parameters())
    n_float_buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    assert n_float_buffers > 0  # BatchNorm running stats
    flat = FlatWeights(model)
    assert len(flat) == flat.vector.numel() == n_params + n_float_buffers
    assert flat.vector.dtype == torch.float32
    assert flat.trainable.dtype == torch.bool
    assert flat.trainable.numel() == len(flat)
    assert int(flat.trainable.sum()) == n_params


def test_values_preserved_when_binding():
    model = make("batch")
    params = [p.detach().clone() for p in model.parameters()]
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        before = model.eval()(x)
    flat = FlatWeights(model)
    for p, ref in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, ref)
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers[k]), k
    with torch.no_grad():
        assert torch.equal(model(x), before)
    # trainable slice, in order, is the concatenated parameters (what FedProx anchors on)
    assert torch.equal(flat.vector[flat.trainable], torch.cat([p.reshape(-1) for p in params]))


def test_parameters_and_float_buffers_are_views():
    model = make("batch")
    flat = FlatWeights(model)
    for name, p in model.named_parameters():
        assert within(flat.vector, p), name
    for name, b in model.named_buffers():
        if b.is_floating_point():
            assert within(flat.vector, b), name
        else:
            assert not within(flat.vector, b), name  # num_batches_tracked stays outside
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_writing_vector_changes_model():
    model = make("group").eval()
    flat = FlatWeights(model)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
        flat.vector.mul_(0.5)
        after = model(x)
    assert not torch.allclose(before, after)
    with torch.no_grad():
        flat.vector.zero_()
        assert torch.equal(model(x), torch.zeros(2, 3))
        for p in model.parameters():
            assert torch.count_nonzero(p) == 0


def test_optimizer_step_changes_vector():
    model = make("group").train()
    flat = FlatWeights(model)
    start = flat.snapshot()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    F.cross_entropy(model(x), y).backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    opt.step()
    assert not torch.equal(flat.vector, start)
    # exactly the SGD update, visible through the vector
    expected = start[flat.trainable] - 0.1 * grads
    torch.testing.assert_close(flat.vector[flat.trainable], expected)
    # group norm has no float buffers, so nothing else exists
    assert bool(flat.trainable.all())


def test_adam_and_momentum_optimizers_also_write_through():
    for make_opt in (
        lambda ps: torch.optim.Adam(ps, lr=0.01),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    ):
        model = make("batch").train()
        flat = FlatWeights(model)
        opt = make_opt(model.parameters())
        x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
        for _ in range(2):
            start = flat.snapshot()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            assert not torch.equal(flat.vector[flat.trainable], start[flat.trainable])
            params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            assert torch.equal(flat.vector[flat.trainable], params)


def test_batchnorm_running_stats_live_in_vector():
    model = make("batch")
    flat = FlatWeights(model)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    start = flat.snapshot()
    x = torch.rand(8, 3, 16, 16) * 3 + 1
    with torch.no_grad():
        model.eval()(x)
    assert torch.equal(flat.vector, start)  # eval does not touch statistics
    with torch.no_grad():
        model.train()(x)
    changed = flat.vector != start
    assert changed.any()
    assert not changed[flat.trainable].any()  # a forward pass moves only buffers
    assert within(flat.vector, bn.running_mean) and within(flat.vector, bn.running_var)
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    # loading the old vector restores the statistics
    flat.load(start)
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))


def test_load_copies_and_snapshot_is_a_copy():
    model = make("batch").eval()
    flat = FlatWeights(model)
    x = torch.rand(2, 3, 16, 16)
    snap = flat.snapshot()
    assert torch.equal(snap, flat.vector)
    assert snap.data_ptr() != flat.vector.data_ptr()
    with torch.no_grad():
        ref = model(x)
    flat.vector.add_(1.0)
    assert not torch.equal(snap, flat.vector)  # snapshot unaffected by later training
    source = snap.clone()
    flat.load(source)
    assert torch.equal(flat.vector, snap)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    source.add_(5.0)  # load copied: the source is not aliased
    assert torch.equal(flat.vector, snap)
    # the parameters still point into the same vector after load
    for p in model.parameters():
        assert within(flat.vector, p)


def test_load_transfers_between_models():
    a, b = make("batch", seed=0), make("batch", seed=1)
    fa, fb = FlatWeights(a), FlatWeights(b)
    assert not torch.equal(fa.vector, fb.vector)
    fb.load(fa.snapshot())
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


def test_snapshot_detached():
    model = make("group").train()
    flat = FlatWeights(model)
    F.cross_entropy(model(torch.rand(2, 3, 16, 16)), torch.tensor([0, 1])).backward()
    assert not flat.snapshot().requires_grad


def test_as_dict_names_views_of_any_vector_for_functional_call():
    model = make("batch").eval()
    flat = FlatWeights(model)
    named = flat.as_dict(flat.vector)
    expected = dict(model.named_parameters()) | {k: b for k, b in model.named_buffers() if b.is_floating_point()}
    assert named.keys() == expected.keys()
    for name, t in named.items():
        assert torch.equal(t, expected[name]) and within(flat.vector, t), name
    # a stack of vectors: leading dims are kept, and vmap evaluates each vector's model
    torch.manual_seed(1)
    stack = flat.vector + 0.1 * torch.randn(3, len(flat))
    assert flat.as_dict(stack)["head.weight"].shape == (3, *model.head.weight.shape)
    x = torch.rand(2, 3, 16, 16)
    outs = vmap(lambda v: functional_call(model, flat.as_dict(v), (x,)))(stack)
    for i in range(3):
        flat.load(stack[i])
        with torch.no_grad():
            assert torch.allclose(outs[i], model(x), atol=1e-5)
