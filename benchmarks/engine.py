"""Engine throughput against what the cores can do, and 10,000-client scaling, measured in one run.

Workload: FedAvg rounds of 500 clients (two populations, about 50 images of
28×28×3 each), 50 clients per round, 1 local epoch, batch 10, SGD lr 0.05, a
width-32 GroupNorm ConvNet; one client actor per core, one torch thread each.

1. **Engine**: the wall time of each round, taken by the driver around
   ``run_round`` (timestamps; the run's own ``rounds`` table gives the
   coordinator's view beside it), after 4 warm-up rounds that are not counted
   (each run starts its own Ray, whose start-up work lingers for the first
   rounds). Per round, samples/s = the round's samples / its wall time;
   reported as the median and min–max over the timed rounds.
2. **Limit**: the plain PyTorch loop (``load_state_dict``, SGD over the same
   clients' samples in the same batches from the same global weights) in as
   many parallel processes as the engine has client actors, each with its
   share of torch threads (cores / actors, at least 1), started with
   ``multiprocessing`` (spawn) in the same benchmark run. The clients are split
   between the processes exactly as the engine split them (each process gets
   the clients that one client actor trained in each timed round, read from
   the run's ``clients`` table). Each process prepares its float tensors and
   state dicts up front and trains one client untimed; then, per pass, all
   processes wait on a common barrier and train every timed round's clients
   back to back. A pass's samples/s = its total samples / the wall time from
   the barrier (the earliest start) to the last process's finish; median and
   min–max over the passes. The ratio engine / limit is median over median.
   The limit does not wait for the slower process at each round's end (FedAvg
   must); the time it would with that wait (the slower process's time summed
   over rounds) is printed beside it. Engine run and limit come in pairs, the
   limit right after its engine run, twice (engine, limit, engine, limit): the
   machine's speed drifts by several per cent over minutes, and a drift then
   shows as a spread between the pairs' ratios rather than biasing one side.
   The table pools both pairs' rounds and passes; each pair's ratio is beside it.
   Also beside the table: how busy the client actors were (their clients'
   ``time_s`` over actors × round time) against the limit's processes, and
   the training time per sample in each: together they split the gap into
   slower local training and time the actors spend not training. And where
   the CPU went during the timed rounds: cores used by the client actors, the
   coordinator, the driver, Ray's own processes (raylet and its object store,
   GCS, agents), and the rest unused (between rounds, the end-of-round tail).
   Beside them, drift-free: the engine's local training code (``train_client``
   from uint8 images, as an actor runs it) and the plain loop alternating
   client by client in one process on the first timed rounds' clients: the
   per-sample cost of the engine's own training code, whatever the machine did.
3. **Scaling**: the same rounds with 10,000 clients (same cohort size); the
   median round time against 500 clients, and peak memory.
4. **Population**: 100,000 clients of about 5 images (at 50 images each the
   pixels alone would be 11 GiB, more than this machine can hold beside Ray's
   copy), beside 500 clients of about 5: data and partition time, median round
   time, peak memory, the last checkpoint's size and how many clients its
   journal holds. What may grow with the population: the data (inherent), the
   partition (a few integers per client), the journal and checkpoint (one small
   state per client that has trained: they follow the rounds run, not the
   population), and nothing else: a client actor is created with no client list
   and attached with only its journaled clients' states.

The engine builds a client's data (gather, acquisition shift) the first time
an actor trains it, inside the round: about half of the timed rounds'
clients at 500 clients, nearly all at 10,000. That cost is in the engine's
figures (as in a real run) and not in the limit's.

Each size runs in a spawned process of its own, with a Ray instance of its
own: its peak memory is its own, not inflated by what an earlier size's
driver freed but kept. Peak memory (PSS summed over that process and every
process of its Ray instance, object store pages included) is sampled from
data preparation to the run's end *except* during the timed rounds: the sampler pauses for them,
and extra rounds after them (then the last round, which evaluates and
checkpoints) are the memory phase. Why: reading every process's ``smaps``
four times a second costs CPU on a 2-core machine and takes each process's
memory-map lock; left on, it slowed the engine's rounds by 15–30 % (median
1.77 s without, 2.05–2.30 s with) while the reference ran without it.

Why a parallel limit: a single-process loop measures one core (or one process
using all of them with small, poorly threaded batches), not what the machine
can do; the engine spreads clients over one process per core, so its honest
reference is the same plain loop in as many processes on as many cores.

Run it on a quiet machine: Ray starts its workers (coordinator, client
actors) at niceness 15 and the limit's processes run at the driver's, so
other load biases the ratio (either way, with the kernel's autogroups). Each
timed round and pass records how many cores processes outside the benchmark
kept busy (the machine's CPU time minus this process tree's, read at its
ends) and the hypervisor's steal; a warning names the rounds and passes
where that exceeded 0.1 cores.

    python benchmarks/engine.py            # full measurement (a few minutes on 2 cores)
    python benchmarks/engine.py --quick    # smaller, for a smoke check (no figure is meaningful)
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing as mp
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import ray
import torch
import torch.nn.functional as F

from simfl.core.checkpoint import list_checkpoints, load_latest
from simfl.core.config import ModelConfig
from simfl.core.determinism import pin_cpu_kernels, pin_this_script
from simfl.core.models import build_model
from simfl.core.seeding import torch_generator
from simfl.core.training import batch_order, train_client
from simfl.core.weights import FlatWeights
from simfl.data.client_data import client_data
from simfl.engine.client_work import new_client_state
from simfl.engine.round import sample_cohort
from simfl.engine.scenario import Scenario, parse_scenario
from simfl.privacy.defences import defended_model
from simfl.simulation.runner import RAY_SYSTEM_CONFIG, Prepared, prepare, start_coordinator, write_run_header

GIB = 1024**3
LIMIT_TIMEOUT_S = 900  # a limit process that has not reported by then has died or hangs
QUIET_CORES = 0.1  # more cores than this busy outside the benchmark during a timed phase: the figures are suspect


def scenario(clients: int, rounds: int, samples: int, cohort: int, actors: int | str,
             gpus_per_actor: float = 0.0) -> Scenario:
    """The benchmark's workload with ``clients`` clients, of which ``cohort`` train in each of ``rounds`` rounds."""
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
    """Samples the PSS of this process and all its descendants (the private Ray instance); pausable."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._sampling = threading.Lock()  # held while sampling; ``paused`` holds it so the thread does nothing
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        """PSS in bytes, summed over this process and its descendants now."""
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
            with self._sampling:
                if self._stop.is_set():
                    break
                self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No sampling inside (waits for a sample in progress to finish first)."""
        with self._sampling:
            yield

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class OtherLoad:
    """How many cores processes outside this benchmark's process tree kept busy over an interval (a quiet check).

    Machine-wide busy CPU time (``/proc/stat``) minus the CPU time of this
    process and its descendants (Ray's processes, the limit's), over the wall
    time; read only at the interval's ends. Also the hypervisor's steal time.
    """

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float, float]:
        """(wall, machine busy CPU s, this tree's CPU s, steal s) now."""
        machine = psutil.cpu_times()
        busy = machine.user + machine.nice + machine.system + machine.irq + machine.softirq
        me = psutil.Process()
        ours = 0.0
        for proc in [me, *me.children(recursive=True)]:
            try:
                cpu = proc.cpu_times()
                ours += cpu.user + cpu.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return time.perf_counter(), busy, ours, getattr(machine, "steal", 0.0)

    def lap(self) -> tuple[float, float]:
        """(cores kept busy by other processes, cores stolen by the hypervisor) on average since the last lap."""
        end = self._read()
        wall = end[0] - self.start[0]
        other = (end[1] - self.start[1]) - (end[2] - self.start[2])
        steal = end[3] - self.start[3]
        self.start = end
        return max(other, 0.0) / wall, steal / wall


