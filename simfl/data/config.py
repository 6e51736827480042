"""The ``data`` section of a scenario: which dataset, where its files are, how images are sized and split.

Pure pydantic models, apart from the loaders, so that the loaders (which need
their settings) and the scenario (which validates them) both import them
without importing each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from simfl.core.validation import Strict
from simfl.data.medmnist_flags import MEDMNIST_2D

DATASETS: frozenset[str] = frozenset({"synthetic", "cifar10", "folder", "camelyon17", *MEDMNIST_2D})
# Datasets whose image files are decoded by simfl.data.folder, and so take the data.folder settings.
FOLDER_DATASETS: frozenset[str] = frozenset({"folder", "camelyon17"})


class FolderConfig(Strict):
    """How the images of ``data.name: folder`` are decoded, resized and split."""

    resample: Literal["nearest", "bilinear", "bicubic", "lanczos", "box"] = Field(
        "bilinear", description="PIL filter that resizes images to data.size. Default bilinear: PIL widens "
        "it with the scale factor, so it averages (no aliasing) when shrinking and stays smooth when "
        "enlarging, and it is torchvision's Resize default; box averages areas, nearest keeps label-like "
        "pixel values")
    fit: Literal["stretch", "crop"] = Field(
        "crop", description="non-square images: `crop` cuts the centre square before resizing (default: "
        "shapes are not distorted, as with torchvision's Resize + CenterCrop); `stretch` resizes the whole "
        "image to a square. Square images are the same either way")
    channels: Literal["auto", 1, 3] = Field(
        "auto", description="colour channels: `auto` is 3 if any image is colour (channels that differ), "
        "else 1; 3 repeats grayscale images on three channels; 1 turns colour into luma (ITU-R 601)")
    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of images drawn into the val split (server-side data: the attack "
        "evaluator, defence decoders) when the manifest has no `split` column; whole patients are drawn, "
        "within each site")
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="share of images drawn into the test split (the global test set) when "
        "the manifest has no `split` column; whole patients, within each site")
    classes: list[str] | None = Field(
        None, description="label names in class order (label 0 first); any other label is then an error. "
        "Unset: the sorted labels (numbers in numeric order), or the ImageFolder's folder names")
    max_per_site: PositiveInt | None = Field(
        None, description="keep a seeded random subset of at most this many images per site (the whole "
        "dataset when there are no sites) before splitting: for huge datasets")

    @field_validator("classes", mode="before")
    @classmethod
    def _names(cls, v: object) -> object:
        # YAML reads `classes: [0, 1]` as numbers; labels are compared as text.
        if isinstance(v, list):
            return [str(c) if isinstance(c, int) and not isinstance(c, bool) else c for c in v]
        return v

    @model_validator(mode="after")
    def _consistent(self) -> FolderConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must leave images to train on, not "
                             f"{self.val_fraction} + {self.test_fraction}")
        if self.classes is not None:
            if len(self.classes) < 2:
                raise ValueError(f"classes: a classifier needs at least two, not {self.classes}")
            repeated = sorted({c for c in self.classes if self.classes.count(c) > 1})
            if repeated:
                raise ValueError(f"classes: {', '.join(repeated)} named twice")
        return self


class SyntheticConfig(Strict):
    """Sizes of the embedded offline dataset; the train split is sized to the partition."""

    num_classes: int = Field(8, ge=2, le=64, description="number of classes (2 to 64)")
    val_size: PositiveInt = Field(
        2000, description="images in the validation split (server-side: the attack evaluator, the latent decoder)")
    test_size: PositiveInt = Field(
        2000, description="images in the test split (the global test set; each population tests on its shifted copy)")


class DataConfig(Strict):
    """The dataset, where its files live, and its image size."""

    name: str = Field("synthetic", description="`synthetic` (embedded, offline), `cifar10`, `folder` (your own "
                      "images: an ImageFolder tree at data.root, or data.manifest), `camelyon17` (WILDS "
                      "Camelyon17: 96 px histopathology patches of 5 hospitals as sites `hospital_0`..`hospital_4`; "
                      "a 10.7 GB download through the `wilds` package on first use), or a 2D MedMNIST flag: "
                      f"{', '.join(f'`{flag}`' for flag in sorted(MEDMNIST_2D))} (ChestMNIST is multi-label and "
                      "not supported)")
    root: str = Field("~/.simfl/data", description="the folder dataset files are read from and downloaded to; "
                      "name: folder without a manifest: an ImageFolder tree, `<root>/<class>/<image>` (class = "
                      "label; the decoded images are cached in `<root>/.simfl-cache/`)")
    size: PositiveInt = Field(28, description="image size in px: MedMNIST 28, 64, 128 or 224; CIFAR-10 32; "
                              "synthetic 8 to 256; folder and camelyon17 8 to 512 (images are resized to it)")
    manifest: str | None = Field(
        None, description="name: folder only: a CSV or Parquet file with one row per image: `path` (relative to "
        "the manifest's folder, or absolute), `label`, and optionally `site`, `patient` and `split` (train, val or "
        "test; without it, splits are drawn from the seed, whole patients within each site). A relative manifest "
        "path starts from data.root, so `--set data.root=...` moves a scenario to another copy of the data. The "
        "decoded images are cached in `.simfl-cache/` beside it "
        "(`~/.simfl/cache/` if that folder is not writable)")
    download: bool = Field(True, description="download a missing real dataset (false: fail in one line instead)")
    synthetic: SyntheticConfig = Field(SyntheticConfig(), description="sizes of the synthetic dataset "
                                       "(name: synthetic only); its train split is sized to what the clients need")
    folder: FolderConfig = Field(FolderConfig(), description="how your own images are resized, coloured and split "
                                 "(name: folder or camelyon17). Any image PIL reads (PNG, JPEG, TIFF, …; the first "
                                 "frame); "
                                 "alpha is dropped; an image of more than 8 bits (16-bit TIFF or PNG) is mapped "
                                 "linearly from its own darkest to its brightest pixel onto 0..255")

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
        if self.folder != FolderConfig() and self.name not in FOLDER_DATASETS:
            raise ValueError(f"folder: only applies to name: folder or camelyon17, not {self.name}")
        if self.manifest is not None and self.name != "folder":
            raise ValueError(f"manifest: only applies to name: folder, not {self.name}")
        if self.name == "cifar10" and self.size != 32:
            raise ValueError("size: CIFAR-10 images are 32 px; set data.size: 32")
        if self.name in FOLDER_DATASETS and not 8 <= self.size <= 512:
            raise ValueError(f"size: folder images are resized to 8..512 px, not {self.size}")
        if self.name not in ("synthetic", "cifar10", *FOLDER_DATASETS) and self.size not in (28, 64, 128, 224):
            raise ValueError(f"size: MedMNIST comes in 28, 64, 128 or 224 px, not {self.size}")
        if self.name == "synthetic" and not 8 <= self.size <= 256:
            raise ValueError(f"size: synthetic images must be 8..256 px, not {self.size}")
        return self

    @property
    def root_path(self) -> Path:
        """``root`` with ``~`` expanded."""
        return Path(self.root).expanduser()

    @property
    def manifest_path(self) -> Path | None:
        """``manifest`` resolved against ``root`` (an absolute manifest stays as it is); None without one."""
        return self.root_path / Path(self.manifest).expanduser() if self.manifest is not None else None

    @property
    def derived_path(self) -> Path:
        """Where simfl keeps what it derives from the data (the evaluation classifier): ``root``, except inside
        an ImageFolder tree, where a plain folder would be taken for a class: ``<root>/.simfl-cache``."""
        if self.name == "folder" and self.manifest is None:
            return self.root_path / ".simfl-cache"
        return self.root_path
