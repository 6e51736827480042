"""A small hospital dataset on disk, as a user would bring it: PNG files of several sites and a CSV manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from simfl.data.synthetic import make_dataset

SITES = ("hospital_a", "hospital_b", "hospital_c")


def write_site_tree(root: Path, patients_per_site: int = 10, images_per_patient: int = 6, classes: int = 4,
                    size: int = 28) -> Path:
    """Learnable images (the synthetic generator's, tinted per site) as PNGs under ``root``; returns the manifest.

    Sites differ in their colour (a real acquisition difference) and hold every class; each patient has
    ``images_per_patient`` images, so patient-grouped splits have something to group.
    """
    per_site = patients_per_site * images_per_patient
    ds = make_dataset(per_site * len(SITES), 1, 1, size, classes, seed=7)
    rows = []
    for s, site in enumerate(SITES):
        tint = np.array([1.0, 1.0 - 0.1 * s, 1.0 - 0.05 * s])
        for i in range(per_site):
            k = s * per_site + i
            image = np.clip(ds.train_x[k] * tint, 0, 255).astype(np.uint8)
            path = Path("images") / site / f"{i:04d}.png"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / path)
            rows.append({"path": str(path), "label": ds.label_names[int(ds.train_y[k])], "site": site,
                         "patient": f"{site}-p{i // images_per_patient:03d}"})
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest
