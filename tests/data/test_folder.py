"""``data.name: folder``: users' own image files, written here with PIL and loaded through the real path.

Manifests (CSV, Parquet), ImageFolder trees and in-memory records; PNG, JPEG
and TIFF (16-bit too), gray and colour, non-square; sites and patients; the
cache beside the data; and one line for every mistake a user can make.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from pydantic import ValidationError

import simfl.data.folder as folder
from simfl.core.errors import UserError
from simfl.data import DataConfig, Dataset, dataset_from_records, load_dataset
from simfl.simulation.runner import main as run_main

ROOT = Path(__file__).resolve().parents[2]
SITES = ("hospital_a", "hospital_b", "hospital_c")


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private home: the fallback cache (~/.simfl/cache) must never be the real one."""
    path = tmp_path / "home"
    monkeypatch.setenv("HOME", str(path))
    return path


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every image PIL opens from now on (decoding starts there)."""
    calls: list[str] = []
    real = Image.open

    def counting(fp, *args, **kwargs):
        calls.append(str(fp))
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting)
    return calls


def _save(path: Path, image: Image.Image, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def _bands(width: int, height: int, colours: list[tuple[int, int, int]]) -> Image.Image:
    """Vertical bands of solid colour, left to right."""
    pixels = np.zeros((height, width, 3), np.uint8)
    for k, colour in enumerate(colours):
        pixels[:, k * width // len(colours):(k + 1) * width // len(colours)] = colour
    return Image.fromarray(pixels)


def _mixed(tmp_path: Path) -> pd.DataFrame:
    """One image of every kind, each in a known split (the first four test images are checked pixel by pixel)."""
    img = tmp_path / "img"
    deep = np.full((32, 32), 1000, np.uint16)
    deep[:, 16:] = 3000
    palette = Image.new("P", (12, 12))
    palette.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    palette.paste(1, (0, 0, 6, 12))
    gradient = np.tile(np.arange(0, 240, 10, dtype=np.uint8), (16, 1))
    rows = [
        ("solid_rgb.png", Image.new("RGB", (37, 23), (200, 30, 90)), {}, "malignant", "hospital_a", "p1", "test"),
        ("solid_gray.png", Image.new("L", (20, 20), 77), {}, "benign", "hospital_b", "p2", "test"),
        ("photo.jpg", Image.new("RGB", (30, 18), (40, 160, 220)), {"quality": 95}, "benign", "hospital_c", "p3",
         "test"),
        ("deep.tif", Image.fromarray(deep), {}, "malignant", "hospital_a", "p1", "test"),
        ("gray8.tif", Image.fromarray(gradient), {}, "benign", "hospital_b", "p2", "val"),
        ("palette.png", palette, {}, "malignant", "hospital_c", "p4", "val"),
        ("alpha.png", Image.new("RGBA", (9, 14), (10, 220, 30, 128)), {}, "benign", "hospital_a", "p5", "train"),
        ("cmyk.jpg", Image.new("CMYK", (16, 16), (0, 128, 128, 0)), {}, "malignant", "hospital_b", "p6", "train"),
        ("la.png", Image.new("LA", (11, 11), (150, 255)), {}, "benign", "hospital_c", "p7", "train"),
        ("bands.png", _bands(60, 20, [(255, 0, 0), (0, 255, 0), (0, 0, 255)]), {}, "malignant", "hospital_a", "p8",
         "train"),
    ]
    records = []
    for name, image, kwargs, label, site, patient, split in rows:
        _save(img / name, image, **kwargs)
        records.append({"path": f"img/{name}", "label": label, "site": site,
                        "patient": patient, "split": split})
    return pd.DataFrame(records)


def _manifest(tmp_path: Path, records: pd.DataFrame, name: str = "manifest.csv") -> Path:
    path = tmp_path / name
    if path.suffix == ".csv":
        records.to_csv(path, index=False)
    else:
        records.to_parquet(path, index=False)
    return path


def _cfg(manifest: Path | None = None, size: int = 16, root: Path | None = None, **folder_settings) -> DataConfig:
    extra = {"manifest": str(manifest)} if manifest is not None else {}
    extra.update({"root": str(root)} if root is not None else {})
    return DataConfig(name="folder", size=size, folder=folder_settings, **extra)


def _load(cfg: DataConfig, seed: int = 0) -> Dataset:
    return load_dataset(cfg, train_size=1, seed=seed)


def _many(tmp_path: Path, patients_per_site: int = 8) -> pd.DataFrame:
    """Lossless solid-colour PNGs, each image's red value its row number: 3 sites, patients of 1 to 3 images."""
    records, i = [], 0
    for s, site in enumerate(SITES):
        for p in range(patients_per_site):
            for _ in range(1 + (p + s) % 3):
                path = tmp_path / "img" / f"{i}.png"
                _save(path, Image.new("RGB", (6, 4), (i, 255 - i, 7)))
                records.append({"path": f"img/{i}.png", "label": ["benign", "malignant"][i % 2], "site": site,
                                "patient": f"{site}-{p}"})
                i += 1
    return pd.DataFrame(records)


