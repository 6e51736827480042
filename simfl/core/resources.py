"""How many client actors to start, which clients each owns, and its GPU share.

Pure functions of the scenario and the cluster's totals, so they are testable
without Ray and the same plan can be shown before anything starts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from simfl.core.config import ResourcesConfig
from simfl.core.determinism import enable_cuda
from simfl.core.errors import UserError


def plan_actors(
    cfg: ResourcesConfig, cluster_cpus: float, cluster_gpus: float, num_clients: int, elastic: bool = False
) -> int:
    """Number of client actors: the user's number, or as many as the cluster fits (``auto``).

    On a fixed cluster (the private local instance) a plan that does not fit is
    an error, since Ray would wait forever for resources that never come. On an
    ``elastic`` one (joined with --address, maybe autoscaling) an explicit count
    is trusted: the autoscaler may add the nodes it needs.
    """
    if cfg.client_actors != "auto":
        n = min(cfg.client_actors, num_clients)
        if not elastic:
            _check_fit(cfg, n, cluster_cpus, cluster_gpus)
        return n
    if cfg.gpus_per_actor > 0 and cluster_gpus <= 0:
        hint = "; set resources.client_actors to a number to let the autoscaler add GPU nodes" if elastic else ""
        raise UserError(f"resources.gpus_per_actor: the Ray cluster has no GPUs{hint}")
    fit = math.floor((cluster_cpus - cfg.coordinator_cpus) / cfg.cpus_per_actor + 1e-9)
    if cfg.gpus_per_actor > 0:
        fit = min(fit, math.floor(cluster_gpus / cfg.gpus_per_actor + 1e-9))
    if fit < 1:
        _check_fit(cfg, 1, cluster_cpus, cluster_gpus)
    return min(fit, num_clients)


def _check_fit(cfg: ResourcesConfig, n: int, cluster_cpus: float, cluster_gpus: float) -> None:
    need_gpus = n * cfg.gpus_per_actor
    if need_gpus > cluster_gpus + 1e-9:
        raise UserError(
            f"resources.gpus_per_actor: {n} actors x {cfg.gpus_per_actor:g} GPUs do not fit the "
            f"cluster's {cluster_gpus:g} GPUs"
        )
    need_cpus = n * cfg.cpus_per_actor + cfg.coordinator_cpus
    if need_cpus > cluster_cpus + 1e-9:
        key = "client_actors" if n > 1 else "cpus_per_actor"
        raise UserError(
            f"resources.{key}: {n} actors x {cfg.cpus_per_actor:g} CPUs (+{cfg.coordinator_cpus:g} for the "
            f"coordinator) do not fit the cluster's {cluster_cpus:g} CPUs; lower resources.client_actors "
            f"or resources.cpus_per_actor"
        )


def assign_clients(sizes: np.ndarray, n_actors: int) -> np.ndarray:
    """Owner actor of each client, balancing sample counts across actors.

    Clients are dealt largest first in snake order (0..M-1, M-1..0, ...), which
    keeps every actor's total within one client's size of the others without a
    per-client Python loop.
    """
    order = np.argsort(-sizes, kind="stable")
    lap = np.arange(len(sizes)) // n_actors
    pos = np.arange(len(sizes)) % n_actors
    dealt = np.where(lap % 2 == 0, pos, n_actors - 1 - pos)
    owner = np.empty(len(sizes), dtype=np.int64)
    owner[order] = dealt
    return owner


def torch_threads(cpus: float) -> int:
    """Intra-op threads for a process holding ``cpus`` CPUs: never more threads than its share."""
    return max(1, int(cpus))


def gpu_memory_fraction(gpus_per_actor: float) -> float | None:
    """Share of one GPU's memory an actor may allocate; None when it uses no GPU.

    Ray's ``num_gpus`` is only a scheduling label; the client actor passes this to
    ``torch.cuda.set_per_process_memory_fraction`` so that an actor exceeding its
    share fails alone instead of starving its neighbours.
    """
    if gpus_per_actor <= 0:
        return None
    return min(1.0, gpus_per_actor)


def actor_device(gpus_per_actor: float) -> torch.device:
    """The device a client actor trains on, with its GPU memory share enforced.

    With a GPU it also switches to deterministic kernels (:func:`simfl.core.determinism.enable_cuda`),
    so that results stay independent of which actor trains which client on GPUs as they are on CPUs.
    """
    fraction = gpu_memory_fraction(gpus_per_actor)
    if fraction is None:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"resources.gpus_per_actor={gpus_per_actor:g}: Ray gave this actor a GPU but "
            "torch.cuda.is_available() is False here (a CPU-only torch build, or a driver mismatch?)"
        )
    enable_cuda()
    device = torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return device


class GpuShareExceeded(RuntimeError):
    """An actor allocated past its share of the GPU's memory (``torch.cuda.set_per_process_memory_fraction``)."""


@contextmanager
def within_gpu_share(key: str, gpus_per_actor: float, who: str) -> Iterator[None]:
    """Turn an out-of-memory error on this actor's GPU share into one clear line naming the key to change.

    The share is enforced per process, so only the actor that overran fails;
    the others on the same GPU keep their memory and go on.
    """
    try:
        yield
    except torch.OutOfMemoryError as exc:
        total = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0
        share = gpu_memory_fraction(gpus_per_actor) or 0.0
        raise GpuShareExceeded(
            f"{who}: out of GPU memory within its share {key}={gpus_per_actor:g} "
            f"({share * total / 2**30:.1f} of {total / 2**30:.1f} GiB); raise {key} "
            f"or lower the batch or model size ({str(exc).splitlines()[0]})"
        ) from None
