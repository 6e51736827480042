"""Every GPU path of simfl, run for real: a pass/fail table with figures, in one command.

    python benchmarks/gpu_check.py          # on a machine with CUDA: about 6 minutes on one GPU
    python benchmarks/gpu_check.py --cpu    # the same checks, smaller, on the CPU (GPU shares 0): tests this script

Without CUDA (and without ``--cpu``) it says so in one line and exits 0, so it
can sit in the test suite. With CUDA it checks, each as a row of the table:

1. ``smoke``: ``scenarios/smoke.yaml`` with ``resources.gpus_per_actor`` 0.25
   (``client_actors: auto``: four actors per GPU) and 0.5 (two), and 0.25 with
   one actor: runs to the end with bit-identical final weights; beside it the
   same scenario on the CPU (not bit-identical: other kernels, other rounding).
2. ``auto``: ``client_actors: auto`` picked min(CPUs, GPUs / share) actors.
3. ``memory share``: two actors at 0.5 of one GPU; the one that allocates past
   its share fails alone with the one-line ``GpuShareExceeded`` message, the
   other allocates within its share and trains, and the failed one recovers.
4. ``defences + attacks``: ``defences_smoke.yaml`` shortened (4 rounds), every
   arm (none, DP-SGD, BiDO, latent) training on GPU shares, attacked by IG,
   DLG and iDLG, naive and adaptive, on attacker actors with a fractional GPU;
   every expected (attack, knowledge) row present and finite.
5. ``defence determinism``: the DP-SGD and latent arms (GPU noise) with one
   and with two client actors: bit-identical final weights.
6. ``throughput``: samples/s of ``benchmarks/engine.py``'s workload (500
   clients, 50 per round) in the engine on GPU shares, against a plain
   single-process GPU loop on the same samples and batches, and against the
   same engine on the CPU.

Exit code 1 if any check fails. Nothing here is timed against a target: the
figures are for the GPUs guide (docs/guides/gpus.md).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine  # noqa: E402  (the engine benchmark beside this file: same workload)

from simfl.core.config import ModelConfig  # noqa: E402
from simfl.core.determinism import pin_this_script  # noqa: E402
from simfl.core.models import build_model  # noqa: E402
from simfl.core.resources import GpuShareExceeded, actor_device, within_gpu_share  # noqa: E402
from simfl.privacy.attacks import ATTACKS  # noqa: E402
from simfl.simulation.runner import RAY_SYSTEM_CONFIG, prepare  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 900


@dataclass
class Row:
    check: str
    ok: bool
    figures: str


class CheckFailed(RuntimeError):
    pass


def simfl_run(scenario: str, out: Path, name: str, sets: list[str]) -> tuple[Path, float]:
    """``python -m simfl.run`` as a user runs it; returns the run directory and its wall time."""
    cmd = [sys.executable, "-m", "simfl.run", f"scenarios/{scenario}", "--quiet", "--no-dashboard",
           "--set", f"output.dir={out}", "--set", f"output.name={name}"]
    for item in sets:
        cmd += ["--set", item]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if proc.returncode != 0:
        raise CheckFailed(f"{name}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return out / name, time.perf_counter() - start


def final_weights(run: Path) -> torch.Tensor:
    return torch.load(run / "final_weights.pt", weights_only=True)["weights"]


def final_test_accuracy(run: Path) -> float:
    evals = pd.read_parquet(run / "evals")
    rows = evals[(evals.population == "global") & (evals.scope == "test")]
    return float(rows.sort_values("round").accuracy.iloc[-1])


def actors_used(run: Path) -> int:
    return int(pd.read_parquet(run / "clients").actor.nunique())


def expected_auto_actors(share: float, clients: int) -> int:
    """What ``client_actors: auto`` should pick on this machine: every CPU (one each), or GPUs / share."""
    fit = len(os.sched_getaffinity(0))
    if share > 0:
        fit = min(fit, math.floor(torch.cuda.device_count() / share + 1e-9))
    return min(fit, clients)


def check_smoke(tmp: Path, gpu: bool) -> list[Row]:
    """Rows 1 and 2: the smoke scenario on GPU shares and actor counts, and ``auto``'s choice."""
    shares = (0.25, 0.5) if gpu else (0.0, 0.0)
    settings = {  # name -> (share, client_actors)
        "quarter-auto": (shares[0], "auto"),
        "half-auto": (shares[1], "auto"),
        "quarter-one": (shares[0], 1),
    }
    if not gpu:  # without shares, "half" is "quarter" again: one run less
        del settings["half-auto"]
    dry = [] if gpu else DRY_RUN_SMOKE
    runs = {}
    for name, (share, actors) in settings.items():
        runs[name] = simfl_run("smoke.yaml", tmp, f"smoke-{name}",
                               [*dry, f"resources.gpus_per_actor={share}", f"resources.client_actors={actors}"])
    weights = {name: final_weights(run) for name, (run, _) in runs.items()}
    same = all(torch.equal(weights["quarter-auto"], w) for w in weights.values())
    figures = "; ".join(
        f"{name}: {actors_used(run)} actors, test acc {final_test_accuracy(run):.4f}, {secs:.0f} s"
        for name, (run, secs) in runs.items()
    )
    rows = [Row("smoke: shares 0.25 / 0.5 / one actor, identical weights", same, figures)]
    if gpu:
        cpu_run, cpu_s = simfl_run("smoke.yaml", tmp, "smoke-cpu", ["resources.gpus_per_actor=0"])
        diff = float((final_weights(cpu_run) - weights["quarter-auto"]).abs().max())
        rows.append(Row("smoke: GPU vs CPU (informational)", True,
                        f"CPU test acc {final_test_accuracy(cpu_run):.4f} vs GPU "
                        f"{final_test_accuracy(runs['quarter-auto'][0]):.4f}; max |Δw| {diff:.2e}; CPU {cpu_s:.0f} s"))
        clients = int(pd.read_parquet(runs["quarter-auto"][0] / "partition.parquet").shape[0])
        got = {s: actors_used(runs[n][0]) for n, s in (("quarter-auto", 0.25), ("half-auto", 0.5))}
        want = {s: expected_auto_actors(s, clients) for s in got}
        rows.append(Row("auto: client actors from GPU shares", got == want,
                        ", ".join(f"share {s}: {got[s]} actors (expected {want[s]})" for s in got)))
    return rows


