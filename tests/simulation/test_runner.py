"""The CLI as a user meets it: bad input, SIGKILL + --resume, and the 500-client BloodMNIST scenario."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from engine_helpers import SMOKE_FAST, assert_same_results, kill_at_checkpoint, run_smoke
from folder_helpers import SITES, write_site_tree
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from simfl.core.provenance import environment
from simfl.data.synthetic import make_dataset
from simfl.engine.scenario import load_scenario
from simfl.results.compare import differences
from simfl.simulation.runner import main, prepare, warn_if_made_elsewhere, write_run_header

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simfl.run", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


BAD_INPUT = [
    (["training.rounds=ten"], "training.rounds"),
    (["training.lr=0.1"], "training.lr: unknown key"),
    (["populations.0.label_skew.alpha=0"], "populations.0.label_skew.alpha"),
    (["populations.0.label_skew.alpha=-1"], "populations.0.label_skew.alpha"),
    (["populations.1.clients=-5"], "populations.1.clients"),
    (["populations.1.label_skew.classes=40"], "populations.1.label_skew.classes"),
    (["populations.0.held_out='yes'"], "populations.0.held_out"),
    (["data.name=bloodmnist"], "data: synthetic: only applies to name: synthetic"),
    (["defence={kind: dpsgd, lam: 1}"], "defence.lam: unknown key (not a setting of dpsgd)"),
    (["attacks={methods: [{kind: ig, iterations: 0}]}"], "attacks.methods.0.iterations"),
]
# The cluster's size is Ray's to say: these ask the session's Ray instance before they fail.
BAD_FOR_THE_CLUSTER = [
    (["resources.gpus_per_actor=0.5"], "resources.gpus_per_actor"),
    (["resources.client_actors=64"], "resources.client_actors"),
]


def _assert_one_line_and_nothing_written(code: int, stderr: str, key: str, out: Path) -> None:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("simfl: error: ") and key in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(("overrides", "key"), BAD_INPUT)
def test_bad_input_is_one_line_exit_2_and_no_run_dir(tmp_path, capsys, overrides, key):
    out = tmp_path / "runs"
    sets = [item for o in overrides for item in ("--set", o)]
    code = main(["scenarios/smoke.yaml", "--set", f"output.dir={out}", "--no-dashboard", *sets])
    _assert_one_line_and_nothing_written(code, capsys.readouterr().err, key, out)


@pytest.mark.parametrize(("overrides", "key"), BAD_FOR_THE_CLUSTER)
def test_a_plan_the_cluster_cannot_hold_is_one_line_exit_2_and_no_run_dir(ray_local, tmp_path, capsys, overrides,
                                                                          key):
    out = tmp_path / "runs"
    sets = [item for o in overrides for item in ("--set", o)]
    code = main(["scenarios/smoke.yaml", "--set", f"output.dir={out}", "--no-dashboard", *sets])
    _assert_one_line_and_nothing_written(code, capsys.readouterr().err, key, out)


def test_missing_dataset_offline_is_one_line_naming_the_file_and_where_to_put_it(tmp_path, capsys):
    out = tmp_path / "runs"
    code = main(["scenarios/noniid_500.yaml", "--set", "data.download=false", "--set", f"data.root={tmp_path}",
                 "--set", f"output.dir={out}"])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("simfl: error: data.root") and "bloodmnist.npz" in line and str(tmp_path) in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("seed: 0\npopulations: [{name: a, clients: 2}]\nbogus: 1\n", "bogus: unknown key"),
        ("seed: 0\n", "populations: required key is missing"),
        ("seed: [0\n", "not valid YAML"),
        ("populations: [{name: a, clients: 2, label_skew: {kind: dirichlet}}]\n", "populations.0.label_skew"),
    ],
)
def test_malformed_scenario_files(tmp_path, capsys, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_scenario_file_through_the_real_command_line():
    proc = cli("scenarios/does_not_exist.yaml")
    assert proc.returncode == 2 and "does_not_exist.yaml" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


SIGKILL_RUN = ["--set", "training.rounds=6", "--set", "resources.client_actors=2"]


@pytest.mark.timeout(600)
def test_sigkilled_run_resumes_to_the_same_results(ray_local, tmp_path):
    reference = run_smoke(tmp_path / "ref", "ref", *SIGKILL_RUN)
    out = tmp_path / "killed"
    run_dir = out / "k"
    cmd = [sys.executable, "-m", "simfl.run", "scenarios/smoke.yaml", "--set", f"output.dir={out}",
           "--set", "output.name=k", *SMOKE_FAST, *SIGKILL_RUN, "--no-dashboard", "--num-cpus", "2"]
    kill_at_checkpoint(cmd, ROOT, run_dir, 2)
    assert not (run_dir / "final_weights.pt").exists(), "the run finished before it was killed"
    done = pd.read_parquet(run_dir / "rounds")["round"].max()
    assert done < 6

    assert main(["--resume", str(run_dir), "--quiet"]) == 0  # in this process, on the session's Ray instance
    assert pd.read_parquet(run_dir / "rounds")["round"].tolist() == [1, 2, 3, 4, 5, 6]
    assert_same_results(reference, run_dir)
    # TensorBoard: rounds logged before the kill and again after the resume are purged, not doubled.
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    ref_events = EventAccumulator(str(reference / "tensorboard"))
    ref_events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == [e.value for e in ref_events.Scalars("train/loss")]


def make_resumable_looking_dir(tmp_path: Path, seed: int) -> Path:
    """A run directory as a real run writes it, from the smoke scenario with ``seed``."""
    run_dir = tmp_path / "run"
    write_run_header(run_dir, prepare(load_scenario(ROOT / "scenarios/smoke.yaml", [f"seed={seed}"])))
    (run_dir / "checkpoints").mkdir()
    return run_dir


def test_resume_refuses_an_unreadable_checkpoint(tmp_path, capsys):
    run_dir = make_resumable_looking_dir(tmp_path, seed=0)
    (run_dir / "checkpoints" / "round_000001.pt").write_bytes(b"not a checkpoint")
    assert main(["--resume", str(run_dir)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "round_000001.pt cannot be read" in line


def test_resume_refuses_when_the_data_changed(tmp_path, capsys):
    run_dir = make_resumable_looking_dir(tmp_path, seed=0)
    torch.save({"round": 1}, run_dir / "checkpoints" / "round_000001.pt")
    # The saved scenario now says seed 1: its data and partition differ from partition.parquet.
    text = (run_dir / "scenario.yaml").read_text().replace("seed: 0", "seed: 1", 1)
    (run_dir / "scenario.yaml").write_text(text)
    assert main(["--resume", str(run_dir)]) == 2
    assert "no longer give the saved partition.parquet" in capsys.readouterr().err


def test_resume_elsewhere_warns_that_later_rounds_follow_this_machine(tmp_path, capsys):
    run_dir = make_resumable_looking_dir(tmp_path, seed=0)
    warn_if_made_elsewhere(run_dir)  # the header was written here, by this process
    assert capsys.readouterr().err == ""
    record = json.loads((run_dir / "environment.json").read_text())
    (run_dir / "environment.json").write_text(json.dumps(dict(record, cpu="Other CPU")))
    warn_if_made_elsewhere(run_dir)
    assert capsys.readouterr().err.splitlines() == [
        f"simfl: warning: --resume {run_dir}: started elsewhere (cpu: 'Other CPU' against {record['cpu']!r}); "
        "the rounds after its checkpoint will not match an uninterrupted run"]


def write_fake_bloodmnist(root: Path, train: int) -> None:
    """A bloodmnist.npz in MedMNIST's exact layout (keys, dtypes, (N, 1) labels)."""
    ds = make_dataset(train_size=train, val_size=300, test_size=600, image_size=28, num_classes=8, seed=7)
    root.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        root / "bloodmnist.npz",
        train_images=ds.train_x, train_labels=ds.train_y[:, None].astype(np.uint8),
        val_images=ds.val_x, val_labels=ds.val_y[:, None].astype(np.uint8),
        test_images=ds.test_x, test_labels=ds.test_y[:, None].astype(np.uint8),
    )


