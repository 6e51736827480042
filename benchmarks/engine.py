"""Engine efficiency and 10,000-client scaling, measured in one run.

1. Efficiency = samples/s of FedAvg rounds in the engine (500 clients, 50 per
   round, one client actor per core) divided by samples/s of a plain
   single-process PyTorch loop (load_state_dict, SGD over the same clients'
   samples in the same batches, float tensors prepared up front). The plain
   loop runs with torch using every core and with one thread; the ratio is
   taken against the faster of the two, best of two repetitions each (small
   batches often run faster on one thread). Target >= 0.85.
2. Per-round wall time and peak memory (PSS of the driver and every process of
   its private Ray instance: GCS, raylet, coordinator, client actors, object
   store pages) with 10,000 clients, and the per-round time ratio against 500
   clients with the same cohort size. Target < 8 GB, ratio close to 1.

    python benchmarks/engine.py            # full measurement (several minutes on 2 cores)
    python benchmarks/engine.py --quick    # smaller, for a smoke check
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import ray
import torch
import torch.nn.functional as F

from simfl.client_data import client_data
from simfl.models import build_model
from simfl.round import sample_cohort
from simfl.run import Prepared, prepare, start_coordinator, write_run_header
from simfl.scenario import parse_scenario
from simfl.seeding import torch_generator
from simfl.training import batch_order


def scenario(clients: int, rounds: int, samples: int, cohort: int, actors: int | str, gpus_per_actor: float = 0.0):
    return parse_scenario(
        {
            "name": f"bench{clients}",
            "seed": 0,
            "data": {"name": "synthetic", "synthetic": {"val_size": 200, "test_size": 500}},
            "populations": [
                {"name": "a", "clients": clients // 2, "label_skew": {"kind": "dirichlet", "alpha": 0.5},
                 "quantity": {"mean": samples}},
                {"name": "b", "clients": clients - clients // 2, "label_skew": {"kind": "dirichlet", "alpha": 0.5},
                 "quantity": {"mean": samples}, "shift": {"color": [1.1, 0.9, 1.0], "blur": 0.5}},
            ],
            "model": {"arch": "convnet", "norm": "group", "width": 32},
            "training": {"rounds": rounds, "clients_per_round": cohort, "local_epochs": 1, "batch_size": 10,
                         "optimizer": {"kind": "sgd", "lr": 0.05}},
            # No evaluation or checkpoint inside the timed rounds (the last round does both).
            "evaluation": {"every": 10_000, "local_val_fraction": 0.0, "local_clients": 1},
            "resources": {"client_actors": actors, "cpus_per_actor": 1, "gpus_per_actor": gpus_per_actor},
            "checkpoint": {"every": 0},
        }
    )


class PeakMemory:
    """Samples the PSS of this process and all its descendants (the private Ray instance)."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_engine(prepared: Prepared, actors: int, warmup: int) -> tuple[list[float], list[int], list[torch.Tensor]]:
    """Drive the coordinator round by round; returns wall time, samples and global weights per round."""
    sc = prepared.scenario
    times, samples, weights = [], [], []
    with tempfile.TemporaryDirectory(prefix="simfl-bench-") as tmp:
        run_dir = Path(tmp) / sc.name
        write_run_header(run_dir, prepared)
        coord = start_coordinator(run_dir, prepared, actors, resume=False)
        ray.get(coord.info.remote())
        for r in range(1, sc.training.rounds):  # the last round evaluates and checkpoints: not timed
            weights.append(ray.get(coord.global_weights.remote()))
            start = time.perf_counter()
            ray.get(coord.run_round.remote())
            times.append(time.perf_counter() - start)
            samples.append(int(sum(len(prepared.partition.train_indices(c)) for c in cohort(prepared, r))))
        ray.get(coord.run_round.remote())
        ray.get(coord.finish.remote())
        ray.kill(coord)
    return times[warmup:], samples[warmup:], weights[warmup:]


def cohort(prepared: Prepared, round_: int) -> np.ndarray:
    """Round ``round_``'s clients, drawn exactly as the coordinator draws them."""
    part = prepared.partition
    eligible = np.flatnonzero(~part.held_out[part.client_population])
    return sample_cohort(prepared.scenario, eligible, round_)


