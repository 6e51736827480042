"""A client's images as its hospital's device acquired them, and each population's test set.

Shared by the client actors (local data) and the coordinator (test sets), so
both see the same acquisition shift for the same (seed, client).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from simfl.core.config import PopulationConfig, ShiftConfig
from simfl.core.seeding import derive_seed
from simfl.data import Dataset
from simfl.data.acquisition import Devices, apply_shift, draw_devices
from simfl.data.partition import Partition
from simfl.data.sites import pool_groups


@dataclass(frozen=True)
class ClientData:
    """One client's images and labels as its acquisition device shows them: train and local validation splits."""

    x: torch.Tensor  # (n_train, H, W, C) uint8
    y: torch.Tensor  # (n_train,) int64
    val_x: torch.Tensor
    val_y: torch.Tensor


def _shifted(images: np.ndarray, shift: ShiftConfig, devices: Devices, noise_seed: int) -> np.ndarray:
    if shift.is_identity:
        return np.array(images, copy=True)  # writable, so torch.from_numpy does not warn
    return apply_shift(images, shift, devices, noise_seed)


def client_data(
    dataset: Dataset, partition: Partition, shifts: list[ShiftConfig], seed: int, client: int
) -> ClientData:
    """Gather client ``client``'s samples and pass them through its own acquisition device."""
    shift = shifts[int(partition.client_population[client])]
    lo, hi = partition.offsets[client], partition.offsets[client + 1]
    idx = partition.indices[lo:hi]
    device = draw_devices(shift, seed, "client-device", np.array([client]), dataset.channels)
    n = len(idx)
    per_image = Devices(
        gain=np.repeat(device.gain, n, axis=0),
        brightness=np.repeat(device.brightness, n),
        contrast=np.repeat(device.contrast, n),
    )
    images = _shifted(dataset.train_x[idx], shift, per_image, derive_seed(seed, "client-noise", client))
    x = torch.from_numpy(images)
    y = torch.from_numpy(np.ascontiguousarray(dataset.train_y[idx], dtype=np.int64))
    n_train = n - int(partition.n_val[client])
    return ClientData(x=x[:n_train], y=y[:n_train], val_x=x[n_train:], val_y=y[n_train:])


def population_test_set(
    dataset: Dataset, shift: ShiftConfig, seed: int, population: int, sites: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split as seen through a population's devices: one device drawn per test image.

    A population of named ``sites`` (indices into ``dataset.sites``) is tested on those sites' test images only.
    """
    keep = np.flatnonzero(np.isin(dataset.test_site, sites)) if sites is not None else slice(None)
    x, y = dataset.test_x[keep], np.array(dataset.test_y[keep], dtype=np.int64)
    devices = draw_devices(shift, seed, f"test-device-{population}", np.arange(len(y)), dataset.channels)
    images = _shifted(x, shift, devices, derive_seed(seed, "test-noise", population))
    return torch.from_numpy(images), torch.from_numpy(y)


def test_sets(dataset: Dataset, populations: list[PopulationConfig], seed: int
              ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``global`` (the unshifted test split), then each population's: its sites' test images, through its devices."""
    sets = {"global": (torch.from_numpy(np.array(dataset.test_x)), torch.from_numpy(dataset.test_y.astype(np.int64)))}
    groups = pool_groups(populations, dataset.sites)
    for i, pop in enumerate(populations):
        sets[pop.name] = population_test_set(dataset, pop.shift, seed, i, groups[i])
    return sets
