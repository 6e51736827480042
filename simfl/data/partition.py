"""Split one training pool among simulated hospitals, non-IID by label and by size.

Every population draws from the same pool without overlap, so no two clients
(in any population) share an image, which membership-inference attacks rely on.
Everything is vectorised over clients: 10,000 clients must partition in about a
second, and every draw comes from :func:`simfl.core.seeding.rng` so a partition is a
pure function of the seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from simfl.core.config import PopulationConfig
from simfl.core.errors import UserError
from simfl.core.seeding import rng
from simfl.data.sites import pool_groups, pool_of, site_label


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy fields with == is ambiguous
class Partition:
    """Which training-pool samples each client owns; client ids are 0..N-1 in population order."""

    populations: list[str]
    held_out: np.ndarray  # (P,) bool
    client_population: np.ndarray  # (N,) int32
    offsets: np.ndarray  # (N+1,) int64 into ``indices``
    indices: np.ndarray  # int64 into the train split; each client's slice in random order
    n_val: np.ndarray  # (N,) int64: the last n_val[c] of client c's slice are local validation
    label_hist: np.ndarray  # (N, K) int64 over all of a client's samples
    population_site: list[str | None] = field(default_factory=list)  # (P,) its sites joined by "+", or None

    @property
    def num_clients(self) -> int:
        """Number of clients, over all populations."""
        return int(len(self.client_population))

    @property
    def sizes(self) -> np.ndarray:
        """Samples per client, train and validation together."""
        return np.diff(self.offsets)

    def train_indices(self, c: int) -> np.ndarray:
        """Dataset train-split indices of client ``c``'s training samples."""
        return self.indices[self.offsets[c] : self.offsets[c + 1] - self.n_val[c]]

    def val_indices(self, c: int) -> np.ndarray:
        """Dataset train-split indices of client ``c``'s local validation samples."""
        return self.indices[self.offsets[c + 1] - self.n_val[c] : self.offsets[c + 1]]

    def to_table(self) -> pa.Table:
        """One row per client, for the run directory and for reports."""
        sizes = self.sizes
        k = self.label_hist.shape[1]
        hist_offsets = np.arange(0, (self.num_clients + 1) * k, k, dtype=np.int32)
        return pa.table(
            {
                "client_id": pa.array(np.arange(self.num_clients, dtype=np.int64)),
                "population": pa.array(
                    np.asarray(self.populations, dtype=object)[self.client_population], pa.string()
                ),
                "held_out": pa.array(self.held_out[self.client_population], pa.bool_()),
                "site": pa.array(np.asarray(self.population_site or [None] * len(self.populations),
                                            dtype=object)[self.client_population], pa.string()),
                "n_train": pa.array((sizes - self.n_val).astype(np.int64)),
                "n_val": pa.array(self.n_val.astype(np.int64)),
                "label_hist": pa.ListArray.from_arrays(
                    pa.array(hist_offsets), pa.array(self.label_hist.reshape(-1).astype(np.int64))
                ),
            }
        )


def client_sizes(populations: list[PopulationConfig], seed: int) -> np.ndarray:
    """Samples per client (train + val), log-normal with the configured mean kept.

    ``size = round(mean * exp(sigma * z - sigma**2 / 2))``, z ~ N(0, 1): the
    ``-sigma**2/2`` keeps the expected size at ``mean`` however heavy the tail;
    then clipped to ``[min, max]``. The synthetic dataset is sized to the sum.
    """
    parts = []
    for i, pop in enumerate(populations):
        q = pop.quantity
        z = rng(seed, "sizes", i).standard_normal(pop.clients)
        sizes = np.rint(q.mean * np.exp(q.sigma * z - q.sigma**2 / 2))
        sizes = np.clip(sizes, q.min, q.max if q.max is not None else np.inf)
        parts.append(sizes.astype(np.int64))
    return np.concatenate(parts)


