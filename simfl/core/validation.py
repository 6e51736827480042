"""Strict config models and one-line errors: how every scenario and study key is checked.

Every section of a scenario is a :class:`Strict` model, so that a typo or an
out-of-range value is caught before a run directory or a Ray actor exists, and
:func:`format_validation_error` reports it in one line with its key path.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

# Safe as a directory name and inside a Ray actor name.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class Strict(BaseModel):
    """Base for every section: unknown keys and mistyped values are errors; immutable once validated."""

    # strict: a YAML typo such as `held_out: "yes"` or `rounds: true` is an error, not a silent 1.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def kind_shorthand(value: Any) -> Any:
    """Allow ``label_skew: iid`` as shorthand for ``label_skew: {kind: iid}``."""
    return {"kind": value} if isinstance(value, str) else value


def key_path(loc: tuple) -> str:
    """The YAML key path of an error, without pydantic's union-branch labels (``constrained-int``, ``kind-ig``)."""
    keys = [str(p) for p in loc if not (isinstance(p, str) and ("-" in p or "[" in p))]
    return ".".join(keys) or "(top level)"


def format_validation_error(exc: ValidationError) -> str:
    """One line: the first failing key path, what is wrong, and the offending value."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    path = key_path(first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    if first["type"] == "extra_forbidden":
        plugin = [p[len("kind-"):] for p in first["loc"] if isinstance(p, str) and p.startswith("kind-")]
        msg = f"unknown key (not a setting of {plugin[-1]})" if plugin else "unknown key"
    elif first["type"] == "missing":
        msg = "required key is missing"
    elif first["type"] == "unknown_plugin":  # see simfl.core.plugins.Registry.config_type
        path = f"{path}.kind" if isinstance(value, dict) else path
        msg += f" (got {value.get('kind') if isinstance(value, dict) else value!r})"
    elif "input" in first and not isinstance(value, (dict, list)):
        msg += f" (got {value!r})"
    # A union (e.g. `auto` or a number) fails once per branch: count keys, not branches.
    others = {key_path(e["loc"]) for e in errors} - {key_path(first["loc"])}
    more = f" (+{len(others)} more)" if others else ""
    return f"{path}: {msg}{more}"
