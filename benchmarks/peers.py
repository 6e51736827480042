"""simfl beside Flower's simulation runtime and pfl-research on one workload, measured in one run.

Workload (benchmarks/engine.py's): 500 clients of about 50 images 28×28×3 (two
populations, one colour-shifted), 50 clients per round, 1 local epoch, batch
10, SGD lr 0.05, FedAvg, simfl's width-32 GroupNorm ConvNet, on the CPU.

The peers get simfl's own client images, already shifted and converted to
float NCHW tensors, written once to an ``.npz`` they load in each worker
before the timed rounds; they build the same model from ``simfl.core.models`` with
the same initial weights. That favours them: simfl gathers and shifts a
client's images inside the round the first time an actor trains it, and
converts uint8 to float per batch. Each side runs in its own process, one
after the other, so no two share the cores:

- **simfl**: the engine as ``benchmarks/engine.py`` drives it (one client
  actor per core, one torch thread each).
- **Flower** (flwr 1.42 ``run_simulation``, Ray backend, the ``NumPyClient``
  and ``FedAvg`` strategy API): ``--flower-actors`` Ray actors, each
  ``cores / actors`` CPUs and torch threads (default: one per core, one thread:
  the fastest of 1×2, 2×1 measured here). A client is built per message from
  ``client_fn`` and finds its data in a per-process cache.
- **pfl-research** (pfl 0.6.0 ``SimulatedBackend``, ``FederatedAveraging``,
  ``PyTorchModel``): one process with all cores' torch threads (pfl runs
  several workers only through Horovod, which is not installed here).

Round time: simfl, the driver's wall time around ``run_round``; Flower, from
the strategy's ``configure_fit`` to the end of its ``aggregate_fit``; pfl,
between consecutive ``after_central_iteration`` callbacks. Samples per round
are what each engine trained that round (its cohorts are its own draws of 50
of the same 500 clients, so samples/s is the comparable figure). Median and
min–max over the timed rounds after the warm-up; ratio = simfl's median
samples/s / the peer's.

Install (the peers pin older protobuf, attrs and packaging than simfl's
environment; a venv that sees simfl's packages keeps them apart)::

    python -m venv --system-site-packages .peers
    .peers/bin/pip install -e ".[peers]"
    .peers/bin/python benchmarks/peers.py
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F
from engine import _float_images, engine_run, scenario  # benchmarks/engine.py: the same workload and engine driver

from simfl.core.config import ModelConfig
from simfl.core.models import build_model
from simfl.data.client_data import client_data
from simfl.simulation.runner import RAY_SYSTEM_CONFIG, Prepared, prepare

HINT = ('peers: Flower and pfl-research are not installed; install the extra in a venv that sees simfl: '
        'python -m venv --system-site-packages .peers && .peers/bin/pip install -e ".[peers]" '
        '&& .peers/bin/python benchmarks/peers.py')
try:
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel
except ImportError:
    PEERS = False
else:
    PEERS = True

CLIENTS, COHORT, SAMPLES = 500, 50, 50
BATCH, LR = 10, 0.05


def workload(rounds: int) -> Prepared:
    """The engine benchmark's 500-client scenario with ``rounds`` rounds, data and partition ready."""
    return prepare(scenario(CLIENTS, rounds, SAMPLES, COHORT, len(os.sched_getaffinity(0))))


def write_clients(prepared: Prepared, out: Path) -> None:
    """Each client's shifted float NCHW images and labels to ``out/<client>.npz``; initial weights to ``w.npz``."""
    sc, ds = prepared.scenario, prepared.dataset
    shifts = [p.shift for p in sc.populations]
    out.mkdir(parents=True)
    for c in range(prepared.partition.num_clients):
        cd = client_data(ds, prepared.partition, shifts, sc.seed, c)
        np.savez(out / f"{c}.npz", x=_float_images(cd.x).numpy(), y=cd.y.numpy())
    torch.manual_seed(sc.seed)
    model = new_model(model_spec(prepared))
    np.savez(out / "w.npz", *[v.numpy() for v in model.state_dict().values()])