@pytest.mark.timeout(600)
def test_noniid_500_runs_to_the_end_on_bloodmnist_npz(ray_local, tmp_path):
    root = tmp_path / "data"
    write_fake_bloodmnist(root, train=11_959)
    out = tmp_path / "runs"
    code = main(["scenarios/noniid_500.yaml", "--set", f"data.root={root}", "--set", "data.download=false",
                 "--set", f"output.dir={out}", "--set", "output.name=n500", "--set", "training.rounds=2",
                 "--set", "training.local_epochs=1", "--set", "evaluation.every=1",
                 "--set", "evaluation.local_clients=50", "--set", "resources.client_actors=2", "--quiet"])
    assert code == 0
    run_dir = out / "n500"
    partition = pd.read_parquet(run_dir / "partition.parquet")
    assert len(partition) == 500
    assert set(partition["population"]) == {"university_hospitals", "regional_clinics", "external_lab"}
    for name in ("rounds", "clients", "evals", "client_evals"):
        assert len(pd.read_parquet(run_dir / name)) > 0, name
    assert len(pd.read_parquet(run_dir / "clients")) == 100
    assert json.loads((run_dir / "environment.json").read_text()) == environment()  # where it ran, for --compare
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/accuracy", "time/round_s", "test_accuracy/global",
                "test_accuracy/external_lab", "local_val_accuracy/regional_clinics"):
        assert tag in tags, tags
        assert len(events.Scalars(tag)) == 2