@ray.remote
class ShareProbe:
    """An actor holding a GPU share exactly as a client actor does (``actor_device``)."""

    def __init__(self, share: float) -> None:
        self.share = share
        self.device = actor_device(share)

    def allocate_and_train(self, fraction_of_gpu: float) -> str:
        """Hold ``fraction_of_gpu`` of the whole GPU's memory, then take training steps beside it."""
        with within_gpu_share("resources.gpus_per_actor", self.share, "probe actor"):
            total = torch.cuda.get_device_properties(0).total_memory
            block = torch.empty(int(fraction_of_gpu * total), dtype=torch.uint8, device=self.device)
            model = build_model(ModelConfig(width=16), 3, 28, 8).to(self.device)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            for _ in range(5):
                loss = model(torch.rand(32, 3, 28, 28, device=self.device)).logsumexp(1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            held = block.numel()
            del block
            torch.cuda.empty_cache()
            return f"held {held / 2**30:.1f} GiB and trained"


def check_memory_share() -> Row:
    """Row 3: one actor overruns its share and fails alone; its neighbour is unaffected."""
    ray.init(include_dashboard=False, logging_level="WARNING")
    try:
        greedy, modest = ShareProbe.options(num_gpus=0.5).remote(0.5), ShareProbe.options(num_gpus=0.5).remote(0.5)
        message = None
        try:
            ray.get(greedy.allocate_and_train.remote(0.7))
        except GpuShareExceeded as exc:
            message = str(exc.cause if hasattr(exc, "cause") else exc).splitlines()[0]
        neighbour = ray.get(modest.allocate_and_train.remote(0.3))
        recovered = ray.get(greedy.allocate_and_train.remote(0.1))
        ok = message is not None and "resources.gpus_per_actor=0.5" in message
        return Row("memory share: overrun fails alone", ok,
                   f"overrun: {message!r}; neighbour: {neighbour}; overrun actor afterwards: {recovered}")
    finally:
        ray.shutdown()


def every_attack(scale: int) -> str:
    """Every registered attack, its budget divided by ``scale``, as an ``attacks.methods`` override."""
    methods = []
    for kind, config in ATTACKS.configs.items():
        budget = {k: max(2, getattr(config(), k) // scale) for k in ("iterations", "steps", "samples", "decoder_steps")
                  if k in config.model_fields}
        methods.append("{" + ", ".join([f"kind: {kind}", *(f"{k}: {v}" for k, v in budget.items())]) + "}")
    return f"attacks.methods=[{', '.join(methods)}]"


SHORT_DEFENCES = [
    "training.rounds=4", "evaluation.every=2", "checkpoint.every=2", "attacks.rounds=[1,4]", "attacks.victims=4",
    every_attack(4),
]
# --cpu tests this script, not the engine (the suite runs these paths at full size elsewhere): the same checks,
# each as small as still exercises it: one round of one local epoch, two victims, budgets / 60, a tenth of the clients.
DRY_RUN_SMOKE = ["training.rounds=1", "evaluation.every=1", "training.local_epochs=1"]
# Two arms: one the naive attacker sees exactly, one with an adaptive attacker and the server's decoder.
DRY_RUN_ARMS = ("none", "latent")
DRY_RUN_DEFENCES = [
    "training.rounds=1", "evaluation.every=1", "checkpoint.every=1", "training.local_epochs=1",
    "attacks.rounds=[1]", "attacks.victims=2", every_attack(60),
    "arms={none: {}, latent: {defence: {kind: latent, lam: 1.0, sigma_init: 0.5, sigma_max: 3.0, sigma_lr: 1.0}}}",
]
THROUGHPUT = {True: (500, 50), False: (50, 10)}  # gpu -> (clients, cohort)
# (arm -> knowledges every attack must have): the naive attacker is exact for none and BiDO at B = 1.
EXPECTED = {"none": {"naive"}, "dpsgd": {"naive", "adaptive"}, "bido": {"naive"}, "latent": {"naive", "adaptive"},
            "latent_local": {"naive", "adaptive"}}
# Only the latent defence trains a decoder of its own, and only the adaptive attacker is told it.
SERVER_DECODER = {("latent", "adaptive"), ("latent_local", "adaptive")}


def check_defences(tmp: Path, gpu: bool) -> list[Row]:
    """Rows 4 and 5: every defence and attack on GPU shares; the noisy defences deterministic across actors."""
    share = 0.25 if gpu else 0.0
    short = SHORT_DEFENCES if gpu else DRY_RUN_DEFENCES
    parent, secs = simfl_run("defences_smoke.yaml", tmp, "defences", [
        *short, f"resources.gpus_per_actor={share}", f"attacks.pool.gpus_per_actor={share}",
        f"attacks.pool.actors={2 if gpu else 1}",
    ])
    problems, figures = [], []
    for arm in EXPECTED if gpu else DRY_RUN_ARMS:
        knowledge = EXPECTED[arm]
        attacks = pd.read_parquet(parent / arm / "attacks")
        for kind in ATTACKS.kinds():
            for know in knowledge:
                if kind == "server_decoder" and (arm, know) not in SERVER_DECODER:
                    continue
                rows = attacks[(attacks.attack == kind) & (attacks.knowledge == know)]
                if rows.empty or not np.isfinite(rows[["mse", "psnr", "ssim"]].to_numpy()).all():
                    problems.append(f"{arm}/{kind}/{know}")
        ig = attacks[attacks.attack == "ig"].groupby("knowledge").psnr.mean()
        figures.append(f"{arm}: test acc {final_test_accuracy(parent / arm):.3f}, IG PSNR "
                       + ", ".join(f"{k} {v:.1f} dB" for k, v in ig.items()))
    rows = [Row("defences + attacks on GPU shares, naive and adaptive", not problems,
                ("missing or non-finite: " + ", ".join(problems) + "; " if problems else "")
                + "; ".join(figures) + f"; {secs:.0f} s")]
    same = {}
    names = {"dpsgd": "DP-SGD", "latent": "latent"}
    # The suite checks every defence across actor counts on the CPU; the dry run needs one arm to test this check.
    for arm in names if gpu else ["dpsgd"]:
        weights = []
        for actors in (1, 2):
            run, _ = simfl_run("defences_smoke.yaml", tmp, f"{arm}-{actors}", [
                *short, "arms=null", f"defence={{kind: {arm}}}", "attacks=null",
                f"resources.gpus_per_actor={share}", f"resources.client_actors={actors}"])
            weights.append(final_weights(run))
        same[arm] = torch.equal(*weights)
    rows.append(Row(f"defence determinism: 1 vs 2 actors ({', '.join(names[a] for a in same)})", all(same.values()),
                    ", ".join(f"{arm}: {'identical' if s else 'DIFFERENT'}" for arm, s in same.items())))
    return rows


def check_throughput(gpu: bool, rounds: int, warmup: int) -> Row:
    """Row 6: engine samples/s on GPU shares vs a plain GPU loop and vs the engine on the CPU."""
    cores = len(os.sched_getaffinity(0))
    share = 0.25 if gpu else 0.0
    device = "cuda" if gpu else "cpu"
    clients, cohort = THROUGHPUT[gpu]
    ray.init(num_cpus=cores, include_dashboard=False, logging_level="WARNING", _system_config=dict(RAY_SYSTEM_CONFIG))
    try:
        on_gpu = prepare(engine.scenario(clients, rounds, 50, cohort, "auto", gpus_per_actor=share))
        actors = expected_auto_actors(share, clients) if gpu else cores
        t_gpu, n_gpu, w_gpu = engine.run_engine(on_gpu, actors, warmup)
        measured = list(range(warmup + 1, rounds))
        plain = sum(n_gpu) / engine.plain_loop(on_gpu, measured, w_gpu, threads=1, device=device)
        on_cpu = prepare(engine.scenario(clients, rounds, 50, cohort, cores))
        t_cpu, n_cpu, _ = engine.run_engine(on_cpu, cores, warmup)
    finally:
        ray.shutdown()
    engine_gpu, engine_cpu = sum(n_gpu) / sum(t_gpu), sum(n_cpu) / sum(t_cpu)
    return Row(f"throughput ({clients} clients, {cohort}/round)", engine_gpu > 0 and plain > 0,
               f"engine on {actors} x {share:g} GPU: {engine_gpu:.0f} samples/s; plain {device} loop: {plain:.0f} "
               f"(ratio {engine_gpu / plain:.2f}); engine on {cores} CPUs: {engine_cpu:.0f} "
               f"(GPU/CPU {engine_gpu / engine_cpu:.2f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run the checks on the CPU (tests this script itself)")
    args = parser.parse_args()
    gpu = torch.cuda.is_available() and not args.cpu
    if not gpu and not args.cpu:
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check")
        return 0
    pin_this_script(1)  # the plain loop beside the engine runs the CPU kernels simfl's actors run
    if gpu:
        props = torch.cuda.get_device_properties(0)
        print(f"gpu_check: {torch.cuda.device_count()} x {props.name} ({props.total_memory / 2**30:.0f} GiB), "
              f"torch {torch.__version__}, CUDA {torch.version.cuda}, {len(os.sched_getaffinity(0))} CPUs", flush=True)
    rows: list[Row] = []
    checks = [
        ("smoke", lambda tmp: check_smoke(tmp, gpu)),
        ("memory share", lambda tmp: [check_memory_share()] if gpu else
         [Row("memory share: overrun fails alone", True, "not applicable on the CPU (no GPU memory share)")]),
        ("defences", lambda tmp: check_defences(tmp, gpu)),
        ("throughput", lambda tmp: [check_throughput(gpu, rounds=6 if gpu else 3, warmup=2 if gpu else 1)]),
    ]
    with tempfile.TemporaryDirectory(prefix="simfl-gpu-check-") as tmp:
        for name, check in checks:
            start = time.perf_counter()
            try:
                got = check(Path(tmp))
            except Exception as exc:  # one failed check must not hide the others' figures
                got = [Row(name, False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")]
            rows.extend(got)
            print(f"gpu_check: {name} done in {time.perf_counter() - start:.0f} s", flush=True)
    print("\n| check | result | figures |\n|---|---|---|")
    for row in rows:
        print(f"| {row.check} | {'pass' if row.ok else 'FAIL'} | {row.figures} |")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
