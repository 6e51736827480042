"""Deterministic GPU kernels: the switch every GPU actor turns on, and the audit that keeps it safe.

Same scenario and seed, same results, whatever the number of actors: on a
GPU that needs ``torch.use_deterministic_algorithms(True)`` (no ``warn_only``),
which makes PyTorch raise ``RuntimeError`` on the first op that has no
deterministic CUDA kernel. So simfl must never call such an op on a GPU path,
and a machine without a GPU must still notice when one creeps in. Two deny
lists, from PyTorch's own (``torch.use_deterministic_algorithms`` docs, 2.14)
and the alert strings in ``libtorch_cuda.so``:

- :data:`NONDETERMINISTIC_MODULES`: module types whose CUDA backward (or
  forward) raises; :func:`denied_modules` finds them in a model.
- :data:`NONDETERMINISTIC_OPS`: the aten ops behind them and behind functional
  calls (``F.interpolate``, ``grid_sample``, ``bincount`` with weights, ...);
  :func:`denied_ops` records every op a piece of code dispatches, on the CPU,
  through a ``TorchDispatchMode`` (which also sees inside ``torch.func``'s
  ``vmap``/``grad`` and Opacus), and returns those on the list.

The audit (``tests/core/test_determinism.py``) runs both over every model × defence
the factory builds, through local training, the gradient view, the defences'
server steps and every attack, naive and adaptive. What it found and how:

- ``nn.AdaptiveAvgPool2d`` (ConvNet, LeNet, ResNet-18's head): replaced by
  :class:`simfl.core.models.AvgPoolTo` (fixed-kernel ``avg_pool2d`` or a spatial
  mean; CPU results bit-identical at the shipped sizes).
- ``index_add``/``index_select``'s backward (the update-view replay),
  ``scatter_add``, ``gather``, ``index_put`` with ``accumulate`` (tensor
  indexing's backward), ``cumsum`` and ``ConvTranspose2d`` (the latent
  defence's decoder): PyTorch switches them to deterministic kernels in this
  mode, so they are allowed.
- ``median`` (BiDO's kernel bandwidth): only the values are taken, no indices,
  which is deterministic.
- Opacus's ExpandedWeights (``unfold`` / ``einsum``) and ``torch.func``'s
  batched convolutions: no op on the list.
- cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` before its first use
  (:func:`enable_cuda` sets it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

# Module types with no deterministic CUDA kernel (backward, or forward for the unpooling ones).
NONDETERMINISTIC_MODULES: tuple[type[nn.Module], ...] = (
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.AvgPool3d,
    nn.FractionalMaxPool2d,
    nn.FractionalMaxPool3d,
    nn.MaxUnpool1d,
    nn.MaxUnpool2d,
    nn.MaxUnpool3d,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReflectionPad3d,
    nn.CTCLoss,
    nn.NLLLoss,  # raises on CUDA for spatial (N, C, H, W) targets: nll_loss2d
    nn.EmbeddingBag,
    nn.UpsamplingBilinear2d,
)
# nn.Upsample is denied only in the interpolating modes (nearest is deterministic).
_INTERPOLATING = {"linear", "bilinear", "bicubic", "trilinear"}


def _always(args: tuple, kwargs: dict) -> bool:
    return True


def _bincount_weighted(args: tuple, kwargs: dict) -> bool:
    return (len(args) > 1 and args[1] is not None) or kwargs.get("weights") is not None


def _scatter_reduce_prod(args: tuple, kwargs: dict) -> bool:
    return "prod" in (*[a for a in args if isinstance(a, str)], kwargs.get("reduce"))


# aten op (overload packet, or op.overload) -> does this call have no deterministic CUDA kernel?
NONDETERMINISTIC_OPS: dict[str, Callable[[tuple, dict], bool]] = {
    **dict.fromkeys(
        [
            "aten._adaptive_avg_pool2d_backward",
            "aten._adaptive_avg_pool3d_backward",
            "aten.adaptive_max_pool2d_backward",
            "aten.adaptive_max_pool3d_backward",
            "aten.avg_pool3d_backward",
            "aten.fractional_max_pool2d_backward",
            "aten.fractional_max_pool3d_backward",
            "aten.max_unpool2d",
            "aten.max_unpool3d",
            "aten.upsample_linear1d_backward",
            "aten.upsample_bilinear2d_backward",
            "aten._upsample_bilinear2d_aa_backward",
            "aten.upsample_bicubic2d_backward",
            "aten._upsample_bicubic2d_aa_backward",
            "aten.upsample_trilinear3d_backward",
            "aten.reflection_pad1d_backward",
            "aten.reflection_pad2d_backward",
            "aten.reflection_pad3d_backward",
            "aten.nll_loss2d_forward",
            "aten._ctc_loss_backward",
            "aten._embedding_bag_backward",
            "aten.put_",
            "aten.put",
            "aten.histc",
            "aten.median.dim",
            "aten.nanmedian.dim",
            "aten.grid_sampler_2d_backward",
            "aten.grid_sampler_3d_backward",
        ],
        _always,
    ),
    "aten.bincount": _bincount_weighted,
    "aten.scatter_reduce": _scatter_reduce_prod,
    "aten.scatter_reduce_": _scatter_reduce_prod,
}


def denied_modules(model: nn.Module) -> list[str]:
    """Names (``type at path``) of the modules in ``model`` that have no deterministic CUDA kernel."""
    found = []
    for name, module in model.named_modules():
        bad = isinstance(module, NONDETERMINISTIC_MODULES) or (
            isinstance(module, nn.Upsample) and module.mode in _INTERPOLATING
        )
        if bad:
            found.append(f"{type(module).__name__} at {name or '(root)'}")
    return found


class _OpRecorder(TorchDispatchMode):
    """Notes every dispatched aten op that is on the deny list (and runs it unchanged)."""

    def __init__(self) -> None:
        super().__init__()
        self.denied: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        for name in (str(func), str(func.overloadpacket)):
            rule = NONDETERMINISTIC_OPS.get(name)
            if rule is not None and rule(args, kwargs):
                self.denied.add(name)
        return func(*args, **kwargs)


def denied_ops(fn: Callable[[], object]) -> set[str]:
    """Run ``fn()`` (on any device) and return the deny-listed aten ops it dispatched, forward and backward."""
    with _OpRecorder() as recorder:
        fn()
    return recorder.denied


def enable_cuda() -> None:
    """Deterministic CUDA kernels for this process, TF32 off (float32 as on the CPU); call before any CUDA work.

    Raising (no ``warn_only``) is the point: an op without a deterministic kernel
    must fail loudly, not quietly make results depend on the actor layout.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
