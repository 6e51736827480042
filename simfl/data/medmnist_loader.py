"""MedMNIST 2D datasets, loaded through the ``medmnist`` package itself.

Going through medmnist keeps its file names, download URLs and checksums the
authority; this module only turns its failures into one-line
:class:`~simfl.core.errors.UserError` messages that say which file to put where, and
reshapes its arrays into a :class:`~simfl.data.Dataset`.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from simfl.core.errors import UserError
from simfl.data.dataset import Dataset

_SPLITS = ("train", "val", "test")


def load_medmnist(flag: str, root: Path, size: int, download: bool) -> Dataset:
    """Load MedMNIST ``flag`` at ``size`` px from ``root``, downloading it on first use."""
    import medmnist  # noqa: PLC0415  (lazy: seconds per Ray worker, and most runs never use it)

    info = medmnist.INFO[flag]
    suffix = "" if size == 28 else f"_{size}"
    path = root / f"{flag}{suffix}.npz"
    try:
        root.mkdir(parents=True, exist_ok=True)  # medmnist refuses a root that does not exist
    except OSError as err:
        message = f"data.root: cannot create {root} ({err.strerror}); set data.root to a writable folder"
        raise UserError(message) from err

    arrays = _read(getattr(medmnist, info["python_class"]), path, size, download, info[f"url{suffix}"])
    splits = {split: _to_nhwc(path, size, *arrays[split]) for split in _SPLITS}
    labels = info["label"]
    return Dataset.from_splits(flag, [labels[k] for k in sorted(labels, key=int)], splits)


def _read(dataset_class: type, path: Path, size: int, download: bool, url: str) -> dict[str, tuple]:
    """(images, labels) of each split, as medmnist reads them; failures become one-line UserErrors."""
    # Only ask medmnist to download a missing file: for a present one it would
    # re-hash it on every load and silently replace it when the hash differs.
    fetch = download and not path.exists()
    arrays = {}
    try:
        for split in _SPLITS:
            ds = dataset_class(split=split, root=str(path.parent), size=size, download=fetch and split == "train")
            arrays[split] = (ds.imgs, ds.labels)
    except RuntimeError as err:  # medmnist's "not found" and "download failed"
        raise UserError(_not_found(path, url, fetch, err)) from err
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as err:  # np.load
        raise UserError(
            f"data.root: {path} is not a valid MedMNIST file ({_reason(err)}); "
            f"delete it and download it again from {url}"
        ) from err
    return arrays


def _not_found(path: Path, url: str, fetched: bool, err: RuntimeError) -> str:
    """The one-line message for a file that is missing: either download is off, or it failed."""
    if fetched:
        # Whatever a failed download left behind is partial: remove it so the next
        # run downloads again instead of reporting a corrupt file.
        path.unlink(missing_ok=True)
        why = f"could not be downloaded ({_one_line(err.__context__ or err)})"
    else:
        why = "download is off (data.download: false)"
    return (
        f"data.root: {path.name} not found in {path.parent} and {why}; "
        f"download it from {url} and put it there (or set data.root)"
    )


def _to_nhwc(path: Path, size: int, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) grayscale or (N, H, W, C) uint8 images -> NHWC; (N, 1) labels -> int64 (N,)."""
    if images.ndim == 3:
        images = images[..., None]
    n = len(images)
    if images.ndim != 4 or images.shape[1:3] != (size, size) or labels.shape not in ((n,), (n, 1)):
        raise UserError(
            f"data.root: {path} holds images of shape {images.shape} and labels of shape {labels.shape}, "
            f"not {size} px single-label MedMNIST; delete it or set data.size"
        )
    return np.ascontiguousarray(images, dtype=np.uint8), labels.reshape(n).astype(np.int64)


def _reason(err: Exception) -> str:
    """Why np.load failed, without numpy's hint to load pickles "unsafely": we never will."""
    if isinstance(err, ValueError) and "pickle" in str(err):
        return "not an npz archive, or it holds pickled objects, which are never loaded"
    return _one_line(err)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