def _label_probs(pop: PopulationConfig, index: int, prior: np.ndarray, g: np.random.Generator) -> np.ndarray:
    """Class probabilities (clients, K) for one population.

    ``dirichlet``: p_c ~ Dir(alpha * 1_K), the convention of flwr-datasets and
    most FL papers (alpha -> 0: one class per client; alpha -> inf: uniform over
    classes, not the dataset's mix). ``shards``: ``classes`` distinct classes
    per client, uniformly chosen, equally likely.
    """
    n, k = pop.clients, len(prior)
    skew = pop.label_skew
    if skew.kind == "iid":
        return np.broadcast_to(prior, (n, k))
    if skew.kind == "dirichlet":
        return g.dirichlet(np.full(k, skew.alpha), size=n)
    assert skew.classes is not None  # LabelSkew requires classes for shards
    if skew.classes > k:
        raise UserError(
            f"populations.{index}.label_skew.classes: {skew.classes} classes per client, "
            f"but the dataset has only {k}"
        )
    chosen = np.argsort(g.random((n, k)), axis=1)[:, : skew.classes]
    p = np.zeros((n, k))
    np.put_along_axis(p, chosen, 1.0 / skew.classes, axis=1)
    return p


def _scale_column(col: np.ndarray, supply: int) -> np.ndarray:
    """Shrink a class's per-client counts to sum exactly to ``supply`` (largest remainder)."""
    demand = int(col.sum())
    scaled, rem = np.divmod(col * supply, demand)
    short = supply - int(scaled.sum())
    scaled[np.argsort(-rem, kind="stable")[:short]] += 1
    return scaled


def _repair_supply(
    counts: np.ndarray, probs: np.ndarray, supply: np.ndarray, g: np.random.Generator
) -> np.ndarray:
    """Make per-class demand fit the pool while keeping every client's size.

    Over-demanded classes are scaled down to exactly their supply (so they are
    never offered again); each client's shortfall is redrawn among classes with
    spare supply, by its own p_c where that has mass there, else by spare
    supply. A redraw can over-demand another class, so repeat: each round
    saturates at least one more class, so at most K rounds.
    """
    sizes = counts.sum(axis=1)
    for _ in range(counts.shape[1] + 1):
        demand = counts.sum(axis=0)
        over = np.flatnonzero(demand > supply)
        if len(over) == 0:
            return counts
        for k in over:
            counts[:, k] = _scale_column(counts[:, k], int(supply[k]))
        deficit = sizes - counts.sum(axis=1)
        if not deficit.any():
            return counts
        spare = np.maximum(supply - counts.sum(axis=0), 0).astype(np.float64)
        weights = probs * (spare > 0)
        row_mass = weights.sum(axis=1, keepdims=True)
        weights = np.where(row_mass > 0, weights / np.where(row_mass > 0, row_mass, 1), spare / spare.sum())
        counts += g.multinomial(deficit, weights)
    raise AssertionError("supply repair did not converge")  # impossible when total demand <= supply


