"""Two runs or two studies compared result by result: does a re-run reproduce?

Why: a privacy verdict that moves when it is re-run cannot be cited (issue 28).
A run directory keeps every result in its Parquet tables, its final weights and,
for a study, its ``report.md``; two runs of one scenario and seed must agree on
all of them, exactly, whatever the number of actors or CPUs and however a
study's cells were packed. What may differ is how it was executed
(:data:`~simfl.engine.run_tables.EXECUTION_COLUMNS`: wall times, which node
and actor trained a client, attempts after a lost actor) and where each
directory lies (``run_dir``, paths in the report). Rows are compared as sets
(attack results arrive in the order attacker actors finish), floats bit for
bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from simfl.engine.run_tables import EXECUTION_COLUMNS

# Where the directory was (a study's cell table), on top of how the run was executed.
IGNORED_COLUMNS = EXECUTION_COLUMNS | {"run_dir"}


def differences(a: Path | str, b: Path | str) -> list[str]:
    """Every way the results in directories ``a`` and ``b`` (runs or studies) differ; empty when they reproduce."""
    a, b = Path(a), Path(b)
    found: list[str] = []
    ta, tb = _tables(a), _tables(b)
    found += [f"{name}: only in {a}" for name in sorted(ta.keys() - tb.keys())]
    found += [f"{name}: only in {b}" for name in sorted(tb.keys() - ta.keys())]
    for name in sorted(ta.keys() & tb.keys()):
        found += _table_differences(name, _read(ta[name]), _read(tb[name]))
    wa = {p.relative_to(a) for p in a.rglob("final_weights.pt")}
    wb = {p.relative_to(b) for p in b.rglob("final_weights.pt")}
    found += [f"{p}: only in one directory" for p in sorted(wa ^ wb)]
    for rel in sorted(wa & wb):
        sa, sb = (torch.load(d / rel, weights_only=True) for d in (a, b))
        if sa.keys() != sb.keys() or any(not torch.equal(sa[k], sb[k]) for k in sa):
            found.append(f"{rel}: weights differ")
    ra, rb = a / "report.md", b / "report.md"
    if ra.exists() and rb.exists():
        if ra.read_text().replace(str(a), "<dir>") != rb.read_text().replace(str(b), "<dir>"):
            found.append("report.md: differs")
    elif ra.exists() or rb.exists():
        found.append("report.md: only in one directory")
    return found


def _tables(root: Path) -> dict[str, list[Path]]:
    """Table name (path relative to ``root``; a directory of part files is one table) -> its files."""
    tables: dict[str, list[Path]] = {}
    for f in sorted(root.rglob("*.parquet")):
        name = f.parent.relative_to(root) if f.name.startswith("part-") else f.relative_to(root)
        tables.setdefault(str(name), []).append(f)
    return tables


def _read(files: Iterable[Path]) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


def _key(value: object) -> object:
    """A value as something exact and orderable: floats by their bits (NaN equal to NaN), lists element-wise."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else value.hex()
    if isinstance(value, list | tuple):
        return repr([_key(v) for v in value])
    if isinstance(value, dict):
        return repr(sorted((k, _key(v)) for k, v in value.items()))
    return repr(value)


def _table_differences(name: str, ta: pa.Table, tb: pa.Table) -> list[str]:
    cols = [c for c in ta.column_names if c not in IGNORED_COLUMNS]
    if cols != [c for c in tb.column_names if c not in IGNORED_COLUMNS]:
        return [f"{name}: columns differ"]
    if ta.num_rows != tb.num_rows:
        return [f"{name}: {ta.num_rows} rows against {tb.num_rows}"]
    rows_a, rows_b = ([[_key(v) for v in col.to_pylist()] for col in t.select(cols).columns] for t in (ta, tb))
    sorted_a, sorted_b = sorted(zip(*rows_a, strict=True)), sorted(zip(*rows_b, strict=True))
    if sorted_a == sorted_b:
        return []
    row_a, row_b = next((x, y) for x, y in zip(sorted_a, sorted_b, strict=True) if x != y)
    changed = [c for c, x, y in zip(cols, row_a, row_b, strict=True) if x != y]
    return [f"{name}: rows differ (first in columns {', '.join(changed)})"]