class CpuSplit:
    """Cores each part of the engine kept busy over an interval: where the CPU of the timed rounds went.

    Parts: the client actors, the coordinator, the driver (this process), and Ray's
    own processes (raylet with its object store, GCS, agents, log monitor): every
    other process of this process tree. CPU times are read at the interval's ends only.
    """

    def __init__(self, actor_pids: list[int], coordinator_pid: int) -> None:
        self.parts = {**{pid: "client actors" for pid in actor_pids}, coordinator_pid: "coordinator",
                      os.getpid(): "driver"}
        self.start = self._read()

    def _read(self) -> tuple[float, dict[int, float]]:
        me = psutil.Process()
        cpu: dict[int, float] = {}
        for proc in [me, *me.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                cpu[proc.pid] = times.user + times.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return time.perf_counter(), cpu

    def lap(self) -> dict[str, float]:
        """Cores busy per part since construction (a process that started meanwhile counts from 0)."""
        (t0, before), (t1, after) = self.start, self._read()
        out = dict.fromkeys(["client actors", "coordinator", "driver", "Ray's own processes"], 0.0)
        for pid, cpu in after.items():
            out[self.parts.get(pid, "Ray's own processes")] += (cpu - before.get(pid, 0.0)) / (t1 - t0)
        return out


@dataclass
class EngineRun:
    """The timed rounds of one engine run."""

    rounds: list[int]  # the timed rounds' numbers
    times: list[float]  # driver wall time of each timed round (s)
    samples: list[int]  # samples trained in each timed round
    weights: list[torch.Tensor]  # global weights at the start of each timed round
    coordinator_times: list[float]  # each timed round's round_time_s in the run's rounds table
    clients: pd.DataFrame  # the timed rounds' rows of the clients table: round, client_id, actor, samples, time_s
    other_load: list[tuple[float, float]]  # OtherLoad of each timed round: (other cores, stolen cores)
    cpu: dict[str, float]  # CpuSplit over the whole timed block: cores busy per part of the engine
    checkpoint_bytes: int = 0  # the last round's checkpoint file
    journal_clients: int = 0  # clients the coordinator's journal holds a state for at the end

    @property
    def samples_per_s(self) -> np.ndarray:
        """Samples/s of each timed round."""
        return np.asarray(self.samples) / np.asarray(self.times)


def engine_run(prepared: Prepared, actors: int, warmup: int, timed: int | None = None,
               memory: PeakMemory | None = None) -> EngineRun:
    """Drive the coordinator round by round: ``warmup`` rounds, ``timed`` timed ones, then the rest untimed.

    The last round (evaluation and checkpoint) is never timed; ``timed`` defaults
    to every round between the warm-up and it. ``memory`` is paused for the
    whole timed block, so nothing but the engine runs while it is timed.
    """
    sc = prepared.scenario
    last = sc.training.rounds
    timed = last - 1 - warmup if timed is None else timed
    if timed < 1 or warmup + timed >= last:
        raise ValueError(f"{last} rounds cannot hold {warmup} warm-up and {timed} timed rounds before the last")
    first, stop = warmup + 1, warmup + timed + 1  # timed rounds: range(first, stop)
    times: list[float] = []
    weights: list[torch.Tensor] = []
    other_load: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="simfl-bench-") as tmp:
        run_dir = Path(tmp) / sc.name
        write_run_header(run_dir, prepared)
        coord = start_coordinator(run_dir, prepared, actors, resume=False)
        info = ray.get(coord.info.remote())
        for _ in range(1, first):
            ray.get(coord.run_round.remote())
        pids = [int(a["pid"]) for a in info["actors"]], ray.get(coord.__ray_call__.remote(lambda _: os.getpid()))
        pause: AbstractContextManager[None] = memory.paused() if memory is not None else nullcontext()
        with pause:
            split = CpuSplit(*pids)
            for _ in range(first, stop):
                weights.append(ray.get(coord.global_weights.remote()))
                load = OtherLoad()
                start = time.perf_counter()
                ray.get(coord.run_round.remote())
                times.append(time.perf_counter() - start)
                other_load.append(load.lap())
            cpu = split.lap()
        while ray.get(coord.run_round.remote()) is not None:
            pass
        ray.get(coord.finish.remote())
        ray.kill(coord)
        (checkpoint,) = list_checkpoints(run_dir)
        checkpoint_bytes = checkpoint.stat().st_size
        journal_clients = len(load_latest(run_dir)["journal"])
        rounds = pd.read_parquet(run_dir / "rounds", columns=["round", "samples", "round_time_s"])
        clients = pd.read_parquet(run_dir / "clients", columns=["round", "client_id", "actor", "samples", "time_s"])
    rounds = rounds[(rounds["round"] >= first) & (rounds["round"] < stop)].sort_values("round")
    clients = clients[(clients["round"] >= first) & (clients["round"] < stop)].reset_index(drop=True)
    return EngineRun(
        rounds=list(range(first, stop)),
        times=times,
        samples=[int(n) for n in rounds["samples"]],
        weights=weights,
        coordinator_times=[float(t) for t in rounds["round_time_s"]],
        clients=clients,
        other_load=other_load,
        cpu=cpu,
        checkpoint_bytes=checkpoint_bytes,
        journal_clients=journal_clients,
    )


