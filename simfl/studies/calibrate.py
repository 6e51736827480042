"""``python -m simfl.calibrate SCENARIO.yaml``: find the local lr and epochs at which the scenario's model learns.

Why: a scenario's training settings decide whether federated training reaches
a useful model at all (few local steps at lr 0.01 left one user at 0.52 test
accuracy after 30 rounds where central training reaches 0.99), and a privacy
comparison on a model that never learned measures nothing. Calibration trains
the scenario without defence and without attacks over a small grid of local
learning rates (``training.optimizer.lr``) and local epochs
(``training.local_epochs``), by successive halving under a round budget
(:mod:`simfl.studies.halving` states the grid, the rungs and the ranking), and writes a
patch that a run (``--set``) or a study (``include:``) lays over the scenario.

Utility is what a study compares defences at: the final global model's
accuracy on the training clients' local validation splits (``--utility
client_val``, the default), or on the global test split (``--utility test``).
Every candidate run evaluates every round; "reached ``--target``" and "final
utility" are read off the mean of the last ``--window`` rounds (default 5;
:mod:`simfl.studies.halving` says why). Candidates of a rung run concurrently, packed onto the Ray instance or
cluster like a study's cells, each a complete run directory under
``DIR/candidates/<candidate>.rung<k>``; a rung's survivors are re-run from
scratch for the next rung (``--resume`` cannot extend a run past its
``training.rounds``). Runs are deterministic, so the same scenario and seed
give the same choice.

Writes, in DIR (default ``<output.dir>/<scenario name>.calibration``; an
existing non-empty DIR is refused): ``calibration.parquet`` (candidate, lr,
local_epochs, rung, round, utility per evaluated round of every run),
``calibration.png`` (each candidate's utility curve) and ``calibrated.yaml``
(``KEY.PATH: value`` lines under a comment header).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from simfl.core.errors import UserError  # noqa: E402
from simfl.engine.scenario import Scenario, load_scenario, parse_scenario, scenario_to_yaml, set_keys  # noqa: E402
from simfl.results.analysis import UTILITY_METRIC, run_metrics  # noqa: E402
from simfl.results.markdown import fmt, table  # noqa: E402
from simfl.simulation.runner import (  # noqa: E402
    EXIT_USER_ERROR,
    Prepared,
    RayOptions,
    add_ray_arguments,
    connect_ray,
    prepare_under,
    ray_options,
)
from simfl.studies.cell_pool import run_cells  # noqa: E402
from simfl.studies.halving import (  # noqa: E402
    EPOCHS,
    WINDOW,
    Candidate,
    Curve,
    Halving,
    make_candidates,
    rung_rounds,
    successive_halving,
)

LR_KEY = "training.optimizer.lr"
EPOCHS_KEY = "training.local_epochs"
PARQUET_COLUMNS = ["candidate", "lr", "local_epochs", "rung", "round", "utility", "trailing", "rung_rounds",
                   "shipped"]


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m simfl.calibrate``."""
    p = argparse.ArgumentParser(prog="python -m simfl.calibrate", description=__doc__.splitlines()[0])
    p.add_argument("scenario", help="scenario YAML file")
    p.add_argument("--target", type=float, default=0.9,
                   help="utility to reach, in (0, 1]: candidates are ranked by the first round reaching it "
                        "(default 0.9)")
    p.add_argument("--rounds", type=int, metavar="R",
                   help="round budget: rungs of R/4, R/2 and R rounds (default: the scenario's training.rounds)")
    p.add_argument("--lrs", metavar="LR,LR,...",
                   help="local learning rates to try (default: lr/3, lr, 3·lr, 10·lr around the scenario's lr)")
    p.add_argument("--epochs", metavar="E,E,...",
                   help=f"local epochs to try (default: {','.join(map(str, EPOCHS))})")
    p.add_argument("--window", type=int, default=WINDOW, metavar="W",
                   help=f"'reached' and 'final' are read off the mean of the last W evaluated rounds (default "
                        f"{WINDOW}; 1: single rounds, which on non-IID clients swing by 0.2-0.4)")
    p.add_argument("--utility", choices=sorted(UTILITY_METRIC), default="client_val",
                   help="client_val: accuracy on the training clients' validation splits (default); "
                        "test: on the global test split")
    p.add_argument("--out", metavar="DIR", help="where the results go (default: <output.dir>/<name>.calibration)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a scenario key before calibrating, e.g. --set data.name=bloodmnist (repeatable)")
    add_ray_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    return p


def parse_list(flag: str, text: str, kind: type[float] | type[int]) -> list[Any]:
    """``0.01,0.1`` as positive numbers of ``kind``; a bad item is a one-line error naming the flag."""
    values = []
    for item in text.split(","):
        try:
            value = kind(item.strip())
        except ValueError:
            raise UserError(f"{flag} {text}: {item.strip()!r} is not a{'n integer' if kind is int else ' number'}"
                            ) from None
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise UserError(f"{flag} {text}: {item.strip()} must be positive")
        values.append(value)
    return values


