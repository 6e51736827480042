"""The scenario reference (docs/reference/scenario.md) is generated from the schema: current, every key described.

A stale block or a field added without ``Field(description=...)`` fails here, so
the reference cannot drift from the code (``scripts/scenario_reference.py``).
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

import simfl.core.config
import simfl.data
import simfl.engine.scenario
from simfl.core.plugins import PluginConfig
from simfl.core.validation import Strict
from simfl.engine.scenario import Scenario

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("scenario_reference", ROOT / "scripts" / "scenario_reference.py")
ref = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = ref  # dataclasses look their module up there
_SPEC.loader.exec_module(ref)


def test_docs_reference_is_current():
    _, block, _ = ref.split(ref.PAGE.read_text())
    assert block == ref.reference(), f"{ref.PAGE} is stale: run python scripts/scenario_reference.py"


def test_every_scenario_key_has_a_description():
    missing = [key.path for key in ref.walk(Scenario) if not (key.field.description or "").strip()]
    assert not missing, f"keys without Field(description=...): {missing}"


def test_every_plugin_kind_and_knob_is_described():
    missing = []
    for family in ref.FAMILIES:
        assert family.configs, family.family
        for kind, config in family.configs.items():
            if not ref.kind_summary(kind, config).strip():
                missing.append(f"{family.family} {kind} (its config's docstring)")
            missing += [f"{family.family} {kind}.{name}" for name, field in ref.knob_fields(config).items()
                        if not (field.description or "").strip()]
    assert not missing, f"without a description: {missing}"


def test_the_walk_reaches_every_section_and_plugin_family():
    # A section the walk skipped would be left out of the reference and of the description check.
    defined = {cls for module in (simfl.core.config, simfl.data, simfl.engine.scenario)
               for _, cls in inspect.getmembers(module, inspect.isclass)
               if cls.__module__ == module.__name__ and issubclass(cls, Strict) and not issubclass(cls, PluginConfig)}
    keys = list(ref.walk(Scenario))
    assert defined - {Scenario} <= {key.section for key in keys}
    assert {key.family for key in keys if key.family is not None} == set(ref.FAMILIES)


def test_every_registered_kind_and_knob_is_in_the_reference():
    text = ref.reference()
    for family in ref.FAMILIES:
        for kind, config in family.configs.items():
            assert f"| `{kind}` |" in text
            assert all(f"| `{name}` |" in text for name in ref.knob_fields(config))


def test_defaults_render_as_in_yaml():
    fields = Scenario.model_fields
    assert ref.default_text(fields["seed"]) == "0"
    assert ref.default_text(fields["defence"]) == "`none`"
    assert ref.default_text(fields["arms"]) == "none"
    assert ref.default_text(fields["populations"]) == "required"
    assert ref.default_text(fields["data"]) == ""
    assert ref.default_text(simfl.engine.scenario.AttacksConfig.model_fields["methods"]) == "`[ig]`"
    assert ref.default_text(simfl.core.config.ResourcesConfig.model_fields["client_actors"]) == "`auto`"
    assert ref.default_text(simfl.core.config.ShiftConfig.model_fields["color"]) == "`[1.0, 1.0, 1.0]`"


def test_check_flags_a_stale_page_and_the_rewrite_fixes_it(tmp_path, capsys):
    page = tmp_path / "scenario.md"
    page.write_text(f"# title\n\nprose\n\n{ref.START}\n| old | table |\n{ref.END}\n\n## next\n")
    assert ref.main(["--check", "--page", str(page)]) == 1
    assert "stale" in capsys.readouterr().err
    assert ref.main(["--page", str(page)]) == 0
    assert ref.main(["--check", "--page", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# title\n\nprose\n\n") and text.endswith(f"{ref.END}\n\n## next\n")
    assert "| old | table |" not in text
