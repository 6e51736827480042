"""``python -m simfl.report RUN_OR_STUDY_DIR``: report.md with figures, from the directory alone.

Works on a study directory (``simfl.study``), on a scenario's arms (the parent
directory ``simfl.run`` writes for ``arms:``) and on a single run. Every figure
has a markdown table with the numbers behind it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from simfl.core.errors import UserError
from simfl.core.provenance import mismatches
from simfl.engine.scenario import load_scenario
from simfl.results import analysis
from simfl.results.compare import differences
from simfl.results.markdown import DIGITS, fmt, fmt_interval, table
from simfl.studies import figures, matched
from simfl.studies.profile import profile
from simfl.studies.spec import ComparisonConfig, load_study, search_outcomes, study_cells

EXIT_USER_ERROR = 2
PREFERRED_ATTACKS = ("ig", "dlg", "idlg")


def load_source(path: Path) -> tuple[str, pd.DataFrame, dict]:
    """What the directory is, its cells, and the comparison settings (a study's, else the defaults)."""
    if (path / "study.yaml").is_file():
        study, _ = load_study(path / "study.yaml")
        return f"study {study.name}", study_cells(path), study.comparison.model_dump()
    if not (path / "scenario.yaml").is_file():
        raise UserError(f"{path}: not a run, arms or study directory (no scenario.yaml or study.yaml)")
    sc = load_scenario(path / "scenario.yaml")
    if sc.arms is not None:
        entries = [analysis.cell_entry(a, path / a, {"arm": a})
                   for a in sc.arms if (path / a / "scenario.yaml").is_file()]
        if not entries:
            raise UserError(f"{path}: no arm of this scenario has started yet")
        return f"arms of {sc.name}", analysis.cells_frame(entries), ComparisonConfig().model_dump()
    if not (path / "rounds").is_dir():
        raise UserError(f"{path}: the run has not finished a round yet (no rounds table)")
    return f"run {path.name}", analysis.cells_frame([analysis.cell_entry(path.name, path, {})]), \
        ComparisonConfig().model_dump()


def matched_section(matched: pd.DataFrame, cmp: dict) -> list[str]:
    """The report's matched-utility section: text and table."""
    out = [f"## Matched-utility comparison (utility {cmp['utility']} = {cmp['target_accuracy']:g})", "",
           "Privacy of each defence at the target utility, interpolated along each seed's privacy-utility curve "
           "(its knob settings), then averaged over seeds with a 95 % t-interval. A defence whose curve does not "
           "span the target in a seed is not interpolated there (`seeds reached`); nothing is extrapolated. "
           "The undefended reference has no knob: its own utility is shown. Worst attack per cell; victims from "
           "training populations. The last column is the proposed defence's change against the most private "
           "baseline at the target, paired by seed (the seed paper's quantity).", ""]
    present = set(matched["defence"])
    missing = [d for d in [cmp["proposed"], *cmp["baselines"]] if d not in present]
    if missing:
        out += [f"Not in these runs, so not compared: {', '.join(missing)} (`comparison.proposed` / "
                "`comparison.baselines` name defence kinds).", ""]
    for context, ctx in matched.groupby("context", sort=False):
        if context != "all":
            out += [f"### Context {context}", ""]
        rows = []
        for (knowledge, defence), g in ctx.groupby(["knowledge", "defence"], sort=False):
            g = g.set_index("metric")
            first = g.iloc[0]
            lo, hi = first["utility_range"]
            cells = [knowledge, defence, f"{fmt(first['utility'])} (measured {fmt(lo)}–{fmt(hi)})"]
            for metric in ("attacker_acc", "mse", "psnr", "ssim"):
                r = g.loc[metric]
                cells.append(fmt_interval(r["value"], r["low"], r["high"], DIGITS[metric]))
            cells.append(f"{int(first['seeds_reached'])}/{int(first['seeds'])}")
            rel = []
            for metric in ("attacker_acc", "mse"):
                r = g.loc[metric]
                if not pd.isna(r["relative_change"]):
                    how = "" if r["relative_paired"] else " (unpaired: no seed where both reached)"
                    change = fmt_interval(r["relative_change"], r["relative_low"], r["relative_high"], 1)
                    rel.append(f"{metric} {change} % vs {r['baseline']}{how}")
            cells.append("; ".join(rel) or "–")
            rows.append(cells)
        out += table(["attacker", "defence", "utility", "attacker acc", "MSE", "PSNR (dB)", "SSIM", "seeds reached",
                      "relative change vs best baseline"], rows) + [""]
    return out


def searched_section(done: pd.DataFrame, metrics: pd.DataFrame, outcomes: pd.DataFrame, cmp: dict) -> list[str]:
    """The report's comparison at the searched utility: achieved utility, worst attacks, guesses, paired changes."""
    kind, target = cmp["utility"], cmp["target_accuracy"]
    utilities = done[["cell", "defence", "setting", "context", "seed"]].assign(
        utility=analysis.utility(done, metrics, kind).to_numpy())
    images = matched.image_rows(done)
    table_, best = matched.compare(images, utilities, outcomes, cmp["proposed"], cmp["baselines"],
                                   cmp.get("best_baseline"))
    excluded = outcomes[outcomes["status"] == "unreachable"]
    out = [f"## Matched-utility comparison (searched: utility {kind} = {target:g})", "",
           "Each searched defence's knob was moved until the cell's utility was within the tolerance of the "
           "target (probe runs without attacks, `search.parquet`); each cell then ran at that setting, with "
           "attacks. Every seed is kept; `search` counts the seeds by how their search ended (matched: within "
           "tolerance; nearest: budget spent, closest probe; at_bracket_end: the target held at the most private "
           "end; grid: not searched). Privacy: the worst (attack, knowledge) per defence on each metric, pooled "
           "over seeds, with a 95 % cluster-bootstrap interval over (seed, round, client). The image-free guesses "
           "(the class-mean image of the victim's label; the global mean image) are scored on the same images: "
           "a defence protects only where attacks fall to them. `nn_match`: the share of reconstructions whose "
           "nearest image (pixels) among the victim's batch and same-label server images seen through the "
           "victim's device is its own original: instance identification, which no class-level guess gives "
           "(chance: the mean of 1 / pool size).", ""]
    if best is None:
        out += ["No baseline reached the target: no paired difference to report.", ""]
    else:
        how = ("named by `comparison.best_baseline`" if cmp.get("best_baseline") else
               "the baseline with the lowest worst-case attacker accuracy at the target, fixed before any paired "
               "difference, the same for every metric")
        out += [f"Best baseline: **{best}** ({how}). Paired difference: defence minus {best} on the same images "
                "(each at its worst attack), and the relative change of the means in %.", ""]
    if len(excluded):
        names = ", ".join(f"{r.cell} ({r.level})" for r in excluded.itertuples())
        out += [f"**Excluded: cannot reach the target utility {target:g} even at the least private end of the "
                f"search bracket: {names}.** These are not compared below.", ""]
    for context, ctx in table_.groupby("context", sort=False) if len(table_) else []:
        if context != "all":
            out += [f"### Context {context}", ""]
        rows = []
        for r in ctx.itertuples():
            digits = DIGITS[r.metric]
            paired = ("–" if pd.isna(r.diff) else
                      f"{fmt_interval(r.diff, r.diff_low, r.diff_high, digits)}; "
                      f"{fmt_interval(r.rel, r.rel_low, r.rel_high, 1)} % ({r.paired_images} images)")
            metric = r.metric if pd.isna(r.chance) else f"{r.metric} (chance {fmt(r.chance, 3)})"
            rows.append([r.setting, f"{fmt(r.utility)} ({fmt(r.utility_min)}–{fmt(r.utility_max)})", r.search,
                         metric, f"{r.attack} ({r.knowledge})", fmt_interval(r.value, r.low, r.high, digits),
                         f"{r.images} / {r.seeds}", fmt(r.class_mean, digits), fmt(r.mean_image, digits), paired])
        out += table(["defence", f"achieved utility (target {target:g})", "search", "metric", "worst attack",
                      "value [95 % cluster bootstrap]", "images / seeds", "class-mean guess", "mean-image guess",
                      "paired vs best baseline: diff; relative change"], rows) + [""]
    rounds = matched.by_round(images)
    if len(rounds):
        per_round = analysis.utility_by_round(metrics, kind).merge(
            utilities[["cell", "context", "setting"]], on="cell").groupby(["context", "setting", "round"])["value"]
        util_at = per_round.mean().to_dict()
        out += ["### Privacy per attacked round", "",
                "Early rounds apart from the pool: the same worst attack per defence, per round, beside the "
                f"class-mean guess on the same images, and the utility ({kind}) of the model after that round, "
                "mean over seeds (– where that round was not evaluated: `evaluation.every`).", ""]
        rows = [[r.context, r.setting, r.metric, str(r.round), fmt(util_at.get((r.context, r.setting, r.round))),
                 f"{r.attack} ({r.knowledge})", fmt_interval(r.value, r.low, r.high, DIGITS[r.metric]),
                 str(r.images), fmt(r.class_mean, DIGITS[r.metric])] for r in rounds.itertuples()]
        out += table(["context", "defence", "metric", "round", "utility after it", "worst attack", "value", "images",
                      "class-mean guess"], rows) + [""]
    if len(outcomes):
        rows = [[r.cell, r.level, r.status, r.knob, fmt(r.value, 4), fmt(r.utility), r.tuned, str(r.probes)]
                for r in outcomes.itertuples()]
        out += ["### Searches", ""] + table(["cell", "level", "status", "knob", "value", "probe utility", "tuned",
                                             "probes"], rows) + [""]
    return out


def _images(title: str, pngs: dict[str, Path | None]) -> list[str]:
    """Markdown for one figure per context (``all`` when the study has no context axis)."""
    out = []
    for context, png in pngs.items():
        if png is not None:
            out += [f"![{title}{'' if context == 'all' else f' ({context})'}]({png.parent.name}/{png.name})", ""]
    return out


def per_context(frame: pd.DataFrame, fig_dir: Path, stem: str, draw) -> dict[str, Path | None]:
    """``draw(frame of one context, path)`` per context: contexts (e.g. population splits) are never pooled."""
    if frame.empty:
        return {}
    return {context: draw(g, fig_dir / (f"{stem}.png" if context == "all" else f"{stem}_{context}.png"))
            for context, g in frame.groupby("context", sort=False)}


def curve_section(curve: pd.DataFrame, pngs: dict[str, Path | None], cmp: dict) -> list[str]:
    """The report's privacy-utility section: figures and the points behind them."""
    out = ["## Privacy-utility curves", ""] + _images("privacy-utility curves", pngs)
    rows = []
    for r in curve[curve["metric"].isin(["attacker_acc", "mse", "psnr"])].itertuples():
        rows.append([r.context, r.defence, r.setting, str(r.seeds),
                     fmt_interval(r.utility, r.utility_low, r.utility_high), r.knowledge, r.metric,
                     fmt_interval(r.value, r.low, r.high, DIGITS[r.metric])])
    return out + table(["context", "defence", "setting", "seeds", f"utility ({cmp['utility']})", "attacker", "metric",
                        "value"], rows) + [""]


def round_section(frame: pd.DataFrame, pngs: dict[str, Path | None]) -> list[str]:
    """The report's attack-by-round section: figures and table."""
    out = ["## Attack success by round", "",
           "Each defence at its operating point (the setting nearest the target utility). Early rounds leak most.", ""]
    out += _images("attack by round", pngs)
    rows = [[r.context, r.defence, r.setting, r.knowledge, r.metric, str(r.round),
             fmt_interval(r.value, r.low, r.high, DIGITS[r.metric]), r.interval]
            for r in frame.itertuples()] if len(frame) else []
    return out + table(["context", "defence", "setting", "attacker", "metric", "round", "value", "interval over"],
                       rows) + [""]


def population_section(frame: pd.DataFrame, pngs: dict[str, Path | None], gaps: pd.DataFrame) -> list[str]:
    """The report's per-population section: figures, table and generalisation gaps."""
    out = ["## Populations", "",
           "Per population at each defence's operating point. Held-out populations never train; their attack "
           "figures come from held-out clients probed as if they joined (`attacks.held_out_victims`). Intervals are "
           "over seeds, or with one seed the run's own (over clients or images).", ""]
    out += _images("populations", pngs)
    rows = [[r.context, r.defence, r.setting, r.population, "yes" if r.held_out else "no", r.metric,
             fmt_interval(r.value, r.low, r.high), r.interval] for r in frame.itertuples()] if len(frame) else []
    out += table(["context", "defence", "setting", "population", "held out", "metric", "value", "interval over"],
                 rows) + [""]
    out += ["### Generalization gap (training populations minus held-out populations)", ""]
    if gaps.empty:
        return out + ["No held-out population in these runs: no gap to measure.", ""]
    rows = [[r.context, r.defence, r.setting, r.metric, fmt(r.training), fmt(r.held_out),
             fmt_interval(r.gap, r.gap_low, r.gap_high), str(r.seeds)] for r in gaps.itertuples()]
    return out + table(["context", "defence", "setting", "metric", "training", "held out", "gap [95 % over seeds]",
                        "seeds"], rows) + [""]


def reconstruction_png(run_dir: Path) -> tuple[str, Path] | None:
    """The earliest round's saved grid, from the strongest attacker there is (adaptive first)."""
    found: dict[str, list[tuple[int, int, Path]]] = {}
    for png in sorted((run_dir / "reconstructions").glob("round*_client*.png")):
        m = re.fullmatch(r"round(\d+)_(.+)_client(\d+)\.png", png.name)
        if m:
            found.setdefault(m.group(2), []).append((int(m.group(1)), int(m.group(3)), png))
    for kind in [f"{a}_adaptive" for a in PREFERRED_ATTACKS] + list(PREFERRED_ATTACKS) + sorted(found):
        if kind in found:
            r, _, png = min(found[kind])
            return f"{kind}, round {r}", png
    return None


def write_report(path: Path, target: float | None = None, utility_kind: str | None = None) -> Path:
    """Write ``report.md`` and ``figures/`` into ``path``; returns the report's path."""
    path = Path(path)
    title, cells, cmp = load_source(path)
    if target is not None:
        cmp["target_accuracy"] = target
    if utility_kind is not None:
        cmp["utility"] = utility_kind
    done = cells[cells["status"] == "finished"].reset_index(drop=True)
    lines = [f"# Report: {title}", "", f"Source: `{path}`. Cells: {len(cells)}, finished: {len(done)}.", ""]
    unfinished = cells[cells["status"] != "finished"]
    if len(unfinished):
        lines += [f"Not finished (left out below): {', '.join(unfinished['cell'])}.", ""]
    if done.empty:
        raise UserError(f"{path}: no finished run to report on yet")
    metrics = analysis.study_metrics(done)
    fig_dir = path / "figures"
    target, kind = cmp["target_accuracy"], cmp["utility"]
    has_attacks = metrics["attack"].notna().any()
    points = analysis.operating_points(done, metrics, target, kind)
    outcomes = search_outcomes(path)
    if has_attacks:
        swept = done[done["defence"] != "none"].groupby(["context", "defence"])["setting"].nunique()
        if len(outcomes):  # each defence at its searched setting: nothing to interpolate; grids stay for curves
            lines += searched_section(done, metrics, outcomes, cmp)
        elif (swept > 1).any():
            matched = analysis.matched_utility(done, metrics, target, kind, cmp["proposed"], cmp["baselines"])
            lines += matched_section(matched, cmp)
        else:
            lines += ["## Matched-utility comparison", "",
                      "No defence is swept over its knob here (one setting per defence), so there is no "
                      "privacy-utility curve to interpolate at a matched utility; see the tables below for each "
                      "setting's own utility and privacy.", ""]
        curve = analysis.curves(done, metrics, kind)
        lines += curve_section(curve, per_context(
            curve, fig_dir, "privacy_utility", lambda g, path: figures.privacy_utility(g, target, kind, path)), cmp)
        rounds = analysis.attack_by_round(done, metrics, points)
        lines += round_section(rounds, per_context(rounds, fig_dir, "attack_by_round", figures.attack_by_round))
    else:
        lines += ["No attacks in these runs: no privacy figures (set `attacks:` in the scenario).", ""]
    pops = analysis.by_population(done, metrics, points)
    pngs = per_context(pops, fig_dir, "populations", lambda g, path: figures.population_bars(
        g, path, f"Per population ({g['context'].iloc[0]}), 95 % intervals"))
    lines += population_section(pops, pngs, analysis.population_gaps(done, metrics))
    if has_attacks:
        lines += reconstruction_section(done, points, fig_dir)
    lines += cells_section(cells, metrics, kind)
    report = path / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def reconstruction_section(done: pd.DataFrame, points: pd.DataFrame, fig_dir: Path) -> list[str]:
    """The report's reconstructions: one grid per defence operating point, from its first seed's cell."""
    items, rows = [], []
    for p in points.itertuples():
        mine = done[(done["context"] == p.context) & (done["defence"] == p.defence) & (done["setting"] == p.setting)]
        first = mine.sort_values("seed").iloc[0]
        found = reconstruction_png(Path(first["run_dir"]))
        if found is None:
            continue
        what, png = found
        items.append((f"{p.defence} ({p.setting}, {p.context}) · {what} · cell {first['cell']}", png))
        rows.append([p.context, p.defence, p.setting, first["cell"], what, f"`{png}`"])
    out = ["## Example reconstructions", ""]
    grid = figures.reconstruction_grid(items, fig_dir / "reconstructions.png")
    if grid is not None:
        out += [f"![reconstructions]({grid.parent.name}/{grid.name})", ""]
    return out + table(["context", "defence", "setting", "cell", "attack", "file"], rows) + [""]


def cells_section(cells: pd.DataFrame, metrics: pd.DataFrame, kind: str) -> list[str]:
    """The report's table of every cell: status, setting, utility, test accuracy, ε and knobs."""
    util = dict(zip(cells["cell"], analysis.utility(cells, metrics, kind))) if len(metrics) else {}
    test = analysis.final_values(metrics, "test_accuracy") if len(metrics) else pd.DataFrame(columns=["cell", "value"])
    test = dict(zip(test["cell"], test["value"]))
    eps = analysis.final_values(metrics, "dp_epsilon_max") if len(metrics) else pd.DataFrame(columns=["cell", "value"])
    eps = dict(zip(eps["cell"], eps["value"]))
    sigma = analysis.final_values(metrics, "sigma_mean") if len(metrics) else pd.DataFrame(columns=["cell", "value"])
    sigma = dict(zip(sigma["cell"], sigma["value"]))
    rows = [[r.cell, r.status, r.defence, r.setting, r.context, str(r.seed), fmt(util.get(r.cell, np.nan)),
             fmt(test.get(r.cell, np.nan)), fmt(eps.get(r.cell, np.nan), 2), fmt(sigma.get(r.cell, np.nan), 3),
             _verdict(metrics, r.cell), f"`{r.knobs}`"]
            for r in cells.itertuples()]
    return ["## Cells", ""] + table(["cell", "status", "defence", "setting", "context", "seed", f"utility ({kind})",
                                     "test acc", "ε (max)", "σ (latent, final mean)",
                                     "worst attack (attacker acc; PSNR)", "knobs"], rows) + [""]


def _verdict(metrics: pd.DataFrame, cell: str) -> str:
    """A cell's worst case: the attack (and knowledge) leaking most on attacker accuracy and on PSNR."""
    mine = metrics[metrics["cell"] == cell] if len(metrics) else metrics
    parts = []
    for metric, digits in (("attacker_acc", 3), ("psnr", 2)):
        found = analysis.worst_attack(mine, metric) if len(mine) else None
        if found is not None:
            parts.append(f"{fmt(found[0], digits)} {found[1]} ({found[2]})")
    return "; ".join(parts) or "–"


def headline(report: str) -> str:
    """The report's matched-utility comparison table (empty if it has none)."""
    if "## Matched-utility comparison (" not in report:
        return ""
    return report.split("## Matched-utility comparison")[1].split("\n## ")[0].split("\n\n", 2)[-1].strip()


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for a user error, reported in one line)."""
    p = argparse.ArgumentParser(prog="python -m simfl.report", description=__doc__.splitlines()[0])
    p.add_argument("directory", help="a run, a scenario's arms, or a study directory")
    p.add_argument("--target", type=float, help="utility to match defences at (default: the study's, else 0.9)")
    p.add_argument("--utility", choices=sorted(analysis.UTILITY_METRIC), help="which accuracy is the utility")
    p.add_argument("--compare", metavar="OTHER_DIR",
                   help="write nothing: list every result that differs from OTHER_DIR's (a re-run of the same "
                        "scenario or study); exit 1 if any does")
    p.add_argument("--profile", action="store_true",
                   help="write nothing: print where a study's time went (probes kept and not, cells, attacks)")
    args = p.parse_args(argv)
    try:
        if args.target is not None and not 0 < args.target < 1:
            raise UserError(f"--target {args.target}: a utility lies strictly between 0 and 1")
        path = Path(args.directory)
        for d in (path, *([Path(args.compare)] if args.compare else [])):
            if not d.is_dir():
                raise UserError(f"{d}: no such directory")
        if args.compare:
            return _print_differences(path, Path(args.compare))
        if args.profile:
            print(profile(path), end="")
            return 0
        report = write_report(path, args.target, args.utility)
    except UserError as exc:
        print(f"simfl: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"simfl: report written to {report}")
    return 0


def _print_differences(path: Path, other: Path) -> int:
    found = differences(path, other)
    for line in found:
        print(line)
    records = [next(iter(sorted(d.rglob("environment.json"))), None) for d in (path, other)]
    if found and all(records):
        for line in mismatches(*(json.loads(r.read_text()) for r in records if r is not None)):
            print(f"made elsewhere: {line}")
    print(f"simfl: {len(found)} difference(s) between {path} and {other}" if found
          else f"simfl: {path} reproduces {other}: every table, final weights and report.md identical")
    return 1 if found else 0