def run_engine(prepared: Prepared, actors: int, warmup: int) -> tuple[list[float], list[int], list[torch.Tensor]]:
    """Wall time, samples and starting global weights of every round after the warm-up but the last."""
    run = engine_run(prepared, actors, warmup)
    return run.times, run.samples, run.weights


def cohort(prepared: Prepared, round_: int) -> np.ndarray:
    """Round ``round_``'s clients, drawn exactly as the coordinator draws them."""
    part = prepared.partition
    eligible = np.flatnonzero(~part.held_out[part.client_population])
    return sample_cohort(prepared.scenario, eligible, round_)


def train_plain(model: torch.nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                batches: list[torch.Tensor], lr: float) -> None:
    """One client's local training in plain PyTorch: load the global weights, SGD over the batches."""
    model.load_state_dict(state)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for idx in batches:
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _float_images(x: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 NHWC → float NCHW in [0, 1], as the engine feeds the model (done up front for the plain loop)."""
    return x.permute(0, 3, 1, 2).float().div(255).to(device)


def _batches(prepared: Prepared, client: int, round_: int, n: int) -> list[torch.Tensor]:
    """The batches the engine draws for ``client`` in ``round_`` (from (seed, client, round))."""
    sc = prepared.scenario
    return batch_order(n, sc.training, torch_generator(sc.seed, "client-train", client, round_))


def plain_loop(
    prepared: Prepared, rounds: list[int], weights: list[torch.Tensor], threads: int, device: str = "cpu"
) -> float:
    """The same clients, samples and batches in one process with plain PyTorch; returns the training seconds."""
    sc = prepared.scenario
    pin_cpu_kernels(threads)
    torch.manual_seed(0)
    ds = prepared.dataset
    model = build_model(sc.model, ds.channels, ds.image_size, ds.num_classes).to(device)
    shifts = [p.shift for p in sc.populations]
    elapsed = 0.0
    for r, flat in zip(rounds, weights, strict=True):
        # Data prepared outside the timer: the baseline gets float tensors for free.
        data = []
        for c in cohort(prepared, r):
            cd = client_data(ds, prepared.partition, shifts, sc.seed, int(c))
            data.append((_float_images(cd.x, device), cd.y.to(device), _batches(prepared, int(c), r, len(cd.y))))
        state = _unflatten(model, flat.to(device))
        start = time.perf_counter()
        for x, y, batches in data:
            train_plain(model, state, x, y, batches, sc.training.optimizer.lr)
        if device != "cpu":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - start
    return elapsed


def _unflatten(model: torch.nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """A state dict of ``model`` from a flat weight vector (float entries in state-dict order, as FlatWeights)."""
    state, offset = {}, 0
    for name, ref in model.state_dict().items():
        if ref.is_floating_point():
            state[name] = flat[offset : offset + ref.numel()].view_as(ref).clone()
            offset += ref.numel()
        else:
            state[name] = ref.clone()
    return state


# ------------------------------------------------------------------ the limit: the plain loop on every core


@dataclass(frozen=True)
class LimitJob:
    """One limit process's share: its clients of every timed round, as plain arrays (pickled to a spawned process)."""

    rank: int
    threads: int
    model: dict[str, Any]  # ModelConfig as JSON
    shape: tuple[int, int, int]  # channels, image size, classes
    lr: float
    weights: list[np.ndarray]  # global weights at the start of each timed round
    work: list[tuple[int, np.ndarray, np.ndarray, list[np.ndarray]]]  # (timed-round index, uint8 x, y, batches)


@dataclass
class LimitPass:
    """One pass of every limit process over its share."""

    samples_per_s: float  # total samples / (last finish - earliest start after the barrier)
    wall_s: float
    synchronised_s: float  # with a wait for the slower process at each round's end: sum over rounds of the max
    busy_s: float  # training seconds summed over the processes
    other_load: tuple[float, float]  # OtherLoad over the pass: (other cores, stolen cores)


def limit_worker(job: LimitJob, passes: int, ready: Any, barrier: Any, results: Any, release: Any) -> None:
    """A limit process: float tensors and state dicts up front, one untimed client, then timed passes.

    ``ready`` (with the parent) before the first pass, ``barrier`` (the processes) before each;
    it exits on ``release``, so the parent can read its CPU time first.
    """
    pin_cpu_kernels(job.threads)  # spawned with the pinned environment main() runs in
    torch.manual_seed(0)
    channels, size, classes = job.shape
    model = build_model(ModelConfig.model_validate(job.model), channels, size, classes)
    states = [_unflatten(model, torch.from_numpy(w)) for w in job.weights]
    data = [(i, _float_images(torch.from_numpy(x)), torch.from_numpy(y), [torch.from_numpy(b) for b in batches])
            for i, x, y, batches in job.work]
    rounds = len(job.weights)
    if data:  # warm-up, untimed: first calls allocate and pick kernels
        i, x, y, batches = data[0]
        train_plain(model, states[i], x, y, batches, job.lr)
    ready.wait()
    for p in range(passes):
        barrier.wait()
        start = time.perf_counter()
        per_round = [0.0] * rounds
        for i, x, y, batches in data:
            t = time.perf_counter()
            train_plain(model, states[i], x, y, batches, job.lr)
            per_round[i] += time.perf_counter() - t
        results.put((job.rank, p, start, time.perf_counter(), per_round))
    release.wait(LIMIT_TIMEOUT_S)


def limit_jobs(prepared: Prepared, run: EngineRun, processes: int, threads: int) -> list[LimitJob]:
    """Each process gets the clients one client actor trained in each timed round, with the engine's batches."""
    sc, ds = prepared.scenario, prepared.dataset
    shifts = [p.shift for p in sc.populations]
    work: list[list[tuple[int, np.ndarray, np.ndarray, list[np.ndarray]]]] = [[] for _ in range(processes)]
    for i, r in enumerate(run.rounds):
        trained = run.clients[run.clients["round"] == r].sort_values("client_id")
        for c, actor in zip(trained["client_id"], trained["actor"], strict=True):
            cd = client_data(ds, prepared.partition, shifts, sc.seed, int(c))
            batches = [b.numpy() for b in _batches(prepared, int(c), r, len(cd.y))]
            work[int(actor) % processes].append((i, cd.x.numpy(), cd.y.numpy(), batches))
    weights = [w.numpy() for w in run.weights]
    return [LimitJob(rank, threads, sc.model.model_dump(mode="json"), (ds.channels, ds.image_size, ds.num_classes),
                     sc.training.optimizer.lr, weights, work[rank]) for rank in range(processes)]


def run_limit(jobs: list[LimitJob], passes: int) -> list[LimitPass]:
    """Run the jobs in parallel spawned processes, ``passes`` times, each pass from a common barrier."""
    ctx = mp.get_context("spawn")
    ready = ctx.Barrier(len(jobs) + 1, timeout=LIMIT_TIMEOUT_S)
    barrier = ctx.Barrier(len(jobs), timeout=LIMIT_TIMEOUT_S)
    results, release = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=limit_worker, args=(job, passes, ready, barrier, results, release), daemon=True)
             for job in jobs]
    for proc in procs:
        proc.start()
    samples = sum(len(y) for job in jobs for _, _, y, _ in job.work)
    by_pass: dict[int, list[tuple[float, float, list[float]]]] = {p: [] for p in range(passes)}
    loads: list[tuple[float, float]] = []
    try:
        ready.wait()
        load = OtherLoad()
        for _ in range(passes * len(jobs)):
            _rank, p, start, end, per_round = results.get(timeout=LIMIT_TIMEOUT_S)
            by_pass[p].append((start, end, per_round))
            if len(by_pass[p]) == len(jobs):  # the pass is over (the next starts at once)
                loads.append(load.lap())
    except (queue.Empty, threading.BrokenBarrierError):
        raise RuntimeError(f"a limit process did not report within {LIMIT_TIMEOUT_S} s "
                           f"(exit codes {[proc.exitcode for proc in procs]})") from None
    finally:
        release.set()
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
    out = []
    for p in range(passes):
        wall = max(end for _, end, _ in by_pass[p]) - min(start for start, _, _ in by_pass[p])
        per_round = np.array([rounds for _, _, rounds in by_pass[p]])  # (processes, rounds)
        out.append(LimitPass(samples / wall, wall, float(per_round.max(axis=0).sum()), float(per_round.sum()),
                             loads[p]))
    return out