def load_client(data: Path, client: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One client's images and labels as written by :func:`write_clients` (about 0.5 MB: ~1 ms)."""
    with np.load(data / f"{client}.npz") as z:
        return torch.from_numpy(z["x"]), torch.from_numpy(z["y"]).long()


def initial_weights(data: Path) -> list[np.ndarray]:
    """The model's initial weights, in state-dict order."""
    with np.load(data / "w.npz") as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


ModelSpec = tuple[ModelConfig, int, int, int]


def model_spec(prepared: Prepared) -> ModelSpec:
    """What builds the workload's model (config, channels, image size, classes): small enough to ship to workers."""
    ds = prepared.dataset
    return prepared.scenario.model, ds.channels, ds.image_size, ds.num_classes


def new_model(spec: ModelSpec) -> torch.nn.Module:
    """simfl's model for the workload."""
    return build_model(*spec)


def local_sgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> None:
    """One local epoch of SGD in shuffled batches of ``BATCH``: the Flower client's training."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for idx in torch.randperm(len(y), generator=gen).split(BATCH):
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def median_spread(times: list[float], samples: list[int]) -> dict[str, Any]:
    """Per-round s and samples/s: median, min, max."""
    t = np.asarray(times)
    sps = np.asarray(samples) / t
    return {"rounds": len(t), "s_round": [float(np.median(t)), float(t.min()), float(t.max())],
            "samples_s": [float(np.median(sps)), float(sps.min()), float(sps.max())]}


# --- simfl ---------------------------------------------------------------------------------------


def run_simfl(prepared: Prepared, warmup: int, timed: int) -> dict[str, Any]:
    """simfl's engine: warm-up, ``timed`` timed rounds, then its last round (evaluation; not timed)."""
    cores = len(os.sched_getaffinity(0))
    ray.init(num_cpus=cores, include_dashboard=False, logging_level=logging.WARNING,
             _system_config=dict(RAY_SYSTEM_CONFIG))
    run = engine_run(prepared, cores, warmup, timed)
    ray.shutdown()
    return {"setting": f"{cores} client actors x 1 thread"} | median_spread(run.times, run.samples)


# --- Flower --------------------------------------------------------------------------------------


def run_flower(prepared: Prepared, data: Path, warmup: int, timed: int, actors: int) -> dict[str, Any]:
    """Flower's simulation runtime over the same clients; round times from inside its strategy."""
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // actors)
    spec = model_spec(prepared)
    times: list[float] = []
    samples: list[int] = []
    started: list[float] = []

    class Client(NumPyClient):
        def __init__(self, cid: int) -> None:
            self.cid = cid

        def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
            torch.set_num_threads(threads)
            # Flower builds a client per message and ships its code by value to each worker,
            # so nothing persists between messages: the client loads its data file, as a
            # Flower app loads its partition in client_fn.
            x, y = load_client(data, self.cid)
            model = new_model(spec)
            model.load_state_dict({k: torch.from_numpy(v) for k, v in zip(model.state_dict(), parameters,
                                                                          strict=True)})
            gen = torch.Generator().manual_seed(int(config["round"]) * 100_003 + self.cid)
            local_sgd(model, x, y, gen)
            return [v.detach().numpy() for v in model.state_dict().values()], len(y), {}

    def client_fn(context: Context) -> Any:
        return Client(int(context.node_config["partition-id"])).to_client()

    class TimedFedAvg(FedAvg):
        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            started.append(time.perf_counter())
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            out = super().aggregate_fit(server_round, results, failures)
            if failures:
                raise RuntimeError(f"Flower round {server_round}: {len(failures)} clients failed: {failures[0]!r}")
            times.append(time.perf_counter() - started[-1])
            samples.append(sum(fit.num_examples for _, fit in results))
            return out

    def server_fn(context: Context) -> ServerAppComponents:
        strategy = TimedFedAvg(
            fraction_fit=COHORT / CLIENTS, min_fit_clients=COHORT, fraction_evaluate=0.0, min_evaluate_clients=0,
            min_available_clients=CLIENTS, initial_parameters=ndarrays_to_parameters(initial_weights(data)),
            on_fit_config_fn=lambda r: {"round": r},
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=warmup + timed))

    run_simulation(
        server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
        num_supernodes=CLIENTS,
        backend_config={"client_resources": {"num_cpus": threads, "num_gpus": 0.0},
                        "init_args": {"num_cpus": cores, "include_dashboard": False,
                                      "logging_level": logging.WARNING}},
    )
    if len(times) != warmup + timed:
        raise RuntimeError(f"Flower ran {len(times)} of {warmup + timed} rounds")
    return {"setting": f"{actors} Ray actors x {threads} thread{'s' * (threads > 1)}"} | median_spread(
        times[warmup:], samples[warmup:])


# --- pfl-research --------------------------------------------------------------------------------


