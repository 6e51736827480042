"""Real sites as populations: pools per set of sites, errors with key paths, from_sites expansion."""

import numpy as np
import pytest

from simfl.core.config import PopulationConfig
from simfl.core.errors import UserError
from simfl.data.partition import client_sizes, make_partition
from simfl.data.sites import expand_from_sites, pool_groups

K = 4
SITES = ["h0", "h1", "h2"]


def site_pop(name, clients, site=None, mean=10, held_out=False, skew="iid"):
    return PopulationConfig(name=name, clients=clients, site=site, quantity={"mean": mean}, held_out=held_out,
                            label_skew=skew)


def site_pool(per_site=200, seed=0):
    """Labels and each image's site: ``per_site`` images per site, site h2 holding classes 2 and 3 only."""
    g = np.random.default_rng(seed)
    site_of = np.repeat(np.arange(len(SITES), dtype=np.int32), per_site)
    labels = np.where(site_of == 2, g.integers(2, K, size=len(site_of)), g.integers(0, K, size=len(site_of)))
    perm = g.permutation(len(labels))
    return labels[perm].astype(np.int64), site_of[perm]


def test_site_populations_draw_only_from_their_sites_and_the_rest_from_unnamed_sites():
    labels, site_of = site_pool()
    pops = [site_pop("a", 5, "h0"), site_pop("rest", 6), site_pop("c", 4, "h2", held_out=True),
            site_pop("a2", 3, "h0", skew={"kind": "dirichlet", "alpha": 0.5})]
    part = make_partition(pops, labels, K, seed=1, val_fraction=0.2, sites=SITES, site_of=site_of)
    assert np.array_equal(part.sizes, client_sizes(pops, 1))
    assert len(np.unique(part.indices)) == len(part.indices)  # no image twice, across site pools too
    drawn_from = [set(site_of[part.indices[part.offsets[c]:part.offsets[c + 1]]].tolist())
                  for c in range(part.num_clients)]
    population = part.client_population
    for c, sites in enumerate(drawn_from):
        expected = {0: {0}, 1: {1}, 2: {2}, 3: {0}}[int(population[c])]  # "rest" gets h1, the unnamed site
        assert sites == expected, (c, sites)
    assert part.label_hist[population == 2][:, :2].sum() == 0  # h2 has no class 0 or 1
    table = part.to_table().to_pydict()
    assert [table["site"][c] for c in (0, 5, 11, 15)] == ["h0", None, "h2", "h0"]


def test_a_partition_with_sites_is_a_pure_function_of_the_seed():
    labels, site_of = site_pool()
    pops = [site_pop("a", 5, "h0"), site_pop("b", 5, ["h1", "h2"])]
    a, b, c = (make_partition(pops, labels, K, s, 0.2, SITES, site_of) for s in (3, 3, 4))
    assert np.array_equal(a.indices, b.indices) and not np.array_equal(a.indices, c.indices)


def test_a_site_without_enough_images_is_named():
    labels, site_of = site_pool(per_site=30)
    with pytest.raises(UserError, match=r"^populations: the clients of populations\.0 need 50 training images "
                                        r"but site h1 has 30;"):
        make_partition([site_pop("a", 5, "h1")], labels, K, 0, 0.2, SITES, site_of)


@pytest.mark.parametrize("pops, sites, message", [
    ([site_pop("a", 2, "h9")], SITES, r"^populations\.0\.site: unknown site 'h9'; the data's sites are: h0, h1, h2$"),
    ([site_pop("a", 2, "h0")], [], r"^populations\.0\.site: the data has no sites"),
    ([site_pop("a", 2, ["h0", "h1"]), site_pop("b", 2, "h1")], SITES,
     r"^populations\.1\.site: shares some but not all sites with populations\.0"),
])
def test_bad_site_lists_give_one_line_with_the_key(pops, sites, message):
    with pytest.raises(UserError, match=message):
        pool_groups(pops, sites)


def test_site_given_as_one_name_or_a_list():
    assert site_pop("a", 1, "h1").site == ["h1"]
    assert site_pop("a", 1, ["h2", "h0"]).site == ["h0", "h2"]
    with pytest.raises(ValueError, match="named twice"):
        site_pop("a", 1, ["h0", "h0"])


def test_from_sites_writes_one_population_per_site():
    spec = {"from_sites": True, "clients": 4, "quantity": {"mean": 20}, "held_out": ["hospital 2"]}
    pops = expand_from_sites(spec, ["hospital 1", "hospital 2"])
    assert pops == [
        {"name": "hospital_1", "clients": 4, "quantity": {"mean": 20}, "site": ["hospital 1"], "held_out": False},
        {"name": "hospital_2", "clients": 4, "quantity": {"mean": 20}, "site": ["hospital 2"], "held_out": True},
    ]
    [PopulationConfig.model_validate(p) for p in pops]


@pytest.mark.parametrize("spec, sites, message", [
    ({"from_sites": True, "clients": 2}, [], "populations.from_sites: the data has no sites"),
    ({"from_sites": True, "held_out": ["x"]}, ["a"], "populations.held_out: give site names among: a"),
    ({"clients": 2}, ["a"], "populations: a mapping must say from_sites: true"),
])
def test_from_sites_errors(spec, sites, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        expand_from_sites(spec, sites)
