"""Deterministic kernels: the CPU kernels every actor pins, the GPU switch, and the audit that keeps it safe.

Same scenario and seed, same results on another machine of the same kind: on
the CPU the float results of PyTorch depend on which kernels its libraries pick
for the processor they find, not only on the code (issue 28: the smoke scenario's
test accuracy was 0.499 on one 2-core AMD EPYC and 0.559 on another, same commit;
the run-to-run, actor-count, packing and --num-cpus results were identical). Measured
on one machine by capping each library's instruction set (6-round smoke run,
final weights compared): ATen's vectorised kernels (AVX-512 vs AVX2), oneDNN's
convolutions (its AVX-512 vs AVX2 kernels; it also sizes its blocks by the
caches it finds) and MKL's GEMM (its CNR mode on or off) each change the
results; numpy's dispatch did not. So every actor (:func:`pin_cpu_kernels`,
started with :func:`actor_runtime_env`):

- runs ATen's AVX2 kernels (``ATEN_CPU_CAPABILITY=avx2``, read once when ATen
  first dispatches, hence set in the actor's environment before it starts);
- turns oneDNN and NNPACK off, so convolutions are im2col + GEMM
  (``slow_conv2d``) and every GEMM goes to MKL;
- runs MKL in conditional-numerical-reproducibility mode (``MKL_CBWR=AVX2``:
  fixed cache sizes, deterministic reductions, static scheduling; Intel
  documents identical results on every Intel CPU with AVX2 at a fixed number
  of threads, which the scenario fixes). On AMD processors MKL takes this as
  its ``AUTO`` CNR branch (read back through ``mkl_serv_cbwr_get``), which
  still fixes cache sizes and reductions but dispatches by the processor's
  instruction sets: expected identical on AMD machines of one kind (checked
  so far by capping instruction sets on one model, Zen 5:
  ``benchmarks/reproducibility.py``), not guaranteed between AMD and Intel. ``MKL_CBWR=COMPATIBLE`` (SSE2 kernels) is
  documented identical on every x86-64 CPU; set it in the environment to use
  it (simfl passes the user's own ``ATEN_CPU_CAPABILITY`` and ``MKL_CBWR`` on).

Cost, measured on the 2-core machine (smoke, 12 rounds, summed round time):
native kernels 11.1 s, these pins 16.5 s (1.5x), with ``COMPATIBLE`` 25.6 s (2.3x).

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

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

# The environment that pins the CPU kernels of an actor's process (the module docstring says why each).
PORTABLE_CPU_ENV: Mapping[str, str] = MappingProxyType({"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"})


def cpu_kernel_env() -> dict[str, str]:
    """The kernel-pinning variables an actor starts with: simfl's, or the user's own values of the same variables."""
    return {name: os.environ.get(name, value) for name, value in PORTABLE_CPU_ENV.items()}


def actor_runtime_env() -> dict[str, dict[str, str]]:
    """Ray ``runtime_env`` for every simfl actor: its process starts with the pinned CPU kernels."""
    return {"env_vars": cpu_kernel_env()}


def pin_cpu_kernels(threads: int) -> None:
    """First call in every actor: ``threads`` intra-op threads, oneDNN and NNPACK off, ATen's dispatch checked.

    Raises ``RuntimeError`` when ATen does not run the kernels the environment asks for (the
    process was started without :func:`actor_runtime_env`, or the CPU lacks AVX2): results would
    then depend on the machine without anyone noticing.
    """
    wanted = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    running = torch.backends.cpu.get_cpu_capability().lower()
    if wanted != running:
        raise RuntimeError(
            f"ATen runs {running!r} kernels, not {wanted or 'unset'!r}: start simfl actors with "
            "simfl.core.determinism.actor_runtime_env() (and a CPU with AVX2) for machine-independent results"
        )
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]  # a ContextProp: assigning sets it
    torch.backends.nnpack.set_flags(False)


def pin_this_script(threads: int) -> None:
    """For a script that times or compares simfl's code in its own process (the benchmarks): run the kernels
    the actors run. Started without their environment, it executes itself again with it (the variables are
    read when the libraries load); processes it spawns inherit the environment and call :func:`pin_cpu_kernels`."""
    wanted = cpu_kernel_env()
    if any(os.environ.get(name) != value for name, value in wanted.items()):
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **wanted})
    pin_cpu_kernels(threads)


def kernel_fingerprint() -> str:
    """SHA-256 (16 hex digits) of a small ConvNet's weights after 8 SGD steps in this process, as it is set up.

    The kernels a run uses (convolutions forward and backward, GEMMs, group norm, the
    optimiser's vectorised updates) on fixed data: two processes print the same value
    exactly when those kernels give them the same float results. ``benchmarks/reproducibility.py``
    compares it across environments and with the value recorded for the project's machines.
    """
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 8),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 0.2 - 0.1)
    x = torch.rand(8, 16, 3, 28, 28, generator=g)
    y = torch.randint(0, 8, (8, 16), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(8):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[step]), y[step]).backward()
        opt.step()
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    return hashlib.sha256(weights.numpy().tobytes()).hexdigest()[:16]


# What a machine without AVX-512 runs: oneDNN, MKL and ATen capped at AVX2 (for kernel_fingerprint_in).
AVX2_MACHINE_ENV: Mapping[str, str] = MappingProxyType(
    {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
)


def kernel_fingerprint_in(env: Mapping[str, str], pin: bool) -> str:
    """:func:`kernel_fingerprint` in a fresh Python process started with ``env`` (over this one's, less the
    kernel variables), pinned as an actor is (``pin``) or with PyTorch's own kernels; the variables are read
    when the libraries load, so only a new process shows their effect."""
    call = "pin_cpu_kernels(1)" if pin else "torch.set_num_threads(1)"
    code = (f"import torch; from simfl.core.determinism import kernel_fingerprint, pin_cpu_kernels; {call}; "
            "print(kernel_fingerprint())")
    clean = {k: v for k, v in os.environ.items() if k not in {*AVX2_MACHINE_ENV, *PORTABLE_CPU_ENV}}
    proc = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"kernel fingerprint process failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip()


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
