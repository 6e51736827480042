"""The plugin registry: registering, the scenario union, and loading installed plugins from entry points.

Entry points are read from a real distribution on ``sys.path`` (a hand-written
``.dist-info`` beside its modules, as pip lays one out), registering into a
registry of its own, so simfl's defences and attacks are left untouched.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Literal

import pytest
from pydantic import TypeAdapter, ValidationError

from simfl.core.plugins import REPORTED, PluginConfig, Registry

GROUP = "simfl_test.widgets"
# The distribution's modules; each registers into widgets_registry.WIDGETS when imported.
MODULES = {
    "widgets_registry": """
        from simfl.core.plugins import Registry
        WIDGETS = Registry("widget")
    """,
    "widgets_good": """
        from typing import Literal
        from simfl.core.plugins import PluginConfig
        from widgets_registry import WIDGETS

        class SpinConfig(PluginConfig):
            kind: Literal["spin"] = "spin"
            speed: int = 3

        @WIDGETS.register(SpinConfig)
        class Spin:
            pass
    """,
    "widgets_object": """
        from typing import Literal
        from simfl.core.plugins import PluginConfig
        from widgets_registry import WIDGETS

        class HumConfig(PluginConfig):
            kind: Literal["hum"] = "hum"

        @WIDGETS.register(HumConfig)
        class Hum:
            pass
    """,
    "widgets_raises": """
        from typing import Literal
        from simfl.core.plugins import PluginConfig
        from widgets_registry import WIDGETS

        class HalfConfig(PluginConfig):
            kind: Literal["half"] = "half"

        @WIDGETS.register(HalfConfig)
        class Half:
            pass

        raise RuntimeError("cannot finish importing\\nmore detail on a second line")
    """,
    "widgets_clash": """
        from typing import Literal
        from simfl.core.plugins import PluginConfig
        from widgets_registry import WIDGETS

        class SpinAgainConfig(PluginConfig):
            kind: Literal["spin"] = "spin"

        @WIDGETS.register(SpinAgainConfig)
        class SpinAgain:
            pass
    """,
    "widgets_missing": """
        import widgets_no_such_dependency
    """,
}
ENTRY_POINTS = f"""
[{GROUP}]
spin = widgets_good
half = widgets_raises
hum = widgets_object:Hum
spin_again = widgets_clash
needs_more = widgets_missing
"""


@pytest.fixture
def widgets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The widget registry, with the ``widgets-dist 1.2`` distribution installed on sys.path."""
    for name, source in MODULES.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    info = tmp_path / "widgets_dist-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: widgets-dist\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(tmp_path))  # also clears the import system's caches
    monkeypatch.setenv(REPORTED, "")  # what this process has reported, restored afterwards
    yield importlib.import_module("widgets_registry").WIDGETS
    for name in MODULES:
        sys.modules.pop(name, None)


class ToolConfig(PluginConfig):
    """``saw``: a test plugin config."""

    kind: Literal["saw"] = "saw"
    teeth: int = 20


class DrillConfig(PluginConfig):
    """``drill``: another."""

    kind: Literal["drill"] = "drill"


def _tools() -> Registry:
    tools: Registry = Registry("tool", default="saw")
    tools.register(ToolConfig)(type("Saw", (), {}))
    tools.register(DrillConfig)(type("Drill", (), {}))
    return tools


def test_a_plugin_registers_under_its_configs_kind():
    tools = _tools()
    assert tools.kinds() == ["saw", "drill"]
    assert tools["saw"].kind == "saw" and tools["saw"].config_class is ToolConfig


def test_a_kind_taken_twice_names_both_classes():
    tools = _tools()
    with pytest.raises(ValueError, match=r"tool 'saw' is registered twice \(.*Saw and .*Other\)"):
        tools.register(ToolConfig)(type("Other", (), {}))