def probe_scenario(scenario: Scenario, candidate: Candidate, rounds: int) -> Scenario:
    """The scenario at a candidate's setting for ``rounds`` rounds: no defence, no attacks, evaluated every round."""
    raw = set_keys(scenario.model_dump(mode="json"), [
        (LR_KEY, candidate.lr), (EPOCHS_KEY, candidate.local_epochs), ("training.rounds", rounds),
        ("evaluation.every", 1), ("checkpoint.every", 0),  # checkpoint only the last round: nothing resumes these
    ])
    raw.update(name=f"{scenario.name}.calibrate.{candidate.name}", defence={"kind": "none"}, attacks=None, arms=None)
    try:
        return parse_scenario(raw)
    except UserError as exc:
        raise UserError(f"candidate {candidate.name}: {exc}") from None


def check_inputs(scenario: Scenario, *, target: float, rounds: int | None, window: int, utility: str,
                 lrs: str | None, epochs: str | None, out: str | None) -> tuple[list[Candidate], int, Path]:
    """Every check before anything is written: the target, budget, grid, each candidate's scenario and DIR.

    The arguments are the command line's (``--lrs 0.01,0.1`` as given).
    """
    if not 0 < target <= 1:
        raise UserError(f"--target {target:g}: must be in (0, 1]")
    budget = scenario.training.rounds if rounds is None else rounds
    if budget < 1:
        raise UserError(f"--rounds {budget}: must be at least 1")
    if window < 1:
        raise UserError(f"--window {window}: must be at least 1")
    if scenario.training.local_steps is not None:
        raise UserError("training.local_steps: calibration sweeps training.local_epochs; unset local_steps "
                        "(--set training.local_steps=null) to calibrate this scenario")
    if utility == "client_val" and scenario.evaluation.local_val_fraction == 0:
        raise UserError("--utility client_val needs evaluation.local_val_fraction > 0; or use --utility test")
    lr_grid = parse_list("--lrs", lrs, float) if lrs else None
    epoch_grid = parse_list("--epochs", epochs, int) if epochs else None
    candidates = make_candidates(scenario.training.optimizer.lr, scenario.training.local_epochs, lr_grid, epoch_grid)
    for c in candidates:
        probe_scenario(scenario, c, budget)
    where = Path(out) if out else Path(scenario.output.dir).expanduser() / f"{scenario.name}.calibration"
    if where.exists() and (not where.is_dir() or any(where.iterdir())):
        raise UserError(f"--out {where}: exists already and is not empty; calibration never overwrites "
                        "(remove it or give another --out)")
    return candidates, budget, where


def utility_curve(run_dir: Path, kind: str) -> Curve:
    """A run's utility at every evaluated round: per round, what its final figure is at the last.

    ``client_val``: the training populations' local validation accuracies, weighted by their samples
    (so the last point is :func:`simfl.results.analysis.final_values`'s ``local_val_accuracy``); ``test``: the
    global test split.
    """
    m = run_metrics(run_dir)
    m = m[m["round"].notna() & (m["metric"] == UTILITY_METRIC[kind]) & m["attack"].isna()]
    if kind == "test":
        m = m[m["population"].isna()]
        return tuple((int(r), float(v)) for r, v in zip(m["round"], m["value"]))
    m = m[m["population"].notna() & (m["held_out"] == False)]  # noqa: E712 (nullable boolean)
    curve = []
    for r, g in m.groupby("round", sort=True):
        weights = g["n"].astype(float)
        curve.append((int(r), float((g["value"] * weights).sum() / weights.sum())))
    return tuple(curve)


def run_names(rung: int, candidates: list[Candidate]) -> dict[str, Candidate]:
    """Each candidate's run directory name in a rung: ``lr0.03_ep2.rung1``."""
    return {f"{c.name}.rung{rung}": c for c in candidates}


def prepare_rung(options: RayOptions, out: Path, scenario: Scenario, rung: int, rounds: int,
                 candidates: list[Candidate]) -> dict[str, tuple[Prepared, int]]:
    """A rung's runs with their data loaded (once for all) and their actors planned; nothing written."""
    scenarios = {n: probe_scenario(scenario, c, rounds) for n, c in run_names(rung, candidates).items()}
    return prepare_under(out / "candidates", scenarios, options, quiet=True)  # one line per run, not per step


