"""Unit tests of simfl.results.markdown: how a figure, its interval and a table are printed."""

from __future__ import annotations

import numpy as np

from simfl.results.markdown import fmt, fmt_interval, table


def test_fmt_rounds_and_marks_missing_values():
    assert fmt(0.65749) == "0.657"
    assert fmt(130.347, 2) == "130.35"
    assert fmt(None) == fmt(np.nan) == fmt(float("nan"), 2) == "–"


def test_fmt_interval_gives_the_value_alone_without_an_interval():
    assert fmt_interval(0.125, 0.0435, 0.3136, 2) == "0.12 [0.04, 0.31]"
    assert fmt_interval(0.42, np.nan, np.nan) == "0.420"
    assert fmt_interval(np.nan, 0.1, 0.2) == "–"


def test_table_layout():
    assert table(["a", "b"], [["1", "2"], ["3", "4"]]) == ["| a | b |", "|---|---|", "| 1 | 2 |", "| 3 | 4 |"]
    assert table(["a"], []) == ["| a |", "|---|"]
