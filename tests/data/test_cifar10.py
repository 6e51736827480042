"""CIFAR-10 through torchvision, on a tiny cifar-10-batches-py written like the official one.

The official files are Python 2 pickles of dicts with str keys ("data": uint8
(N, 3072) rows of R, G, B planes of 32x32, "labels": list of int; batches.meta
has "label_names"); torchvision reads them with ``encoding="latin1"``.
torchvision checks each file's md5 before unpickling it, so the tests register
the md5s of their files instead of bypassing that check.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets import CIFAR10

from simfl.core.errors import UserError
from simfl.data.cifar10 import load_cifar10, split_val

LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 8  # 5 train batches -> 40 train images, 4 of them carved off for validation
TEST_IMAGES = 6


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _batch(r: np.random.Generator, label: str, n: int) -> dict:
    return {
        "batch_label": label,
        "labels": [int(v) for v in r.integers(0, 10, n)],
        "data": r.integers(0, 256, (n, 3072), dtype=np.uint8),
        "filenames": [f"img_{i}.png" for i in range(n)],
    }


@pytest.fixture
def cifar_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, dict]]:
    """A tiny official-layout CIFAR-10 under tmp_path, with torchvision told its md5s."""
    folder = tmp_path / CIFAR10.base_folder
    folder.mkdir()
    r = np.random.default_rng(0)
    batches = {f"data_batch_{i}": _batch(r, f"training batch {i} of 5", PER_BATCH) for i in range(1, 6)}
    batches["test_batch"] = _batch(r, "testing batch 1 of 1", TEST_IMAGES)
    for name, batch in batches.items():
        _write(folder / name, batch)
    _write(folder / "batches.meta", {"num_cases_per_batch": PER_BATCH, "label_names": LABEL_NAMES, "num_vis": 3072})

    train_list = [[f"data_batch_{i}", _md5(folder / f"data_batch_{i}")] for i in range(1, 6)]
    monkeypatch.setattr(CIFAR10, "train_list", train_list)
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": _md5(folder / "batches.meta")})
    return tmp_path, batches


def _nhwc(data: np.ndarray) -> np.ndarray:
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.root: ")
    return message


def test_loads_all_splits(cifar_root) -> None:
    root, batches = cifar_root
    ds = load_cifar10(root, download=False)
    assert ds.name == "cifar10" and ds.num_classes == 10 and ds.label_names == LABEL_NAMES
    assert ds.train_x.shape == (36, 32, 32, 3) and ds.train_x.dtype == np.uint8
    assert ds.val_x.shape == (4, 32, 32, 3)
    assert ds.train_y.dtype == ds.val_y.dtype == ds.test_y.dtype == np.int64

    all_x = np.concatenate([_nhwc(batches[f"data_batch_{i}"]["data"]) for i in range(1, 6)])
    all_y = np.concatenate([batches[f"data_batch_{i}"]["labels"] for i in range(1, 6)])
    val_idx, train_idx = split_val(40)
    np.testing.assert_array_equal(ds.train_x, all_x[train_idx])
    np.testing.assert_array_equal(ds.train_y, all_y[train_idx])
    np.testing.assert_array_equal(ds.val_x, all_x[val_idx])
    np.testing.assert_array_equal(ds.val_y, all_y[val_idx])
    np.testing.assert_array_equal(ds.test_x, _nhwc(batches["test_batch"]["data"]))
    np.testing.assert_array_equal(ds.test_y, batches["test_batch"]["labels"])


def test_pixels_are_row_major_rgb_planes(cifar_root) -> None:
    """Image i's pixel (row, col, channel) is data[i, channel * 1024 + row * 32 + col]."""
    root, batches = cifar_root
    ds = load_cifar10(root, download=False)
    data = batches["test_batch"]["data"]
    for row, col, channel in [(0, 0, 0), (0, 31, 1), (5, 7, 2), (31, 30, 0)]:
        assert ds.test_x[2, row, col, channel] == data[2, channel * 1024 + row * 32 + col]


def test_val_split_is_fixed_and_partitions_train() -> None:
    val, train = split_val(50_000)
    assert len(val) == 5000 and len(train) == 45_000
    assert np.union1d(val, train).tolist() == list(range(50_000))
    np.testing.assert_array_equal(split_val(50_000)[0], val)
    assert len(split_val(200)[0]) == 20


def test_md5_mismatch_is_refused_without_unpickling(cifar_root, tmp_path: Path) -> None:
    """A foreign file under an official name is never unpickled: this one would create a file."""
    root, _ = cifar_root
    sentinel = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    _write(root / CIFAR10.base_folder / "data_batch_3", {"data": Payload()})
    with pytest.raises(UserError) as err:
        load_cifar10(root, download=False)
    message = _one_line(err)
    assert "data_batch_3 in" in message and "failed the md5 check" in message
    assert "download is off (data.download: false)" in message
    assert f"delete {root / CIFAR10.base_folder}" in message
    assert not sentinel.exists()


def test_missing_with_download_off(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        load_cifar10(tmp_path, download=False)
    message = _one_line(err)
    assert f"CIFAR-10 not found in {tmp_path}" in message
    assert "download is off (data.download: false)" in message
    assert f"download {CIFAR10.url} and extract it into {tmp_path}" in message


def test_missing_and_offline(tmp_path: Path, offline: None) -> None:
    with pytest.raises(UserError) as err:
        load_cifar10(tmp_path, download=True)
    message = _one_line(err)
    assert f"CIFAR-10 not found in {tmp_path} (no cifar-10-batches-py/data_batch_1)" in message
    assert "could not be downloaded (<urlopen error network unreachable (test)>)" in message
    assert CIFAR10.url in message


def test_present_files_are_not_downloaded(cifar_root, offline: None) -> None:
    root, _ = cifar_root
    assert len(load_cifar10(root, download=True).test_y) == TEST_IMAGES


def test_download_on_first_use(cifar_root, serve, monkeypatch: pytest.MonkeyPatch) -> None:
    """The archive is fetched, md5-checked and extracted by torchvision, then loaded."""
    root, batches = cifar_root
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(root / CIFAR10.base_folder, arcname=CIFAR10.base_folder)
    shutil.rmtree(root / CIFAR10.base_folder)
    body = archive.getvalue()
    monkeypatch.setattr(CIFAR10, "tgz_md5", hashlib.md5(body).hexdigest())
    requested = serve(body)

    ds = load_cifar10(root, download=True)
    assert requested[0] == CIFAR10.url
    np.testing.assert_array_equal(ds.test_x, _nhwc(batches["test_batch"]["data"]))
