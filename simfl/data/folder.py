"""Users' own images (``data.name: folder``): an ImageFolder tree or a CSV/Parquet manifest.

Hospitals bring their images as files, not as MedMNIST arrays. This module turns
them into the same :class:`Dataset` every other loader returns: uint8 NHWC
images of ``data.size`` px, int64 labels, patient-grouped train/val/test splits
and, where the manifest says so, the site each image came from.

The parts a library does are left to it: torchvision finds ImageFolder classes
and image files, pandas/pyarrow read manifests, PIL decodes and resizes. What
is ours: the checks (every mistake a user can make is one line naming the file
and the row), the splits (a patient never straddles two), and a cache of the
decoded arrays beside the data, so that only the first run decodes.

:func:`dataset_from_records` is the reusable part: any loader that can list its
images as rows (path, label, optional site, patient, split) gets decoding,
splitting, caching and the one-line errors for free.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image, ImageOps

from simfl.core.errors import UserError
from simfl.core.seeding import rng
from simfl.data.config import DataConfig
from simfl.data.dataset import Dataset

RESAMPLING: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
SPLITS = ("train", "val", "test")
CACHE_DIR = ".simfl-cache"  # beside the data: <manifest folder>/.simfl-cache or <root>/.simfl-cache
FALLBACK_CACHE = "~/.simfl/cache"  # where the cache goes when the data's folder is not writable
CACHE_VERSION = 1  # bump when decoding changes, so old caches are not reused
MANIFEST_FORMATS = {".csv": "CSV", ".parquet": "Parquet", ".pq": "Parquet"}
SLOW_BUILD = 1000  # images: decoding more prints one line to stderr (the only output of this module)
# More than 8 bits per pixel: PIL keeps these as 16/32-bit integers or floats.
_HIGH_DEPTH = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_GRAY = frozenset({"1", "L", "LA", "La"})


@dataclass(frozen=True)
class _Where:
    """Which file an error is about; rows are named for manifests, image paths for folders."""

    key: str  # the scenario key to fix: data.manifest or data.root
    source: Path
    per_row: bool  # a manifest (rows) rather than a folder tree (files)

    def row(self, i: int, what: str) -> UserError:
        """An error about row ``i`` (0-based) of the records."""
        if self.per_row:
            return UserError(f"{self.key}: {self.source} row {i + 1}: {what}")
        return UserError(f"{self.key}: {what}")

    def whole(self, what: str) -> UserError:
        """An error about the whole source."""
        return UserError(f"{self.key}: {self.source}: {what}")


@dataclass(frozen=True)
class _Rows:
    """The checked records, one entry per image."""

    paths: list[Path]  # resolved
    text: dict[str, list[str]]  # path, label, site, patient, split as written: the cache key
    labels: np.ndarray  # int64 codes into label_names
    label_names: list[str]
    sites: np.ndarray | None  # int32 codes into site_names
    site_names: list[str]
    patients: list[str] | None
    split: np.ndarray | None  # int codes into SPLITS


def load_folder(cfg: DataConfig, seed: int) -> Dataset:
    """Load ``data.name: folder``: the manifest ``cfg.manifest`` if set, else the ImageFolder tree at ``cfg.root``."""
    if cfg.manifest_path is not None:
        source = cfg.manifest_path
        return dataset_from_records(read_manifest(source), source, cfg, seed, "folder", key="data.manifest")
    root = cfg.root_path
    return dataset_from_records(folder_records(root, cfg.folder.classes), root, cfg, seed, "folder", key="data.root")


def read_manifest(path: Path) -> pd.DataFrame:
    """The rows of a CSV or Parquet manifest, as pandas reads them; a missing or unreadable file is a UserError."""
    kind = MANIFEST_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"data.manifest: {path} is not a CSV or Parquet file (name it .csv or .parquet)")
    if not path.is_file():
        raise UserError(f"data.manifest: no file at {path} (a relative manifest path starts from data.root)")
    try:
        if kind == "CSV":
            # Only empty cells are missing ("NA" may be a label); path, patient and split stay text
            # (patient "007" is not 7); label and site are left to pandas, so numbers sort as numbers.
            return pd.read_csv(path, dtype={"path": str, "patient": str, "split": str},
                               keep_default_na=False, na_values=[""])
        return pd.read_parquet(path)
    except (OSError, ValueError, pa.ArrowException) as err:  # pandas' parser errors are ValueErrors
        raise UserError(f"data.manifest: cannot read {path} as {kind} ({_one_line(err)})") from None


def manifest_sites(cfg: DataConfig) -> list[str]:
    """The sites of ``cfg.manifest`` in the order the loaded Dataset names them (empty without a site column)."""
    assert cfg.manifest_path is not None
    source = cfg.manifest_path
    records = read_manifest(source)
    if "site" not in records.columns:
        return []
    return _categories(records["site"], "site", _Where("data.manifest", source, True))[2]


def folder_records(root: Path, classes: list[str] | None = None) -> pd.DataFrame:
    """The images of an ImageFolder tree ``<root>/<class>/<image>`` as records (path relative to ``root``, label =
    folder name).

    Class folders and image files are found by torchvision, as its ImageFolder
    finds them, except hidden folders (our ``.simfl-cache``, ``.ipynb_checkpoints``).
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset  # noqa: PLC0415  (lazy: seconds per Ray worker, and most runs never use it)

    if not root.is_dir():
        raise UserError(f"data.root: {root} is not a folder; with data.name: folder, point data.root at an "
                        f"ImageFolder tree (<root>/<class>/<image>) or set data.manifest")
    try:
        found, _ = find_classes(root)
    except FileNotFoundError:  # torchvision's "Couldn't find any class folder"
        found = []
    found = [c for c in found if not c.startswith(".")]
    if not found:
        raise UserError(f"data.root: no class folders in {root}; an ImageFolder tree is <root>/<class>/<image> "
                        f"(or set data.manifest)")
    if classes is not None:
        extra = [c for c in found if c not in classes]
        if extra:
            raise UserError(f"data.root: class folder {root / extra[0]} is not in data.folder.classes "
                            f"({', '.join(classes)})")
    names = classes if classes is not None else found
    present = {c: i for i, c in enumerate(names) if c in found}
    samples = make_dataset(root, present, extensions=IMG_EXTENSIONS, allow_empty=True) if present else []
    counts = np.bincount([i for _, i in samples], minlength=len(names))
    for name, count in zip(names, counts):
        if count == 0 and name in present:
            raise UserError(f"data.root: class folder {root / name} holds no images "
                            f"({', '.join(IMG_EXTENSIONS)})")
        if count == 0:
            raise UserError(f"data.folder.classes: {name} has no folder in {root}")
    return pd.DataFrame({"path": [os.path.relpath(p, root) for p, _ in samples],
                         "label": [names[i] for _, i in samples]})


