"""Attack benchmarks on the engine's default smoke model (convnet, GroupNorm, width 16, 28×28×3, 8 classes).

1. Batched vs single: 16 victims (different images and labels, gradient view,
   B = 1) reconstructed by Inverting Gradients in one batched call, against 16
   calls of one victim each, with the same iterations. Measured twice:
   - shared weights: every victim starts from the same global weights, as all
     victims of one engine round do (the attack vmaps over images only);
   - different weights: each victim has its own weights (the general path,
     per-victim kernels).
   Target: batched >= 4x faster than single.
2. Training slowdown: the attacked smoke scenario's training rounds with
   attacks running beside them vs none (same scenario, one client actor,
   2 CPUs for Ray). The attacker gets its own CPU and training never waits on
   it (``when_full: drop``, drops reported), so the ratio is the cost of
   sharing the machine's cores, not of blocking.

    python benchmarks/attacks.py            # full: about 4 minutes on 2 cores
    python benchmarks/attacks.py --quick    # tiny sizes, for a smoke check (about a minute)

Timings use ``time.perf_counter`` after one short warm-up of each call shape.
torch's intra-op threads are set explicitly (``--threads``, default 2).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from simfl.core.config import ModelConfig
from simfl.core.determinism import pin_cpu_kernels, pin_this_script
from simfl.core.models import build_model
from simfl.core.weights import FlatWeights
from simfl.data.synthetic import make_dataset
from simfl.privacy.attacks import ATTACKS, InvertingGradients, Observation, adapt, build_attack, observe_gradient
from simfl.privacy.attacks.base import AuxData
from simfl.privacy.decoders import Decoder
from simfl.privacy.disclosure import Disclosure
from simfl.simulation.runner import main as run

ROOT = Path(__file__).resolve().parents[1]
SMOKE_MODEL = ModelConfig(arch="convnet", norm="group", width=16)
CHANNELS, IMAGE_SIZE, CLASSES = 3, 28, 8
TARGET_RATIO = 4.0


def smoke_model(seed: int) -> tuple[torch.nn.Module, FlatWeights]:
    torch.manual_seed(seed)
    model = build_model(SMOKE_MODEL, CHANNELS, IMAGE_SIZE, CLASSES)
    return model, FlatWeights(model)


def smoke_victims(count: int, shared_weights: bool, seed: int = 0) -> tuple[torch.nn.Module, FlatWeights, list]:
    """``count`` gradient-view victims with their own random images and labels (B = 1)."""
    model, flat = smoke_model(seed)
    global_weights = flat.snapshot()
    gen = torch.Generator().manual_seed(seed)
    observations: list[Observation] = []
    for v in range(count):
        weights = global_weights if shared_weights else smoke_model(seed + 1 + v)[1].vector
        x = torch.rand(1, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
        y = torch.randint(0, CLASSES, (1,), generator=gen)
        observations.append(observe_gradient(model, flat, weights, x, y))
    return model, flat, observations


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def batched_vs_single(args: argparse.Namespace) -> dict:
    """Section 1: IG on ``args.victims`` victims, one batched call vs one call per victim.

    Returns ``{"threads", "iterations", "victims", "target", "cases": {case: {"batched_s",
    "single_s", "ratio", "met"}}}`` with ``case`` "shared weights" or "different weights";
    each time is the best of ``args.repeats`` measurements.
    """
    pin_cpu_kernels(args.threads)
    attack = InvertingGradients(iterations=args.iterations)
    warm_up = InvertingGradients(iterations=min(3, args.iterations))
    seeds = list(range(args.victims))
    cases = {}
    for case, shared in (("shared weights", True), ("different weights", False)):
        model, flat, observations = smoke_victims(args.victims, shared)

        def batched(model=model, flat=flat, observations=observations) -> None:
            attack(model, flat, observations, seeds)

        def single(model=model, flat=flat, observations=observations) -> None:
            for obs, seed in zip(observations, seeds, strict=True):
                attack(model, flat, [obs], [seed])

        warm_up(model, flat, observations, seeds)
        warm_up(model, flat, observations[:1], seeds[:1])
        batched_s = min(seconds(batched) for _ in range(args.repeats))
        single_s = min(seconds(single) for _ in range(args.repeats))
        ratio = single_s / batched_s
        cases[case] = {"batched_s": batched_s, "single_s": single_s, "ratio": ratio, "met": ratio >= TARGET_RATIO}
    return {
        "threads": torch.get_num_threads(),
        "iterations": args.iterations,
        "victims": args.victims,
        "target": TARGET_RATIO,
        "cases": cases,
    }


def every_attack_batched(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Section 3: every registered attack, ``args.victims`` victims of one round batched vs one call each.

    Small budgets (the ratio, not the attack's quality, is measured): optimisation attacks batch
    their victims into one vmapped optimisation; learned ones fit their network once per round
    and reuse it for every victim. The server's data: a synthetic validation split.
    """
    pin_cpu_kernels(args.threads)
    ds = make_dataset(train_size=10, val_size=200, test_size=10, image_size=IMAGE_SIZE, num_classes=CLASSES, seed=0)
    aux = AuxData(torch.from_numpy(ds.val_x), torch.from_numpy(ds.val_y), seed=0)
    model, flat, observations = smoke_victims(args.victims, shared_weights=True)
    seeds = list(range(args.victims))
    out = {}
    for kind, config in ATTACKS.configs.items():
        budget = {k: v for k, v in (("iterations", 20), ("steps", 40), ("samples", 40), ("decoder_steps", 40))
                  if k in config.model_fields}
        attack = build_attack(config(**budget), aux)
        if not attack.applies():  # the server's decoder: as under the latent defence, which discloses one
            torch.manual_seed(0)
            attack = adapt(attack, Disclosure(decoder=Decoder(model.latent_dim, CHANNELS, IMAGE_SIZE)))
        batched_s = seconds(lambda attack=attack: attack(model, flat, observations, seeds))
        single_s = seconds(lambda attack=attack: [attack(model, flat, [o], [s]) for o, s in zip(observations, seeds)])
        out[kind] = {"batched_s": batched_s, "single_s": single_s, "ratio": single_s / batched_s}
    return out


