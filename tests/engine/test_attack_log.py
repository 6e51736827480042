"""Attack results out of order and across a crash: table rows once, TensorBoard means once per round."""

from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from simfl.engine.attack_log import AttackLog
from simfl.engine.run_tables import SCHEMAS, RunTables


def job(r, first):
    return {"round": r, "victims": [SimpleNamespace(client_id=first)], "submitted_at": 0.0}


def out(r, client, psnr):
    blank = {pa.bool_(): False, pa.string(): ""}
    row = {f.name: blank.get(f.type, 0) for f in SCHEMAS["attacks"]}
    row.update({"round": r, "client_id": client, "attack": "ig", "knowledge": "naive", "defence": "none",
                "psnr": psnr, "attacker_correct": True,
                "random_attacker_correct": False, "mean_attacker_correct": False,
                "class_mean_attacker_correct": False, "view": "gradient",
                "labels": "known", "evaluator_on_original": True})
    del row["population"], row["submitted_at"]  # the log fills them in
    image = torch.full((1, 3, 4, 4), psnr / 100)
    return {"rows": [row], "grids": {"ig": (image, image)}}


def scalars(run_dir, tag="attack/ig/psnr"):
    events = EventAccumulator(str(run_dir / "tensorboard" / "attacks"))
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return []
    return sorted((e.step, e.value) for e in events.Scalars(tag))  # re-logged rounds come later in the file


def test_a_rounds_means_wait_for_its_last_job_and_its_grid_is_the_lowest_clients(tmp_path):
    tables = RunTables(tmp_path, flush_seconds=1e9)
    log = AttackLog(tmp_path, tables, lambda c: f"pop{c % 2}")
    log.expect([job(1, 5), job(1, 2)])
    log.done(job(1, 5), out(1, 5, 20.0))
    log.flush()
    assert scalars(tmp_path) == []  # one job of round 1 still out
    log.done(job(1, 2), out(1, 2, 30.0))
    log.close()
    tables.flush()
    assert scalars(tmp_path) == [(1, 25.0)]
    rows = pd.read_parquet(tmp_path / "attacks")
    assert rows["population"].tolist() == ["pop1", "pop0"] and (rows["submitted_at"] == 0.0).all()
    assert sorted(p.name for p in (tmp_path / "reconstructions").iterdir()) == [
        "round00001_ig_client2.png", "round00001_ig_client5.png"]
    events = EventAccumulator(str(tmp_path / "tensorboard" / "attacks"), size_guidance={"images": 0})
    events.Reload()
    (grid,) = events.Images("attack/ig/originals_above_reconstructions")
    assert grid.step == 1


def test_a_dropped_job_settles_its_round(tmp_path):
    log = AttackLog(tmp_path, RunTables(tmp_path, 1e9), str)
    log.expect([job(3, 1), job(3, 4)])
    log.done(job(3, 1), out(3, 1, 10.0))
    log.settle(3)  # the other job was dropped
    log.close()
    assert scalars(tmp_path) == [(3, 10.0)]


@pytest.mark.parametrize("b_finished_before_crash", [False, True])
def test_after_a_resume_each_round_is_logged_once_with_all_its_rows(tmp_path, b_finished_before_crash):
    # Round 1 has jobs A and B, round 2 one job C. A and C finish, then the checkpoint
    # after round 2 is taken with B pending; B may finish before the crash.
    tables = RunTables(tmp_path, 1e9)
    log = AttackLog(tmp_path, tables, str)
    log.expect([job(1, 1), job(1, 2), job(2, 3)])
    log.done(job(1, 1), out(1, 1, 10.0))
    log.done(job(2, 3), out(2, 3, 40.0))
    tables.flush()
    log.flush()
    manifest = tables.manifest()
    if b_finished_before_crash:
        log.done(job(1, 2), out(1, 2, 20.0))
        tables.flush()
    log.flush()  # then the crash; B is in the checkpoint's pending jobs

    tables = RunTables(tmp_path, 1e9)
    tables.truncate_to(manifest)
    log = AttackLog(tmp_path, tables, str, resumed_round=2, rerun_rounds={1})
    log.expect([job(1, 2)])
    log.done(job(1, 2), out(1, 2, 20.0))
    log.close()
    tables.flush()
    assert scalars(tmp_path) == [(1, 15.0), (2, 40.0)]
    rows = pd.read_parquet(tmp_path / "attacks")
    assert sorted(rows["client_id"]) == [1, 2, 3]


def test_the_nn_match_rate_is_logged_beside_each_baseline(tmp_path):
    log = AttackLog(tmp_path, RunTables(tmp_path, 1e9), str)
    log.expect([job(1, 1), job(1, 2)])
    for client, hit in ((1, True), (2, False)):
        o = out(1, client, 20.0)
        o["rows"][0].update(nn_match=hit, class_mean_nn_match=False, mean_nn_match=False, random_nn_match=False)
        log.done(job(1, client), o)
    log.close()
    assert scalars(tmp_path, "attack/ig/nn_match_rate") == [(1, 0.5)]
    for baseline in ("random", "mean", "class_mean"):
        assert scalars(tmp_path, f"attack/ig/nn_match_rate_{baseline}_baseline") == [(1, 0.0)]
