"""Study specs: the grid expands as written, and a bad study fails in one line naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from folder_helpers import SITES, write_site_tree
from pydantic import ValidationError

from simfl.core.errors import UserError
from simfl.studies.probes import plan_searches
from simfl.studies.spec import StudyConfig, expand, load_study

ROOT = Path(__file__).resolve().parents[2]


def study_file(tmp_path: Path, **spec) -> Path:
    spec.setdefault("base", str(ROOT / "scenarios" / "smoke.yaml"))
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cells_of(tmp_path: Path, **spec):
    return expand(*load_study(study_file(tmp_path, **spec)))


def test_grid_is_the_product_of_its_axes_in_order(tmp_path):
    cells = cells_of(tmp_path, grid={
        "defence": {"none": {"defence": "none"}, "dp": {"defence": {"kind": "dpsgd", "noise_multiplier": 0.7}}},
        "training.batch_size": [8, 16],
        "seed": [0, 3],
    })
    assert [c.name for c in cells][:3] == ["none__batch_size-8__seed-0", "none__batch_size-8__seed-3",
                                          "none__batch_size-16__seed-0"]
    assert len(cells) == 8
    by_name = {c.name: c.scenario for c in cells}
    dp = by_name["dp__batch_size-16__seed-3"]
    assert dp.defence.kind == "dpsgd" and dp.defence.noise_multiplier == 0.7
    assert dp.training.batch_size == 16 and dp.seed == 3
    assert by_name["none__batch_size-8__seed-0"].defence.kind == "none"
    assert dp.name == "study.dp__batch_size-16__seed-3"


def test_set_overrides_the_base_and_arms_become_the_first_axis(tmp_path):
    cells = cells_of(tmp_path, base=str(ROOT / "scenarios" / "defences_smoke.yaml"),
                     set={"training.rounds": 4, "attacks.rounds": [2]}, grid={"seed": [0, 1]})
    assert len(cells) == 10  # 5 arms x 2 seeds
    assert cells[0].labels == {"arm": "none", "seed": "seed-0"}
    assert {c.labels["arm"] for c in cells} == {"none", "dpsgd", "bido", "latent", "latent_local"}
    assert {c.scenario.defence.kind for c in cells} == {"none", "dpsgd", "bido", "latent"}
    assert all(c.scenario.training.rounds == 4 and c.scenario.arms is None for c in cells)


def test_leave_one_population_out_holds_out_each_population_once(tmp_path):
    cells = cells_of(tmp_path, grid={"split": "leave_one_population_out"})
    assert [c.name for c in cells] == ["out-central_lab", "out-rural_clinic", "out-new_scanner"]
    for cell in cells:
        held = [p.name for p in cell.scenario.populations if p.held_out]
        assert held == [cell.name.removeprefix("out-")]


def test_leave_one_site_out_on_populations_from_sites(tmp_path):
    data = tmp_path / "hospitals"
    write_site_tree(data, patients_per_site=2, images_per_patient=1, size=8)
    cells = cells_of(tmp_path, base=str(ROOT / "scenarios" / "folder_sites.yaml"), set={"data.root": str(data)},
                     grid={"split": "leave_one_population_out"})
    assert [c.name for c in cells] == [f"out-{s}" for s in SITES]
    for cell in cells:
        assert [p.site for p in cell.scenario.populations if p.held_out] == [[cell.name.removeprefix("out-")]]


def test_values_keep_their_type_through_set_and_grid(tmp_path):
    # 1e-05 must stay a number (a JSON round trip through YAML would make it the string "1e-05").
    cells = cells_of(tmp_path, set={"training.optimizer": {"kind": "sgd", "lr": 1.0e-5}},
                     grid={"defence": {"dp": {"defence": "dpsgd"}}, "defence.delta": [1.0e-6, 1.0e-5]})
    assert [c.scenario.defence.delta for c in cells] == [1.0e-6, 1.0e-5]
    assert all(c.scenario.training.optimizer.lr == 1.0e-5 for c in cells)


def test_leave_one_out_keeps_what_other_axes_set_on_the_populations(tmp_path):
    cells = cells_of(tmp_path, grid={"populations.0.label_skew.alpha": [0.1, 2.0],
                                     "split": "leave_one_population_out"})
    assert len(cells) == 6
    for cell in cells:
        alpha = float(cell.labels["populations.0.label_skew.alpha"].removeprefix("alpha-"))
        assert cell.scenario.populations[0].label_skew.alpha == alpha
        held = [p.name for p in cell.scenario.populations if p.held_out]
        assert held == [cell.labels["split"].removeprefix("out-")]


def test_base_path_is_relative_to_the_study_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.yaml").write_text((ROOT / "scenarios" / "smoke.yaml").read_text())
    path = study_file(tmp_path, base="sub/base.yaml", grid={"seed": [5]})
    (cell,) = expand(*load_study(path))
    assert cell.scenario.seed == 5 and len(cell.scenario.populations) == 3


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"grid": {"seed": [-1]}}, "cell seed--1 (grid.seed.seed--1): scenario: seed"),
        ({"grid": {"defence": {"dp": {"defence": {"kind": "dpsgd", "a1": 1}}}}}, "grid.defence.dp): scenario: defence"),
        ({"grid": {"training.rounds": [2]}, "set": {"training.bogus": 1}}, "training.bogus: unknown key"),
        ({"grid": {}}, "study: grid"),
        ({"grid": {"seed": []}}, "seed: an axis needs at least one value"),
        ({"grid": {"seed": [0]}, "comparison": {"target_accuracy": 1.5}}, "study: comparison.target_accuracy"),
        ({"grid": {"seed": [0]}, "base": "nowhere.yaml"}, "study: base: no scenario file"),
        ({"grid": {"seed": [0]}, "set": {"evaluation.local_val_fraction": 0.0}},
         "comparison.utility: client_val needs evaluation.local_val_fraction > 0"),
        ({"grid": {"seed": [0]}, "set": {"populations.7.clients": 3}}, "study: set: --set populations.7.clients"),
        ({"grid": {"a": {"x": {}}, "b": {"x": {}}}, "name": "s"}, None),  # distinct axes may reuse a level name
    ],
)
def test_bad_studies_are_named_by_key(tmp_path, spec, message):
    if message is None:
        assert [c.name for c in cells_of(tmp_path, **spec)] == ["x__x"]
        return
    with pytest.raises(UserError) as err:
        cells_of(tmp_path, **spec)
    assert message in str(err.value), str(err.value)


def test_study_config_is_strict():
    with pytest.raises(ValidationError):
        StudyConfig.model_validate({"base": "x.yaml", "scenario": {}, "grid": {"seed": [0]}})
    with pytest.raises(ValidationError):
        StudyConfig.model_validate({"base": "x.yaml", "grid": {"seed": [0]}, "concurency": 2})


def test_shipped_studies_expand_into_valid_cells():
    counts = {f.stem: len(expand(*load_study(f))) for f in sorted((ROOT / "scenarios").glob("study_*.yaml"))}
    assert counts == {"study_paper_bloodmnist": 30, "study_paper_cifar10": 30, "study_populations": 72,
                      "study_smoke": 20, "study_verdict": 30}
    for f in sorted((ROOT / "scenarios").glob("study_*.yaml")):  # every searched setting they may take is valid
        study, base = load_study(f)
        if study.search is not None:
            cells = expand(study, base)
            assert len(plan_searches(study, cells)) == len([c for c in cells if c.searched]) == len(cells) * 5 // 6


def test_include_lays_patch_files_over_the_base_before_set(tmp_path):
    (tmp_path / "cal").mkdir()
    (tmp_path / "cal" / "calibrated.yaml").write_text(
        "# simfl calibration of smoke.yaml\ntraining.optimizer.lr: 0.1\ntraining.local_epochs: 2\n")
    (tmp_path / "more.yaml").write_text("training.local_epochs: 3\ntraining.batch_size: 16\n")
    path = study_file(tmp_path, include=["cal/calibrated.yaml", str(tmp_path / "more.yaml")],
                      set={"training.batch_size": 4}, grid={"seed": [0, 1]})
    study, base = load_study(path)
    cells = expand(study, base)
    for cell in cells:
        t = cell.scenario.training
        assert t.optimizer.lr == 0.1 and t.optimizer.momentum == 0.9  # the rest of the optimizer kept
        assert t.local_epochs == 3  # a later include wins over an earlier one
        assert t.batch_size == 4  # the study's own set wins over every include
    # Laid into the base: the study as saved (base inlined) needs no file outside its directory.
    assert study.include == [] and base["training"]["optimizer"]["lr"] == 0.1


@pytest.mark.parametrize(
    ("files", "include", "message"),
    [
        ({}, ["calibrated.yaml"], "study: include: calibrated.yaml: no patch file at"),
        ({"p.yaml": "- 1\n- 2\n"}, ["p.yaml"], "study: include: p.yaml: "),
        ({"p.yaml": ""}, ["p.yaml"], "must hold a mapping of KEY.PATH: value"),
        ({"p.yaml": "training: [\n"}, ["p.yaml"], "study: include: p.yaml: "),
        ({"p.yaml": "training.optimiser.lr: 0.1\n"}, ["p.yaml"],
         "study: include: p.yaml: training.optimiser.lr: training.optimiser is not a scenario key"),
        ({"p.yaml": "training..lr: 0.1\n"}, ["p.yaml"], "'training..lr' is not a KEY.PATH"),
        ({"p.yaml": "populations.9.clients: 3\n"}, ["p.yaml"],
         "study: include: p.yaml: populations.9.clients: populations.9 is not an index of a list of 3"),
        ({"p.yaml": "training.optimizer.lr: -1\n"}, ["p.yaml"], "scenario: training.optimizer.lr"),
        ({}, "p.yaml", "study: include"),  # a list, not a single name
    ],
)
def test_bad_includes_are_one_line_naming_file_and_key(tmp_path, files, include, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(UserError) as err:
        cells_of(tmp_path, include=include, grid={"seed": [0]})
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