@pytest.mark.timeout(600)
def test_folder_sites_runs_end_to_end_on_a_manifest_with_a_held_out_hospital(ray_local, tmp_path):
    root = tmp_path / "hospitals"
    write_site_tree(root, patients_per_site=10, images_per_patient=6, size=28)
    out = tmp_path / "runs"
    args = ["scenarios/folder_sites.yaml", "--set", f"data.root={root}", "--set", "data.size=16",
            "--set", "populations.held_out=[hospital_c]", "--set", "populations.clients=3",
            "--set", "populations.quantity={mean: 10, sigma: 0.3, min: 4}",
            "--set", f"output.dir={out}", "--set", "training.rounds=2", "--set", "training.clients_per_round=4",
            "--set", "training.local_epochs=1", "--set", "evaluation.every=1", "--set", "checkpoint.every=1",
            "--set", "attacks.methods=[{kind: ig, iterations: 10}, {kind: feature_decoder, steps: 10}]",
            "--set", "attacks.victims=2", "--set", "attacks.rounds=[1, 2]", "--set", "attacks.held_out_victims=1",
            "--set", "resources={client_actors: 1, cpus_per_actor: 0.5}",
            "--set", "attacks.pool={actors: 1, cpus_per_actor: 0.5}", "--quiet"]
    assert main([*args, "--set", "output.name=first"]) == 0
    run_dir = out / "first"
    partition = pd.read_parquet(run_dir / "partition.parquet")
    assert partition.groupby("population")["site"].first().to_dict() == {s: s for s in SITES}
    assert partition.groupby("population")["held_out"].first().to_dict() == {
        "hospital_a": False, "hospital_b": False, "hospital_c": True}
    evals = pd.read_parquet(run_dir / "evals")
    held = evals[(evals["population"] == "hospital_c") & (evals["round"] == 2)]
    assert set(held["scope"]) >= {"test", "local_val"}, evals[["population", "scope"]].drop_duplicates()
    assert (held["samples"] > 0).all()
    attacks = pd.read_parquet(run_dir / "attacks")
    assert set(attacks["attack"]) == {"ig", "feature_decoder"}
    assert set(attacks["knowledge"]) == {"naive", "adaptive"}  # the latent defence's adaptive attacker too
    assert "hospital_c" in set(attacks["population"])  # the held-out hospital probed
    # The second run decodes nothing: the images come from the cache beside the manifest.
    (cache,) = (root / ".simfl-cache").glob("*.npz")
    stamp = cache.stat().st_mtime_ns
    assert main([*args, "--set", "output.name=second", "--set", "attacks=null"]) == 0
    assert cache.stat().st_mtime_ns == stamp and len(list((root / ".simfl-cache").glob("*.npz"))) == 1
    assert pd.read_parquet(out / "second" / "partition.parquet").equals(partition)


RECORDED_ATTACKS = ["--set", "attacks={methods: [{kind: ig, iterations: 10}, {kind: feature_decoder, steps: 10}], "
                    "victims: 2, rounds: [1, 3], pool: {actors: 1, cpus_per_actor: 1}}"]


@pytest.mark.timeout(600)
def test_recorded_attack_jobs_attacked_later_give_the_live_runs_results(ray_local, tmp_path):
    # What a study's cell does with its kept probe: record while training, then resume with live attacks.
    live = run_smoke(tmp_path, "live", *RECORDED_ATTACKS)
    recorded = run_smoke(tmp_path, "rec", *RECORDED_ATTACKS, "--set", "attacks.record=true")
    assert not (recorded / "attacks").exists() and not (recorded / "reconstructions").exists()
    assert sorted(p.name for p in (recorded / "attack_jobs").iterdir()) == ["round_000001.pt", "round_000003.pt"]
    assert_same_results(live, recorded)  # recording changes nothing in training
    saved = recorded / "scenario.yaml"
    saved.write_text(saved.read_text().replace("record: true", "record: false"))
    assert main(["--resume", str(recorded), "--quiet"]) == 0
    assert differences(live, recorded) == []  # every table (attacks included), final weights
    assert sorted(p.name for p in (recorded / "reconstructions").iterdir()) == sorted(
        p.name for p in (live / "reconstructions").iterdir())
    assert pd.read_parquet(recorded / "rounds")["round"].tolist() == [1, 2, 3]  # nothing trained again