def run_rung(out: Path, rung: int, rounds: int, candidates: list[Candidate],
             prepared: dict[str, tuple[Prepared, int]], utility: str, *, quiet: bool) -> dict[Candidate, Curve]:
    """One rung: each candidate a fresh run of ``rounds`` rounds, run concurrently; the curves of those that ran."""
    names = run_names(rung, candidates)
    runs_dir = out / "candidates"
    if not quiet:
        print(f"simfl calibrate: rung {rung}: {len(candidates)} candidates x {rounds_text(rounds)}", file=sys.stderr)
    status = run_cells(runs_dir, prepared, "auto", quiet=quiet)
    curves: dict[Candidate, Curve] = {}
    for name, c in names.items():
        if status.get(name, "").startswith("failed"):
            print(f"simfl calibrate: {name} {status[name]}", file=sys.stderr)
            continue
        curves[c] = utility_curve(runs_dir / name, utility)
    return curves


def results_frame(halving: Halving) -> pd.DataFrame:
    """``calibration.parquet``: one row per evaluated round of every candidate run."""
    rows = []
    for rung in halving.rungs:
        for r in rung:
            trailing = dict(r.trailing()) if r.curve else {}
            rows += [{"candidate": r.candidate.name, "lr": r.candidate.lr, "local_epochs": r.candidate.local_epochs,
                      "rung": r.rung, "round": rnd, "utility": u, "trailing": trailing.get(rnd, math.nan),
                      "rung_rounds": r.rounds, "shipped": r.candidate.shipped} for rnd, u in r.curve]
    return pd.DataFrame(rows, columns=PARQUET_COLUMNS).astype(
        {"lr": "float64", "local_epochs": "int64", "rung": "int64", "round": "int64", "utility": "float64",
         "trailing": "float64", "rung_rounds": "int64", "shipped": "bool"})


def summary_rows(halving: Halving) -> list[dict[str, Any]]:
    """Per candidate, at the last rung it ran: rounds run, rounds to the target, final utility."""
    rows = []
    best = halving.best
    for c in halving.candidates():
        r = halving.last(c)
        note = ", ".join(n for n, flag in (("best", best is not None and c == best.candidate),
                                            ("shipped", c.shipped), ("failed", r.failed)) if flag)
        rows.append({"candidate": c.name, "lr": c.lr, "epochs": c.local_epochs, "rounds": r.rounds,
                     "to_target": r.rounds_to_target(halving.target), "final": r.final, "note": note})
    return rows


def summary_table(halving: Halving) -> str:
    """The table printed at the end: candidate, lr, epochs, rounds run, rounds to target, final utility."""
    rows = [[r["candidate"], f"{r['lr']:g}", str(r["epochs"]), str(r["rounds"]),
             "–" if r["to_target"] is None else str(r["to_target"]), fmt(r["final"]), r["note"]]
            for r in summary_rows(halving)]
    header = ["candidate", "lr", "epochs", "rounds run", f"rounds to {halving.target:g}{mean_of(halving)}",
              f"final utility{mean_of(halving)}", ""]
    return "\n".join(table(header, rows))


def mean_of(halving: Halving) -> str:
    """`` (mean of 5 rounds)`` where figures are trailing means; empty for single rounds."""
    return f" (mean of {halving.window} rounds)" if halving.window > 1 else ""


def rounds_text(n: int) -> str:
    """``1 round``, ``4 rounds``."""
    return f"{n} round{'' if n == 1 else 's'}"


def outcome(halving: Halving, c: Candidate) -> str:
    """One candidate in words: its setting, when it reached the target in its last rung, its final utility."""
    r = halving.last(c)
    if r.failed:
        return f"lr {c.lr:g}, local_epochs {c.local_epochs}: its {r.rounds}-round run failed"
    reached = r.rounds_to_target(halving.target)
    where = (f"reached {halving.target:g} at round {reached} of {r.rounds}" if reached is not None
             else f"did not reach {halving.target:g} in {rounds_text(r.rounds)}")
    return f"lr {c.lr:g}, local_epochs {c.local_epochs}: {where}; final utility {r.final:.3f}{mean_of(halving)}"


def patch_text(halving: Halving, scenario_path: str, scenario: Scenario, utility: str) -> str:
    """``calibrated.yaml``: the best setting as ``KEY.PATH: value`` lines under a comment header."""
    best = halving.best
    assert best is not None
    shipped = next(c for c in halving.candidates() if c.shipped)
    header = [
        f"simfl calibration of {scenario_path} (scenario {scenario.name}, seed {scenario.seed}), "
        "without defence or attacks",
        f"target: {utility} ({UTILITY_METRIC[utility]}) >= {halving.target:g}"
        f"{f', as the mean of the last {halving.window} evaluated rounds' if halving.window > 1 else ''}; "
        f"round budget {halving.budget}; "
        f"{len(halving.rungs[0])} candidates by successive halving, {halving.total_rounds} rounds trained in all",
        f"best:    {outcome(halving, best.candidate)}",
        f"shipped: {outcome(halving, shipped)}",
        "rounds each candidate ran (its last rung), rounds to the target, final utility:",
        *(f"  {r['candidate']}: {rounds_text(r['rounds'])}, {'–' if r['to_target'] is None else r['to_target']}, "
          f"{fmt(r['final'])}" + (f" ({r['note']})" if r["note"] else "") for r in summary_rows(halving)),
        "use: python -m simfl.run SCENARIO --set KEY=VALUE for each line below, or in a study file: "
        "include: [calibrated.yaml]",
    ]
    body = yaml.safe_dump({LR_KEY: best.candidate.lr, EPOCHS_KEY: best.candidate.local_epochs}, sort_keys=False)
    return "".join(f"# {line}\n" for line in header) + body


