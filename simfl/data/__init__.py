"""Datasets as plain uint8 arrays, whatever their source.

Every loader returns the same :class:`Dataset`, so that partitioning, actors and
attacks never care where images came from. Images are NHWC uint8; labels int64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from simfl.data.medmnist_flags import MEDMNIST_2D

if TYPE_CHECKING:  # config imports DATASETS from here
    from simfl.config import DataConfig

DATASETS: frozenset[str] = frozenset({"synthetic", "cifar10", *MEDMNIST_2D})


@dataclass(frozen=True)
class Dataset:
    name: str
    num_classes: int
    label_names: list[str]
    train_x: np.ndarray  # (N, H, W, C) uint8
    train_y: np.ndarray  # (N,) int64
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    @classmethod
    def from_splits(cls, name: str, label_names: list[str], splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> Dataset:
        """Build from ``{"train": (x, y), "val": (x, y), "test": (x, y)}``, the shape every loader has."""
        return cls(
            name=name,
            num_classes=len(label_names),
            label_names=label_names,
            train_x=splits["train"][0],
            train_y=splits["train"][1],
            val_x=splits["val"][0],
            val_y=splits["val"][1],
            test_x=splits["test"][0],
            test_y=splits["test"][1],
        )

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[-1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[1])


def load_dataset(cfg: DataConfig, train_size: int, seed: int) -> Dataset:
    """Load ``cfg.name``.

    ``train_size`` is what the partition needs: the synthetic generator makes
    exactly that many training images; real datasets must hold at least that many.
    Raises :class:`simfl.errors.UserError` with one line naming the key to fix.
    """
    from simfl.errors import UserError

    if cfg.name == "synthetic":
        from simfl.data.synthetic import make_dataset

        return make_dataset(
            train_size=train_size,
            val_size=cfg.synthetic.val_size,
            test_size=cfg.synthetic.test_size,
            image_size=cfg.size,
            num_classes=cfg.synthetic.num_classes,
            seed=seed,
        )
    if cfg.name == "cifar10":
        from simfl.data.cifar10 import load_cifar10

        ds = load_cifar10(cfg.root_path, download=cfg.download)
    else:
        from simfl.data.medmnist_loader import load_medmnist

        ds = load_medmnist(cfg.name, cfg.root_path, size=cfg.size, download=cfg.download)
    if len(ds.train_y) < train_size:
        raise UserError(
            f"populations: the clients need {train_size} training images but {cfg.name} has "
            f"{len(ds.train_y)}; lower populations.*.quantity.mean or the client counts"
        )
    return ds
