"""Deterministic kernels. On the CPU: the pinned kernels give results that do not depend on the instruction
sets a machine offers. For the GPU, the CPU-side guard: no model, defence or attack path may use an op without
a deterministic CUDA kernel (``torch.use_deterministic_algorithms(True)`` would raise on the GPU)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_helpers import with_adaptive_pooling
from torch import nn

from simfl.core.config import ModelConfig, TrainingConfig
from simfl.core.determinism import (
    AVX2_MACHINE_ENV,
    actor_runtime_env,
    cpu_kernel_env,
    denied_modules,
    denied_ops,
    kernel_fingerprint_in,
    pin_cpu_kernels,
)
from simfl.core.models import build_model
from simfl.core.seeding import torch_generator
from simfl.core.training import train_client
from simfl.core.weights import FlatWeights
from simfl.data import Dataset
from simfl.privacy.attacks import adapt, get_attack, observe_gradient, observe_update
from simfl.privacy.defences import DEFENCES, defended_model

ARCHS = ("convnet", "lenet", "resnet18")


def _dataset(size: int, classes: int = 4, n: int = 64) -> Dataset:
    g = np.random.default_rng(0)
    x = g.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    y = (np.arange(n) % classes).astype(np.int64)
    return Dataset.from_splits("t", [str(k) for k in range(classes)], {s: (x, y) for s in ("train", "val", "test")})


def _every_gpu_path(arch: str, kind: str) -> tuple[list[str], set[str]]:
    """Build the defended model, then run every path it takes in the engine; return what the guard found."""
    size = 8 if arch == "resnet18" else 28
    ds = _dataset(size)
    shape = (ds.channels, ds.image_size, ds.num_classes)
    torch.manual_seed(0)
    model_cfg, defence_cfg = ModelConfig(arch=arch, norm="group"), DEFENCES.configs[kind]()
    model, defence = defended_model(model_cfg, defence_cfg, 0, shape)
    flat = FlatWeights(model)
    modules = denied_modules(model)
    weights = flat.snapshot()
    x, y = torch.from_numpy(ds.train_x[:8]), torch.from_numpy(ds.train_y[:8])
    training = TrainingConfig(batch_size=4, local_steps=2)

    def run() -> None:
        server_model, server = defended_model(model_cfg, defence_cfg, 0, shape)
        FlatWeights(server_model)
        server.server_setup(ds, server_model)
        rows = [{"samples": 8, "accuracy": 0.5}]
        server.server_round(1, server_model, rows)
        defence.receive(server.broadcast(), torch.device("cpu"))
        gen = torch_generator(0, "test", 1)
        train_client(model, flat, weights, x, y, training, gen, defence, {})
        grad_view = observe_gradient(model, flat, weights, x[:1], y[:1], defence, gen)
        update_view = observe_update(model, flat, weights, x[:2], y[:2], lr=0.1, local_steps=2, local_batch_size=1)
        flat.load(weights)
        naive, adaptive = defence.naive_view(), defence.disclosure(server.broadcast())
        # Both None: nothing to adapt to, so the adaptive attack is the naive one, the same path (run once).
        views = [naive] if naive is None and adaptive is None else [naive, adaptive]
        for name, options in (("ig", {"iterations": 2}), ("dlg", {"iterations": 2})):
            attack = get_attack(name, **options)
            for disclosure in views:
                adapt(attack, disclosure)(model, flat, [dataclasses.replace(grad_view, labels=None)], [1])
        get_attack("ig", iterations=2)(model, flat, [update_view], [2])

    return modules, denied_ops(run)


@pytest.mark.parametrize("kind", DEFENCES.kinds())
@pytest.mark.parametrize("arch", ARCHS)
def test_every_model_and_defence_has_deterministic_cuda_kernels_only(arch, kind):
    modules, ops = _every_gpu_path(arch, kind)
    assert modules == []
    assert ops == set()


def test_the_guard_fails_when_adaptive_pooling_is_put_back():
    model = with_adaptive_pooling(build_model(ModelConfig(arch="convnet", width=4), 3, 28, 4))
    assert denied_modules(model) == ["AdaptiveAvgPool2d at encoder.11"]
    x = torch.rand(2, 3, 28, 28)
    ops = denied_ops(lambda: F.cross_entropy(model(x), torch.tensor([0, 1])).backward())
    assert ops == {"aten._adaptive_avg_pool2d_backward"}


def test_the_guard_sees_functional_calls_and_their_arguments():
    x = torch.rand(1, 2, 6, 6, requires_grad=True)
    assert denied_ops(lambda: F.interpolate(x, scale_factor=2, mode="bilinear").sum().backward()) == {
        "aten.upsample_bilinear2d_backward"
    }
    assert denied_ops(lambda: F.interpolate(x, scale_factor=2, mode="nearest").sum().backward()) == set()
    idx = torch.tensor([0, 2, 2])
    assert denied_ops(lambda: torch.bincount(idx)) == set()
    assert denied_ops(lambda: torch.bincount(idx, weights=torch.ones(3))) == {"aten.bincount"}
    assert denied_ops(lambda: torch.rand(5).median()) == set()  # values only: deterministic
    assert denied_ops(lambda: torch.rand(2, 5).median(dim=1)) == {"aten.median.dim"}
    assert denied_modules(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear"))) == ["Upsample at 0"]
    assert denied_modules(nn.Sequential(nn.Upsample(scale_factor=2))) == []


def test_pinned_kernels_give_the_same_results_on_a_machine_with_fewer_instruction_sets():
    pinned = actor_runtime_env()["env_vars"]
    assert kernel_fingerprint_in(pinned, pin=True) == kernel_fingerprint_in({**AVX2_MACHINE_ENV, **pinned}, pin=True)


@pytest.mark.skipif("avx512" not in torch.backends.cpu.get_cpu_capability().lower(),
                    reason="needs a CPU with AVX-512 to show that unpinned kernels follow the instruction sets")
def test_unpinned_kernels_follow_the_instruction_sets_so_the_check_above_can_fail():
    assert kernel_fingerprint_in({}, pin=False) != kernel_fingerprint_in(AVX2_MACHINE_ENV, pin=False)


def test_a_process_started_without_the_pinned_environment_is_refused(monkeypatch):
    running = torch.backends.cpu.get_cpu_capability().lower()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default" if running != "default" else "avx2")
    with pytest.raises(RuntimeError, match=f"ATen runs '{running}' kernels, not"):
        pin_cpu_kernels(1)
    assert torch.backends.mkldnn.enabled  # refused before changing anything in this process


def test_the_users_own_kernel_settings_are_passed_on(monkeypatch):
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    assert cpu_kernel_env() == {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}
    assert actor_runtime_env() == {"env_vars": cpu_kernel_env()}
