import pickle

import pytest
import torch

from simfl.core.checkpoint import checkpoint_dir, list_checkpoints, load_latest, save_checkpoint

CALLS: list[str] = []


def record(tag):
    """Stands in for an attacker's payload (os.system, ...): records that it ran."""
    CALLS.append(tag)
    return tag


class Payload:
    """An arbitrary object whose unpickling would run code."""

    def __reduce__(self):
        return (record, ("payload ran",))


class Plain:
    def __init__(self):
        self.x = 1


def state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "weights": torch.randn(50, generator=g),
        "server": {"m": torch.randn(10, generator=g), "v": torch.rand(10, generator=g)},
        "journal": {0: {"participation": 3, "attempt": 1}, 17: {"participation": 1, "attempt": 0}},
        "manifest": {"rounds": ["part-000000.parquet"], "clients": []},
        "nested": {1: {2: {3: torch.arange(4)}}},
        "scalars": [1, 2.5, "text", True, None],
    }


def assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_round_trip(tmp_path):
    s = state()
    path = save_checkpoint(tmp_path, 3, s, keep=2)
    assert path == checkpoint_dir(tmp_path) / "round_000003.pt"
    assert path.is_file()
    loaded = load_latest(tmp_path)
    assert loaded["round"] == 3
    assert_same({k: v for k, v in loaded.items() if k != "round"}, s)
    assert all(isinstance(k, int) for k in loaded["journal"])
    assert loaded["weights"].device.type == "cpu"


def test_state_round_key_is_the_given_round(tmp_path):
    save_checkpoint(tmp_path, 5, {"weights": torch.zeros(1)}, keep=1)
    assert load_latest(tmp_path)["round"] == 5


def test_load_latest_without_checkpoints(tmp_path):
    assert load_latest(tmp_path) is None
    assert list_checkpoints(tmp_path) == []
    checkpoint_dir(tmp_path).mkdir(parents=True)
    assert load_latest(tmp_path) is None


def test_load_refuses_arbitrary_objects(tmp_path):
    CALLS.clear()
    save_checkpoint(tmp_path, 1, {"weights": torch.zeros(2), "evil": Payload()}, keep=2)
    assert CALLS == []
    with pytest.raises(pickle.UnpicklingError):
        load_latest(tmp_path)
    assert CALLS == []  # the payload never ran
    # the same file with full unpickling would have run it: the refusal is what protects us
    torch.load(list_checkpoints(tmp_path)[-1], weights_only=False)
    assert CALLS == ["payload ran"]


def test_load_refuses_custom_class_instance(tmp_path):
    save_checkpoint(tmp_path, 1, {"obj": Plain()}, keep=2)
    with pytest.raises(pickle.UnpicklingError):
        load_latest(tmp_path)


def test_keep_prunes_oldest(tmp_path):
    for r in range(1, 6):
        save_checkpoint(tmp_path, r, state(r), keep=2)
        assert len(list_checkpoints(tmp_path)) == min(r, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round_000004.pt", "round_000005.pt"]
    loaded = load_latest(tmp_path)
    assert loaded["round"] == 5
    assert torch.equal(loaded["weights"], state(5)["weights"])
    save_checkpoint(tmp_path, 6, state(6), keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round_000006.pt"]


def test_list_is_in_round_order_and_ignores_other_files(tmp_path):
    for r in (10, 2, 100, 9):
        save_checkpoint(tmp_path, r, {"weights": torch.full((1,), float(r))}, keep=10)
    d = checkpoint_dir(tmp_path)
    (d / "notes.txt").write_text("x")
    (d / ".round_000500.pt.tmp").write_bytes(b"partial")
    (d / "round_7.pt").write_bytes(b"not ours")
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["round_000002.pt", "round_000009.pt", "round_000010.pt", "round_000100.pt"]
    # latest means highest round, not last written, and leftovers are not loaded
    loaded = load_latest(tmp_path)
    assert loaded["round"] == 100 and float(loaded["weights"]) == 100.0


def test_atomic_write_leaves_no_tmp(tmp_path):
    for r in range(3):
        save_checkpoint(tmp_path, r, state(r), keep=5)
    files = sorted(p.name for p in checkpoint_dir(tmp_path).iterdir())
    assert files == ["round_000000.pt", "round_000001.pt", "round_000002.pt"]


def test_failed_save_does_not_replace_existing(tmp_path):
    save_checkpoint(tmp_path, 1, {"weights": torch.ones(3)}, keep=5)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, 2, {"bad": Unpicklable()}, keep=5)
    # no visible round 2, and the latest is still round 1
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round_000001.pt"]
    assert load_latest(tmp_path)["round"] == 1


def test_overwrite_same_round(tmp_path):
    save_checkpoint(tmp_path, 4, {"weights": torch.zeros(2)}, keep=3)
    save_checkpoint(tmp_path, 4, {"weights": torch.ones(2)}, keep=3)
    assert len(list_checkpoints(tmp_path)) == 1
    assert torch.equal(load_latest(tmp_path)["weights"], torch.ones(2))


def test_checkpoints_past_round_999999_sort_by_round(tmp_path):
    for r in (999_999, 1_000_000):
        save_checkpoint(tmp_path, r, {"w": torch.zeros(1)}, keep=5)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round_999999.pt", "round_1000000.pt"]
    assert load_latest(tmp_path)["round"] == 1_000_000
