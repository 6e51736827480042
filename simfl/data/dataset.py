"""A dataset as plain uint8 arrays, whatever its source: what every loader returns.

Partitioning, actors and attacks never care where images came from. Images are
NHWC uint8; labels int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Dataset:
    """A dataset in memory: train, validation and test splits of uint8 (N, H, W, C) images with int64 labels."""

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
    def from_splits(
        cls, name: str, label_names: list[str], splits: dict[str, tuple[np.ndarray, np.ndarray]]
    ) -> Dataset:
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
        """Colour channels per image."""
        return int(self.train_x.shape[-1])

    @property
    def image_size(self) -> int:
        """Height (= width) of the square images, in pixels."""
        return int(self.train_x.shape[1])
