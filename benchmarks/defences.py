"""What each defence costs per round, against no defence, on the smoke model (convnet, GroupNorm, width 16, 28 px).

1. Local training: the same clients (synthetic images, the smoke scenario's
   sizes: 80 samples, batch 8, 4 local epochs, SGD with momentum) trained by
   one process in a row, as a client actor does, with each defence. Opacus
   objects are built once per process, as in the engine, so the ratio is the
   steady per-client cost (per-sample gradients for DP-SGD, HSIC kernels for
   BiDO, the decoder's forward and backward for the latent defence).
2. Server step: the latent defence's per-round work in the coordinator
   (training the decoder ``decoder_steps`` steps on server data, measuring it).

    python benchmarks/defences.py           # about a minute on 2 cores
    python benchmarks/defences.py --quick   # a smoke check

Ratios are measured in this one run: defence time / no-defence time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from simfl.core.config import ModelConfig, TrainingConfig
from simfl.core.determinism import pin_this_script
from simfl.core.training import train_client
from simfl.core.weights import FlatWeights
from simfl.data import Dataset
from simfl.privacy.defences import DEFENCES, defended_model

SHAPE = (3, 28, 8)
KNOBS = {
    "none": {},
    "dpsgd": {"noise_multiplier": 0.5},
    "bido": {},
    "latent": {"sigma_init": 0.5, "sigma_max": 3.0},
}


MODEL = ModelConfig(arch="convnet", norm="group", width=16)


def clients(count: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (n, 28, 28, 3), dtype=torch.uint8, generator=gen),
             torch.randint(0, SHAPE[2], (n,), generator=gen)) for _ in range(count)]


def server_data(n: int) -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)
    y = rng.integers(0, SHAPE[2], n)
    splits = {s: (x, y) for s in ("train", "val", "test")}
    return Dataset.from_splits("bench", [str(c) for c in range(SHAPE[2])], splits)


def time_training(kind: str, data: list, cfg: TrainingConfig) -> tuple[float, float]:
    """Seconds per client (after one warm-up client), and the defence's server step per round (0 if none)."""
    torch.manual_seed(0)
    model, defence = defended_model(MODEL, DEFENCES.configs[kind](**KNOBS[kind]), 0, SHAPE)
    flat = FlatWeights(model)
    defence.server_setup(server_data(600), model)
    server_s = 0.0
    if kind == "latent":
        start = time.perf_counter()
        defence.server_round(1, model, [{"samples": 1, "accuracy": 0.5}])
        server_s = time.perf_counter() - start
    defence.receive(defence.broadcast(), torch.device("cpu"))
    weights = flat.snapshot()
    state: dict = {}
    train_client(model, flat, weights, *data[0], cfg, torch.Generator().manual_seed(0), defence, state)
    start = time.perf_counter()
    for i, (x, y) in enumerate(data):
        train_client(model, flat, weights, x, y, cfg, torch.Generator().manual_seed(i), defence, state)
    return (time.perf_counter() - start) / len(data), server_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke check of the script")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    pin_this_script(args.threads)  # the kernels simfl's actors run
    n, count, epochs = (16, 2, 1) if args.quick else (80, 6, 4)
    cfg = TrainingConfig(local_epochs=epochs, batch_size=8, optimizer={"kind": "sgd", "lr": 0.01, "momentum": 0.9})
    data = clients(count, n)
    base, _ = time_training("none", data, cfg)
    print(f"local training per client ({n} samples, batch 8, {epochs} epochs, {args.threads} threads):")
    print(f"  none    {base * 1000:8.1f} ms")
    for kind in ("dpsgd", "bido", "latent"):
        seconds, server_s = time_training(kind, data, cfg)
        extra = f"   server step per round {server_s:.2f} s" if server_s else ""
        print(f"  {kind:7s} {seconds * 1000:8.1f} ms   ratio {seconds / base:5.2f}x{extra}")


if __name__ == "__main__":
    main()