def training_slowdown(args: argparse.Namespace) -> dict:
    """Section 2: median training-round time with attacks beside training vs without.

    Returns the two medians, their ratio, how many victims were sent and
    dropped, and how many attack jobs finished while training was still going.
    """
    rounds = 4 if args.quick else 16
    out = Path(tempfile.mkdtemp(prefix="simfl-bench-attacks-"))
    common = [
        str(ROOT / "scenarios/smoke_attacks.yaml"), "--quiet", "--num-cpus", "2", "--no-dashboard",
        "--set", f"training.rounds={rounds}", "--set", "resources.client_actors=1",
        "--set", "evaluation.every=1000", "--set", f"output.dir={out}",
    ]
    if args.quick:  # a small validation split: the evaluation classifier trains in seconds
        common += ["--set", "data.synthetic.val_size=200", "--set", f"data.root={out / 'data'}"]
    iterations = 20 if args.quick else 300
    attacks = (f"{{methods: [{{kind: ig, iterations: {iterations}}}], victims: 4, every: 2, "
               "pool: {max_pending: 2, when_full: drop}}")
    runs = {}
    for name, setting in (("without", "attacks=null"), ("with", f"attacks={attacks}")):
        if run([*common, "--set", f"output.name={name}-attacks", "--set", setting]) != 0:
            raise SystemExit(f"the run {name} attacks failed")
        runs[name] = out / f"{name}-attacks"
    off = pd.read_parquet(runs["without"] / "rounds")
    on = pd.read_parquet(runs["with"] / "rounds")
    rows = pd.read_parquet(runs["with"] / "attacks")
    jobs = rows.groupby("round")["finished_at"].max()  # one job per attacked round (4 victims <= victims_per_job)
    return {
        "rounds": rounds,
        "round_s_off": float(off["round_time_s"].median()),
        "round_s_on": float(on["round_time_s"].median()),
        "ratio": float(on["round_time_s"].median() / off["round_time_s"].median()),
        "victims": int(on["attack_victims"].sum()),
        "dropped": int(on["attack_victims_dropped"].sum()),
        "jobs": len(jobs),
        "jobs_during_training": int((jobs < on["finished_at"].max()).sum()),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny run (5 iterations) for a smoke check")
    parser.add_argument("--iterations", type=int, help="IG iterations (default 100, 5 with --quick)")
    parser.add_argument("--victims", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=1, help="report the best of this many timings")
    args = parser.parse_args(argv)
    if args.iterations is None:
        args.iterations = 5 if args.quick else 100
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pin_this_script(args.threads)  # the kernels simfl's attacker actors run
    print("1. batched vs single (Inverting Gradients, smoke model, gradient view, B=1)")
    result = batched_vs_single(args)
    print(f"torch threads: {result['threads']} (set explicitly); iterations: {result['iterations']}; "
          f"best of {args.repeats}")
    for case, r in result["cases"].items():
        verdict = "met" if r["met"] else "not met"
        print(f"ig batched {result['victims']} victims ({case}): {r['batched_s']:.2f} s; "
              f"single x{result['victims']}: {r['single_s']:.2f} s; ratio {r['ratio']:.2f}x "
              f"(target >= {result['target']:g}x: {verdict})")
    print(f"3. every attack, {args.victims} victims of one round batched vs one call each (small budgets)")
    for kind, r in every_attack_batched(args).items():
        print(f"{kind} batched {args.victims} victims: {r['batched_s']:.2f} s; single x{args.victims}: "
              f"{r['single_s']:.2f} s; ratio {r['ratio']:.2f}x")
    print("2. training rounds with attacks beside them vs none (smoke_attacks, 1 client actor, Ray on 2 CPUs)")
    slow = training_slowdown(args)
    print(f"median round: {slow['round_s_on']:.2f} s with attacks vs {slow['round_s_off']:.2f} s without over "
          f"{slow['rounds']} rounds; slowdown ratio {slow['ratio']:.2f}")
    print(f"attack jobs: {slow['jobs']} ({slow['victims']} victims sampled, {slow['dropped']} dropped because the "
          f"pool was busy), {slow['jobs_during_training']} finished while training was still running")


if __name__ == "__main__":
    main()
