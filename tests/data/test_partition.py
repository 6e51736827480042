import numpy as np
import pyarrow as pa
import pytest

from simfl.core.config import PopulationConfig
from simfl.core.errors import UserError
from simfl.data.partition import client_sizes, make_partition

K = 8


def pop(name="a", clients=50, skew="iid", mean=40.0, sigma=0.0, qmin=2, qmax=None, held_out=False):
    return PopulationConfig(
        name=name,
        clients=clients,
        label_skew=skew,
        quantity={"mean": mean, "sigma": sigma, "min": qmin, "max": qmax},
        held_out=held_out,
    )


def pool(n, probs=None, seed=123):
    """A shuffled train-split label array with the given class mix."""
    probs = np.full(K, 1 / K) if probs is None else np.asarray(probs, dtype=float) / np.sum(probs)
    return np.random.default_rng(seed).choice(len(probs), size=n, p=probs).astype(np.int64)


def check_valid(part, labels, sizes):
    """Exact sizes, disjoint in-range indices, and label_hist true to the labels."""
    assert np.array_equal(part.sizes, sizes)
    assert part.offsets[0] == 0 and part.offsets[-1] == len(part.indices)
    assert part.indices.dtype == np.int64
    assert len(np.unique(part.indices)) == len(part.indices)
    assert part.indices.min() >= 0 and part.indices.max() < len(labels)
    seg = np.repeat(np.arange(part.num_clients), part.sizes)
    hist = np.zeros_like(part.label_hist)
    np.add.at(hist, (seg, labels[part.indices]), 1)
    assert np.array_equal(hist, part.label_hist)


def max_share(part):
    return (part.label_hist.max(axis=1) / part.sizes).mean()


# ---------------------------------------------------------------- sizes


def test_sigma_zero_gives_equal_sizes():
    assert np.array_equal(client_sizes([pop(clients=7, mean=12.6)], seed=0), np.full(7, 13))


def test_lognormal_sizes_keep_the_mean_and_clip():
    sizes = client_sizes([pop(clients=20000, mean=50, sigma=0.5, qmin=1)], seed=0)
    assert abs(sizes.mean() - 50) < 1.0
    assert sizes.std() > 15
    clipped = client_sizes([pop(clients=2000, mean=50, sigma=1.0, qmin=10, qmax=80)], seed=0)
    assert clipped.min() == 10 and clipped.max() == 80


def test_sizes_are_per_population_and_deterministic():
    a, b = pop("a", 30, mean=20, sigma=0.7), pop("b", 40, mean=60, sigma=0.7)
    both = client_sizes([a, b], seed=5)
    assert both.dtype == np.int64 and len(both) == 70
    assert np.array_equal(both, client_sizes([a, b], seed=5))
    assert not np.array_equal(both, client_sizes([a, b], seed=6))
    # population 1's draw does not depend on population 0's client count
    assert np.array_equal(client_sizes([pop("a", 3, mean=20, sigma=0.7), b], seed=5)[3:], both[30:])


# ---------------------------------------------------------------- partition structure


def test_exact_sizes_disjoint_and_hist_matches():
    pops = [
        pop("a", 60, {"kind": "dirichlet", "alpha": 0.3}, mean=30, sigma=0.6),
        pop("b", 40, {"kind": "shards", "classes": 2}, mean=25),
        pop("c", 30, "iid", mean=20, sigma=0.3, held_out=True),
    ]
    labels = pool(20000)
    part = make_partition(pops, labels, K, seed=1, val_fraction=0.2)
    check_valid(part, labels, client_sizes(pops, seed=1))
    assert part.populations == ["a", "b", "c"]
    assert np.array_equal(part.held_out, [False, False, True])
    assert part.client_population.dtype == np.int32
    assert np.array_equal(part.client_population, np.repeat([0, 1, 2], [60, 40, 30]))
    assert part.label_hist.shape == (130, K)


def test_deterministic_from_seed():
    pops = [pop("a", 40, {"kind": "dirichlet", "alpha": 0.5}, sigma=0.5)]
    labels = pool(5000)
    a = make_partition(pops, labels, K, seed=3, val_fraction=0.1)
    b = make_partition(pops, labels, K, seed=3, val_fraction=0.1)
    c = make_partition(pops, labels, K, seed=4, val_fraction=0.1)
    for field in ("offsets", "indices", "n_val", "label_hist", "client_population"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.indices, c.indices)


