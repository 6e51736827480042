"""WILDS Camelyon17 (``camelyon17_v1.0``) as a records table: one row per 96x96 patch.

Camelyon17-WILDS holds 455,954 RGB 96x96 PNG patches of lymph-node sections,
each labelled tumour or normal, from 50 slides (10 per hospital) of 5 hospitals
(patients 0-19 at hospital 0, 20-39 at hospital 1, and so on). WILDS's own
split trains on hospitals 0, 3 and 4 (train 302,436, id_val 33,560), validates
on hospital 1 (val 34,904) and tests on hospital 2 (test 85,054) (counts from
the WILDS paper, Koh et al. 2021; their sum is the 455,954). simfl wants
any hospital to be a training or a held-out site, so the records carry no
``split``: the records loader draws patient-grouped splits within every
hospital, and WILDS's split is kept as ``wilds_split`` for whoever wants it.

The download is WILDS's one archive: 10,658,709,504 bytes (about 10.7 GB; the
``compressed_size`` of the camelyon17 1.0 entry in
``wilds.datasets.camelyon17_dataset.Camelyon17Dataset._versions_dict``; the
wilds README rounds it to 10 GB and 15 GB on disk), extracted into
``<root>/camelyon17_v1.0/`` (``RELEASE_v1.0.txt``, ``metadata.csv``,
``patches/patient_XXX_node_Y/*.png``).

The dataset is read through the ``wilds`` package itself, so its release marker,
layout, metadata parsing and official split are the ones every WILDS user gets;
this module only turns its arrays into rows and its failures (most of which
wilds prints, or raises as tracebacks) into one-line ``UserError`` messages.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
import warnings
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd

from simfl.core.errors import UserError

LABEL_NAMES: list[str] = ["normal", "tumor"]
SITES: list[str] = [f"hospital_{h}" for h in range(5)]  # the `site` of the records, from WILDS's `hospital`
FOLDER = "camelyon17_v1.0"  # WILDS's data_dir: f"{dataset_name}_v{version}"
RELEASE_MARKER = "RELEASE_v1.0.txt"  # what wilds checks to call the dataset present
DOWNLOAD_BYTES = 10_658_709_504
DOWNLOAD_PAGE = "https://wilds.stanford.edu/downloads"
COLUMNS = ["path", "label", "site", "patient", "wilds_split"]


def camelyon17_records(root: Path, download: bool) -> pd.DataFrame:
    """WILDS Camelyon17 as one row per patch: path, label, site, patient and wilds_split.

    ``path`` is the patch PNG's absolute path, ``label`` 0 (normal) or 1 (tumor),
    ``site`` ``hospital_0`` to ``hospital_4``, ``patient`` e.g. ``patient_004``
    (unique across hospitals), ``wilds_split`` WILDS's official split (train,
    id_val, val or test). Reads ``root/camelyon17_v1.0`` through
    ``wilds.get_dataset``, downloading it there first (about 10.7 GB) if it is
    missing and ``download`` is on.
    """
    root = root.expanduser().absolute()
    folder = root / FOLDER
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(_Tee(sys.stdout, printed)), warnings.catch_warnings():
            # wilds hands pandas' read-only arrays to torch, which warns about it once: noise, not the user's doing
            warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
            ds = _wilds().get_dataset(dataset="camelyon17", root_dir=str(root), download=download)
    except FileNotFoundError as err:
        if not (folder / RELEASE_MARKER).is_file():
            raise UserError(_not_there(root, download, printed.getvalue(), err)) from err
        raise UserError(_corrupt(folder, err)) from err
    except (OSError, ValueError, KeyError, TypeError) as err:  # pandas' parser and dtype errors are ValueErrors
        raise UserError(_corrupt(folder, err)) from err

    data_dir = Path(ds.data_dir)
    fields = list(ds.metadata_fields)
    metadata = np.asarray(ds.metadata_array)
    split_name = {code: name for name, code in ds.split_dict.items()}
    records = pd.DataFrame({
        "path": [str(data_dir / rel) for rel in ds._input_array],
        "label": np.asarray(ds.y_array, dtype=np.int64),
        "site": [SITES[h] for h in metadata[:, fields.index("hospital")]],
        "patient": [f"patient_{p}" for p in ds._metadata_df["patient"]],
        "wilds_split": [split_name[int(code)] for code in ds.split_array],
    }, columns=COLUMNS)
    _check_patches(data_dir, ds._input_array)
    return records


class _Tee(io.TextIOBase):
    """A stdout that still prints (wilds' download messages) and keeps a copy: wilds only prints download failures."""

    def __init__(self, screen: TextIO, copy: io.StringIO) -> None:
        super().__init__()
        self.screen, self.copy = screen, copy

    def write(self, s: str) -> int:
        """Print ``s`` and keep it."""
        self.copy.write(s)
        return self.screen.write(s)

    def flush(self) -> None:
        """Flush the screen."""
        self.screen.flush()


def _check_patches(data_dir: Path, rel_paths: list[str]) -> None:
    """Fail in one line if a patch named in metadata.csv is not on disk (one listing per slide folder, not per file)."""
    present: dict[str, set[str]] = {}
    missing = []
    for rel in rel_paths:
        parent, name = os.path.split(rel)
        if parent not in present:
            try:
                present[parent] = set(os.listdir(data_dir / parent))
            except OSError:
                present[parent] = set()
        if name not in present[parent]:
            missing.append(rel)
    if missing:
        raise UserError(
            f"data.root: {data_dir} is incomplete: {len(missing):,} of the {len(rel_paths):,} patches in metadata.csv "
            f"are missing (first: {missing[0]}); delete {data_dir} and download it again (or set data.root)")


def _not_there(root: Path, download: bool, printed: str, err: Exception) -> str:
    """One line for a camelyon17_v1.0 that is absent (download off) or that could not be downloaded."""
    folder = root / FOLDER
    manual = f"download camelyon17 from {DOWNLOAD_PAGE} and extract it into {folder}"
    if not download:
        what = f"{FOLDER} not found in {root} (no {FOLDER}/{RELEASE_MARKER})"
        return (f"data.root: {what} and download is off (data.download: false); set data.download: true "
                f"to download it (about {DOWNLOAD_BYTES / 1e9:.1f} GB), or {manual} (or set data.root)")
    failures = [line.split(":", 1)[1] for line in printed.splitlines() if line.startswith("Exception:")]
    reason = " ".join((failures[-1] if failures else str(err)).split()) or type(err).__name__
    archive = folder / "archive.tar.gz"
    # wilds reuses any archive.tar.gz it finds without checking it, so a partial one must go before a retry.
    fix = f"delete {archive} and retry, or {manual}" if archive.exists() else f"retry, or {manual}"
    return f"data.root: {FOLDER} could not be downloaded into {root} ({reason}); {fix} (or set data.root)"


def _corrupt(folder: Path, err: Exception) -> str:
    """One line for a camelyon17_v1.0 that is there but whose metadata.csv is missing or unreadable."""
    metadata = folder / "metadata.csv"
    if not metadata.is_file():
        what = f"{folder} is incomplete (no metadata.csv)"
    elif isinstance(err, KeyError):
        what = f"cannot read {metadata} (no column {err})"
    else:
        reason = " ".join(str(err).split()) or type(err).__name__
        what = f"cannot read {metadata} ({type(err).__name__}: {reason})"
    return f"data.root: {what}; delete {folder} and download it again (or set data.root)"


def _wilds() -> Any:
    """The ``wilds`` package, imported when Camelyon17 is loaded and not when simfl is.

    Importing wilds starts a thread that asks PyPI whether wilds is outdated (its
    ``wilds/version.py``); every simfl process, Ray workers included, would do
    that on a cluster that may have no business reaching the internet.
    """
    return importlib.import_module("wilds")
