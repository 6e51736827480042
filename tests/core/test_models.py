import copy

import pytest
import torch
import torch.nn.functional as F
from model_helpers import with_adaptive_pooling
from torch import nn
from torch.func import functional_call, grad

from simfl.core.config import ModelConfig
from simfl.core.models import DEFAULT_LATENT, AvgPoolTo, SplitNet, build_model, norm_layer

COMBOS = [
    (arch, norm)
    for arch in ("convnet", "lenet", "resnet18")
    for norm in ("batch", "group", "none")
    if not (arch == "resnet18" and norm == "none")
]



def make(arch="convnet", norm="group", channels=3, size=28, classes=5, **kw):
    torch.manual_seed(0)
    if arch == "convnet":  # width is a convnet knob; the config rejects it elsewhere
        kw.setdefault("width", 8)
    cfg = ModelConfig(arch=arch, norm=norm, **kw)
    return build_model(cfg, channels=channels, image_size=size, num_classes=classes)


@pytest.mark.parametrize("arch, norm", COMBOS)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32, 64])
def test_shapes(arch, norm, channels, size):
    model = make(arch, norm, channels=channels, size=size, classes=7).eval()
    assert isinstance(model, SplitNet)
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():
        out = model(x)
        feats = model.features(x)
    assert out.shape == (2, 7)
    assert feats.shape == (2, DEFAULT_LATENT[arch])
    assert model.latent_dim == DEFAULT_LATENT[arch]
    assert model.head.in_features == DEFAULT_LATENT[arch]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ["convnet", "lenet", "resnet18"])
def test_latent_dim_override(arch):
    model = make(arch, "group", latent_dim=20, classes=3).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert model.features(x).shape == (2, 20)
        assert model(x).shape == (2, 3)
    assert model.latent_dim == 20
    assert model.head.in_features == 20


@pytest.mark.parametrize("arch", ["convnet", "lenet", "resnet18"])
def test_forward_is_head_of_features(arch):
    model = make(arch, "group").eval()
    x = torch.rand(3, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), model.head(model.features(x)))


class Zero(nn.Module):
    def forward(self, z):
        return torch.zeros_like(z)


@pytest.mark.parametrize("arch", ["convnet", "lenet", "resnet18"])
def test_latent_slot_is_on_forward_path(arch):
    model = make(arch, "group").eval()
    assert isinstance(model.latent, nn.Identity)
    x = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        before = model(x)
        enc = model.encoder(x)
        assert torch.equal(model.features(x), enc)
        model.latent = Zero()
        after = model(x)
        # only the head's bias is left once the latent is zeroed
        assert torch.allclose(after, model.head.bias.expand(2, -1))
        assert not torch.allclose(before, after)
        assert torch.equal(model.features(x), torch.zeros_like(enc))
        # a defence that perturbs the latent changes predictions
        model.latent = nn.Dropout(p=0.0)
        assert torch.equal(model(x), before)


def test_group_norm_replaces_batch_norm():
    for arch in ("convnet", "lenet", "resnet18"):
        model = make(arch, "group")
        kinds = [type(m) for m in model.modules()]
        assert nn.GroupNorm in kinds, arch
        assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds), arch
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                assert m.num_channels % m.num_groups == 0
        # no running statistics: nothing differs between train and eval
        x = torch.rand(4, 3, 28, 28)
        with torch.no_grad():
            assert torch.equal(model.train()(x), model.eval()(x))


def test_batch_norm_and_none():
    for arch in ("convnet", "lenet", "resnet18"):
        bn = make(arch, "batch")
        assert any(isinstance(m, nn.BatchNorm2d) for m in bn.modules())
        assert not any(isinstance(m, nn.GroupNorm) for m in bn.modules())
    for arch in ("convnet", "lenet"):
        plain = make(arch, "none")
        assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in plain.modules())
        assert len(list(plain.buffers())) == 0


def test_resnet_counts_norm_layers():
    # ResNet-18: stem + 8 blocks x 2 + 3 downsample = 20 norm layers
    model = make("resnet18", "group")
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == 20
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 20


def test_norm_layer_group_count():
    gn = norm_layer("group")(6)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 2 and gn.num_channels == 6
    gn = norm_layer("group")(64)
    assert gn.num_groups == 8
    assert isinstance(norm_layer("batch")(4), nn.BatchNorm2d)
    assert isinstance(norm_layer("none")(4), nn.Identity)


def test_resnet_stem_stride_by_size():
    small = make("resnet18", "group", size=32)
    large = make("resnet18", "group", size=64)
    assert small.encoder.conv1.stride == (1, 1)
    assert large.encoder.conv1.stride == (2, 2)
    assert isinstance(small.encoder.maxpool, nn.Identity)


def test_width_scales_convnet():
    narrow = make("convnet", "group", width=8)
    wide = make("convnet", "group", width=16)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(wide) > n(narrow)
    assert narrow.encoder[0].out_channels == 8
    assert wide.encoder[0].out_channels == 16


def test_init_follows_global_rng():
    a, b = make("convnet"), make("convnet")
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    torch.manual_seed(1)
    c = build_model(ModelConfig(width=8), 3, 28, 5)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_gradients_reach_every_parameter():
    model = make("convnet", "batch").train()
    x = torch.rand(4, 3, 28, 28)
    model(x).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name


@pytest.mark.parametrize("arch", ["convnet", "lenet", "resnet18"])
@pytest.mark.parametrize("size", [28, 32])
def test_deterministic_pooling_is_bit_identical_to_adaptive_pooling_at_shipped_sizes(arch, size):
    """Forward, gradient and the attacks' gradient-of-gradient: CPU results did not change with the GPU fix."""
    model = make(arch, "group", size=size, classes=4)
    before = with_adaptive_pooling(copy.deepcopy(model))
    x = torch.rand(3, size, size, 3).permute(0, 3, 1, 2)  # channels-last, as to_input gives it
    y = torch.tensor([0, 1, 3])
    params = dict(model.named_parameters())

    def grad_of_grad(net: nn.Module) -> torch.Tensor:
        def loss(p, images):
            return F.cross_entropy(functional_call(net, p, (images,)), y)

        def mismatch(images):
            return sum(g.pow(2).sum() for g in grad(loss)(params, images).values())

        return grad(mismatch)(x)

    assert torch.equal(model(x), before(x))
    assert torch.equal(grad_of_grad(model), grad_of_grad(before))


@pytest.mark.parametrize("size, out", [(7, 2), (6, 5), (11, 4), (9, 4), (4, 1), (14, 2)])
def test_avg_pool_to_matches_adaptive_pooling_for_any_size(size, out):
    x = torch.randn(2, 3, size, size + 1, requires_grad=True)
    ours, theirs = AvgPoolTo(out)(x), F.adaptive_avg_pool2d(x, out)
    assert ours.shape == theirs.shape == (2, 3, out, out)
    assert torch.allclose(ours, theirs, atol=1e-6)
    (g1,) = torch.autograd.grad(ours.pow(2).sum(), x)
    (g2,) = torch.autograd.grad(theirs.pow(2).sum(), x)
    assert torch.allclose(g1, g2, atol=1e-6)
