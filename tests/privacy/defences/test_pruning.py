"""Gradient pruning: exact per-tensor top-k, deterministic ties, both views, its figures, config and search knob."""

from __future__ import annotations

import pytest
import torch

from simfl.core.config import ModelConfig, TrainingConfig
from simfl.core.errors import UserError
from simfl.core.training import train_client
from simfl.core.weights import FlatWeights
from simfl.engine.scenario import parse_scenario
from simfl.privacy.attacks.observation import observe_gradient
from simfl.privacy.defences import DEFENCES, defended_model, make_defence
from simfl.privacy.defences.base import NoDefenceConfig
from simfl.privacy.defences.pruning import (
    Pruning,
    PruningConfig,
    flat_segments,
    parameter_segments,
    prune,
    pruned_count,
)

SHAPE = (3, 16, 4)  # channels, image size, classes


def defended(fraction=0.9, norm="group"):
    torch.manual_seed(0)
    model, defence = defended_model(ModelConfig(arch="convnet", width=8, norm=norm), PruningConfig(fraction=fraction),
                                    0, SHAPE)
    return model, FlatWeights(model), defence


def data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8, generator=g)
    return x, torch.randint(0, SHAPE[2], (n,), generator=g)


def nonzeros_per_tensor(vector, segments):
    return [int((vector[o : o + n] != 0).sum()) for o, n in segments]


# ---------------------------------------------------------------- the pruning itself


def test_keeps_exactly_the_top_k_magnitudes_of_each_tensor_and_leaves_buffers():
    # Two "parameter" tensors (5 and 4 entries) around 2 buffer entries that are not pruned.
    v = torch.tensor([0.5, -3.0, 0.1, 2.0, -0.2, 7.0, 9.0, 0.01, -0.03, 0.02, 0.04])
    segments = [(0, 5), (7, 4)]
    out = prune(v, segments, 0.5)  # floor(2.5) = 2 and floor(2.0) = 2 entries zeroed
    expected = torch.tensor([0.5, -3.0, 0.0, 2.0, 0.0, 7.0, 9.0, 0.0, -0.03, 0.0, 0.04])
    assert torch.equal(out, expected)
    assert torch.equal(v[5:7], out[5:7])  # buffers untouched
    assert out is not v and v[2] == 0.1  # a copy: the input is not changed


def test_per_tensor_not_global_a_small_layer_keeps_its_own_top_entries():
    v = torch.tensor([10.0, 20.0, 30.0, 40.0, 1e-6, 2e-6, 3e-6, 4e-6])
    out = prune(v, [(0, 4), (4, 4)], 0.5)
    # A global top-4 would keep only the first layer; per tensor each keeps its two largest.
    assert torch.equal(out, torch.tensor([0.0, 0.0, 30.0, 40.0, 0.0, 0.0, 3e-6, 4e-6]))


def test_ties_are_broken_deterministically_the_earlier_entry_kept():
    v = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0])
    out = prune(v, [(0, 6)], 0.5)
    assert torch.equal(out, torch.tensor([1.0, -1.0, 1.0, 0.0, 0.0, 0.0]))
    assert torch.equal(prune(v, [(0, 6)], 0.5), out)


def test_fraction_zero_is_the_identity_and_a_tensor_always_keeps_an_entry():
    v = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(prune(v, [(0, 30), (30, 20)], 0.0), v)
    one = prune(torch.tensor([0.3, -0.7, 0.1]), [(0, 1), (1, 2)], 0.99)
    assert torch.equal(one, torch.tensor([0.3, -0.7, 0.0]))  # floor(0.99) = 0, floor(1.98) = 1


