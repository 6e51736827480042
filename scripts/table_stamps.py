"""The stamps of the measured tables under docs/tables/, and the rule that says which tables are stale.

A measured table is only true of the code it measured. Each table file carries
that code's commit and paths in its front matter::

    ---
    title: Engine against the parallel plain-loop limit
    commit: 5c24289
    command: python benchmarks/engine.py
    date: 2026-12-06
    machine: 2-core development machine (CPU)
    measures: [benchmarks/engine.py, simfl/engine, simfl/simulation]
    note: optional: what the table predates
    ---
    | the | table |

A table is **stale** when a file under its ``measures`` paths differs between
its stamp's commit and ``HEAD``. Renames and copies are followed (``git diff
-M30% -C30%``: a file moved into a measured path is compared with where it came
from), and a Python file counts as changed only if it holds code its old
version did not: each top-level statement is compared by its syntax tree
without import statements, docstrings and comments (``ast.dump``, no line
numbers), and the file is unchanged when every statement it has now is among
its old version's. Moving modules between packages rewrote their import lines
and the module paths their docstrings name, and split a few modules in two
(``simfl/run.py`` became the command line over ``simfl/simulation/runner.py``):
none of that changes what a statement computes. A YAML file counts as changed
when what it loads to changed (comments are free); any other file when any
non-blank line changed. A file added to a measured path is compared with an
empty file (a package's docstring-only ``__init__.py`` does not count); a file
deleted from one counts. A stamp whose commit git does not know is stale on
every path it measures.

Standard library, PyYAML and git, so the docs hook (``docs/hooks.py``) loads it
without importing simfl; ``scripts/docs_tables.py`` is its command line.
"""

from __future__ import annotations

import ast
import subprocess
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TABLES = ROOT / "docs" / "tables"
STAMP_KEYS = ("title", "commit", "command", "date", "machine", "measures", "note")
REQUIRED = ("commit", "command", "date", "machine", "measures")


@dataclass(frozen=True)
class Table:
    """One measured table: its file, its stamp (front matter) and its markdown body."""

    path: Path
    stamp: dict = field(hash=False)
    body: str

    @property
    def name(self) -> str:
        """The name guides include it by: the file name without ``.md``."""
        return self.path.stem


def read_table(path: Path) -> Table:
    """Parse a table file; a missing or incomplete stamp is a ``ValueError`` naming the file."""
    text = Path(path).read_text()
    _, sep, rest = text.partition("---\n")
    front, sep2, body = rest.partition("\n---\n")
    if not text.startswith("---\n") or not sep or not sep2:
        raise ValueError(f"{path}: no stamp (front matter between '---' lines)")
    stamp = yaml.safe_load(front) or {}
    missing = [key for key in REQUIRED if not stamp.get(key)]
    unknown = sorted(set(stamp) - set(STAMP_KEYS))
    if missing or unknown:
        raise ValueError(f"{path}: stamp lacks {missing}" if missing else f"{path}: unknown stamp keys {unknown}")
    stamp["commit"] = str(stamp["commit"])
    stamp["date"] = str(stamp["date"])
    if isinstance(stamp["measures"], str):
        stamp["measures"] = [stamp["measures"]]
    return Table(Path(path), stamp, body.strip("\n") + "\n")


def table_text(stamp: dict, body: str) -> str:
    """A table file's text: the stamp as front matter (keys in a fixed order), then the body."""
    ordered = {key: stamp[key] for key in STAMP_KEYS if stamp.get(key) is not None}
    front = yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True, width=10_000, default_flow_style=None)
    return f"---\n{front}---\n{body.strip(chr(10))}\n"


def read_tables(directory: Path = TABLES) -> list[Table]:
    """Every table file of ``directory``, by name."""
    return [read_table(path) for path in sorted(Path(directory).glob("*.md"))]


def git(repo: Path, *args: str) -> str:
    """Run git in ``repo``; its stdout (a failure raises ``CalledProcessError``)."""
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          errors="replace").stdout


# Whether the file at one REV:PATH changed against another, remembered across tables (the pairs recur).
_differs: dict[tuple[Path, str | None, str], bool] = {}


