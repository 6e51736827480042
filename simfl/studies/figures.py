"""The report's figures, drawn with matplotlib from the frames of :mod:`simfl.results.analysis`.

Each function draws one PNG and returns its path, or None when it has nothing
to show: a figure is never written with an empty panel.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from simfl.engine.knowledge import naive_first  # noqa: E402

LABELS = {
    "attacker_acc": "attacker accuracy (worst attack)",
    "mse": "reconstruction MSE (worst attack)",
    "psnr": "reconstruction PSNR, dB (worst attack)",
    "ssim": "reconstruction SSIM (worst attack)",
    "local_val_accuracy": "accuracy on clients' validation data",
    "test_accuracy": "accuracy on the population's test set",
    "client_val": "client accuracy (validation data of training clients)",
    "test": "test accuracy (global test split)",
}
COLOURS = {"none": "#555555", "dpsgd": "#1f77b4", "bido": "#ff7f0e", "latent": "#2ca02c"}
MARKERS = {"none": "*", "dpsgd": "s", "bido": "^", "latent": "o"}


def label(name: str) -> str:
    """Axis label for a metric name (``metric`` or ``metric:knowledge``)."""
    metric, _, knowledge = name.partition(":")
    text = LABELS.get(metric, metric)
    return f"{text}, {knowledge} attacker" if knowledge else text


def _colour(defence: str) -> str:
    return COLOURS.get(defence, "#9467bd")


def _err(values: pd.Series, low: pd.Series, high: pd.Series) -> np.ndarray | None:
    lo, hi = (values - low).to_numpy(dtype=float), (high - values).to_numpy(dtype=float)
    if np.all(np.isnan(lo)):
        return None
    # An interval that misses its value (a clipped bound) must not turn into a negative bar.
    return np.maximum(np.vstack([np.nan_to_num(lo), np.nan_to_num(hi)]), 0.0)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _context(frame: pd.DataFrame) -> str:
    """`` · out-a``-style title suffix for a figure of one context; empty without a context axis."""
    contexts = set(frame["context"]) if "context" in frame else {"all"}
    return "" if contexts == {"all"} else f" · {', '.join(sorted(contexts))}"


def _grid(frame: pd.DataFrame, rows: list[str], height: float, draw, title: str, path: Path) -> Path:
    """A panel per metric (rows) and attacker knowledge (columns); ``draw(ax, metric, panel data)`` fills each."""
    cols = naive_first(frame["knowledge"])  # as in the tables
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(5.2 * len(cols), height * len(rows)), squeeze=False)
    for i, metric in enumerate(rows):
        for j, knowledge in enumerate(cols):
            ax = axes[i][j]
            draw(ax, metric, frame[(frame["metric"] == metric) & (frame["knowledge"] == knowledge)])
            ax.set_ylabel(label(metric))
            ax.set_title(f"{knowledge} attacker")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title + _context(frame))
    return _save(fig, path)


def privacy_utility(curve: pd.DataFrame, target: float, utility_kind: str, path: Path,
                    metrics: tuple[str, ...] = ("attacker_acc", "mse")) -> Path | None:
    """One panel per privacy metric x attacker knowledge; a line per defence through its settings."""
    curve = curve[curve["metric"].isin(metrics) & curve["value"].notna() & curve["utility"].notna()]
    if curve.empty:
        return None

    def draw(ax: plt.Axes, metric: str, panel: pd.DataFrame) -> None:
        for defence, g in panel.groupby("defence", sort=False):
            g = g.sort_values("utility")
            ax.errorbar(g["utility"], g["value"], xerr=_err(g["utility"], g["utility_low"], g["utility_high"]),
                        yerr=_err(g["value"], g["low"], g["high"]), marker=MARKERS.get(defence, "D"),
                        markersize=9 if defence == "none" else 6, capsize=3, color=_colour(defence),
                        linestyle="none" if defence == "none" else "-", label=defence)
        ax.axvline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:g}")
        ax.set_xlabel(label(utility_kind))

    rows = [m for m in metrics if (curve["metric"] == m).any()]
    return _grid(curve, rows, 3.8, draw, "Privacy-utility curves (mean over seeds, 95 % intervals)", path)


def attack_by_round(frame: pd.DataFrame, path: Path) -> Path | None:
    """Worst-attack metric against the attacked round, a line per defence at its operating point."""
    frame = frame[frame["value"].notna()] if len(frame) else frame
    if frame.empty:
        return None

    def draw(ax: plt.Axes, metric: str, panel: pd.DataFrame) -> None:
        for (defence, setting), g in panel.groupby(["defence", "setting"], sort=False):
            g = g.sort_values("round")
            ax.plot(g["round"], g["value"], marker=MARKERS.get(defence, "D"), color=_colour(defence),
                    label=setting if setting == defence else f"{defence} ({setting})")
            if g["low"].notna().any():
                ax.fill_between(g["round"], g["low"], g["high"], color=_colour(defence), alpha=0.15)
        ax.set_xlabel("training round attacked")

    return _grid(frame, list(dict.fromkeys(frame["metric"])), 3.6, draw,
                 "Attack success by round (training-population victims; 95 % intervals)", path)


def population_bars(frame: pd.DataFrame, path: Path, title: str) -> Path | None:
    """Grouped bars: a group per population (held-out ones hatched), a bar per defence, one panel per metric."""
    frame = frame[frame["value"].notna()] if len(frame) else frame
    if frame.empty:
        return None
    metrics = list(dict.fromkeys(frame["metric"]))
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols, 4.0 * rows), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.remove()  # no empty panels
    for ax, metric in zip(axes.flat, metrics):
        panel = frame[frame["metric"] == metric]
        pops = list(dict.fromkeys(panel.sort_values(["held_out", "population"])["population"]))
        held = {p: bool(panel[panel["population"] == p]["held_out"].iloc[0]) for p in pops}
        bars = list(dict.fromkeys(zip(panel["defence"], panel["setting"])))
        width = 0.8 / len(bars)
        for k, (defence, setting) in enumerate(bars):
            g = panel[(panel["defence"] == defence) & (panel["setting"] == setting)].set_index("population")
            xs = [i + (k - (len(bars) - 1) / 2) * width for i, p in enumerate(pops) if p in g.index]
            got = [p for p in pops if p in g.index]
            vals = g.loc[got]
            ax.bar(xs, vals["value"], width, color=_colour(defence),
                   hatch=[("//" if held[p] else "") for p in got], edgecolor="black", linewidth=0.5,
                   yerr=_err(vals["value"], vals["low"], vals["high"]), capsize=2,
                   label=setting if setting == defence else f"{defence} ({setting})")
        ax.set_xticks(range(len(pops)))
        ax.set_xticklabels([f"{p}\n(held out)" if held[p] else p for p in pops], fontsize=8)
        ax.set_ylabel(label(metric))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def reconstruction_grid(items: list[tuple[str, Path]], path: Path) -> Path | None:
    """One row per defence: the attack's saved grid of originals (top) above reconstructions (bottom)."""
    items = [(title, png) for title, png in items if png is not None and Path(png).is_file()]
    if not items:
        return None
    fig, axes = plt.subplots(len(items), 1, figsize=(7.5, 2.0 * len(items) + 0.4), squeeze=False)
    for ax, (title, png) in zip(axes[:, 0], items):
        ax.imshow(plt.imread(png), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel("original\nreconstruction", fontsize=8)
    fig.suptitle("Example reconstructions (top: private originals, bottom: attack output)")
    return _save(fig, path)
