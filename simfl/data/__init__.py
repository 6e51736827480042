"""Datasets: which ones a scenario may name, their settings, and loading them as one :class:`Dataset`.

Every loader returns the same :class:`Dataset` (NHWC uint8 images, int64
labels, and the site of each image where the data has sites), so that
partitioning, actors and attacks never care where images came from.
"""

from __future__ import annotations

from simfl.core.errors import UserError
from simfl.data.camelyon17 import LABEL_NAMES as CAMELYON17_LABELS
from simfl.data.camelyon17 import SITES as CAMELYON17_SITES
from simfl.data.camelyon17 import camelyon17_records
from simfl.data.cifar10 import load_cifar10
from simfl.data.config import DATASETS, FOLDER_DATASETS, DataConfig, FolderConfig, SyntheticConfig
from simfl.data.dataset import Dataset
from simfl.data.folder import dataset_from_records, load_folder, manifest_sites
from simfl.data.medmnist_loader import load_medmnist
from simfl.data.synthetic import make_dataset


def load_dataset(cfg: DataConfig, train_size: int, seed: int) -> Dataset:
    """Load ``cfg.name``.

    ``train_size`` is what the partition needs: the synthetic generator makes
    exactly that many training images; real datasets must hold at least that many.
    Raises :class:`simfl.core.errors.UserError` with one line naming the key to fix.
    """
    if cfg.name == "synthetic":
        return make_dataset(
            train_size=train_size,
            val_size=cfg.synthetic.val_size,
            test_size=cfg.synthetic.test_size,
            image_size=cfg.size,
            num_classes=cfg.synthetic.num_classes,
            seed=seed,
        )
    if cfg.name == "cifar10":
        ds = load_cifar10(cfg.root_path, download=cfg.download)
    elif cfg.name == "folder":
        ds = load_folder(cfg, seed)
    elif cfg.name == "camelyon17":
        records = camelyon17_records(cfg.root_path, cfg.download)
        records["label"] = [CAMELYON17_LABELS[i] for i in records["label"]]  # names; they sort as 0, 1
        ds = dataset_from_records(records, cfg.root_path, cfg, seed, "camelyon17", key="data.root")
    else:
        ds = load_medmnist(cfg.name, cfg.root_path, size=cfg.size, download=cfg.download)
    if len(ds.train_y) < train_size:
        raise UserError(
            f"populations: the clients need {train_size} training images but {cfg.name} has "
            f"{len(ds.train_y)}; lower populations.*.quantity.mean or the client counts"
        )
    return ds


def site_names(cfg: DataConfig) -> list[str]:
    """The sites the configured data has, known before loading it (for ``populations: {from_sites: ...}``)."""
    if cfg.name == "camelyon17":
        return list(CAMELYON17_SITES)
    if cfg.name == "folder" and cfg.manifest is not None:
        return manifest_sites(cfg)
    return []


__all__ = ["DATASETS", "FOLDER_DATASETS", "DataConfig", "Dataset", "FolderConfig", "SyntheticConfig",
           "dataset_from_records", "load_dataset", "site_names"]