def dataset_from_records(records: pd.DataFrame, source: Path, cfg: DataConfig, seed: int, name: str,
                         *, key: str | None = None) -> Dataset:
    """A :class:`Dataset` from one row per image: ``path``, ``label``, optional ``site``, ``patient``, ``split``.

    ``path`` is absolute or relative to ``source``'s folder (``source`` itself
    if it is a folder); ``source`` is the manifest or root, named in errors and
    holding the cache. Images are decoded with ``cfg.size`` and ``cfg.folder``
    (the decoded arrays cached under a hash of the rows, the files' sizes and
    times and those settings); splits come from the ``split`` column or are
    drawn from ``seed``, whole patients within each site. ``key`` is the
    scenario key errors name (default: data.root for a folder, else
    data.manifest); row N in errors is the N-th row of ``records``. Other
    columns are ignored.
    """
    where = _Where(key or ("data.root" if source.is_dir() else "data.manifest"), source, not source.is_dir())
    rows = _check(records, source, cfg.folder.classes, where)
    keep = _subset(rows.sites, len(rows.paths), cfg.folder.max_per_site, seed)
    if rows.split is not None:
        split = rows.split[keep]
    else:
        split = _draw_splits(rows, keep, cfg.folder.val_fraction, cfg.folder.test_fraction, seed)
    for code, split_name in enumerate(SPLITS):
        if not (split == code).any():
            raise where.whole(f"the {split_name} split is empty ({_split_hint(rows, split_name)})")
    stats = _stats(rows.paths, keep, where)
    images = _cached_images(rows, keep, stats, source, cfg, where)

    labels = rows.labels[keep]
    parts = {s: np.flatnonzero(split == code) for code, s in enumerate(SPLITS)}
    splits = {s: (images[idx], labels[idx]) for s, idx in parts.items()}
    if rows.sites is None:
        return Dataset.from_splits(name, rows.label_names, splits)
    sites = rows.sites[keep]
    return Dataset.from_splits(name, rows.label_names, splits, sites=rows.site_names,
                               site_of={s: sites[idx] for s, idx in parts.items()})


