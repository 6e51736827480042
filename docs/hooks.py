"""mkdocs hook: measured tables are included from docs/tables/, each with its stamp, a stale one marked.

A page writes ``<!-- table: NAME -->`` on a line of its own where
``docs/tables/NAME.md`` belongs. The table comes with its title, a line saying
when, where and by what command it was measured, its note, and, when the code
it measures changed since its stamp's commit (the rule of
``scripts/table_stamps.py``), a warning naming that commit and the changed files.
An unknown name, a table no page includes, or a table without a full stamp is
a build warning, so ``mkdocs build --strict`` refuses it. The API pages
lose the Sphinx roles (``:func:``) in front of the code their docstrings cite.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError

DOCS = Path(__file__).resolve().parent
_SPEC = importlib.util.spec_from_file_location("table_stamps", DOCS.parent / "scripts" / "table_stamps.py")
assert _SPEC is not None and _SPEC.loader is not None
stamps = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = stamps  # dataclasses look their module up there
_SPEC.loader.exec_module(stamps)

MARKER = re.compile(r"^<!-- table: ([\w.-]+) -->$", re.MULTILINE)
# Docstrings cite code with Sphinx roles (:func:`x`, :class:`~a.B`); the API pages show the code alone.
ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):(<code>)~?")
log = logging.getLogger("mkdocs.hooks.tables")
_tables: dict = {}
_stale: dict = {}
_included: set = set()


def on_pre_build(config) -> None:
    """Read every table and decide once per build which are stale."""
    _tables.clear(), _stale.clear(), _included.clear()
    try:
        tables = stamps.read_tables(DOCS / "tables")
    except ValueError as error:
        raise PluginError(str(error)) from error
    _tables.update({table.name: table for table in tables})
    _stale.update({table.name: paths for table, paths in stamps.stale(DOCS.parent, DOCS / "tables")})


def render(table) -> str:
    """A table as it appears on a page: title, stale warning, the table, its note and its stamp."""
    stamp = table.stamp
    parts = [f"**{stamp['title']}**"] if stamp.get("title") else []
    if table.name in _stale:
        files = ", ".join(f"`{path}`" for path in _stale[table.name])
        parts.append(f'!!! warning "stale: the code it measures changed since {stamp["commit"]}"\n'
                     f"    Re-measure with `{stamp['command']}` before relying on these figures. "
                     f"Changed since `{stamp['commit']}`: {files}.")
    parts.append(table.body.rstrip("\n"))
    if stamp.get("note"):
        parts.append(f'!!! note "About this table"\n    {stamp["note"]}')
    measures = ", ".join(f"`{path}`" for path in stamp["measures"])
    parts.append(f"<small>Measured at `{stamp['commit']}` on {stamp['date']}, {stamp['machine']}: "
                 f"`{stamp['command']}`. Measures {measures}. Source: `docs/tables/{table.name}.md`.</small>")
    return "\n\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Replace every table marker of the page with its table."""
    def include(match: re.Match) -> str:
        name = match.group(1)
        if name not in _tables:
            log.warning("%s: no table docs/tables/%s.md", page.file.src_path, name)
            return match.group(0)
        _included.add(name)
        return render(_tables[name])
    return MARKER.sub(include, markdown)


def on_page_content(html: str, page, config, files) -> str:
    """Drop the Sphinx roles in front of code that docstrings cite."""
    return ROLE.sub(r"\1", html)


def on_post_build(config) -> None:
    """A table that no page includes is a warning."""
    for name in sorted(set(_tables) - _included):
        log.warning("docs/tables/%s.md is included by no page (<!-- table: %s -->)", name, name)
