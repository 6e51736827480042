"""MedMNIST through the real medmnist package, on tiny files in its exact on-disk format."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import medmnist
import numpy as np
import pytest

from simfl.core.errors import UserError
from simfl.data import DataConfig, load_dataset
from simfl.data.medmnist_flags import MEDMNIST_2D
from simfl.data.medmnist_loader import load_medmnist

SIZES = {"train": 12, "val": 4, "test": 6}


def _arrays(size: int, channels: int | None, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The six arrays of a MedMNIST npz: {split}_images (N, H, W[, C]) uint8, {split}_labels (N, 1)."""
    r = np.random.default_rng(seed)
    shape = (size, size) if channels is None else (size, size, channels)
    arrays = {}
    for split, n in SIZES.items():
        arrays[f"{split}_images"] = r.integers(0, 256, (n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = r.integers(0, num_classes, (n, 1)).astype(np.uint8)
    return arrays


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.")
    return message


@pytest.mark.parametrize("size, filename", [(28, "bloodmnist.npz"), (64, "bloodmnist_64.npz")])
def test_loads_rgb(tmp_path: Path, size: int, filename: str) -> None:
    arrays = _arrays(size, 3, 8)
    np.savez_compressed(tmp_path / filename, **arrays)
    ds = load_medmnist("bloodmnist", tmp_path, size=size, download=False)
    assert ds.name == "bloodmnist" and ds.num_classes == 8
    assert ds.label_names[0] == "basophil" and ds.label_names[7] == "platelet"
    for split in SIZES:
        x, y = getattr(ds, f"{split}_x"), getattr(ds, f"{split}_y")
        np.testing.assert_array_equal(x, arrays[f"{split}_images"])
        assert y.dtype == np.int64 and y.shape == (SIZES[split],)
        np.testing.assert_array_equal(y, arrays[f"{split}_labels"][:, 0])


def test_grayscale_gets_a_channel_axis(tmp_path: Path) -> None:
    arrays = _arrays(28, None, 2)
    np.savez_compressed(tmp_path / "pneumoniamnist.npz", **arrays)
    ds = load_medmnist("pneumoniamnist", tmp_path, size=28, download=False)
    assert ds.train_x.shape == (12, 28, 28, 1) and ds.channels == 1
    np.testing.assert_array_equal(ds.test_x[..., 0], arrays["test_images"])
    assert ds.label_names == ["normal", "pneumonia"]


def test_label_names_in_class_order(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "organamnist.npz", **_arrays(28, None, 11))
    ds = load_medmnist("organamnist", tmp_path, size=28, download=False)
    labels = medmnist.INFO["organamnist"]["label"]
    assert ds.num_classes == 11
    assert ds.label_names == [labels[str(i)] for i in range(11)]  # "10" comes last, not after "1"


def test_missing_with_download_off(tmp_path: Path) -> None:
    root = tmp_path / "not" / "yet"
    with pytest.raises(UserError) as err:
        load_medmnist("bloodmnist", root, size=28, download=False)
    message = _one_line(err)
    assert f"bloodmnist.npz not found in {root}" in message
    assert "download is off (data.download: false)" in message
    assert medmnist.INFO["bloodmnist"]["url"] in message
    assert root.is_dir()  # created, so the user can drop the file there


def test_missing_and_offline(tmp_path: Path, offline: None) -> None:
    with pytest.raises(UserError) as err:
        load_medmnist("bloodmnist", tmp_path, size=64, download=True)
    message = _one_line(err)
    assert f"bloodmnist_64.npz not found in {tmp_path} and could not be downloaded" in message
    assert "network unreachable (test)" in message
    assert medmnist.INFO["bloodmnist"]["url_64"] in message
    assert not (tmp_path / "bloodmnist_64.npz").exists()


def test_download_on_first_use(tmp_path: Path, serve, monkeypatch: pytest.MonkeyPatch) -> None:
    body = _npz_bytes(_arrays(28, 3, 8))
    monkeypatch.setitem(medmnist.INFO["bloodmnist"], "MD5", hashlib.md5(body).hexdigest())
    requested = serve(body)
    ds = load_medmnist("bloodmnist", tmp_path, size=28, download=True)
    assert requested and requested[0] == medmnist.INFO["bloodmnist"]["url"]
    assert (tmp_path / "bloodmnist.npz").read_bytes() == body
    assert ds.train_x.shape == (12, 28, 28, 3)
    requested.clear()
    load_medmnist("bloodmnist", tmp_path, size=28, download=True)
    assert requested == []  # present: not fetched again


def test_download_with_wrong_md5_is_refused_and_removed(tmp_path: Path, serve) -> None:
    serve(_npz_bytes(_arrays(28, 3, 8)))  # not the official file: its md5 differs from INFO's
    with pytest.raises(UserError) as err:
        load_medmnist("bloodmnist", tmp_path, size=28, download=True)
    assert "could not be downloaded" in _one_line(err)
    assert not (tmp_path / "bloodmnist.npz").exists()


def test_present_file_is_not_replaced(tmp_path: Path, offline: None) -> None:
    """download: true with the file present must not re-fetch (or overwrite) it."""
    np.savez_compressed(tmp_path / "bloodmnist.npz", **_arrays(28, 3, 8))
    assert load_medmnist("bloodmnist", tmp_path, size=28, download=True).train_x.shape == (12, 28, 28, 3)


@pytest.mark.parametrize(
    "content",
    [b"", b"not a zip file at all", _npz_bytes(_arrays(28, 3, 8))[:200]],
    ids=["empty", "garbage", "truncated"],
)
def test_corrupt_file(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "bloodmnist.npz").write_bytes(content)
    with pytest.raises(UserError) as err:
        load_medmnist("bloodmnist", tmp_path, size=28, download=True)
    message = _one_line(err)
    assert f"{tmp_path / 'bloodmnist.npz'} is not a valid MedMNIST file" in message
    assert "delete it" in message
    assert (tmp_path / "bloodmnist.npz").read_bytes() == content  # left for the user to inspect


def test_pickled_arrays_are_never_loaded(tmp_path: Path) -> None:
    arrays = _arrays(28, 3, 8)
    arrays["train_labels"] = np.array([{"a": 1}] * 12, dtype=object)  # stored with pickle
    np.savez(tmp_path / "bloodmnist.npz", **arrays)
    with pytest.raises(UserError) as err:
        load_medmnist("bloodmnist", tmp_path, size=28, download=False)
    assert "pickle" in _one_line(err)


def test_wrong_resolution_in_file(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "bloodmnist.npz", **_arrays(64, 3, 8))
    with pytest.raises(UserError) as err:
        load_medmnist("bloodmnist", tmp_path, size=28, download=False)
    assert "not 28 px single-label MedMNIST" in _one_line(err)


def test_flags_are_the_2d_single_label_datasets() -> None:
    expected = {
        flag
        for flag, info in medmnist.INFO.items()
        if not flag.endswith("3d") and "multi-label" not in info["task"]
    }
    assert MEDMNIST_2D == expected


def test_load_dataset_checks_the_partition_fits(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "bloodmnist.npz", **_arrays(28, 3, 8))
    cfg = DataConfig(name="bloodmnist", root=str(tmp_path), download=False)
    assert len(load_dataset(cfg, train_size=12, seed=0).train_y) == 12
    with pytest.raises(UserError, match="need 13 training images but bloodmnist has 12"):
        load_dataset(cfg, train_size=13, seed=0)