def _rows_of(ds: Dataset, split: str) -> np.ndarray:
    """The manifest rows (from the red value) of a split's images made by :func:`_many`."""
    return getattr(ds, f"{split}_x")[:, 0, 0, 0].astype(int)


def _one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(err.value)
    assert "\n" not in message and message.startswith("data."), message
    for part in parts:
        assert part in message, message
    return message


# ---- loading -------------------------------------------------------------------------------------------------------


def test_csv_manifest_of_every_kind_of_image(tmp_path: Path) -> None:
    records = _mixed(tmp_path)
    ds = _load(_cfg(_manifest(tmp_path, records)))
    assert ds.name == "folder" and ds.label_names == ["benign", "malignant"] and ds.num_classes == 2
    assert ds.sites == list(SITES)
    assert [len(ds.train_y), len(ds.val_y), len(ds.test_y)] == [4, 2, 4]
    for split in ("train", "val", "test"):
        x, y, site = (getattr(ds, f"{split}_{k}") for k in ("x", "y", "site"))
        assert x.dtype == np.uint8 and x.shape[1:] == (16, 16, 3) and y.dtype == np.int64
        assert site.dtype == np.int32
        rows = records[records.split == split]
        np.testing.assert_array_equal(y, (rows.label == "malignant").to_numpy())
        np.testing.assert_array_equal(site, [SITES.index(s) for s in rows.site])

    solid, gray, jpeg, deep = ds.test_x
    assert (solid == (200, 30, 90)).all()  # non-square, cropped and resized: a solid colour survives exactly
    assert (gray == 77).all()  # gray repeated on the three channels
    assert np.abs(jpeg.astype(int) - (40, 160, 220)).max() <= 4
    assert (deep[:, 0] == 0).all() and (deep[:, -1] == 255).all()  # 16-bit: own min..max onto 0..255
    assert (deep[..., 0] == deep[..., 2]).all()
    palette, alpha_gone = ds.val_x[1], ds.train_x[0]
    assert (palette[:, 0] == (250, 10, 10)).all() and (palette[:, -1] == 0).all()
    assert (alpha_gone == (10, 220, 30)).all()


def test_parquet_manifest_gives_the_same_dataset(tmp_path: Path) -> None:
    records = _mixed(tmp_path)
    from_csv = _load(_cfg(_manifest(tmp_path, records)))
    from_parquet = _load(_cfg(_manifest(tmp_path, records, "manifest.parquet")))
    for split in ("train", "val", "test"):
        for k in ("x", "y", "site"):
            np.testing.assert_array_equal(getattr(from_csv, f"{split}_{k}"), getattr(from_parquet, f"{split}_{k}"))


