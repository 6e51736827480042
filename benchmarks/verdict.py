"""Time to verdict: one small searched study at a base commit and at this checkout, side by side, in one run.

Why (issue 26): a researcher waits for a verdict, not a round. This runs the
same study file with the code of a base commit (checked out into a temporary
git worktree, imported through ``PYTHONPATH``) and with this checkout's, each
in its own process and private Ray instance on ``--num-cpus`` CPUs, one after
the other, alternating which goes first over ``--pairs``. It prints each
side's wall time (both run in one directory, the attack evaluation classifier
trained beforehand, untimed), the ratio, whether the two studies' results are identical
(``simfl.report --compare``: every table, final weight and report), and the
profile of this checkout's study (``simfl.report --profile``).

The study (default): the verdict's recipe (``scenarios/study_verdict.yaml``:
12 rounds, 3 local epochs, the same attacks at the same budgets) cut to the
undefended grid and DP-SGD and the latent defence searched, over seeds 0 and 1,
with search budget 3 and 4 victims in rounds 1 and 12: 6 cells after at most 12
probes. ``--quick``: seed 0, DP-SGD alone, 2 rounds of 4 clients, IG and the feature
decoder at small budgets (for the test of this script). ``--study FILE``: any study
file (e.g. ``scenarios/study_verdict.yaml`` itself: hours per side).

    python benchmarks/verdict.py                       # the cut verdict, 1 pair
    python benchmarks/verdict.py --before b2b66ed --pairs 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from simfl.results.compare import differences
from simfl.simulation.runner import prepare, prepare_evaluator
from simfl.studies.profile import profile
from simfl.studies.spec import expand, load_study

ROOT = Path(__file__).resolve().parents[1]
# The last commit before issue 26's changes to how a study spends its time.
BEFORE = "b2b66ed"


def cut_verdict(root: Path, quick: bool) -> dict:
    """The default study: study_verdict.yaml cut down (see the module docstring), its base in ``root``."""
    study = yaml.safe_load((ROOT / "scenarios" / "study_verdict.yaml").read_text())
    study["name"] = "verdict_cut"
    study["base"] = str(root / "scenarios" / "defences_smoke.yaml")
    study["set"]["attacks.victims"] = 4
    study["search"]["levels"] = {k: v for k, v in study["search"]["levels"].items() if k in ("dpsgd", "latent")}
    study["search"]["tune"] = {}
    study["search"]["knobs"] = {}
    study["search"]["budget"] = 3
    study["grid"]["seed"] = [0, 1]
    study["comparison"]["baselines"] = ["dpsgd"]
    if quick:
        study["set"].update({"training.rounds": 2, "training.clients_per_round": 4, "training.local_epochs": 1,
                             "evaluation.every": 2, "checkpoint.every": 2, "attacks.rounds": [1, 2],
                             "attacks.victims": 1, "attacks.methods": [{"kind": "ig", "iterations": 10},
                                                                       {"kind": "feature_decoder", "steps": 20}]})
        study["search"]["levels"] = {"dpsgd": study["search"]["levels"]["dpsgd"]}
        study["search"]["budget"] = 2
        study["grid"]["seed"] = [0]
        study["comparison"].update(target_accuracy=0.13, proposed="dpsgd", baselines=["none"])  # chance: 1/8
    return study


def worktree(commit: str, where: Path) -> Path:
    """``commit`` checked out (detached) at ``where``; exits with one line if this checkout lacks it."""
    out = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(where), commit],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"verdict.py: cannot check out {commit} ({out.stderr.strip().splitlines()[-1]})")
    return where


def warm_up(study: Path, where: Path) -> None:
    """Train the attack evaluation classifiers both sides load (cached per dataset under ``where``), untimed."""
    spec, base = load_study(study)
    here = Path.cwd()
    os.chdir(where)  # data.root is relative: both sides run here
    try:
        for data in {json.dumps(c.scenario.data.model_dump(mode="json"), sort_keys=True): c
                     for c in expand(spec, base)}.values():
            prepare_evaluator(prepare(data.scenario), quiet=True)
    finally:
        os.chdir(here)


def run_side(code: Path, study: Path, out: Path, cpus: int, where: Path) -> float:
    """One study with the simfl of ``code``, run in ``where``, in its own process and Ray instance; its wall time."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "simfl.study", str(study), "--out", str(out), "--num-cpus", str(cpus),
                           "--no-dashboard", "--quiet"], cwd=where, env=env, capture_output=True, text=True,
                          check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"verdict.py: the study failed with {code.name}'s code:\n{proc.stderr[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default=BEFORE, help=f"the base commit (default {BEFORE})")
    p.add_argument("--study", help="a study file to time instead of the cut verdict")
    p.add_argument("--pairs", type=int, default=1, help="before/after pairs, alternating which runs first")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1, help="CPUs of each side's Ray instance")
    p.add_argument("--quick", action="store_true", help="a tiny cut (seed 0, DP-SGD, 2 rounds): minutes")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="simfl-verdict-") as tmp:
        tmp_dir = Path(tmp)
        sides = {"before": worktree(args.before, tmp_dir / "before"), "after": ROOT}
        try:
            studies = {}
            for name, code in sides.items():
                spec = yaml.safe_load(Path(args.study).read_text()) if args.study else cut_verdict(code, args.quick)
                if args.study and not Path(str(spec.get("base", ""))).is_absolute():
                    spec["base"] = str(Path(args.study).resolve().parent / spec["base"])
                studies[name] = tmp_dir / f"{name}.yaml"
                studies[name].write_text(yaml.safe_dump(spec, sort_keys=False))
            (tmp_dir / "work").mkdir()
            warm_up(studies["after"], tmp_dir / "work")
            seconds: dict[str, list[float]] = {"before": [], "after": []}
            last: dict[str, Path] = {}
            for pair in range(args.pairs):
                for name in (("before", "after") if pair % 2 == 0 else ("after", "before")):
                    out = tmp_dir / f"{name}-{pair}"
                    seconds[name].append(run_side(sides[name], studies[name], out, args.num_cpus, tmp_dir / "work"))
                    last[name] = out
                    print(f"pair {pair + 1}: {name} {seconds[name][-1]:.0f} s", flush=True)
            found = differences(last["before"], last["after"])
            before_commit = subprocess.run(["git", "-C", str(sides["before"]), "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True, check=True).stdout.strip()
            after_commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                          capture_output=True, text=True, check=True).stdout.strip()
            study_name = args.study or ("cut verdict, quick" if args.quick else "cut verdict")
            print(f"\nstudy: {study_name}; {args.num_cpus} CPUs; {args.pairs} pair(s)\n")
            print("| side | commit | wall (s), per pair | median (s) |\n|---|---|---|---:|")
            for name, commit in (("before", before_commit), ("after", after_commit)):
                values = sorted(seconds[name])
                print(f"| {name} | {commit} | {', '.join(f'{v:.0f}' for v in seconds[name])} | "
                      f"{values[len(values) // 2]:.0f} |")
            ratio = sorted(seconds["after"])[args.pairs // 2] / sorted(seconds["before"])[args.pairs // 2]
            print(f"\nafter / before: {ratio:.2f} (median wall)")
            print(f"results identical (every table, final weight, report): {'yes' if not found else 'NO'}")
            for line in found[:20]:
                print(f"  {line}")
            print(f"\nprofile of the after side (last pair):\n\n{profile(last['after'], args.num_cpus)}")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(sides["before"])],
                           capture_output=True, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
