"""Numbers as markdown: how every table simfl writes (arms summary, report) prints a figure.

One rule for a missing value (–), for a value with its interval and for a
table's layout, so the summary printed after a run and the report read alike.
"""

from __future__ import annotations

import pandas as pd

# Decimals of each privacy metric in the report's tables and the worst-case summary.
DIGITS = {"attacker_acc": 3, "mse": 4, "psnr": 2, "ssim": 3, "nn_match": 3}


def fmt(value: float | None, digits: int = 3) -> str:
    """A number to ``digits`` decimals; – where there is none (None or NaN)."""
    return "–" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def fmt_interval(value: float, low: float, high: float, digits: int = 3) -> str:
    """``value [low, high]``; the value alone where there is no interval (e.g. one seed)."""
    if pd.isna(value):
        return "–"
    if pd.isna(low):
        return fmt(value, digits)
    return f"{fmt(value, digits)} [{fmt(low, digits)}, {fmt(high, digits)}]"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