def _split_hint(rows: _Rows, split_name: str) -> str:
    """What to do about an empty split."""
    if rows.split is not None:
        return f"no row has split {split_name}"
    unit = "patients" if rows.patients is not None else "images"
    return (f"drawn splits need 3 or more {unit} in a site to fill all three; add {unit} "
            f"or give a split column")


# ---- checking the records ----------------------------------------------------------------------------------------


def _check(records: pd.DataFrame, source: Path, classes: list[str] | None, where: _Where) -> _Rows:
    """Every row checked: a path, a known label, a site and patient where those columns exist, a known split."""
    for column in ("path", "label"):
        if column not in records.columns:
            raise where.whole(f"no '{column}' column (columns: {', '.join(map(str, records.columns))}); a manifest "
                              f"needs path and label, optionally site, patient and split")
    if len(records) == 0:
        raise where.whole("no rows")
    base = source if source.is_dir() else source.parent
    path_text, _ = _text(records["path"], "path", where)
    label_text, label_codes, label_names = _categories(records["label"], "label", where, classes)
    text = {"path": path_text, "label": label_text}
    sites: np.ndarray | None = None
    site_names: list[str] = []
    if "site" in records.columns:
        text["site"], sites, site_names = _categories(records["site"], "site", where)
    patients: list[str] | None = None
    if "patient" in records.columns:
        text["patient"] = patients = _text(records["patient"], "patient", where)[0]
    split: np.ndarray | None = None
    if "split" in records.columns:
        text["split"], _ = _text(records["split"], "split", where)
        lookup = {s: code for code, s in enumerate(SPLITS)}
        wanted = [lookup.get(s.lower(), -1) for s in text["split"]]
        bad = wanted.index(-1) if -1 in wanted else None
        if bad is not None:
            raise where.row(bad, f"split {text['split'][bad]!r} is not train, val or test")
        split = np.asarray(wanted, dtype=np.int64)
    return _Rows(
        paths=[base / p for p in path_text], text=text, labels=label_codes.astype(np.int64), label_names=label_names,
        sites=None if sites is None else sites.astype(np.int32), site_names=site_names, patients=patients, split=split,
    )


def _text(column: pd.Series, what: str, where: _Where) -> tuple[list[str], np.ndarray | None]:
    """Each value as text (whole numbers without a decimal point), and the values as int64 if all are whole numbers.

    A missing or blank value is an error naming its row.
    """
    missing = column.isna().to_numpy()
    if missing.any():
        raise where.row(int(np.argmax(missing)), f"empty {what}")
    numbers = _integers(column)
    values = [str(v) for v in numbers] if numbers is not None else [str(v).strip() for v in column]
    blank = next((i for i, v in enumerate(values) if not v), None)
    if blank is not None:
        raise where.row(blank, f"empty {what}")
    return values, numbers


def _integers(column: pd.Series) -> np.ndarray | None:
    """The column as int64 if it holds whole numbers (pandas reads them as int, or as float), else None."""
    if pd.api.types.is_bool_dtype(column):
        return None
    if pd.api.types.is_integer_dtype(column):
        return column.to_numpy(dtype=np.int64)
    if pd.api.types.is_float_dtype(column):
        values = column.to_numpy(dtype=np.float64)
        if np.all(np.isfinite(values)) and np.all(values == np.round(values)):
            return values.astype(np.int64)
    return None


def _categories(column: pd.Series, what: str, where: _Where, names: list[str] | None = None
                ) -> tuple[list[str], np.ndarray, list[str]]:
    """(each value as text, its index into the names, the names): ``names`` (data.folder.classes) if given, else
    the sorted values, whole numbers as numbers (2 before 10), anything else as text."""
    text, numbers = _text(column, what, where)
    if names is None:
        names = [str(v) for v in np.unique(numbers)] if numbers is not None else sorted(set(text))
    index = {n: i for i, n in enumerate(names)}
    codes = np.fromiter((index.get(v, -1) for v in text), dtype=np.int64, count=len(text))
    if (codes < 0).any():
        bad = int(np.argmax(codes < 0))
        raise where.row(bad, f"{what} {text[bad]!r} is not in data.folder.classes ({', '.join(names)})")
    unused = [n for i, n in enumerate(names) if not (codes == i).any()]
    if unused:
        raise UserError(f"data.folder.classes: {unused[0]} has no images in {where.source}")
    if what == "label" and len(names) < 2:
        raise where.whole(f"every image has label {names[0]!r}; a classifier needs at least two labels")
    return text, codes, names


# ---- choosing rows and splits -------------------------------------------------------------------------------------


