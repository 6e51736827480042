"""Datasets: which ones a scenario may name, their settings, and loading them as one :class:`Dataset`.

Every loader returns the same :class:`Dataset` (NHWC uint8 images, int64
labels), so that partitioning, actors and attacks never care where images came from.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, PositiveInt, field_validator, model_validator

from simfl.data.cifar10 import load_cifar10
from simfl.data.dataset import Dataset
from simfl.data.medmnist_flags import MEDMNIST_2D
from simfl.data.medmnist_loader import load_medmnist
from simfl.data.synthetic import make_dataset
from simfl.errors import UserError
from simfl.validation import Strict

DATASETS: frozenset[str] = frozenset({"synthetic", "cifar10", *MEDMNIST_2D})


class SyntheticConfig(Strict):
    """Sizes of the embedded offline dataset; the train split is sized to the partition."""

    num_classes: int = Field(8, ge=2, le=64, description="number of classes (2 to 64)")
    val_size: PositiveInt = Field(
        2000, description="images in the validation split (server-side: the attack evaluator, the latent decoder)")
    test_size: PositiveInt = Field(
        2000, description="images in the test split (the global test set; each population tests on its shifted copy)")


class DataConfig(Strict):
    """The dataset, where its files live, and its image size."""

    name: str = Field("synthetic", description="`synthetic` (embedded, offline), `cifar10`, or a 2D MedMNIST flag: "
                      f"{', '.join(f'`{flag}`' for flag in sorted(MEDMNIST_2D))} (ChestMNIST is multi-label and "
                      "not supported)")
    root: str = Field("~/.simfl/data", description="the folder dataset files are read from and downloaded to")
    size: PositiveInt = Field(28, description="image size in px: MedMNIST 28, 64, 128 or 224; CIFAR-10 32; "
                              "synthetic 8 to 256")
    download: bool = Field(True, description="download a missing real dataset (false: fail in one line instead)")
    synthetic: SyntheticConfig = Field(SyntheticConfig(), description="sizes of the synthetic dataset "
                                       "(name: synthetic only); its train split is sized to what the clients need")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        v = v.lower()
        if v not in DATASETS:
            raise ValueError(f"unknown dataset {v!r}; choose one of: {', '.join(sorted(DATASETS))}")
        return v

    @model_validator(mode="after")
    def _size_fits(self) -> DataConfig:
        # Checked by value, not by presence, so the resolved scenario a run saves reloads.
        if self.synthetic != SyntheticConfig() and self.name != "synthetic":
            raise ValueError(f"synthetic: only applies to name: synthetic, not {self.name}")
        if self.name == "cifar10" and self.size != 32:
            raise ValueError("size: CIFAR-10 images are 32 px; set data.size: 32")
        if self.name not in ("synthetic", "cifar10") and self.size not in (28, 64, 128, 224):
            raise ValueError(f"size: MedMNIST comes in 28, 64, 128 or 224 px, not {self.size}")
        if self.name == "synthetic" and not 8 <= self.size <= 256:
            raise ValueError(f"size: synthetic images must be 8..256 px, not {self.size}")
        return self

    @property
    def root_path(self) -> Path:
        """``root`` with ``~`` expanded."""
        return Path(self.root).expanduser()


def load_dataset(cfg: DataConfig, train_size: int, seed: int) -> Dataset:
    """Load ``cfg.name``.

    ``train_size`` is what the partition needs: the synthetic generator makes
    exactly that many training images; real datasets must hold at least that many.
    Raises :class:`simfl.errors.UserError` with one line naming the key to fix.
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
    else:
        ds = load_medmnist(cfg.name, cfg.root_path, size=cfg.size, download=cfg.download)
    if len(ds.train_y) < train_size:
        raise UserError(
            f"populations: the clients need {train_size} training images but {cfg.name} has "
            f"{len(ds.train_y)}; lower populations.*.quantity.mean or the client counts"
        )
    return ds


__all__ = ["DATASETS", "DataConfig", "Dataset", "SyntheticConfig", "load_dataset"]