def plot(halving: Halving, path: Path, utility: str) -> Path:
    """``calibration.png``: each candidate's utility curve at the last rung it ran, the target dashed."""
    fig, ax = plt.subplots(figsize=(8, 5))
    best = halving.best
    colours = plt.get_cmap("tab20")
    for i, c in enumerate(halving.candidates()):
        r = halving.last(c)
        if r.failed:
            continue
        rounds, values = zip(*r.curve)
        is_best = best is not None and c == best.candidate
        label = c.name + (" (best)" if is_best else "") + (" (shipped)" if c.shipped else "")
        colour = "black" if c.shipped else colours(i % 20)
        style = "--" if c.shipped else "-"
        if halving.window > 1:  # each round faint, the trailing mean the ranking reads in full
            ax.plot(rounds, values, color=colour, linestyle=style, linewidth=0.6, alpha=0.35)
            rounds, values = zip(*r.trailing())
        ax.plot(rounds, values, label=label, color=colour, linestyle=style,
                linewidth=2.5 if is_best or c.shipped else 1.0)
    ax.axhline(halving.target, color="grey", linestyle=":", linewidth=1, label=f"target {halving.target:g}")
    ax.set_ylim(0.0, 1.0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(f"{UTILITY_METRIC[utility]} ({utility})")
    ax.set_title(f"calibration: target {halving.target:g}, budget {halving.budget} rounds"
                 + (f"; bold: mean of the last {halving.window} rounds" if halving.window > 1 else ""))
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(out: Path, halving: Halving, scenario_path: str, scenario: Scenario, utility: str) -> Path:
    """The figure and the patch (the parquet is written before: it is there even when no run finished)."""
    plot(halving, out / "calibration.png", utility)
    patch = out / "calibrated.yaml"
    patch.write_text(patch_text(halving, scenario_path, scenario, utility))
    return patch


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for a user error, reported in one line)."""
    args = build_parser().parse_args(argv)
    try:
        scenario = load_scenario(args.scenario, args.overrides)
        candidates, budget, out = check_inputs(scenario, target=args.target, rounds=args.rounds, window=args.window,
                                               utility=args.utility, lrs=args.lrs, epochs=args.epochs, out=args.out)
        options = ray_options(args)
        if not args.quiet:
            print(f"simfl calibrate: {scenario.name}: {len(candidates)} candidates (lr "
                  f"{', '.join(f'{v:g}' for v in sorted({c.lr for c in candidates}))} x local_epochs "
                  f"{', '.join(str(v) for v in sorted({c.local_epochs for c in candidates}))}), "
                  f"budget {budget} rounds; loading data and planning actors", file=sys.stderr)
        connect_ray(options)
        # The first rung's data and actors, planned before DIR exists: a missing dataset costs nothing.
        first = prepare_rung(options, out, scenario, 1, rung_rounds(budget)[0], candidates)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--out {out}: cannot create it ({exc.strerror})") from None
        (out / "scenario.yaml").write_text(scenario_to_yaml(scenario))
    except UserError as exc:
        print(f"simfl: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR

    def evaluate(rung: int, rounds: int, alive: list[Candidate]) -> dict[Candidate, Curve]:
        prepared = first if rung == 1 else prepare_rung(options, out, scenario, rung, rounds, alive)
        return run_rung(out, rung, rounds, alive, prepared, args.utility, quiet=args.quiet)

    try:
        halving = successive_halving(candidates, budget, args.target, evaluate, args.window)
    except UserError as exc:
        print(f"simfl: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    results_frame(halving).to_parquet(out / "calibration.parquet", index=False)
    print(summary_table(halving))
    if halving.best is None:
        print(f"simfl: calibration failed: no candidate run of the last rung finished; runs in {out / 'candidates'}",
              file=sys.stderr)
        return 1
    patch = write_outputs(out, halving, args.scenario, scenario, args.utility)
    shipped = next(c for c in candidates if c.shipped)
    print(f"best:    {outcome(halving, halving.best.candidate)}\nshipped: {outcome(halving, shipped)}")
    print(f"simfl calibrate: {halving.total_rounds} rounds trained; figure {out / 'calibration.png'}; patch: {patch}")
    return 0