def _subset(sites: np.ndarray | None, n: int, cap: int | None, seed: int) -> np.ndarray:
    """Indices of the rows kept, in order: all, or a seeded random ``cap`` of each site's (of all, without sites)."""
    if cap is None:
        return np.arange(n)
    groups = sites if sites is not None else np.zeros(n, dtype=np.int32)
    keep = []
    for site in np.unique(groups):
        idx = np.flatnonzero(groups == site)
        if len(idx) > cap:
            idx = rng(seed, "folder-subset", int(site)).choice(idx, cap, replace=False)
        keep.append(idx)
    return np.sort(np.concatenate(keep))


def _draw_splits(rows: _Rows, keep: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Split codes of the kept rows, whole patients drawn within each site (each image its own patient if unnamed).

    Patients (sorted as strings) are shuffled with ``rng(seed, "folder-split"[, site])``;
    the first ones go to test, then val, the rest train, cut where the image
    counts come closest to the fractions. With 3 patients or more, a site gets
    at least one in each split.
    """
    patients = np.asarray(rows.patients, dtype=str)[keep] if rows.patients is not None \
        else np.arange(len(keep)).astype(str)
    split = np.empty(len(keep), dtype=np.int64)
    if rows.sites is None:
        groups = [(np.arange(len(keep)), rng(seed, "folder-split"))]
    else:
        sites = rows.sites[keep]
        groups = [(np.flatnonzero(sites == site), rng(seed, "folder-split", int(site))) for site in np.unique(sites)]
    for mine, generator in groups:
        ids, patient_of = np.unique(patients[mine], return_inverse=True)
        order = generator.permutation(len(ids))
        assigned = _cut(np.bincount(patient_of, minlength=len(ids))[order], val_fraction, test_fraction)
        split_of_patient = np.empty(len(ids), dtype=np.int64)
        split_of_patient[order] = assigned
        split[mine] = split_of_patient[patient_of]
    return split


def _cut(counts: np.ndarray, val_fraction: float, test_fraction: float) -> np.ndarray:
    """Split codes of patients in drawn order: test first, then val, then train, closest to the fractions of images."""
    p, n = len(counts), counts.sum()
    cum = np.concatenate([[0], np.cumsum(counts)])  # cum[k]: images in the first k patients
    if p >= 3:  # k1 patients to test, k2 - k1 to val: at least one each, and one left to train
        k1 = 1 + int(np.argmin(np.abs(cum[1:p - 1] - test_fraction * n)))
        k2 = k1 + 1 + int(np.argmin(np.abs(cum[k1 + 1:p] - cum[k1] - val_fraction * n)))
    else:  # too few patients for all three splits here: the closest cut (another site may fill the others)
        k1 = int(np.argmin(np.abs(cum - test_fraction * n)))
        k2 = k1 + int(np.argmin(np.abs(cum[k1:] - cum[k1] - val_fraction * n)))
    codes = np.full(p, SPLITS.index("train"), dtype=np.int64)
    codes[:k1] = SPLITS.index("test")
    codes[k1:k2] = SPLITS.index("val")
    return codes


# ---- decoding and the cache ---------------------------------------------------------------------------------------


def _stats(paths: list[Path], keep: np.ndarray, where: _Where) -> list[tuple[int, int]]:
    """(size, mtime in ns) of each kept image: what tells a changed file; a missing one is an error naming its row."""
    stats: list[tuple[int, int]] = []
    for i in keep:
        try:
            st = paths[i].stat()
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            raise where.row(int(i), f"no image at {paths[i]}")
        stats.append((st.st_size, st.st_mtime_ns))
    return stats


def _cache_key(rows: _Rows, keep: np.ndarray, stats: list[tuple[int, int]], cfg: DataConfig) -> str:
    """Hash of the kept rows as written, their files' sizes and times, and the settings that shape the arrays.

    The seed is not in it: it only matters through which rows ``max_per_site`` keeps, and those are.
    """
    folder = cfg.folder
    settings = {"version": CACHE_VERSION, "size": cfg.size, "resample": folder.resample, "fit": folder.fit,
                "channels": folder.channels, "classes": folder.classes, "max_per_site": folder.max_per_site}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    columns = [rows.text.get(c) for c in ("path", "label", "site", "patient", "split")]
    for j, i in enumerate(keep):
        fields = [c[i] if c is not None else "" for c in columns]
        h.update("\x1f".join([*fields, *map(str, stats[j])]).encode() + b"\x1e")
    return h.hexdigest()[:32]


def _cache_dirs(source: Path) -> list[Path]:
    """Where the cache may live: beside the data, else in the user's home."""
    base = source if source.is_dir() else source.parent
    return [base / CACHE_DIR, Path(FALLBACK_CACHE).expanduser()]


def _cached_images(rows: _Rows, keep: np.ndarray, stats: list[tuple[int, int]], source: Path, cfg: DataConfig,
                   where: _Where) -> np.ndarray:
    """The kept images, from the cache if it has them, else decoded and cached."""
    key = _cache_key(rows, keep, stats, cfg)
    for folder in _cache_dirs(source):
        images = _load_cache(folder / f"{key}.npz", len(keep), cfg.size)
        if images is not None:
            return images
    if len(keep) >= SLOW_BUILD:
        print(f"simfl: decoding {len(keep)} images of {source} (once: the arrays are cached beside it)",
              file=sys.stderr)
    images = _decode_all([rows.paths[i] for i in keep], keep, cfg, where)
    for folder in _cache_dirs(source):
        if _save_cache(folder, key, images):
            break
    return images


def _load_cache(path: Path, n: int, size: int) -> np.ndarray | None:
    """The cached images if ``path`` holds a readable array of the expected shape, else None (it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            images = saved["images"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[:3] != (n, size, size) \
            or images.shape[3] not in (1, 3):
        return None
    return images


def _save_cache(folder: Path, key: str, images: np.ndarray) -> bool:
    """Write ``folder/<key>.npz`` atomically (a temporary file, renamed); False if ``folder`` is not writable."""
    tmp: Path | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{key}.", suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            np.savez(f, images=images)
        os.replace(tmp, folder / f"{key}.npz")
        return True
    except OSError:  # read-only, full, or not a folder: the next place, or no cache
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        return False


def _decode_all(paths: list[Path], rows: np.ndarray, cfg: DataConfig, where: _Where) -> np.ndarray:
    """(N, size, size, C) uint8: each image decoded, made gray or RGB, fitted and resized; C as ``channels`` says."""
    folder, size = cfg.folder, cfg.size
    out = np.empty((len(paths), size, size, 1 if folder.channels == 1 else 3), dtype=np.uint8)
    colour = False
    for j, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                pixels, is_colour = decode_image(image, size, folder.resample, folder.fit, gray=folder.channels == 1)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise where.row(int(rows[j]), f"cannot read the image {path} ({_one_line(err)})") from None
        out[j] = pixels[..., None] if pixels.ndim == 2 else pixels  # gray: repeated on every channel
        colour |= is_colour
    if folder.channels == "auto" and not colour:
        return np.ascontiguousarray(out[..., :1])
    return out


def decode_image(image: Image.Image, size: int, resample: str = "bilinear", fit: str = "crop", gray: bool = False
                 ) -> tuple[np.ndarray, bool]:
    """One PIL image as uint8 (size, size) gray or (size, size, 3) RGB pixels, and whether it is colour.

    Palette, alpha, CMYK and other modes become RGB (alpha is dropped); an RGB
    image whose channels are all equal is gray. Images of more than 8 bits
    (16-bit TIFF/PNG, 32-bit integer or float) are mapped linearly from their own
    darkest to their brightest pixel onto 0..255 (a constant image becomes 0),
    then resized in floating point. ``gray`` turns colour into luma (ITU-R 601).
    """
    image = _gray_or_rgb(image)
    is_colour = image.mode == "RGB"
    if gray and is_colour:
        image = image.convert("L")
    if fit == "crop":
        image = ImageOps.fit(image, (size, size), method=RESAMPLING[resample])
    else:
        image = image.resize((size, size), RESAMPLING[resample])
    if image.mode == "F":
        return np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8), False
    return np.asarray(image, dtype=np.uint8), is_colour


def _gray_or_rgb(image: Image.Image) -> Image.Image:
    """``image`` as mode L, RGB, or F scaled to 0..255 (for more than 8 bits)."""
    if image.mode in _HIGH_DEPTH:
        pixels = np.nan_to_num(np.asarray(image, dtype=np.float32))
        lo, hi = float(pixels.min()), float(pixels.max())
        scaled = (pixels - lo) * np.float32(255 / (hi - lo)) if hi > lo else np.zeros_like(pixels)
        return Image.fromarray(scaled.astype(np.float32))
    if image.mode in _GRAY:
        return image.convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # what PIL asks for, rather than warning, for palettes with transparency
    rgb = image.convert("RGB")
    pixels = np.asarray(rgb)
    if (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all():
        return rgb.getchannel(0)
    return rgb


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
