"""The offline dataset: deterministic, split-stable, resolution-free, and learnable."""

from __future__ import annotations

import numpy as np
import pytest

from simfl.data import DataConfig, load_dataset
from simfl.data.synthetic import CHUNK, cell_types, make_dataset


def _splits(ds) -> list[np.ndarray]:
    return [ds.train_x, ds.train_y, ds.val_x, ds.val_y, ds.test_x, ds.test_y]


@pytest.mark.parametrize("size", [28, 64])
def test_shapes_and_dtypes(size: int) -> None:
    ds = make_dataset(train_size=50, val_size=20, test_size=30, image_size=size, num_classes=8, seed=1)
    assert ds.name == "synthetic"
    assert ds.num_classes == 8
    assert ds.label_names == [f"class-{c}" for c in range(8)]
    for x, y, n in [(ds.train_x, ds.train_y, 50), (ds.val_x, ds.val_y, 20), (ds.test_x, ds.test_y, 30)]:
        assert x.shape == (n, size, size, 3) and x.dtype == np.uint8
        assert y.shape == (n,) and y.dtype == np.int64
        assert y.min() >= 0 and y.max() < 8
    assert ds.channels == 3 and ds.image_size == size


@pytest.mark.parametrize("size", [8, 256])
def test_extreme_sizes(size: int) -> None:
    ds = make_dataset(train_size=3, val_size=1, test_size=1, image_size=size, num_classes=2, seed=0)
    assert ds.train_x.shape == (3, size, size, 3)
    assert ds.train_x.std() > 10  # a picture, not a flat colour


def test_same_arguments_same_bytes() -> None:
    a = make_dataset(300, 40, 40, 28, 8, seed=7)
    b = make_dataset(300, 40, 40, 28, 8, seed=7)
    for x, y in zip(_splits(a), _splits(b), strict=True):
        assert x.tobytes() == y.tobytes()


def test_seed_changes_images() -> None:
    a = make_dataset(100, 10, 10, 28, 8, seed=0)
    b = make_dataset(100, 10, 10, 28, 8, seed=1)
    assert np.abs(a.train_x.astype(int) - b.train_x).mean() > 10


def test_smaller_split_is_a_prefix_across_chunks() -> None:
    small = make_dataset(CHUNK + 100, 5, 5, 12, 8, seed=3)
    large = make_dataset(2 * CHUNK + 50, 5, 5, 12, 8, seed=3)
    n = len(small.train_y)
    np.testing.assert_array_equal(small.train_x, large.train_x[:n])
    np.testing.assert_array_equal(small.train_y, large.train_y[:n])


def test_train_size_does_not_change_val_or_test() -> None:
    a = make_dataset(10, 60, 70, 28, 8, seed=5)
    b = make_dataset(900, 60, 70, 28, 8, seed=5)
    np.testing.assert_array_equal(a.val_x, b.val_x)
    np.testing.assert_array_equal(a.test_x, b.test_x)
    np.testing.assert_array_equal(a.test_y, b.test_y)
    # and the splits are different draws, not copies of each other
    assert not np.array_equal(a.val_x[:60], a.test_x[:60])


def test_image_size_is_only_resolution() -> None:
    """Geometry is in normalized coordinates: the 56 px image, halved, is the 28 px one."""
    small = make_dataset(64, 1, 1, 28, 8, seed=2).train_x.astype(float)
    large = make_dataset(64, 1, 1, 56, 8, seed=2).train_x.astype(float)
    halved = large.reshape(64, 28, 2, 28, 2, 3).mean(axis=(2, 4))
    other = make_dataset(64, 1, 1, 28, 8, seed=9).train_x.astype(float)
    assert np.abs(small - halved).mean() < 3
    assert np.abs(small - other).mean() > 20


def test_labels_are_balanced() -> None:
    y = make_dataset(4 * CHUNK, 1, 1, 8, 8, seed=0).train_y
    counts = np.bincount(y, minlength=8)
    assert counts.min() > 0.8 * len(y) / 8 and counts.max() < 1.2 * len(y) / 8


def test_same_class_images_vary() -> None:
    ds = make_dataset(400, 1, 1, 28, 8, seed=0)
    for c in range(8):
        x = ds.train_x[ds.train_y == c].astype(float)
        assert np.abs(x[0] - x[1]).mean() > 5, f"class {c} images are near copies"


def test_classes_beyond_eight_are_new_variants() -> None:
    types = cell_types(20)
    assert types[:8] == cell_types(8)
    assert types[8].nucleus == types[0].nucleus and types[8] != types[0]
    assert cell_types(20) == types  # fixed by class index, not by run
    ds = make_dataset(200, 1, 1, 16, 20, seed=0)
    assert set(np.unique(ds.train_y)) == set(range(20))


def _ridge_classifier(x: np.ndarray, y: np.ndarray, num_classes: int):
    """One-vs-rest least squares on standardized features (closed form, so fast and exact)."""
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6

    def design(v: np.ndarray) -> np.ndarray:
        return np.hstack([(v - mean) / std, np.ones((len(v), 1))])

    a = design(x)
    w = np.linalg.solve(a.T @ a + np.eye(a.shape[1]), a.T @ np.eye(num_classes)[y])
    return lambda v: (design(v) @ w).argmax(axis=1)


def test_classes_have_learnable_structure() -> None:
    """A linear classifier on 7x7 pooled pixels, trained on 2,000 images, beats chance by far."""
    ds = make_dataset(2000, 1, 1000, 28, 8, seed=0)

    def features(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), 7, 4, 7, 4, 3).mean(axis=(2, 4)).reshape(len(x), -1) / 255

    predict = _ridge_classifier(features(ds.train_x), ds.train_y, 8)
    accuracy = (predict(features(ds.test_x)) == ds.test_y).mean()
    assert accuracy > 3 / 8, accuracy


def test_load_dataset_sizes_train_to_the_partition() -> None:
    cfg = DataConfig(name="synthetic", size=32, synthetic={"num_classes": 4, "val_size": 30, "test_size": 40})
    ds = load_dataset(cfg, train_size=123, seed=0)
    assert ds.train_x.shape == (123, 32, 32, 3)
    assert len(ds.val_y) == 30 and len(ds.test_y) == 40 and ds.num_classes == 4
