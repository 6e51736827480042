"""CIFAR-10, loaded through torchvision, as a non-medical reference dataset.

torchvision checks every file's md5 against the official one before it
unpickles it; that check is also what keeps us from unpickling a foreign file,
so it must stay on the load path. CIFAR-10 has no validation split: a fixed one
is carved from the training images, the same in every run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from simfl.core.errors import UserError
from simfl.core.seeding import rng
from simfl.data.dataset import Dataset

if TYPE_CHECKING:  # imported where used (see load_cifar10)
    from torchvision.datasets import CIFAR10

VAL_SIZE = 5000


def load_cifar10(root: Path, download: bool) -> Dataset:
    """Load CIFAR-10 from ``root/cifar-10-batches-py``, downloading it on first use."""
    from torchvision.datasets import CIFAR10  # noqa: PLC0415  (lazy: seconds per Ray worker, and most runs never use it)

    try:
        train = CIFAR10(str(root), train=True, download=download)
        test = CIFAR10(str(root), train=False)
    except (RuntimeError, OSError) as err:  # offline download: URLError, an OSError
        raise UserError(_explain(CIFAR10, root, download, err)) from err

    x, y = train.data, np.asarray(train.targets, np.int64)
    val_idx, train_idx = split_val(len(y))
    splits = {
        "train": (x[train_idx], y[train_idx]),
        "val": (x[val_idx], y[val_idx]),
        "test": (test.data, np.asarray(test.targets, np.int64)),
    }
    return Dataset.from_splits("cifar10", list(train.classes), splits)


def split_val(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(val, train) indices: 5,000 of the 50,000 (10% of a smaller set), fixed for every run.

    Sorted, so each part keeps the files' order.
    """
    perm = rng(0, "cifar10-val").permutation(n)
    n_val = min(VAL_SIZE, n // 10)
    return np.sort(perm[:n_val]), np.sort(perm[n_val:])


def _explain(cifar: type[CIFAR10], root: Path, download: bool, err: Exception) -> str:
    """One line saying what is wrong with ``root`` and how to fix it."""
    from torchvision.datasets.utils import check_integrity  # noqa: PLC0415  (lazy: seconds per Ray worker, and most runs never use it)

    folder = root / cifar.base_folder
    expected = [*cifar.train_list, *cifar.test_list, [cifar.meta["filename"], cifar.meta["md5"]]]
    missing = [name for name, _ in expected if not (folder / name).is_file()]
    corrupt = [name for name, md5 in expected if name not in missing and not check_integrity(folder / name, md5)]
    reason = " ".join(str(err).split()) or type(err).__name__

    if corrupt:
        what = f"{', '.join(corrupt)} in {folder} failed the md5 check (not the official CIFAR-10 files)"
        fix = f"delete {folder}, then download {cifar.url} and extract it into {root}"
    elif missing:
        what = f"CIFAR-10 not found in {root} (no {folder.name}/{missing[0]})"
        fix = f"download {cifar.url} and extract it into {root}"
    else:
        return f"data.root: cannot read CIFAR-10 from {folder} ({reason}); check the folder or set data.root"
    if not download:
        why = "download is off (data.download: false)"
    else:
        why = f"could not be downloaded ({reason})"
    return f"data.root: {what} and {why}; {fix} (or set data.root)"