def test_client_slices_are_shuffled():
    labels = np.repeat(np.arange(K), 200)  # sorted pool: slices would be sorted by class if not shuffled
    part = make_partition([pop("a", 20, "iid", mean=50)], labels, K, seed=0, val_fraction=0.2)
    slices = [labels[part.indices[s:e]] for s, e in zip(part.offsets[:-1], part.offsets[1:])]
    unsorted = [not np.all(np.diff(lab) >= 0) for lab in slices]
    assert sum(unsorted) >= 18


def test_train_and_val_indices_split_each_slice():
    labels = pool(3000)
    part = make_partition([pop("a", 30, "iid", mean=40, sigma=0.8)], labels, K, seed=0, val_fraction=0.25)
    for c in range(part.num_clients):
        tr, va = part.train_indices(c), part.val_indices(c)
        assert len(va) == part.n_val[c] and len(tr) + len(va) == part.sizes[c]
        assert np.array_equal(np.concatenate([tr, va]), part.indices[part.offsets[c] : part.offsets[c + 1]])


def test_n_val_rules():
    labels = pool(2000)
    pops = [
        pop("one", 3, mean=1, qmin=1),
        pop("two", 3, mean=2, qmin=1),
        pop("ten", 3, mean=10),
        pop("big", 3, mean=7),
    ]
    part = make_partition(pops, labels, K, seed=0, val_fraction=0.5)
    # size 1 -> 0 (never negative); size 2 -> min(1, 1); 10 -> 5; 7 -> round(3.5) capped by 6
    assert np.array_equal(part.n_val, [0, 0, 0, 1, 1, 1, 5, 5, 5, 4, 4, 4])
    assert part.n_val.dtype == np.int64
    assert np.all(part.sizes - part.n_val >= 1)
    none = make_partition(pops, labels, K, seed=0, val_fraction=0.0)
    assert not none.n_val.any()
    most = make_partition(pops, labels, K, seed=0, val_fraction=0.95)
    assert np.array_equal(most.n_val, most.sizes - 1)


# ---------------------------------------------------------------- label skew


def test_iid_clients_follow_the_global_mix():
    probs = [40, 20, 10, 10, 8, 6, 4, 2]
    labels = pool(40000, probs)
    part = make_partition([pop("a", 200, "iid", mean=100)], labels, K, seed=0, val_fraction=0.0)
    shares = part.label_hist / part.sizes[:, None]
    global_mix = np.bincount(labels, minlength=K) / len(labels)
    assert np.abs(shares.mean(axis=0) - global_mix).max() < 0.01
    assert max_share(part) < 0.55  # no client is dominated by one class


def test_small_dirichlet_alpha_is_far_more_skewed_than_large():
    labels = pool(60000)
    skewed = make_partition([pop("a", 300, {"kind": "dirichlet", "alpha": 0.05}, mean=60)], labels, K, 0, 0.0)
    mild = make_partition([pop("a", 300, {"kind": "dirichlet", "alpha": 100.0}, mean=60)], labels, K, 0, 0.0)
    assert max_share(skewed) > 0.8
    assert max_share(mild) < 0.3
    assert (skewed.label_hist > 0).sum(axis=1).mean() < 2.5


def test_shards_give_at_most_k_classes_when_supply_allows():
    labels = pool(50000)
    part = make_partition([pop("a", 400, {"kind": "shards", "classes": 2}, mean=30)], labels, K, 0, 0.0)
    present = (part.label_hist > 0).sum(axis=1)
    assert present.max() <= 2
    assert (present == 2).mean() > 0.9
    # the chosen pairs are spread over all classes
    assert np.all(part.label_hist.sum(axis=0) > 0)


def test_shards_with_more_classes_than_the_dataset_raise_with_key_path():
    with pytest.raises(UserError, match=r"populations\.1\.label_skew\.classes"):
        pops = [pop("a", 5), pop("b", 5, {"kind": "shards", "classes": K + 1})]
        make_partition(pops, pool(1000), K, 0, 0.1)


# ---------------------------------------------------------------- supply


def test_too_much_demand_raises_naming_populations():
    expected = r"^populations: the clients need 1000 training images but the dataset has 999;"
    with pytest.raises(UserError, match=expected):
        make_partition([pop("a", 10, mean=100)], pool(999), K, 0, 0.1)