def run_pfl(prepared: Prepared, data: Path, warmup: int, timed: int) -> dict[str, Any]:
    """pfl-research's simulated backend over the same clients, one process, all cores' threads."""
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    clients = [load_client(data, c) for c in range(CLIENTS)]
    spec = model_spec(prepared)
    counted = [0]

    class Net(torch.nn.Module):
        """simfl's model with the ``loss`` and ``metrics`` methods pfl's PyTorchModel calls."""

        def __init__(self) -> None:
            super().__init__()
            self.net = new_model(spec)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:  # noqa: A002
            self.train(not eval)
            return F.cross_entropy(self(x), y)

        @torch.no_grad()
        def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = True) -> dict[str, Any]:  # noqa: A002
            self.eval()
            loss = F.cross_entropy(self(x), y, reduction="sum")
            return {"loss": Weighted(float(loss), len(y))}

    net = Net()
    net.net.load_state_dict({k: torch.from_numpy(v) for k, v in zip(net.net.state_dict(), initial_weights(data),
                                                                     strict=True)})

    def make_dataset(uid: int) -> Dataset:
        x, y = clients[uid]
        counted[0] += len(y)
        return Dataset(raw_data=[x, y], user_id=uid)

    ids = list(range(CLIENTS))
    weights = {uid: len(clients[uid][1]) for uid in ids}
    train = FederatedDataset(make_dataset, get_user_sampler("random", ids), user_id_to_weight=weights)
    val = FederatedDataset(make_dataset, get_user_sampler("random", ids), user_id_to_weight=weights)
    times: list[float] = []
    samples: list[int] = []
    last = [time.perf_counter()]

    class Timer(TrainingProcessCallback):
        def after_central_iteration(self, aggregate_metrics: Any, model: Any, *, central_iteration: int) -> Any:
            now = time.perf_counter()
            times.append(now - last[0])
            samples.append(counted[0])
            counted[0] = 0
            last[0] = now
            return False, Metrics()

    model = PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=warmup + timed, evaluation_frequency=10**9,
                                           train_cohort_size=COHORT, val_cohort_size=None),
        backend=SimulatedBackend(training_data=train, val_data=val),
        model=model,
        model_train_params=NNTrainHyperParams(local_batch_size=BATCH, local_num_epochs=1, local_learning_rate=LR),
        model_eval_params=NNEvalHyperParams(local_batch_size=100),
        callbacks=[Timer()],
        send_metrics_to_platform=False,
    )
    if len(times) != warmup + timed:
        raise RuntimeError(f"pfl ran {len(times)} of {warmup + timed} rounds")
    return {"setting": f"one process x {cores} threads"} | median_spread(times[warmup:], samples[warmup:])


# --- driver --------------------------------------------------------------------------------------


def side(args: argparse.Namespace) -> None:
    """One side in this process; prints its figures as one JSON line."""
    prepared = workload(args.warmup + args.timed + 1)
    if args.side == "simfl":
        out = run_simfl(prepared, args.warmup, args.timed)
    elif args.side == "flower":
        out = run_flower(prepared, Path(args.data), args.warmup, args.timed, args.flower_actors)
    else:
        out = run_pfl(prepared, Path(args.data), args.warmup, args.timed)
    print("RESULT " + json.dumps(out), flush=True)


def run_side(name: str, args: argparse.Namespace, data: Path) -> dict[str, Any]:
    """Run one side in a fresh process (same interpreter) and read back its figures."""
    cmd = [sys.executable, __file__, "--side", name, "--data", str(data), "--warmup", str(args.warmup),
           "--timed", str(args.timed), "--flower-actors", str(args.flower_actors)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"peers: the {name} side failed (exit {proc.returncode})")
    return dict(json.loads(lines[-1][len("RESULT "):]))


def main() -> None:
    cores = len(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--timed", type=int, default=10, help="timed rounds (default 10)")
    p.add_argument("--flower-actors", type=int, default=cores, help="Flower's Ray actors (default: one per core)")
    p.add_argument("--sides", default="simfl,flower,pfl", help="which sides to run (default all three)")
    p.add_argument("--side", choices=["simfl", "flower", "pfl"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not PEERS:
        print(HINT)
        return
    if args.side:
        side(args)
        return
    sides = args.sides.split(",")
    with tempfile.TemporaryDirectory(prefix="simfl-peers-") as tmp:
        data = Path(tmp) / "clients"
        write_clients(workload(args.warmup + args.timed + 1), data)
        results = {name: run_side(name, args, data) for name in sides}
    print(f"[peers] {time.strftime('%Y-%m-%d')}, {cores} cores, torch {torch.__version__}; {CLIENTS} clients x "
          f"~{SAMPLES} images 28x28x3, {COHORT}/round, 1 local epoch, batch {BATCH}, SGD {LR}; "
          f"{args.timed} timed rounds after {args.warmup} warm-up")
    print()
    print("| engine | setting | s/round median (min-max) | samples/s median (min-max) | simfl / it |")
    print("| --- | --- | ---: | ---: | ---: |")
    base = results["simfl"]["samples_s"][0] if "simfl" in results else None
    for name, r in results.items():
        s, sps = r["s_round"], r["samples_s"]
        ratio = f"{base / sps[0]:.2f}" if base else "-"
        print(f"| {name} | {r['setting']} | {s[0]:.3f} ({s[1]:.3f}-{s[2]:.3f}) "
              f"| {sps[0]:.0f} ({sps[1]:.0f}-{sps[2]:.0f}) | {ratio} |")


if __name__ == "__main__":
    main()