# ------------------------------------------------------------------ local training code, side by side


@dataclass(frozen=True)
class SideBySide:
    """Per-sample local training time of the engine's code and of the plain loop, alternating client by client."""

    engine_ms: float
    plain_ms: float
    samples: int


def side_by_side(prepared: Prepared, run: EngineRun, rounds: int) -> SideBySide:
    """The first ``rounds`` timed rounds' clients, each trained by the engine's ``train_client`` (from uint8
    images, as an actor does) and then by the plain loop (float tensors prepared up front), in this one
    process with one torch thread. Alternating client by client, the machine's drift over minutes (several
    per cent on this one) falls on both alike: what is left is the cost of the engine's own training code."""
    sc, ds = prepared.scenario, prepared.dataset
    pin_cpu_kernels(1)
    shifts = [p.shift for p in sc.populations]
    shape = (ds.channels, ds.image_size, ds.num_classes)
    model, defence = defended_model(sc.model, sc.defence, sc.seed, shape)
    flat = FlatWeights(model)
    plain = build_model(sc.model, *shape)
    times, samples = {"engine": 0.0, "plain": 0.0}, 0
    for i, r in enumerate(run.rounds[:rounds]):
        weights, state = run.weights[i], _unflatten(plain, run.weights[i])
        for c in sorted(run.clients.loc[run.clients["round"] == r, "client_id"]):
            cd = client_data(ds, prepared.partition, shifts, sc.seed, int(c))
            x, batches = _float_images(cd.x), _batches(prepared, int(c), r, len(cd.y))
            if not samples:  # first calls allocate and pick kernels: one untimed call of each first
                train_client(model, flat, weights, cd.x, cd.y, sc.training,
                             torch_generator(sc.seed, "client-train", c, r), defence, new_client_state())
                train_plain(plain, state, x, cd.y, batches, sc.training.optimizer.lr)
            t0 = time.perf_counter()
            train_client(model, flat, weights, cd.x, cd.y, sc.training, torch_generator(sc.seed, "client-train", c, r),
                         defence, new_client_state())
            t1 = time.perf_counter()
            train_plain(plain, state, x, cd.y, batches, sc.training.optimizer.lr)
            t2 = time.perf_counter()
            times["engine"] += t1 - t0
            times["plain"] += t2 - t1
            samples += len(cd.y)
    return SideBySide(1e3 * times["engine"] / samples, 1e3 * times["plain"] / samples, samples)