def test_a_config_without_a_default_kind_cannot_register():
    class Nameless(PluginConfig):
        """No default kind."""

    with pytest.raises(TypeError, match="needs a default"):
        Registry("tool").register(Nameless)


def test_the_union_takes_a_name_or_a_mapping_and_rejects_an_unknown_kind_in_one_line():
    union = TypeAdapter(_tools().config_type())
    assert union.validate_python("drill") == DrillConfig()
    assert union.validate_python({"teeth": 5}) == ToolConfig(teeth=5)  # no kind: the default
    with pytest.raises(ValidationError) as caught:
        union.validate_python({"kind": "hammer"})
    assert "unknown tool; choose one of: saw, drill" in str(caught.value)


def test_installed_plugins_load_and_broken_ones_name_themselves_in_one_line(widgets, capsys):
    widgets.load_entry_points(GROUP)
    assert widgets.kinds() == ["spin", "hum"]  # a module, or an object in one; after a failure too
    assert widgets.configs["spin"]().knobs() == {"speed": 3}
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "simfl: warning: widget plugin 'half' (widgets-dist 1.2) not loaded: RuntimeError: cannot finish importing",
        "simfl: warning: widget plugin 'spin_again' (widgets-dist 1.2) not loaded: ValueError: widget 'spin' is "
        "registered twice (widgets_good.Spin and widgets_clash.SpinAgain)",
        "simfl: warning: widget plugin 'needs_more' (widgets-dist 1.2) not loaded: ModuleNotFoundError: No module "
        "named 'widgets_no_such_dependency'",
    ]
    assert "half" not in widgets  # registered before its module failed: removed again
    assert list(widgets.failed) == ["'half' (widgets-dist 1.2)", "'spin_again' (widgets-dist 1.2)",
                                    "'needs_more' (widgets-dist 1.2)"]


def test_an_unknown_kind_lists_the_plugins_that_failed_to_load(widgets, capsys):
    widgets.load_entry_points(GROUP)
    with pytest.raises(ValidationError) as caught:
        TypeAdapter(widgets.config_type()).validate_python("half")
    assert ("unknown widget; choose one of: spin, hum (plugins that failed to load: 'half' (widgets-dist 1.2), "
            "'spin_again' (widgets-dist 1.2), 'needs_more' (widgets-dist 1.2))") in str(caught.value)


def test_loading_again_is_quiet_and_changes_nothing(widgets, capsys):
    widgets.load_entry_points(GROUP)
    capsys.readouterr()
    os.environ[REPORTED] = ""  # quiet because nothing is tried twice, not because it was said
    widgets.load_entry_points(GROUP)
    assert widgets.kinds() == ["spin", "hum"]
    assert capsys.readouterr().err == ""


def test_a_group_with_nothing_installed_is_quiet(widgets, capsys):
    widgets.load_entry_points("simfl_test.nothing_installed")
    assert widgets.kinds() == [] and widgets.failed == {}
    assert capsys.readouterr().err == ""


LOAD = f"from widgets_registry import WIDGETS; WIDGETS.load_entry_points({GROUP!r}); print(WIDGETS.kinds())"


def test_a_process_started_from_one_that_reported_a_failure_stays_quiet(widgets, tmp_path, capsys):
    # As Ray's workers are: they inherit the environment and load the same plugins.
    widgets.load_entry_points(GROUP)
    said = capsys.readouterr().err.splitlines()
    child = subprocess.run([sys.executable, "-c", LOAD], env=dict(os.environ, PYTHONPATH=str(tmp_path)),
                           capture_output=True, text=True, timeout=300)
    assert child.stdout.strip() == "['spin', 'hum']" and child.stderr == ""
    fresh = dict(os.environ, PYTHONPATH=str(tmp_path), **{REPORTED: ""})
    alone = subprocess.run([sys.executable, "-c", LOAD], env=fresh, capture_output=True, text=True, timeout=300)
    assert alone.stdout.strip() == "['spin', 'hum']" and alone.stderr.splitlines() == said and len(said) == 3