def test_pruned_count_rounds_down_exactly_despite_float_products():
    assert pruned_count(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996
    assert pruned_count(10, 0.7) == 7
    assert pruned_count(7, 0.5) == 3
    assert pruned_count(1, 0.99) == 0
    assert pruned_count(1000, 0.0) == 0


@pytest.mark.parametrize("arch", ["convnet", "lenet", "resnet18"])
def test_the_layout_known_from_build_is_the_flat_weights_one(arch):
    kw = {"width": 8, "norm": "batch"} if arch == "convnet" else {}
    torch.manual_seed(0)
    model, defence = defended_model(ModelConfig(arch=arch, **kw), PruningConfig(), 0, SHAPE)
    assert defence._segments == parameter_segments(model)
    assert parameter_segments(model) == flat_segments(FlatWeights(model))


# ---------------------------------------------------------------- both views


def test_share_prunes_each_parameter_tensor_and_passes_buffers():
    model, flat, defence = defended(fraction=0.75, norm="batch")
    segments = flat_segments(flat)
    delta = torch.randn(len(flat), generator=torch.Generator().manual_seed(3))
    shared = defence.share(delta)
    assert nonzeros_per_tensor(shared, segments) == [n - pruned_count(n, 0.75) for _, n in segments]
    buffers = ~flat.trainable
    assert buffers.any() and torch.equal(shared[buffers], delta[buffers])  # BatchNorm running statistics
    kept = shared != 0
    assert torch.equal(shared[kept], delta[kept])  # what is kept is kept exactly
    for offset, n in segments:  # every kept entry outweighs every dropped one of its tensor
        seg, keep = delta[offset : offset + n].abs(), kept[offset : offset + n]
        if (~keep).any():
            assert seg[keep].min() >= seg[~keep].max()
    assert defence.share(delta).equal(shared)  # deterministic


def test_share_with_fraction_zero_is_the_identity():
    _, flat, defence = defended(fraction=0.0)
    delta = torch.randn(len(flat), generator=torch.Generator().manual_seed(4))
    assert torch.equal(defence.share(delta), delta)


def test_the_gradient_view_is_the_plain_gradient_pruned():
    model, flat, defence = defended(fraction=0.9)
    plain = make_defence(NoDefenceConfig(), SHAPE, 0)
    x, y = data(n=2)
    weights = flat.snapshot()
    observed = observe_gradient(model, flat, weights, x, y, defence, torch.Generator().manual_seed(0)).shared
    clean = observe_gradient(model, flat, weights, x, y, plain, torch.Generator().manual_seed(0)).shared
    assert torch.equal(observed, prune(clean, flat_segments(flat), 0.9))
    assert float((observed[flat.trainable] == 0).float().mean()) >= 0.89


def test_training_shares_a_pruned_update_and_logs_its_declared_figures():
    model, flat, defence = defended(fraction=0.8)
    x, y = data(n=16)
    weights = flat.snapshot()
    cfg = TrainingConfig(batch_size=4)
    local = train_client(model, flat, weights, x, y, cfg, torch.Generator().manual_seed(5), defence, {})
    assert set(local.defence) == set(Pruning.client_figures)
    segments = flat_segments(flat)
    floor = sum(pruned_count(n, 0.8) for _, n in segments) / sum(n for _, n in segments)  # just under 0.8
    assert 0.79 < floor <= local.defence["prune_sparsity"] < floor + 0.01  # plus entries that did not move
    assert 0.0 < local.defence["prune_kept_norm"] <= 1.0
    # The same client trained without the defence: the shared update is its true update, pruned.
    plain_model, plain_flat, _ = defended(fraction=0.0)
    true = train_client(plain_model, plain_flat, weights, x, y, cfg, torch.Generator().manual_seed(5), None, {})
    torch.testing.assert_close(local.delta, prune(true.delta, flat_segments(flat), 0.8))
    kept = float(local.delta[flat.trainable].norm() / true.delta[flat.trainable].norm())
    assert local.defence["prune_kept_norm"] == pytest.approx(kept, rel=1e-5)


# ---------------------------------------------------------------- attackers, config, search


def test_the_naive_attacker_is_not_exact_and_nothing_is_disclosed_yet():
    sc = parse_scenario({"populations": [{"name": "a", "clients": 2}], "defence": "pruning", "attacks": {}})
    assert Pruning.naive_is_exact(sc.attacks) is False
    assert defended()[2].disclosure() is None and defended()[2].naive_view() is None


def test_config_defaults_and_registry():
    assert DEFENCES["pruning"] is Pruning and DEFENCES.configs["pruning"] is PruningConfig
    assert PruningConfig().knobs() == {"fraction": 0.9}
    sc = parse_scenario({"populations": [{"name": "a", "clients": 2}], "defence": {"kind": "pruning", "fraction": 0}})
    assert sc.defence == PruningConfig(fraction=0.0)


@pytest.mark.parametrize(
    ("defence", "message"),
    [
        ({"kind": "pruning", "fraction": 1.0}, "defence.fraction: Input should be less than 1"),
        ({"kind": "pruning", "fraction": -0.1}, "defence.fraction: Input should be greater than or equal to 0"),
        ({"kind": "pruning", "fraction": float("nan")}, "defence.fraction: Input should be a finite number"),
        ({"kind": "pruning", "fraction": "0.5"}, "defence.fraction"),
        ({"kind": "pruning", "sigma": 0.1}, "defence.sigma: unknown key (not a setting of pruning)"),
    ],
)
def test_bad_knobs_are_rejected_naming_their_key(defence, message):
    with pytest.raises(UserError) as info:
        parse_scenario({"populations": [{"name": "a", "clients": 2}], "defence": defence})
    assert message in str(info.value)


def test_the_search_knob_is_declared_within_the_knobs_domain():
    knob = Pruning.search_knob
    assert knob is not None and knob.name == "fraction" and knob.name in PruningConfig.model_fields
    assert (knob.low, knob.high, knob.falls, knob.log) == (0.0, 0.99, True, False)
    for value in (knob.low, knob.high):  # both ends are valid settings
        PruningConfig(**knob.settings(value))