# ------------------------------------------------------------------ one engine measurement, and the report


@dataclass
class Measured:
    """One workload size: its timed rounds, its peak memory (outside them), its preparation time."""

    clients: int
    images_per_client: int
    run: EngineRun
    peak_memory: int
    setup_s: float


def measure(clients: int, actors: int, warmup: int, timed: int, memory_rounds: int, samples: int = 50) -> Measured:
    """Prepare and run ``clients`` clients of about ``samples`` images: warm-up, timed rounds (sampler paused),
    memory rounds, the last round; in this process and a Ray instance of its own, started and stopped here."""
    rounds = warmup + timed + memory_rounds + 1
    cores = len(os.sched_getaffinity(0))
    ray.init(num_cpus=cores, include_dashboard=False, logging_level=logging.WARNING,
             _system_config=dict(RAY_SYSTEM_CONFIG))
    try:
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            prepared = prepare(scenario(clients, rounds, samples, 50, actors))
            setup = time.perf_counter() - t0
            run = engine_run(prepared, actors, warmup, timed, mem)
    finally:
        ray.shutdown()
    return Measured(clients, round(len(prepared.dataset.train_y) / clients), run, mem.peak, setup)


def measure_alone(clients: int, actors: int, warmup: int, timed: int, memory_rounds: int,
                  samples: int = 50) -> Measured:
    """:func:`measure` in a fresh spawned process: each size's peak memory is its own, not a sum with what an
    earlier size's driver kept (freed memory a process does not return), and each starts its own Ray."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, (clients, actors, warmup, timed, memory_rounds, samples))


def spread(values: np.ndarray | list[float], fmt: str) -> str:
    """``| median | min | max |`` cells."""
    v = np.asarray(values, dtype=float)
    return f"| {np.median(v):{fmt}} | {v.min():{fmt}} | {v.max():{fmt}} |"


def diagnose(run: EngineRun, limit: list[LimitPass], actors: int, cores: int, prefix: str) -> None:
    """Where one engine run's rounds went, beside its limit's passes: busy time, per-sample time, CPU split."""
    samples = sum(run.samples)
    engine_sps = float(np.median(run.samples_per_s))
    sync_sps = [samples / p.synchronised_s for p in limit]
    engine_busy = run.clients.groupby("round")["time_s"].sum().to_numpy() / (actors * np.asarray(run.times))
    limit_busy = [p.busy_s / (actors * p.wall_s) for p in limit]
    per_sample_engine = 1e3 * run.clients["time_s"].sum() / run.clients["samples"].sum()
    per_sample_limit = 1e3 * np.median([p.busy_s for p in limit]) / samples
    print(f"{prefix}engine, all timed rounds: {samples / sum(run.times):.1f} samples/s (total / total); "
          f"coordinator's round_time_s median {np.median(run.coordinator_times):.3f} s")
    print(f"{prefix}limit with FedAvg's wait for the slower process at each round's end: {np.median(sync_sps):.1f} "
          f"samples/s (median; engine / that {engine_sps / float(np.median(sync_sps)):.3f})")
    print(f"{prefix}busy training: engine client actors {100 * np.median(engine_busy):.0f} % of each round "
          f"(clients' time_s / ({actors} x round time), median); limit processes {100 * np.median(limit_busy):.0f} %")
    print(f"{prefix}training time per sample in one process: engine {per_sample_engine:.3f} ms (clients' time_s), "
          f"limit {per_sample_limit:.3f} ms")
    print(f"{prefix}CPU over the engine's timed rounds (cores, of {cores}): "
          + ", ".join(f"{part} {cores_:.3f}" for part, cores_ in run.cpu.items())
          + f"; unused {cores - sum(run.cpu.values()):.3f} (the between-round gap and the end-of-round tail, "
          "and the benchmark's own reads between rounds)")
    print(f"{prefix}limit passes in order: " + ", ".join(f"{p.wall_s:.2f} s ({p.other_load[0]:.2f} other cores)"
                                                       for p in limit))


def report(pairs: list[tuple[Measured, list[LimitPass]]], side: SideBySide, big: Measured, few: Measured,
           huge: Measured, actors: int, threads: int, warmup: int) -> None:
    """Print the efficiency table (every pair's rounds and passes pooled), each pair's ratio and diagnostics,
    and the scaling figures."""
    cores = len(os.sched_getaffinity(0))
    runs = [m.run for m, _ in pairs]
    limit = [p for _, passes in pairs for p in passes]
    engine_sps_all = np.concatenate([r.samples_per_s for r in runs])
    times_all = [t for r in runs for t in r.times]
    engine_sps = float(np.median(engine_sps_all))
    limit_sps = float(np.median([p.samples_per_s for p in limit]))
    n_timed, samples = len(runs[0].times), sum(runs[0].samples)
    threads_s = f"{threads} torch thread{'s' * (threads > 1)}"
    print(f"cores: {cores}; client actors: {actors} x {threads_s}; limit: {actors} processes x {threads_s}")
    print(f"[efficiency] 500 clients, 50/round, batch 10, 1 local epoch; {len(pairs)} pair(s) of an engine run "
          f"({n_timed} timed rounds after {warmup} warm-up, {samples} samples) and the limit on the same samples "
          f"({len(limit) // len(pairs)} passes) right after it; rounds and passes pooled below")
    print()
    print("| 500 clients, 50/round | median | min | max | n |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| engine samples/s {spread(engine_sps_all, '.1f')} {len(times_all)} rounds |")
    print(f"| engine round time (s) {spread(times_all, '.3f')} {len(times_all)} rounds |")
    print(f"| limit samples/s {spread([p.samples_per_s for p in limit], '.1f')} {len(limit)} passes |")
    print(f"| limit pass time (s) {spread([p.wall_s for p in limit], '.3f')} {len(limit)} passes |")
    print(f"| engine / limit | {engine_sps / limit_sps:.3f} | | | median / median |")
    print()
    ratios = [float(np.median(m.run.samples_per_s) / np.median([p.samples_per_s for p in passes]))
              for m, passes in pairs]
    print("  engine / limit of each pair, in order: " + ", ".join(f"{r:.3f}" for r in ratios))
    for i, (m, passes) in enumerate(pairs, 1):
        diagnose(m.run, passes, actors, cores, f"  pair {i}: ")
    print(f"  local training code side by side (one process, one thread, alternating client by client, "
          f"{side.samples} samples): engine's train_client {side.engine_ms:.3f} ms per sample, plain loop "
          f"{side.plain_ms:.3f} ms (ratio {side.plain_ms / side.engine_ms:.3f})")
    n_big = big.clients
    loads = {"engine's timed rounds (500 clients)": [lap for r in runs for lap in r.other_load],
             f"engine's timed rounds ({n_big} clients)": big.run.other_load,
             "limit's passes": [p.other_load for p in limit]}
    print("  other load (cores busy outside this benchmark's processes, max; cores stolen by the hypervisor, max): "
          + "; ".join(f"{what} {max(o for o, _ in lap):.2f}, {max(s for _, s in lap):.2f}"
                      for what, lap in loads.items()))
    noisy = {what: sum(o + s > QUIET_CORES for o, s in lap) for what, lap in loads.items()}
    if any(noisy.values()):
        print(f"  WARNING: the machine was not quiet (over {QUIET_CORES} cores used elsewhere) in "
              + ", ".join(f"{n} of {len(loads[what])} {what}" for what, n in noisy.items() if n)
              + ": those figures are not comparable; run it again on a quiet machine")
    small, run = pairs[0][0], runs[0]
    print(f"[scaling] {n_big} clients, 50/round: data + partition {big.setup_s:.1f} s")
    print()
    print("| per-round time (s) | median | min | max | n |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, timed in [("500 clients", run.times), (f"{n_big} clients", big.run.times)]:
        print(f"| {label} {spread(timed, '.3f')} {len(timed)} rounds |")
    print()
    ratio = float(np.median(big.run.times) / np.median(run.times))
    print(f"  median round: {np.median(big.run.times):.3f} s vs {np.median(run.times):.3f} s at 500 clients "
          f"(ratio {ratio:.2f})")
    print(f"  peak memory (PSS, driver + Ray, outside the timed rounds): {big.peak_memory / GIB:.2f} GiB "
          f"at {n_big} clients (target < 8), {small.peak_memory / GIB:.2f} GiB at 500")
    n_huge = huge.clients
    print()
    print(f"[population] {n_huge} clients of about 5 images (at 50 images they would need "
          f"{n_huge * 50 * 28 * 28 * 3 / GIB:.1f} GiB of pixels), beside 500 clients of about 5; 50/round")
    print()
    print("| clients x images | data + partition (s) | round median (s) | min | max | peak memory (GiB) "
          "| checkpoint (MiB) | journal clients |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for m in (small, big, few, huge):
        times = np.asarray(m.run.times)
        print(f"| {m.clients} x {m.images_per_client} | {m.setup_s:.1f} | {np.median(times):.3f} "
              f"| {times.min():.3f} | {times.max():.3f} | {m.peak_memory / GIB:.2f} "
              f"| {m.run.checkpoint_bytes / 2**20:.2f} | {m.run.journal_clients} |")
    print()
    ratio = float(np.median(huge.run.times) / np.median(few.run.times))
    print(f"  median round at {n_huge} clients: {np.median(huge.run.times):.3f} s vs {np.median(few.run.times):.3f} s "
          f"at 500 clients of the same size (ratio {ratio:.2f}); peak memory {huge.peak_memory / GIB:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="few rounds and passes; 2,000 and 5,000 clients instead of 10,000 and 100,000")
    parser.add_argument("--timed-rounds", type=int, help="timed rounds per engine run (default 12; quick 3)")
    parser.add_argument("--passes", type=int, help="passes of the limit (default 5; quick 3)")
    parser.add_argument("--pairs", type=int, help="engine runs at 500 clients, each followed by the limit "
                        "(default 2; quick 1)")
    args = parser.parse_args()
    pin_this_script(1)  # the limit and the side-by-side loop run the kernels the actors run
    cores = len(os.sched_getaffinity(0))
    actors = cores
    threads = max(1, math.floor(cores / actors))
    warmup, memory_rounds = (1, 1) if args.quick else (4, 3)
    timed = args.timed_rounds or (3 if args.quick else 12)
    passes = args.passes or (3 if args.quick else 5)
    big, huge = (2_000, 5_000) if args.quick else (10_000, 100_000)

    # The limit replays each 500-client engine run's timed rounds on the same data (prepared again:
    # deterministic), on a machine without Ray, right after that run: engine, limit, engine, limit, so that
    # a drift in the machine's speed shows as a spread between pairs instead of biasing one side.
    prepared = prepare(scenario(500, warmup + timed + memory_rounds + 1, 50, 50, actors))
    pairs = []
    for _ in range(args.pairs or (1 if args.quick else 2)):
        small = measure_alone(500, actors, warmup, timed, memory_rounds)
        pairs.append((small, run_limit(limit_jobs(prepared, small.run, actors, threads), passes)))
    side = side_by_side(prepared, pairs[0][0].run, 1 if args.quick else 4)
    del prepared
    large = measure_alone(big, actors, warmup, timed, memory_rounds)
    few = measure_alone(500, actors, warmup, timed, memory_rounds, samples=5)
    population = measure_alone(huge, actors, warmup, timed, memory_rounds, samples=5)
    report(pairs, side, large, few, population, actors, threads, warmup)


if __name__ == "__main__":
    main()
