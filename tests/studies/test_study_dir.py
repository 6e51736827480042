"""A study directory opened from Python, on a hand-written study: two defences, one cell never started."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml
from analysis_helpers import SMOKE, make_run, naive_attacks

import simfl
from simfl.core.errors import UserError
from simfl.results.analysis import write_study_tables
from simfl.studies.spec import study_cells
from simfl.studies.study_dir import Study

GRID = {"defence": {"none": {"defence": "none"}, "bido": {"defence": "bido"}, "latent": {"defence": "latent"}}}


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """As ``python -m simfl.study`` leaves a study killed before its latent cell started, then tabulated."""
    path = tmp_path_factory.mktemp("study")
    base = yaml.safe_load(SMOKE.read_text()) | {"arms": None}
    (path / "study.yaml").write_text(yaml.safe_dump({"name": "hand", "scenario": base, "grid": GRID}))
    make_run(path / "cells", naive_attacks(), name="none")
    make_run(path / "cells", [], "defence.kind=bido", name="bido")
    write_study_tables(path, study_cells(path))
    return path


def test_cells_are_the_started_cells_runs(study_dir):
    study = Study(study_dir)
    assert sorted(study.cells) == ["bido", "none"]
    assert study.cells["none"].path == study_dir / "cells" / "none"
    assert study.cells["none"].summary()["test_accuracy"].tolist() == pytest.approx([0.75, 0.75])
    assert study.cell_table.set_index("cell")["defence"].to_dict() == {"none": "none", "bido": "bido"}


def test_metrics_is_the_tidy_table_the_study_wrote(study_dir):
    pd.testing.assert_frame_equal(Study(study_dir).metrics, pd.read_parquet(study_dir / "metrics.parquet"))
    assert Study(study_dir).config.name == "hand"


def test_the_report_is_there_once_written(study_dir):
    assert Study(study_dir).report is None
    (study_dir / "report.md").write_text("# Report\n")
    assert simfl.Study(study_dir).report == study_dir / "report.md"


def test_a_directory_that_is_not_a_study_is_one_line(tmp_path):
    with pytest.raises(UserError) as err:
        Study(tmp_path)
    assert str(err.value) == f"{tmp_path}: not a study directory (no study.yaml)"


def test_a_study_not_tabulated_yet_says_so(study_dir, tmp_path):
    (tmp_path / "study.yaml").write_text((study_dir / "study.yaml").read_text())
    with pytest.raises(UserError, match="no metrics.parquet yet"):
        _ = Study(tmp_path).metrics


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"study": "nowhere.yaml"}, "study file nowhere.yaml"),
    ({"study": "scenarios/study_smoke.yaml", "resume": "somewhere"}, "--resume: a resumed study uses its saved"),
    ({}, "give a study file, or --resume STUDY_DIR"),
])
def test_run_study_bad_input_is_one_line_and_writes_nothing(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message) as err:
        simfl.run_study(**kwargs, out=None if "resume" in kwargs else tmp_path / "s")
    assert "\n" not in str(err.value) and not (tmp_path / "s").exists()
