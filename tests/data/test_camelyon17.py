"""WILDS Camelyon17 records, through the real ``wilds`` package, on a tiny tree in WILDS's on-disk layout.

The layout is what wilds 2.0 reads (``wilds/datasets/camelyon17_dataset.py``)
and what WILDS's preprocessing wrote (``dataset_preprocessing/camelyon17/
generate_final_metadata.py``, ``df.to_csv(...)`` with its unnamed index):

    <root>/camelyon17_v1.0/RELEASE_v1.0.txt     the marker wilds checks before it would download
    <root>/camelyon17_v1.0/metadata.csv         ,patient,node,x_coord,y_coord,tumor,slide,center,split
    <root>/camelyon17_v1.0/patches/patient_XXX_node_Y/patch_patient_XXX_node_Y_x_X_y_Y.png  (96x96 RGB)

``patient`` is a zero-padded string (patients 20*h .. 20*h+19 at hospital h),
``center`` the hospital, ``slide`` the index of (patient, node) in sorted order,
``split`` 0 (train) or 1 (id_val); wilds itself moves hospital 1 to val and 2 to test.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from simfl.core.errors import UserError
from simfl.data import FolderConfig
from simfl.data.camelyon17 import COLUMNS, FOLDER, LABEL_NAMES, RELEASE_MARKER, camelyon17_records
from simfl.data.folder import dataset_from_records, decode_image

HEADER = ["patient", "node", "x_coord", "y_coord", "tumor", "slide", "center", "split"]
PATIENTS_PER_HOSPITAL = 4  # patients 20*h + 3, 7, 11 and 15
NODES = (0, 4)  # the first patient of each hospital has two slides
PATCHES_PER_LABEL = 2


def _write_tree(root: Path) -> pd.DataFrame:
    """A tiny camelyon17_v1.0 in WILDS's layout under ``root``; returns the metadata as written."""
    folder = root / FOLDER
    rows = []
    for hospital in range(5):
        for k in range(PATIENTS_PER_HOSPITAL):
            patient = f"{20 * hospital + 3 + 4 * k:03d}"
            for node in NODES if k == 0 else NODES[:1]:
                for tumor in (0, 1):
                    for i in range(PATCHES_PER_LABEL):
                        x, y = 3200 + 32 * i + 1000 * tumor, 5440 + 64 * i
                        rows.append((patient, node, x, y, tumor))
    df = pd.DataFrame(rows, columns=HEADER[:5])
    slides = sorted(set(zip(df["patient"], df["node"])))
    df["slide"] = [slides.index(key) for key in zip(df["patient"], df["node"])]
    df["center"] = df["patient"].astype(int) // 20
    df["split"] = [i % 3 == 2 for i in range(len(df))]  # about 1 in 3 to WILDS's id_val
    df["split"] = df["split"].astype(int)

    r = np.random.default_rng(0)
    for patient, node, x, y in df[["patient", "node", "x_coord", "y_coord"]].itertuples(index=False):
        slide_dir = folder / "patches" / f"patient_{patient}_node_{node}"
        slide_dir.mkdir(parents=True, exist_ok=True)
        pixels = r.integers(0, 256, (96, 96, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(slide_dir / f"patch_patient_{patient}_node_{node}_x_{x}_y_{y}.png")
    df.to_csv(folder / "metadata.csv")
    (folder / RELEASE_MARKER).write_text("v1.0\n")
    return df


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    root = tmp_path / "data"
    return root, _write_tree(root)


def test_metadata_header_is_wilds(tree: tuple[Path, pd.DataFrame]) -> None:
    root, _ = tree
    header = (root / FOLDER / "metadata.csv").read_text().splitlines()[0]
    assert header == "," + ",".join(HEADER)


def test_records_one_row_per_patch(tree: tuple[Path, pd.DataFrame]) -> None:
    root, meta = tree
    records = camelyon17_records(root, download=False)

    assert list(records.columns) == COLUMNS
    assert "split" not in records.columns
    assert len(records) == len(meta)
    assert LABEL_NAMES == ["normal", "tumor"]

    paths = [Path(p) for p in records["path"]]
    assert all(p.is_absolute() and p.is_file() for p in paths)
    with Image.open(paths[0]) as img:
        assert img.size == (96, 96) and img.mode == "RGB"
    expected = [
        root / FOLDER / "patches" / f"patient_{p}_node_{n}" / f"patch_patient_{p}_node_{n}_x_{x}_y_{y}.png"
        for p, n, x, y in meta[["patient", "node", "x_coord", "y_coord"]].itertuples(index=False)
    ]
    assert paths == expected

    assert records["label"].dtype == np.int64
    assert records["label"].tolist() == meta["tumor"].tolist()
    assert records["site"].tolist() == [f"hospital_{c}" for c in meta["center"]]
    assert records["patient"].tolist() == [f"patient_{p}" for p in meta["patient"]]
    assert sorted(records["site"].unique()) == [f"hospital_{h}" for h in range(5)]


def test_patients_are_unique_across_hospitals(tree: tuple[Path, pd.DataFrame]) -> None:
    records = camelyon17_records(tree[0], download=False)

    assert records.groupby("patient")["site"].nunique().max() == 1
    per_site = records.groupby("site")["patient"].nunique()
    assert (per_site == PATIENTS_PER_HOSPITAL).all()
    assert "patient_003" in set(records["patient"]) and "patient_083" in set(records["patient"])
    # every hospital has both labels, so any of them can be a training or a held-out site
    assert (records.groupby("site")["label"].nunique() == 2).all()


def test_wilds_split_is_the_official_one(tree: tuple[Path, pd.DataFrame]) -> None:
    root, meta = tree
    records = camelyon17_records(root, download=False)

    by_site = records.groupby("site")["wilds_split"].agg(lambda s: sorted(set(s)))
    assert by_site["hospital_1"] == ["val"]
    assert by_site["hospital_2"] == ["test"]
    for site in ("hospital_0", "hospital_3", "hospital_4"):
        assert by_site[site] == ["id_val", "train"]
    train_hospitals = meta["center"].isin([0, 3, 4]).to_numpy()
    csv_split = np.where(meta["split"] == 1, "id_val", "train")
    assert (records["wilds_split"].to_numpy()[train_hospitals] == csv_split[train_hospitals]).all()


def test_tilde_root_gives_absolute_paths(tree: tuple[Path, pd.DataFrame], monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = tree
    monkeypatch.setenv("HOME", str(root.parent))
    records = camelyon17_records(Path("~") / root.name, download=False)
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in records["path"])


def _one_line(err: pytest.ExceptionInfo[UserError]) -> str:
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.root: ")
    return message


def test_missing_with_download_off_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        camelyon17_records(tmp_path / "empty", download=False)
    message = _one_line(err)
    assert f"{FOLDER} not found in {tmp_path / 'empty'}" in message
    assert "download is off (data.download: false)" in message
    assert "10.7 GB" in message and "wilds.stanford.edu" in message


def test_no_release_marker_counts_as_missing(tree: tuple[Path, pd.DataFrame]) -> None:
    root, _ = tree
    (root / FOLDER / RELEASE_MARKER).unlink()
    with pytest.raises(UserError) as err:
        camelyon17_records(root, download=False)
    assert f"no {FOLDER}/{RELEASE_MARKER}" in _one_line(err)


def test_failed_download_is_one_line(tmp_path: Path, offline: None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError) as err:
        camelyon17_records(tmp_path, download=True)
    message = _one_line(err)
    assert f"{FOLDER} could not be downloaded into {tmp_path}" in message
    assert "network unreachable (test)" in message
    assert "Downloading dataset to" in capsys.readouterr().out  # wilds' own messages still reach the screen


def test_partial_archive_is_named_for_deletion(tmp_path: Path, offline: None) -> None:
    archive = tmp_path / FOLDER / "archive.tar.gz"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"\x1f\x8b truncated")  # wilds reuses it without a check, then fails to extract it
    with pytest.raises(UserError) as err:
        camelyon17_records(tmp_path, download=True)
    message = _one_line(err)
    assert "could not be downloaded" in message and f"delete {archive}" in message


def test_missing_metadata_is_one_line(tree: tuple[Path, pd.DataFrame]) -> None:
    root, _ = tree
    (root / FOLDER / "metadata.csv").unlink()
    with pytest.raises(UserError) as err:
        camelyon17_records(root, download=False)
    message = _one_line(err)
    assert f"{root / FOLDER} is incomplete (no metadata.csv)" in message and "download it again" in message


@pytest.mark.parametrize("text", ["", "not,a,metadata\nfile,at,all\n", ",patient,node\n0,004,4\n"])
def test_unreadable_metadata_is_one_line(tree: tuple[Path, pd.DataFrame], text: str) -> None:
    root, _ = tree
    (root / FOLDER / "metadata.csv").write_text(text)
    with pytest.raises(UserError) as err:
        camelyon17_records(root, download=False)
    assert f"cannot read {root / FOLDER / 'metadata.csv'}" in _one_line(err)


def test_missing_patch_is_one_line(tree: tuple[Path, pd.DataFrame]) -> None:
    root, meta = tree
    p, n, x, y = meta[["patient", "node", "x_coord", "y_coord"]].iloc[5]
    rel = f"patches/patient_{p}_node_{n}/patch_patient_{p}_node_{n}_x_{x}_y_{y}.png"
    (root / FOLDER / rel).unlink()
    with pytest.raises(UserError) as err:
        camelyon17_records(root, download=False)
    message = _one_line(err)
    assert f"1 of the {len(meta)} patches in metadata.csv are missing (first: {rel})" in message


def test_missing_slide_folder_is_one_line(tree: tuple[Path, pd.DataFrame]) -> None:
    root, meta = tree
    for png in (root / FOLDER / "patches" / "patient_083_node_0").iterdir():
        png.unlink()
    (root / FOLDER / "patches" / "patient_083_node_0").rmdir()
    with pytest.raises(UserError) as err:
        camelyon17_records(root, download=False)
    missing = int(((meta["patient"] == "083") & (meta["node"] == 0)).sum())
    assert f"{missing} of the {len(meta)} patches" in _one_line(err)


def test_records_build_a_dataset_with_sites(tree: tuple[Path, pd.DataFrame]) -> None:
    root, _ = tree
    records = camelyon17_records(root, download=False)
    named = records.assign(label=[LABEL_NAMES[i] for i in records["label"]])
    cfg = SimpleNamespace(size=32, folder=FolderConfig())  # the two parts of data: that decoding reads
    ds = dataset_from_records(named, root, cfg, seed=0, name="camelyon17")  # type: ignore[arg-type]

    assert ds.label_names == LABEL_NAMES  # sorted names keep label 0 = normal
    assert ds.sites == [f"hospital_{h}" for h in range(5)]
    assert ds.image_size == 32 and ds.channels == 3 and ds.train_x.dtype == np.uint8
    assert len(ds.train_y) + len(ds.val_y) + len(ds.test_y) == len(records)
    for hospital in range(5):  # patient-grouped splits within every hospital, whatever WILDS's split says
        for split_site in (ds.train_site, ds.val_site, ds.test_site):
            assert (split_site == hospital).any()

    # every image is one of the patches, decoded at 32 px, with that patch's label and hospital
    decoded = {}
    for i, path in enumerate(records["path"]):
        with Image.open(path) as img:
            decoded[decode_image(img, 32)[0].tobytes()] = i
    for x, y, site_ids in ((ds.train_x, ds.train_y, ds.train_site), (ds.val_x, ds.val_y, ds.val_site),
                           (ds.test_x, ds.test_y, ds.test_site)):
        for image, label, s in zip(x, y, site_ids):
            row = records.iloc[decoded[image.tobytes()]]
            assert label == row["label"] and ds.sites[s] == row["site"]