def make_partition(
    populations: list[PopulationConfig],
    labels: np.ndarray,
    num_classes: int,
    seed: int,
    val_fraction: float,
    sites: list[str] | None = None,
    site_of: np.ndarray | None = None,
) -> Partition:
    """Give every client exactly ``client_sizes(...)[c]`` disjoint train-split samples.

    Per client: class mix p_c from its population's label skew, class counts
    ~ Multinomial(size_c, p_c), then a supply repair so that no class is asked
    for more images than the pool holds. Each class's indices are shuffled and
    dealt out to clients in order; each client's slice is then shuffled, and its
    last ``min(size - 1, round(size * val_fraction))`` samples (never negative)
    are local validation, so every client keeps at least one training sample.

    ``sites`` and ``site_of`` (each train image's site index) are a dataset's
    sites: populations that name sites draw from theirs only (one pool per set of
    sites, :mod:`simfl.data.sites`); the others share the rest.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    sizes = client_sizes(populations, seed)
    groups = pool_groups(populations, sites or [])
    first = np.concatenate([[0], np.cumsum([p.clients for p in populations])])
    counts = np.zeros((len(sizes), num_classes), dtype=np.int64)
    per_client: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(sizes)
    for group in dict.fromkeys(groups):  # each pool once, in order of first use
        members = [i for i, g in enumerate(groups) if g == group]
        clients = np.concatenate([np.arange(first[i], first[i + 1]) for i in members])
        key: tuple[int, ...] = ()  # no sites named: one pool, seeded as always
        pool = np.arange(len(labels), dtype=np.int64)
        if any(g is not None for g in groups):
            assert site_of is not None
            pool = pool_of(group, groups, site_of)
            key = group or (len(sites or []),)  # the sites' indices; past the last: the sites no population names
        if sizes[clients].sum() > len(pool):
            whose, where = "", "the dataset"
            if key:
                whose = " of " + ", ".join(f"populations.{i}" for i in members)
                where = ("the images of no named site" if group is None
                         else f"site {'+'.join((sites or [])[s] for s in group)}")
            raise UserError(
                f"populations: the clients{whose} need {int(sizes[clients].sum())} training images but "
                f"{where} has {len(pool)}; lower populations.*.quantity.mean or the client counts"
            )
        group_counts, dealt = _deal([(i, populations[i]) for i in members], sizes[clients], labels[pool],
                                    num_classes, seed, key)
        counts[clients] = group_counts
        for c, idx in zip(clients, dealt, strict=True):
            per_client[c] = pool[idx]

    n_val = np.maximum(np.minimum(sizes - 1, np.rint(sizes * val_fraction).astype(np.int64)), 0)
    return Partition(
        populations=[p.name for p in populations],
        held_out=np.array([p.held_out for p in populations], dtype=bool),
        client_population=np.repeat(
            np.arange(len(populations), dtype=np.int32), [p.clients for p in populations]
        ),
        offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        indices=np.concatenate(per_client).astype(np.int64),
        n_val=n_val,
        label_hist=counts,
        population_site=[site_label(p) for p in populations],
    )


def _deal(
    pops: list[tuple[int, PopulationConfig]], sizes: np.ndarray, labels: np.ndarray, num_classes: int, seed: int,
    key: tuple,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class counts (clients, K) and each client's indices into ``labels`` (one pool) for ``pops``' clients.

    ``key`` tells pools apart in the seeding; the single pool of a dataset without named sites has ``()``, so
    its partition is the one simfl has always drawn.
    """
    supply = np.bincount(labels, minlength=num_classes).astype(np.int64)
    prior = supply / max(int(supply.sum()), 1)
    probs, count_parts, start = [], [], 0
    for i, pop in pops:
        g = rng(seed, "labels", i)
        p = _label_probs(pop, i, prior, g)
        p = p / p.sum(axis=1, keepdims=True)
        probs.append(p)
        count_parts.append(g.multinomial(sizes[start : start + pop.clients], p))
        start += pop.clients
    repair = rng(seed, "repair" if not key else "repair-sites", *key)
    counts = _repair_supply(np.concatenate(count_parts).astype(np.int64), np.concatenate(probs), supply, repair)

    # Deal each class's shuffled indices to clients in client order, then shuffle within clients.
    g = rng(seed, "assign" if not key else "assign-sites", *key)
    by_class = np.argsort(labels, kind="stable")
    class_start = np.concatenate([[0], np.cumsum(supply)])
    n = len(sizes)
    idx_parts, owner_parts = [], []
    for k in range(num_classes):
        col = counts[:, k]
        pool = by_class[class_start[k] : class_start[k + 1]]
        idx_parts.append(g.permutation(pool)[: col.sum()])
        owner_parts.append(np.repeat(np.arange(n, dtype=np.int32), col))
    idx = np.concatenate(idx_parts)
    owner = np.concatenate(owner_parts)
    shuffle = g.permutation(len(idx))
    order = shuffle[np.argsort(owner[shuffle], kind="stable")]
    return counts, np.split(idx[order].astype(np.int64), np.cumsum(sizes)[:-1])