def test_image_folder_tree(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for k in range(4):
        _save(root / "tumour" / f"{k}.png", Image.new("RGB", (20, 10 + k), (180, 20, 20)))
        _save(root / "normal" / f"{k}.tiff", Image.new("L", (8 + k, 8), 90))
        _save(root / "necrosis" / "sub" / f"{k}.jpeg", Image.new("L", (12, 12), 30))
    (root / "normal" / "notes.txt").write_text("not an image")
    ds = _load(_cfg(root=root, size=8))
    assert ds.label_names == ["necrosis", "normal", "tumour"]  # folder names, sorted as torchvision sorts them
    assert ds.sites == [] and len(ds.train_site) == 0
    assert len(ds.train_y) + len(ds.val_y) + len(ds.test_y) == 12
    x = np.concatenate([ds.train_x, ds.val_x, ds.test_x])
    y = np.concatenate([ds.train_y, ds.val_y, ds.test_y])
    assert x.shape[1:] == (8, 8, 3)
    assert (x[y == 2] == (180, 20, 20)).all() and (x[y == 1] == 90).all()


def test_records_in_memory_as_another_loader_builds_them(tmp_path: Path) -> None:
    # A WILDS-like table: absolute paths, int labels, site and patient names, no split column.
    records = _many(tmp_path)
    records["path"] = [str(tmp_path / p) for p in records.path]
    records["label"] = [i % 2 for i in range(len(records))]
    records["wilds_split"] = "train"  # other columns are ignored
    source = tmp_path / "camelyon" / "metadata.csv"
    source.parent.mkdir()
    ds = dataset_from_records(records, source, _cfg(size=8, root=tmp_path), seed=0, name="camelyon17")
    assert ds.name == "camelyon17" and ds.label_names == ["0", "1"] and ds.sites == list(SITES)
    assert list((source.parent / ".simfl-cache").glob("*.npz"))
    for split in ("train", "val", "test"):
        rows = _rows_of(ds, split)
        np.testing.assert_array_equal(getattr(ds, f"{split}_y"), rows % 2)
        np.testing.assert_array_equal(getattr(ds, f"{split}_site"), [SITES.index(s) for s in records.site[rows]])


def test_int_labels_sort_as_numbers(tmp_path: Path) -> None:
    records = _many(tmp_path).assign(label=lambda r: [(10, 2, 1)[i % 3] for i in range(len(r))])
    ds = _load(_cfg(_manifest(tmp_path, records), size=8))
    assert ds.label_names == ["1", "2", "10"]
    rows = _rows_of(ds, "train")
    np.testing.assert_array_equal(ds.train_y, [(2, 1, 0)[i % 3] for i in rows])


def test_classes_fix_the_order(tmp_path: Path) -> None:
    records = _many(tmp_path)
    ds = _load(_cfg(_manifest(tmp_path, records), size=8, classes=["malignant", "benign"]))
    assert ds.label_names == ["malignant", "benign"]
    np.testing.assert_array_equal(ds.test_y, 1 - _rows_of(ds, "test") % 2)


@pytest.mark.parametrize("channels, gray_only, expected", [
    ("auto", True, 1), ("auto", False, 3), (3, True, 3), (1, False, 1),
])
def test_channels(tmp_path: Path, channels: str | int, gray_only: bool, expected: int) -> None:
    root = tmp_path / "tree"
    for k in range(3):
        _save(root / "a" / f"{k}.png", Image.new("L", (8, 8), 40 * k))
        _save(root / "b" / f"{k}.png", Image.new("L" if gray_only else "RGB", (8, 8), 50 if gray_only else (9, 99, 0)))
    ds = _load(_cfg(root=root, size=8, channels=channels))
    x = np.concatenate([ds.train_x, ds.val_x, ds.test_x])
    assert x.shape[-1] == expected
    assert (x == x[..., :1]).all() or not gray_only
    if channels == 1:  # colour as luma, ITU-R 601: 0.299 R + 0.587 G + 0.114 B
        assert set(np.unique(x[..., 0])) <= {0, 40, 80, round(0.299 * 9 + 0.587 * 99)}


def test_crop_or_stretch(tmp_path: Path) -> None:
    img = tmp_path / "img"
    _save(img / "wide.png", _bands(60, 20, [(255, 0, 0), (0, 255, 0), (0, 0, 255)]))
    for k in range(3):
        _save(img / f"{k}.png", Image.new("L", (8, 8), k))
    records = pd.DataFrame({"path": ["img/wide.png", "img/0.png", "img/1.png", "img/2.png"], "label": [0, 1, 0, 1],
                            "split": ["test", "train", "val", "train"]})
    manifest = _manifest(tmp_path, records)
    cropped = _load(_cfg(manifest, size=8, fit="crop")).test_x[0]
    stretched = _load(_cfg(manifest, size=9, fit="stretch", resample="nearest")).test_x[0]
    # PIL's filter reads a little past the crop box, as if the whole image were resized and then cropped
    assert (cropped[:, 1:-1] == (0, 255, 0)).all() and (cropped[..., 1] > 200).all()
    assert (stretched[:, :3] == (255, 0, 0)).all() and (stretched[:, 3:6] == (0, 255, 0)).all()


# ---- splits and subsets ------------------------------------------------------------------------------------------


def test_drawn_splits_keep_patients_whole(tmp_path: Path) -> None:
    records = _many(tmp_path)
    manifest = _manifest(tmp_path, records)
    ds = _load(_cfg(manifest, size=8))
    split_of = {}
    for split in ("train", "val", "test"):
        rows = _rows_of(ds, split)
        for patient in records.patient[rows]:
            assert split_of.setdefault(patient, split) == split, f"{patient} in {split} and {split_of[patient]}"
        for site in range(3):  # every site has images in every split
            assert (getattr(ds, f"{split}_site") == site).any()
    assert len(split_of) == records.patient.nunique()
    n = len(records)
    assert abs(len(ds.val_y) / n - 0.1) <= 0.07 and abs(len(ds.test_y) / n - 0.2) <= 0.07

    again = _load(_cfg(manifest, size=8))
    other = _load(_cfg(manifest, size=8), seed=1)
    np.testing.assert_array_equal(_rows_of(again, "test"), _rows_of(ds, "test"))
    assert set(_rows_of(other, "test")) != set(_rows_of(ds, "test"))


def test_without_patients_each_image_is_its_own(tmp_path: Path) -> None:
    records = _many(tmp_path).drop(columns=["patient", "site"])
    ds = _load(_cfg(_manifest(tmp_path, records), size=8, val_fraction=0.25, test_fraction=0.25))
    assert ds.sites == []
    assert [len(ds.train_y), len(ds.val_y), len(ds.test_y)] == [24, 12, 12]


def test_split_column_is_honoured(tmp_path: Path) -> None:
    records = _many(tmp_path)
    records["split"] = [("train", "val", "test", "train")[i % 4] for i in range(len(records))]
    ds = _load(_cfg(_manifest(tmp_path, records), size=8))
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(_rows_of(ds, split), np.flatnonzero(records.split == split))


def test_max_per_site(tmp_path: Path) -> None:
    records = _many(tmp_path)
    manifest = _manifest(tmp_path, records)
    ds = _load(_cfg(manifest, size=8, max_per_site=5))
    kept = np.concatenate([_rows_of(ds, s) for s in ("train", "val", "test")])
    assert sorted(records.site[kept].value_counts().to_list()) == [5, 5, 5]
    same = _load(_cfg(manifest, size=8, max_per_site=5))
    other = _load(_cfg(manifest, size=8, max_per_site=5), seed=1)
    assert set(np.concatenate([_rows_of(same, s) for s in ("train", "val", "test")])) == set(kept)
    assert set(np.concatenate([_rows_of(other, s) for s in ("train", "val", "test")])) != set(kept)


# ---- the cache ---------------------------------------------------------------------------------------------------


def test_second_load_reads_the_cache(tmp_path: Path, opened: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "tree"
    for k in range(4):
        _save(root / "a" / f"{k}.png", Image.new("RGB", (8, 12), (k, 50, 60)))
        _save(root / "b" / f"{k}.png", Image.new("RGB", (8, 12), (k, 60, 50)))
    first = _load(_cfg(root=root, size=8))
    assert len(opened) == 8
    assert len(list((root / ".simfl-cache").glob("*.npz"))) == 1  # beside the data; not taken for a class
    assert not list((root / ".simfl-cache").glob("*.tmp"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image although the cache holds it")

    monkeypatch.setattr(Image, "open", no_decoding)
    second = _load(_cfg(root=root, size=8))
    assert second.label_names == ["a", "b"]
    np.testing.assert_array_equal(second.train_x, first.train_x)
    np.testing.assert_array_equal(second.test_y, first.test_y)


def test_a_changed_file_or_setting_rebuilds_the_cache(tmp_path: Path, opened: list[str]) -> None:
    records = _many(tmp_path, patients_per_site=3)
    manifest = _manifest(tmp_path, records)
    _load(_cfg(manifest, size=8))
    n = len(opened)
    _load(_cfg(manifest, size=8))
    assert len(opened) == n  # cached

    changed_file = tmp_path / "img" / "0.png"
    _save(changed_file, Image.new("RGB", (6, 4), (0, 0, 255)))
    later = changed_file.stat().st_mtime + 10  # a new mtime even on a coarse-grained file system
    os.utime(changed_file, (later, later))
    changed = _load(_cfg(manifest, size=8))
    assert len(opened) == 2 * n
    x = np.concatenate([changed.train_x, changed.val_x, changed.test_x])
    assert (x[..., 2] == 255).any()

    _load(_cfg(manifest, size=8, resample="box"))
    assert len(opened) == 3 * n
    _load(_cfg(manifest, size=10))
    assert len(opened) == 4 * n
    _load(_cfg(manifest, size=8), seed=5)  # the seed only draws splits: the images are cached
    assert len(opened) == 4 * n


def test_cache_falls_back_to_home(tmp_path: Path, home: Path, opened: list[str]) -> None:
    records = _many(tmp_path, patients_per_site=3)
    manifest = _manifest(tmp_path, records)
    (tmp_path / ".simfl-cache").write_text("a file where the cache folder would go: not writable")
    _load(_cfg(manifest, size=8))
    assert len(list((home / ".simfl" / "cache").glob("*.npz"))) == 1
    n = len(opened)
    _load(_cfg(manifest, size=8))
    assert len(opened) == n


def test_a_corrupt_cache_is_rebuilt(tmp_path: Path, opened: list[str]) -> None:
    records = _many(tmp_path, patients_per_site=3)
    manifest = _manifest(tmp_path, records)
    first = _load(_cfg(manifest, size=8))
    (cache,) = (tmp_path / ".simfl-cache").glob("*.npz")
    cache.write_bytes(b"not an npz")
    n = len(opened)
    second = _load(_cfg(manifest, size=8))
    assert len(opened) == 2 * n
    np.testing.assert_array_equal(second.train_x, first.train_x)


# ---- mistakes, each one line naming the file and the row ---------------------------------------------------------


def _edit(tmp_path: Path, records: pd.DataFrame, case: str) -> tuple[pd.DataFrame, dict]:
    """``records`` with one mistake; returns them and extra data.folder settings."""
    records = records.copy()
    if case == "missing image":
        records.loc[6, "path"] = "img/nope.png"
    elif case == "unreadable image":
        (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG but not really")
        records.loc[2, "path"] = "img/broken.png"
    elif case == "empty label":
        records.loc[3, "label"] = None
    elif case == "label not in classes":
        records.loc[1, "label"] = "cyst"
        return records, {"classes": ["benign", "malignant"]}
    elif case == "class without images":
        return records, {"classes": ["benign", "malignant", "cyst"]}
    elif case == "no path column":
        records = records.drop(columns=["path"])
    elif case == "no label column":
        records = records.rename(columns={"label": "diagnosis"})
    elif case == "unknown split":
        records["split"] = "train"
        records.loc[4, "split"] = "validation"
    elif case == "empty split":
        records["split"] = ["train", "test"] * (len(records) // 2)
    elif case == "one label":
        records["label"] = "benign"
    elif case == "empty path":
        records.loc[5, "path"] = None
    return records, {}


@pytest.mark.parametrize("case, expected", [
    ("missing image", "row 7: no image at {tmp}/img/nope.png"),
    ("unreadable image", "row 3: cannot read the image {tmp}/img/broken.png ("),
    ("empty label", "row 4: empty label"),
    ("label not in classes", "row 2: label 'cyst' is not in data.folder.classes (benign, malignant)"),
    ("class without images", "data.folder.classes: cyst has no images in {manifest}"),
    ("no path column", "{manifest}: no 'path' column"),
    ("no label column", "{manifest}: no 'label' column"),
    ("unknown split", "row 5: split 'validation' is not train, val or test"),
    ("empty split", "{manifest}: the val split is empty (no row has split val)"),
    ("one label", "{manifest}: every image has label 'benign'"),
    ("empty path", "row 6: empty path"),
])
@pytest.mark.parametrize("fmt", ["manifest.csv", "manifest.parquet"])
def test_mistakes_in_a_manifest(tmp_path: Path, case: str, expected: str, fmt: str) -> None:
    records, settings = _edit(tmp_path, _many(tmp_path, patients_per_site=4), case)
    manifest = _manifest(tmp_path, records, fmt)
    with pytest.raises(UserError) as err:
        _load(_cfg(manifest, size=8, **settings))
    message = _one_line(err, expected.format(tmp=tmp_path, manifest=manifest))
    assert str(manifest) in message
    if expected.startswith("row "):
        assert message.startswith(f"data.manifest: {manifest} row ")


def test_manifest_that_is_not_there_or_not_a_table(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        _load(_cfg(tmp_path / "nope.csv"))
    _one_line(err, f"data.manifest: no file at {tmp_path}/nope.csv", "starts from data.root")
    (tmp_path / "list.txt").write_text("path,label\n")
    with pytest.raises(UserError) as err:
        _load(_cfg(tmp_path / "list.txt"))
    _one_line(err, f"data.manifest: {tmp_path}/list.txt is not a CSV or Parquet file")
    (tmp_path / "fake.parquet").write_text("path,label\n")
    with pytest.raises(UserError) as err:
        _load(_cfg(tmp_path / "fake.parquet"))
    _one_line(err, f"data.manifest: cannot read {tmp_path}/fake.parquet as Parquet (")


def test_relative_manifest_starts_from_data_root(tmp_path: Path) -> None:
    _manifest(tmp_path, _many(tmp_path, patients_per_site=3))
    ds = _load(_cfg(Path("manifest.csv"), size=8, root=tmp_path))
    assert len(ds.train_y) + len(ds.val_y) + len(ds.test_y) == 18


def test_mistakes_in_an_image_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:  # the default root of other datasets
        _load(_cfg(root=tmp_path / "nowhere"))
    _one_line(err, f"data.root: {tmp_path}/nowhere is not a folder", "data.manifest")

    root = tmp_path / "tree"
    (root / "empty").mkdir(parents=True)
    for k in range(3):
        _save(root / "full" / f"{k}.png", Image.new("L", (8, 8), k))
    with pytest.raises(UserError) as err:
        _load(_cfg(root=root))
    _one_line(err, f"data.root: class folder {root}/empty holds no images (.jpg")

    (root / "empty").rmdir()
    _save(root / "other" / "0.png", Image.new("L", (8, 8), 3))
    with pytest.raises(UserError) as err:
        _load(_cfg(root=root, classes=["full", "cyst"]))
    _one_line(err, f"data.root: class folder {root}/other is not in data.folder.classes (full, cyst)")
    with pytest.raises(UserError) as err:
        _load(_cfg(root=root, classes=["full", "other", "cyst"]))
    assert str(err.value) == f"data.folder.classes: cyst has no folder in {root}"

    (root / "full" / "1.png").write_bytes(b"garbage")
    with pytest.raises(UserError) as err:
        _load(_cfg(root=root))
    _one_line(err, f"data.root: cannot read the image {root}/full/1.png (")


def test_no_class_folders(tmp_path: Path) -> None:
    _save(tmp_path / "img" / "0.png", Image.new("L", (8, 8), 3))
    with pytest.raises(UserError) as err:
        _load(_cfg(root=tmp_path / "img"))
    _one_line(err, f"data.root: no class folders in {tmp_path}/img")


def test_too_few_patients_to_draw_every_split(tmp_path: Path) -> None:
    records = _many(tmp_path, patients_per_site=2).drop(columns="site")
    records["patient"] = records.patient.str.endswith("-0")
    with pytest.raises(UserError) as err:
        _load(_cfg(_manifest(tmp_path, records), size=8))
    _one_line(err, "split is empty (drawn splits need 3 or more patients in a site")


def test_clients_need_more_images_than_there_are(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, _many(tmp_path, patients_per_site=3))
    with pytest.raises(UserError, match="the clients need 1000 training images but folder has"):
        load_dataset(_cfg(manifest, size=8), train_size=1000, seed=0)


# ---- settings ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data, message", [
    ({"name": "synthetic", "folder": {"fit": "stretch"}}, "folder: only applies to name: folder"),
    ({"name": "cifar10", "size": 32, "manifest": "m.csv"}, "manifest: only applies to name: folder"),
    ({"name": "folder", "size": 600}, "folder images are resized to 8..512 px"),
    ({"name": "folder", "size": 4}, "8..512 px"),
    ({"name": "folder", "folder": {"val_fraction": 0.5, "test_fraction": 0.5}}, "must leave images to train on"),
    ({"name": "folder", "folder": {"classes": ["a", "a", "b"]}}, "a named twice"),
    ({"name": "folder", "folder": {"channels": 2}}, "channels"),
    ({"name": "folder", "folder": {"resample": "hamming"}}, "resample"),
])
def test_settings_are_checked(data: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DataConfig.model_validate(data)


def test_settings_that_load() -> None:
    cfg = DataConfig.model_validate({"name": "folder", "size": 300, "manifest": "m.parquet",
                                     "folder": {"classes": [1, 0], "max_per_site": 100, "channels": 3}})
    assert cfg.folder.classes == ["1", "0"] and cfg.folder.resample == "bilinear" and cfg.folder.fit == "crop"
    assert DataConfig.model_validate(cfg.model_dump(mode="json")) == cfg  # a saved scenario reloads


# ---- the command line ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["missing image", "unreadable image", "empty label", "label not in classes",
                                  "class without images", "no path column", "no label column", "unknown split",
                                  "empty split", "one label", "empty path"])
def test_run_cli_fails_in_one_line_before_any_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           case: str) -> None:
    # The data are loaded before Ray starts or the run directory exists: a bad manifest costs nothing.
    records, settings = _edit(tmp_path, _many(tmp_path, patients_per_site=4), case)
    manifest = _manifest(tmp_path, records)
    scenario = yaml.safe_load((ROOT / "scenarios" / "smoke.yaml").read_text())
    scenario["data"] = {"name": "folder", "manifest": str(manifest), "size": 16, "folder": settings}
    scenario["output"]["dir"] = str(tmp_path / "runs")
    (tmp_path / "scenario.yaml").write_text(yaml.safe_dump(scenario))
    code = run_main([str(tmp_path / "scenario.yaml"), "--set", "training.rounds=1", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("simfl: error: data.") and err.count("\n") == 1 and str(manifest) in err, err
    if case == "missing image":
        assert err == f"simfl: error: data.manifest: {manifest} row 7: no image at {tmp_path}/img/nope.png\n"
    assert "Traceback" not in out + err
    assert not (tmp_path / "runs").exists()


def test_folder_module_has_no_stray_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _load(_cfg(_manifest(tmp_path, _many(tmp_path, patients_per_site=3)), size=8))
    assert capsys.readouterr() == ("", "")
    assert folder.SLOW_BUILD >= 1000
