"""The docs' machinery: the rule that marks a measured table stale, the script that regenerates one from a run
directory, the hook that shows a stale table as such, and a strict build of the whole site.

The staleness rule is checked on a small git repository made here, commit by
commit, so every case (a move that rewrote imports and docstrings, a split
module, a real change, YAML comments) has a known answer.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from analysis_helpers import SMOKE, make_run, naive_attacks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # docs_tables imports table_stamps as its sibling


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


stamps = load("table_stamps", ROOT / "scripts" / "table_stamps.py")
docs_tables = load("docs_tables", ROOT / "scripts" / "docs_tables.py")
hooks = load("docs_hooks", ROOT / "docs" / "hooks.py")

ORIGINAL = '''\
"""Sums: see :mod:`old.helpers`."""
import math
from old.helpers import twice


def total(xs):
    """Add them up."""
    return sum(xs)


def spread(xs):
    return max(xs) - min(xs) + math.pi * 0
'''


class Repo:
    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True)
        self.git("init", "-q")

    def git(self, *args: str) -> str:
        return subprocess.run(["git", "-C", str(self.path), "-c", "user.name=t", "-c", "user.email=t@t",
                               "-c", "commit.gpgsign=false", *args], check=True, capture_output=True,
                              text=True).stdout.strip()

    def write(self, relative: str, text: str) -> None:
        target = self.path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def commit(self, message: str) -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "--short", "HEAD")


@pytest.fixture
def repo(tmp_path):
    repo = Repo(tmp_path / "repo")
    repo.write("old/sums.py", ORIGINAL)
    repo.write("old/helpers.py", "def twice(x):\n    return 2 * x\n")
    repo.write("scenario.yaml", "rounds: 3  # short\nclients: 4\n")
    repo.write("notes.txt", "unmeasured\n")
    return repo


def test_a_move_that_rewrote_imports_and_docstrings_is_not_a_change(repo):
    measured = repo.commit("measured")
    repo.git("mv", "old", "new")
    text = ORIGINAL.replace("old.helpers", "new.helpers").replace('"""Add them up."""', '"""Add them all up."""')
    repo.write("new/sums.py", text.replace("import math\n", "import math  # for pi\n\n"))
    repo.write("new/__init__.py", '"""The new package: only a docstring."""\n')
    repo.write("notes.txt", "changed, but not measured\n")
    repo.commit("move")
    assert stamps.changed_paths(repo.path, measured, ["new", "scenario.yaml"]) == []


def test_a_split_module_whose_statements_are_all_old_is_not_a_change(repo):
    measured = repo.commit("measured")
    head, _, tail = ORIGINAL.partition("\n\ndef spread")
    repo.write("old/sums.py", head + "\n")
    repo.write("old/spread.py", "import math\n\n\ndef spread" + tail)
    repo.commit("split")
    assert stamps.changed_paths(repo.path, measured, ["old"]) == []


def test_a_code_change_is_stale_and_named(repo):
    measured = repo.commit("measured")
    repo.write("old/sums.py", ORIGINAL.replace("return sum(xs)", "return sum(xs) + 1"))
    repo.write("old/extra.py", "VALUE = 3\n")
    repo.commit("real change")
    assert stamps.changed_paths(repo.path, measured, ["old"]) == ["old/extra.py", "old/sums.py"]
    assert stamps.changed_paths(repo.path, measured, ["old/helpers.py", "notes.txt"]) == []


def test_a_moved_file_with_a_code_change_is_stale(repo):
    measured = repo.commit("measured")
    repo.git("mv", "old/sums.py", "new_sums.py")
    repo.write("new_sums.py", ORIGINAL.replace("max(xs) - min(xs)", "max(xs) - min(xs) + 1"))
    repo.commit("move and change")
    assert stamps.changed_paths(repo.path, measured, ["new_sums.py"]) == ["new_sums.py"]


def test_yaml_counts_by_what_it_loads_and_deletions_count(repo):
    measured = repo.commit("measured")
    repo.write("scenario.yaml", "rounds: 3  # a comment rewritten\nclients: 4\n")
    repo.commit("comment")
    assert stamps.changed_paths(repo.path, measured, ["scenario.yaml"]) == []
    repo.write("scenario.yaml", "rounds: 5\nclients: 4\n")
    (repo.path / "old" / "helpers.py").unlink()
    repo.commit("value and deletion")
    assert stamps.changed_paths(repo.path, measured, ["scenario.yaml", "old"]) == ["old/helpers.py",
                                                                                   "scenario.yaml"]


def test_an_unknown_commit_is_stale_on_every_path(repo):
    repo.commit("measured")
    assert stamps.changed_paths(repo.path, "0123456", ["old", "scenario.yaml"]) == ["old", "scenario.yaml"]


def test_stale_lists_only_tables_whose_code_changed(repo, capsys):
    measured = repo.commit("measured")
    tables = repo.path / "tables"
    tables.mkdir()
    for name, measures in (("sums", ["old/sums.py"]), ("helpers", ["old/helpers.py"])):
        stamp = {"commit": measured, "command": "python run.py", "date": "2026-12-07", "machine": "here",
                 "measures": measures}
        (tables / f"{name}.md").write_text(stamps.table_text(stamp, "| a |\n|---|\n| 1 |"))
    repo.write("old/sums.py", ORIGINAL.replace("return sum(xs)", "return sum(xs) * 2"))
    repo.commit("change sums")
    found = stamps.stale(repo.path, tables)
    assert [(table.name, paths) for table, paths in found] == [("sums", ["old/sums.py"])]


def test_a_table_without_a_full_stamp_is_refused(tmp_path):
    path = tmp_path / "t.md"
    path.write_text("---\ncommit: abc\ncommand: x\n---\n| a |\n")
    with pytest.raises(ValueError, match="lacks"):
        stamps.read_table(path)
    path.write_text("| a |\n")
    with pytest.raises(ValueError, match="no stamp"):
        stamps.read_table(path)


def test_every_shipped_table_has_a_full_stamp_and_a_known_commit():
    tables = stamps.read_tables()
    assert tables
    for table in tables:
        assert stamps.known(ROOT, table.stamp["commit"]), table.name
        assert table.body.startswith("|"), table.name


@pytest.fixture
def arms_run(tmp_path):
    parent = tmp_path / "arms"
    parent.mkdir()
    shutil.copy(SMOKE, parent / "scenario.yaml")
    make_run(parent, naive_attacks(), name="none")
    make_run(parent, naive_attacks(), "defence.kind=latent", name="latent")
    return parent


# analysis_helpers' hand-worked run: worst attacker accuracy ig (.75), PSNR and MSE gi (25, .05), SSIM ig (.5).
WORST = ["| arm | defence | test acc | ε (max) | worst attacker acc | worst PSNR | worst SSIM | lowest MSE |",
         "|---|---|---|---|---|---|---|---|",
         "| none | none | 0.750 | 2.50 | 0.750 (ig) | 25.00 (gi) | 0.500 (ig) | 0.0500 (gi) |",
         "| latent | latent | 0.750 | 2.50 | 0.750 (ig, naive) | 25.00 (gi, naive) | 0.500 (ig, naive) "
         "| 0.0500 (gi, naive) |"]


def test_the_script_regenerates_a_table_from_a_run_directory(arms_run, tmp_path):
    out = tmp_path / "defences.md"
    old = {"title": "Worst case", "commit": "0000000", "command": "old", "date": "2020-01-01", "machine": "old",
           "measures": ["simfl/privacy"], "note": "kept"}
    out.write_text(stamps.table_text(old, "| old |"))
    command = "python -m simfl.run scenarios/defences_smoke.yaml"
    assert docs_tables.main(["arms", str(arms_run), "--out", str(out), "--command", command]) == 0
    table = stamps.read_table(out)
    assert table.body.splitlines() == WORST
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()
    assert table.stamp["commit"] == head
    assert table.stamp["command"] == command
    assert table.stamp["date"] == dt.date.today().isoformat()  # the run directory was written just now
    assert table.stamp["machine"] == docs_tables.machine()
    assert (table.stamp["title"], table.stamp["note"], table.stamp["measures"]) == ("Worst case", "kept",
                                                                                   ["simfl/privacy"])
    assert docs_tables.main(["arms", str(arms_run), "--out", str(out), "--command", command, "--part", "attacks"]) == 0
    rows = stamps.read_table(out).body.splitlines()
    assert rows[0].startswith("| arm | defence | test acc | client val acc |")
    assert sum(row.startswith("| none | none |") for row in rows) == 2  # gi and ig, naive = adaptive


def test_the_script_regenerates_a_table_from_a_study_report(tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    (study / "study.yaml").write_text("name: s\n")
    (study / "report.md").write_text("# Study s\n\n## Matched-utility comparison (searched, target 0.35)\n\n"
                                     "Worst attack per defence.\n\n| defence | acc |\n|---|---|\n| none | 0.9 |\n\n"
                                     "## Cells\n\n| cell |\n|---|\n")
    out = tmp_path / "verdict.md"
    command = "python -m simfl.study scenarios/study_verdict.yaml"
    assert docs_tables.main(["study", str(study), "--out", str(out), "--command", command, "--title", "V"]) == 0
    table = stamps.read_table(out)
    assert table.body.splitlines() == ["| defence | acc |", "|---|---|", "| none | 0.9 |"]
    assert (table.stamp["title"], table.stamp["command"]) == ("V", command)
    (study / "report.md").write_text("# Study s\n\n## Cells\n\n| cell |\n")
    with pytest.raises(SystemExit, match="no report.md with a matched-utility comparison"):
        docs_tables.main(["study", str(study), "--out", str(out), "--command", command])


def test_the_hook_marks_a_stale_table_visibly():
    stamp = {"title": "T", "commit": "abc1234", "command": "python x.py", "date": "2026-12-07", "machine": "m",
             "measures": ["simfl/engine"], "note": "predates a fix"}
    table = stamps.Table(Path("docs/tables/t.md"), stamp, "| a |\n|---|\n| 1 |\n")
    hooks._stale.clear()
    fresh = hooks.render(table)
    assert "stale" not in fresh and "| a |" in fresh and "predates a fix" in fresh and "abc1234" in fresh
    hooks._stale["t"] = ["simfl/engine/round.py"]
    marked = hooks.render(table)
    hooks._stale.clear()
    assert '!!! warning "stale: the code it measures changed since abc1234"' in marked
    assert "`simfl/engine/round.py`" in marked


def test_the_api_pages_drop_sphinx_roles_before_cited_code():
    html = "see :func:<code>a.b</code> and :class:<code>~c.D</code>, and :note: <code>x</code>"
    expected = "see <code>a.b</code> and <code>c.D</code>, and :note: <code>x</code>"
    assert hooks.on_page_content(html, None, None, None) == expected


def test_the_stale_command_lists_and_exits_zero(capsys):
    assert docs_tables.main(["--stale"]) == 0
    out = capsys.readouterr().out
    total = len(stamps.read_tables())
    assert out.splitlines()[-1].endswith(f"of {total} tables stale")


@pytest.mark.engine
def test_the_site_builds_strictly(tmp_path):
    # Warnings are errors: a broken link, a table no page includes, an unknown table, a bad docstring.
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, textwrap.shorten(result.stderr, 4000)
    page = (tmp_path / "site" / "guides" / "benchmarks" / "index.html").read_text()
    assert "Measured at <code>" in page and "<table>" in page