def test_supply_repair_when_a_rare_class_is_over_demanded():
    # class 1 has 20 images, but ~half of 40 one-class clients (size 10) ask for it
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(2, dtype=np.int64), [2000, 20]))
    pops = [pop("a", 40, {"kind": "shards", "classes": 1}, mean=10)]
    part = make_partition(pops, labels, 2, seed=0, val_fraction=0.2)
    check_valid(part, labels, client_sizes(pops, 0))
    assert part.label_hist[:, 1].sum() == 20  # the rare class is used up, not over-used


def test_supply_repair_with_every_image_used():
    probs = [50, 30, 10, 5, 2, 1, 1, 1]
    labels = pool(4000, probs)
    pops = [
        pop("a", 50, {"kind": "dirichlet", "alpha": 0.1}, mean=40),
        pop("b", 50, {"kind": "shards", "classes": 1}, mean=40),
    ]
    part = make_partition(pops, labels, K, seed=2, val_fraction=0.2)
    check_valid(part, labels, client_sizes(pops, 2))
    assert np.array_equal(np.sort(part.indices), np.arange(4000))


def test_repair_prefers_the_clients_own_classes():
    # classes 0 and 1 are plentiful, class 2 is scarce; clients who wanted 2 and 0 should fall back to 0
    labels = np.concatenate([np.zeros(3000), np.ones(3000), np.full(30, 2)]).astype(np.int64)
    pops = [pop("a", 300, {"kind": "shards", "classes": 2}, mean=10)]
    part = make_partition(pops, labels, 3, seed=0, val_fraction=0.0)
    check_valid(part, labels, client_sizes(pops, 0))
    present = (part.label_hist > 0).sum(axis=1)
    assert present.max() <= 2
    # ~200 clients sharded on {0, 2} or {1, 2} lose (nearly) all their class 2; refilling from their own
    # plentiful class leaves them single-class, where refilling by spare supply would mix in the other one
    assert (present == 1).sum() > 150


def test_classes_absent_from_the_pool_are_never_assigned():
    labels = pool(5000, [1, 1, 1, 1, 0, 0, 0, 0])
    pops = [pop("a", 50, {"kind": "dirichlet", "alpha": 0.2}, mean=40)]
    part = make_partition(pops, labels, K, 0, 0.1)
    check_valid(part, labels, client_sizes(pops, 0))
    assert not part.label_hist[:, 4:].any()


# ---------------------------------------------------------------- table and scale


def test_to_table_schema_and_values():
    pops = [pop("a", 3, mean=10), pop("b", 2, {"kind": "shards", "classes": 1}, mean=5, held_out=True)]
    part = make_partition(pops, pool(500), K, seed=0, val_fraction=0.2)
    table = part.to_table()
    assert table.schema.equals(
        pa.schema(
            [
                ("client_id", pa.int64()),
                ("population", pa.string()),
                ("held_out", pa.bool_()),
                ("site", pa.string()),
                ("n_train", pa.int64()),
                ("n_val", pa.int64()),
                ("label_hist", pa.list_(pa.int64())),
            ]
        )
    )
    rows = table.to_pydict()
    assert rows["client_id"] == [0, 1, 2, 3, 4]
    assert rows["population"] == ["a", "a", "a", "b", "b"]
    assert rows["held_out"] == [False, False, False, True, True]
    assert rows["site"] == [None] * 5
    assert rows["n_train"] == [8, 8, 8, 4, 4]
    assert rows["n_val"] == [2, 2, 2, 1, 1]
    assert rows["label_hist"] == part.label_hist.tolist()


def test_ten_thousand_clients():
    pops = [
        pop("a", 4000, {"kind": "dirichlet", "alpha": 0.1}, mean=50, sigma=0.8),
        pop("b", 3000, {"kind": "shards", "classes": 2}, mean=50),
        pop("c", 3000, "iid", mean=40, sigma=0.3, held_out=True),
    ]
    labels = pool(500_000, [30, 20, 10, 10, 8, 8, 6, 8], seed=9)
    part = make_partition(pops, labels, K, seed=0, val_fraction=0.2)
    assert part.num_clients == 10_000
    check_valid(part, labels, client_sizes(pops, 0))
