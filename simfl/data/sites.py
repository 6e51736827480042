"""Real sites as populations: which of a dataset's images a population may draw from and is tested on.

A dataset of real hospitals (a manifest's ``site`` column, Camelyon17's five
hospitals) says which site each image came from. A population that names sites
(``populations.N.site``) draws its clients from those sites' training images
only and is tested on their test images, so "does the defence hold on another
hospital" is asked on real hospitals, not only on simulated acquisition shifts.
Populations without ``site`` share the images of the sites no population names.
``populations: {from_sites: ...}`` writes one population per site.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from simfl.core.config import PopulationConfig
from simfl.core.errors import UserError
from simfl.core.validation import NAME_PATTERN

# The keys of a ``from_sites`` mapping that are not a population's own.
FROM_SITES_KEYS = ("from_sites", "held_out")


def pool_groups(populations: list[PopulationConfig], dataset_sites: list[str]) -> list[tuple[int, ...] | None]:
    """Per population: the indices (into ``dataset_sites``) of the sites it draws from; None: the unnamed sites.

    Raises UserError (key path named) for a site the data lacks, for sites on a
    dataset without sites, and for site lists that partly overlap.
    """
    groups: list[tuple[int, ...] | None] = []
    for i, pop in enumerate(populations):
        if pop.site is None:
            groups.append(None)
            continue
        if not dataset_sites:
            raise UserError(f"populations.{i}.site: the data has no sites (sites come from a manifest's site column "
                            "or from camelyon17)")
        unknown = [s for s in pop.site if s not in dataset_sites]
        if unknown:
            raise UserError(f"populations.{i}.site: unknown site {unknown[0]!r}; the data's sites are: "
                            f"{', '.join(dataset_sites)}")
        groups.append(tuple(sorted(dataset_sites.index(s) for s in pop.site)))
    named = [g for g in groups if g is not None]
    for a in set(named):
        for b in set(named):
            if a != b and set(a) & set(b):
                i, j = groups.index(a), groups.index(b)
                raise UserError(f"populations.{j}.site: shares some but not all sites with populations.{i}; "
                                "populations either name the same sites or disjoint ones")
    return groups


def pool_of(group: tuple[int, ...] | None, groups: list[tuple[int, ...] | None], site_of: np.ndarray) -> np.ndarray:
    """Indices of the images a pool group draws from: its sites' images, or (None) those of no named site."""
    if group is None:
        named = sorted({s for g in groups if g is not None for s in g})
        return np.flatnonzero(~np.isin(site_of, named)).astype(np.int64)
    return np.flatnonzero(np.isin(site_of, group)).astype(np.int64)


def site_label(pop: PopulationConfig) -> str | None:
    """How a population's sites appear in the partition table: names joined with ``+``; None without sites."""
    return "+".join(pop.site) if pop.site is not None else None


def expand_from_sites(spec: Any, site_names: list[str]) -> list[dict[str, Any]]:
    """``populations: {from_sites: true, held_out: [sites], <population keys>}`` → one population per site.

    Each is named after its site (characters outside ``[A-Za-z0-9_.-]`` become ``_``) and takes the
    other keys (``clients``, ``label_skew``, ``quantity``, ``shift``) as they are.
    """
    if spec.get("from_sites") is not True:
        raise UserError("populations: a mapping must say from_sites: true (or give a list of populations)")
    if not site_names:
        raise UserError("populations.from_sites: the data has no sites (sites come from a manifest's site column "
                        "or from camelyon17)")
    held_out = spec.get("held_out", [])
    if isinstance(held_out, str):
        held_out = [held_out]
    if not isinstance(held_out, list) or any(s not in site_names for s in held_out):
        raise UserError(f"populations.held_out: give site names among: {', '.join(site_names)} (got {held_out!r})")
    template = {k: v for k, v in spec.items() if k not in FROM_SITES_KEYS}
    out = []
    for site in site_names:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", site)
        if not re.fullmatch(NAME_PATTERN, name) or name == "global":
            raise UserError(f"populations.from_sites: site {site!r} gives no valid population name; "
                            "list the populations instead")
        out.append({"name": name, **template, "site": [site], "held_out": site in held_out})
    return out


def require_test_images(populations: list[PopulationConfig], dataset_sites: list[str], test_site: np.ndarray) -> None:
    """Refuse (one line) a site population whose sites have no test images: it could not be evaluated."""
    for i, group in enumerate(pool_groups(populations, dataset_sites)):
        if group is not None and not np.isin(test_site, group).any():
            raise UserError(f"populations.{i}.site: {', '.join(dataset_sites[s] for s in group)} has no test images; "
                            "give it some (the manifest's split column, or larger data.folder.test_fraction)")