def blobs(repo: Path, specs: list[str]) -> dict[str, str]:
    """The text of each ``REV:PATH`` in ``specs``, read by one ``git cat-file --batch``."""
    out = subprocess.run(["git", "-C", str(repo), "cat-file", "--batch"], check=True, capture_output=True,
                         input="".join(f"{spec}\n" for spec in specs).encode()).stdout
    texts, at = {}, 0
    for spec in specs:
        header_end = out.index(b"\n", at)
        header = out[at:header_end].split()
        if header[-1] == b"missing":
            raise ValueError(f"git has no {spec}")
        size = int(header[2])
        texts[spec] = out[header_end + 1:header_end + 1 + size].decode(errors="replace")
        at = header_end + 1 + size + 1
    return texts


@cache
def _changes(repo: Path, commit: str, head: str) -> tuple[tuple[str, str | None, str | None], ...]:
    """(status letter, old path, new path) of every file that differs between the two commits."""
    out = git(repo, "diff", "--name-status", "-z", "-M30%", "-C30%", commit, head)
    fields, changes = out.split("\0"), []
    i = 0
    while i < len(fields) - 1:
        status = fields[i][0]
        if status in "RC":
            changes.append((status, fields[i + 1], fields[i + 2]))
            i += 3
        else:
            path = fields[i + 1]
            changes.append((status, None if status == "A" else path, None if status == "D" else path))
            i += 2
    return tuple(changes)


def _is_docstring(node: ast.AST) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def statements(text: str, path: str) -> list[str] | None:
    """A Python file's top-level statements as syntax trees without imports, docstrings and comments;
    None for any other file (or one that does not parse)."""
    if not path.endswith(".py"):
        return None
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            node.body = [n for n in body if not isinstance(n, ast.Import | ast.ImportFrom) and not _is_docstring(n)]
    return [ast.dump(statement) for statement in tree.body]


def differs(before: str, after: str, path: str) -> bool:
    """Whether ``after`` changed what ``before`` computes, by the rule of this module's docstring."""
    old, new = statements(before, path), statements(after, path)
    if old is not None and new is not None:
        return not set(new) <= set(old)
    if path.endswith((".yaml", ".yml")):
        try:
            return yaml.safe_load(before) != yaml.safe_load(after)
        except yaml.YAMLError:
            pass
    lines = [[line.rstrip() for line in text.splitlines() if line.strip()] for text in (before, after)]
    return lines[0] != lines[1]


def under(path: str, measures: list[str]) -> bool:
    """Whether ``path`` is one of ``measures`` or inside one of them."""
    return any(path == m.rstrip("/") or path.startswith(m.rstrip("/") + "/") for m in measures)


def known(repo: Path, commit: str) -> bool:
    """Whether git knows ``commit``."""
    try:
        git(repo, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    except subprocess.CalledProcessError:
        return False
    return True


def changed_paths(repo: Path, commit: str, measures: list[str], head: str = "HEAD") -> list[str]:
    """The measured files changed since ``commit`` by the rule above (current paths; deleted ones by old path)."""
    repo = Path(repo).resolve()
    if not known(repo, commit):
        return list(measures)
    # Remembered work is keyed by commit ids, never by a name such as HEAD that moves.
    commit, head = (git(repo, "rev-parse", f"{rev}^{{commit}}").strip() for rev in (commit, head))
    changed, pairs = [], []
    for _, old, new in _changes(repo, commit, head):
        if new is None:
            if old is not None and under(old, measures):
                changed.append(old)  # deleted from a measured path
        elif under(new, measures):
            pairs.append((None if old is None else f"{commit}:{old}", f"{head}:{new}", new))
    todo = [(before, after, new) for before, after, new in pairs if (repo, before, after) not in _differs]
    texts = blobs(repo, [spec for before, after, _ in todo for spec in (before, after) if spec is not None])
    for before, after, new in todo:
        _differs[repo, before, after] = differs("" if before is None else texts[before], texts[after], new)
    changed += [new for before, after, new in pairs if _differs[repo, before, after]]
    return sorted(changed)


def stale(repo: Path = ROOT, directory: Path = TABLES) -> list[tuple[Table, list[str]]]:
    """Every stale table of ``directory`` with the measured files changed since its stamp."""
    found = []
    for table in read_tables(directory):
        paths = changed_paths(repo, table.stamp["commit"], table.stamp["measures"])
        if paths:
            found.append((table, paths))
    return found