def plain_loop(
    prepared: Prepared, rounds: list[int], weights: list[torch.Tensor], threads: int, device: str = "cpu"
) -> float:
    """The same clients, samples and batches in one process with plain PyTorch; returns seconds."""
    sc = prepared.scenario
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ds = prepared.dataset
    model = build_model(sc.model, ds.channels, ds.image_size, ds.num_classes).to(device)
    names = [n for n, _ in model.state_dict().items()]
    shifts = [p.shift for p in sc.populations]
    elapsed = 0.0
    for r, flat in zip(rounds, weights, strict=True):
        # Data prepared outside the timer: the baseline gets float tensors for free.
        data = []
        for c in cohort(prepared, r):
            cd = client_data(ds, prepared.partition, shifts, sc.seed, int(c))
            data.append((cd.x.permute(0, 3, 1, 2).float().div(255).to(device), cd.y.to(device), int(c)))
        state = _unflatten(model, names, flat.to(device))
        start = time.perf_counter()
        for x, y, c in data:
            model.load_state_dict(state)
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=sc.training.optimizer.lr)
            for idx in batch_order(len(y), sc.training, torch_generator(sc.seed, "client-train", c, r)):
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        if device != "cpu":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - start
    return elapsed


def _unflatten(model: torch.nn.Module, names: list[str], flat: torch.Tensor) -> dict[str, torch.Tensor]:
    state, offset = {}, 0
    for name in names:
        ref = model.state_dict()[name]
        if ref.is_floating_point():
            state[name] = flat[offset : offset + ref.numel()].view_as(ref).clone()
            offset += ref.numel()
        else:
            state[name] = ref.clone()
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and 2,000 instead of 10,000 clients")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    rounds, warmup = (4, 1) if args.quick else (8, 2)
    big = 2_000 if args.quick else 10_000

    ray.init(num_cpus=cores, include_dashboard=False, logging_level="WARNING")
    with PeakMemory() as mem_small:
        small = prepare(scenario(500, rounds, 50, 50, cores))
        t_engine, n_engine, w_engine = run_engine(small, cores, warmup)
    measured_rounds = list(range(warmup + 1, rounds))
    # Best of two repetitions per thread count: the baseline gets every benefit of the doubt.
    plain = {threads: max(sum(n_engine) / plain_loop(small, measured_rounds, w_engine, threads) for _ in range(2))
             for threads in sorted({cores, 1})}
    engine_sps = sum(n_engine) / sum(t_engine)
    plain_sps = max(plain.values())

    with PeakMemory() as mem_big:
        t0 = time.perf_counter()
        large = prepare(scenario(big, rounds, 50, 50, cores))
        setup = time.perf_counter() - t0
        t_big, _, _ = run_engine(large, cores, warmup)
    ray.shutdown()

    gib = 1024**3
    print(f"cores: {cores}, client actors: {cores} (1 torch thread each)")
    print(f"[efficiency] 500 clients, 50/round, {len(t_engine)} timed rounds, {sum(n_engine)} samples")
    print(f"  engine  : {engine_sps:8.1f} samples/s  (median round {np.median(t_engine):.3f} s)")
    for threads, sps in plain.items():
        print(f"  plain   : {sps:8.1f} samples/s  (one process, {threads} torch thread{'s' * (threads > 1)})")
    print(f"  efficiency ratio (target >= 0.85): {engine_sps / plain_sps:.3f}")
    print(f"[scaling] {big} clients, 50/round: data + partition {setup:.1f} s")
    print(f"  median round: {np.median(t_big):.3f} s vs {np.median(t_engine):.3f} s at 500 clients "
          f"(ratio {np.median(t_big) / np.median(t_engine):.2f})")
    print(f"  peak memory (PSS, driver + Ray): {mem_big.peak / gib:.2f} GiB at {big} clients "
          f"(target < 8), {mem_small.peak / gib:.2f} GiB at 500")


if __name__ == "__main__":
    main()
