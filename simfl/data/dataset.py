"""A dataset as plain uint8 arrays, whatever its source: what every loader returns.

Partitioning, actors and attacks never care where images came from. Images are
NHWC uint8; labels int64. Datasets of real hospitals also say which site each
image came from (``sites`` names them; ``*_site`` index into it), so that
populations can be drawn from one site's images and tested on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_NO_SITE = np.zeros(0, dtype=np.int32)


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
    # Site names, and each image's site as an index into them; empty for datasets without sites.
    sites: list[str] = field(default_factory=list)
    train_site: np.ndarray = field(default_factory=lambda: _NO_SITE)  # (N,) int32
    val_site: np.ndarray = field(default_factory=lambda: _NO_SITE)
    test_site: np.ndarray = field(default_factory=lambda: _NO_SITE)

    def __post_init__(self) -> None:
        if self.sites:
            for split, y, site in (("train", self.train_y, self.train_site), ("val", self.val_y, self.val_site),
                                   ("test", self.test_y, self.test_site)):
                if site.shape != y.shape:
                    raise ValueError(f"{split}_site has shape {site.shape}, labels {y.shape}")

    @classmethod
    def from_splits(
        cls, name: str, label_names: list[str], splits: dict[str, tuple[np.ndarray, np.ndarray]],
        sites: list[str] | None = None, site_of: dict[str, np.ndarray] | None = None,
    ) -> Dataset:
        """Build from ``{"train": (x, y), "val": (x, y), "test": (x, y)}``, the shape every loader has.

        ``sites`` names the sites and ``site_of[split]`` gives each image's index into them (both or neither).
        """
        if (sites is None) != (site_of is None):
            raise ValueError("give sites and site_of together")
        by_site = {f"{s}_site": np.asarray(site_of[s], dtype=np.int32) for s in ("train", "val", "test")} \
            if site_of is not None else {}
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
            sites=list(sites or []),
            **by_site,
        )

    @property
    def channels(self) -> int:
        """Colour channels per image."""
        return int(self.train_x.shape[-1])

    @property
    def image_size(self) -> int:
        """Height (= width) of the square images, in pixels."""
        return int(self.train_x.shape[1])
