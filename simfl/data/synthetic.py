"""The embedded offline dataset: synthetic blood-smear micrographs.

Quick-starts, CI and benchmarks must run without a download, yet the task has to
be real: a CNN must learn shapes and colours to classify it, and gradient-inversion
reconstructions must be judgeable by eye. So each class is a white-cell type (as in
BloodMNIST) with its own nucleus shape, cell size, cytoplasm and granules, seen
among red cells, with per-image pose, size and stain variation.

Rendering is an optical-density model, as light through a stained smear: every
layer (background, red cells, cytoplasm, nucleus, granules) adds absorbance and
the image is ``light * exp(-absorbance)``. Shapes are sums of isotropic Gaussian
blobs (metaballs) thresholded into masks; a Gaussian is separable, so a sum of K
blobs over a batch of images is one batched matmul. Geometry lives in normalized
coordinates ``[-1, 1]``, so ``image_size`` only sets the resolution.

Image ``i`` of a split depends only on ``(seed, split, i)``: images are drawn in
chunks of :data:`CHUNK`, each from its own generator, so a smaller split is a
prefix of a larger one and the splits never influence each other.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from simfl.core.seeding import rng
from simfl.data.dataset import Dataset

CHUNK = 1024
_SPLITS = {"train": 0, "val": 1, "test": 2}
_PIXEL_BUDGET = 1 << 18  # float32 pixels per working array (1 MB): small enough to stay in cache
_MAX_GRANULES = 32
_TEXTURE_GRID = 10
_SLIDE_STRENGTH = 0.25  # +- per image on every stain: slides differ, so colour alone is not the class
_SLIDE_HUE = 0.22  # +- per channel and image


@dataclass(frozen=True)
class CellType:
    """What makes a class: all sizes are fractions of the image half-width or of ``body_r``."""

    nucleus: str  # lobe layout: round, bilobed, multilobed, kidney, fragments
    body_r: float  # cell radius (image half-width units)
    nuc_size: float  # lobe radius (body_r units)
    nuc_offset: float  # how far the nucleus sits off the cell centre (body_r units)
    nuc_rgb: tuple[float, float, float]  # transmittance of each stained layer on white
    cyto_rgb: tuple[float, float, float]
    gran_rgb: tuple[float, float, float]
    granules: int
    gran_size: float  # granule radius (body_r units)
    chromatin: float  # contrast of the nucleus texture


# The eight BloodMNIST cell types, in BloodMNIST's label order.
_BASE_TYPES: tuple[CellType, ...] = (
    # basophil: bilobed nucleus hidden under coarse dark-purple granules
    CellType("bilobed", 0.58, 0.40, 0.0, (0.45, 0.32, 0.62), (0.86, 0.80, 0.92), (0.30, 0.18, 0.50), 26, 0.11, 0.2),
    # eosinophil: "spectacle" bilobed nucleus, cytoplasm packed with orange granules
    CellType("bilobed", 0.62, 0.32, 0.0, (0.42, 0.26, 0.56), (0.98, 0.84, 0.76), (0.96, 0.52, 0.36), 32, 0.085, 0.3),
    # erythroblast: small cell, round very dark nucleus, lilac rim
    CellType("round", 0.40, 0.62, 0.05, (0.22, 0.13, 0.32), (0.84, 0.74, 0.84), (1.0, 1.0, 1.0), 0, 0.1, 0.15),
    # immature granulocyte: large grey-blue cell, big eccentric round nucleus, few pink granules
    CellType("round", 0.76, 0.52, 0.22, (0.52, 0.40, 0.68), (0.78, 0.81, 0.92), (0.90, 0.62, 0.78), 10, 0.06, 0.45),
    # lymphocyte: small, dark round nucleus filling the cell, thin sky-blue rim
    CellType("round", 0.48, 0.74, 0.12, (0.32, 0.22, 0.52), (0.72, 0.84, 0.97), (1.0, 1.0, 1.0), 0, 0.1, 0.3),
    # monocyte: the same cell as the immature granulocyte but for its kidney / horseshoe nucleus
    CellType("kidney", 0.76, 0.27, 0.0, (0.52, 0.40, 0.68), (0.78, 0.81, 0.92), (1.0, 1.0, 1.0), 0, 0.1, 0.35),
    # neutrophil: 3-5 nuclear lobes on an arc, pale pink cytoplasm with fine granules
    CellType("multilobed", 0.62, 0.19, 0.0, (0.40, 0.25, 0.55), (0.94, 0.86, 0.90), (0.84, 0.70, 0.82), 14, 0.05, 0.2),
    # platelet: a small cluster of purple fragments between the red cells, no cell body
    CellType("fragments", 0.30, 0.28, 0.0, (0.52, 0.38, 0.68), (1.0, 1.0, 1.0), (0.48, 0.34, 0.64), 8, 0.14, 0.2),
)
_BACKGROUND_RGB = (0.95, 0.91, 0.89)
_RBC_RGB = (0.92, 0.62, 0.64)


def cell_types(num_classes: int) -> list[CellType]:
    """The first eight classes are the BloodMNIST types; later ones recolour and resize them.

    Fixed by class index (not by seed), so a class looks the same in every run.
    """
    types = list(_BASE_TYPES[:num_classes])
    for c in range(len(types), num_classes):
        base = _BASE_TYPES[c % len(_BASE_TYPES)]
        r = rng(0, "synthetic-class", c)
        types.append(
            replace(
                base,
                body_r=base.body_r * float(r.uniform(0.8, 1.2)),
                nuc_size=base.nuc_size * float(r.uniform(0.85, 1.15)),
                cyto_rgb=_rgb(r.uniform(0.65, 1.0, 3)),
                gran_rgb=_rgb(r.uniform(0.3, 0.95, 3)),
            )
        )
    return types


def _rgb(values: np.ndarray) -> tuple[float, float, float]:
    red, green, blue = (float(v) for v in values)
    return red, green, blue


def make_dataset(
    train_size: int, val_size: int, test_size: int, image_size: int, num_classes: int, seed: int
) -> Dataset:
    """Generate the three splits; each from its own stream, so their sizes never interact."""
    types = cell_types(num_classes)
    splits = {
        split: _make_split(n, image_size, types, seed, _SPLITS[split])
        for split, n in (("train", train_size), ("val", val_size), ("test", test_size))
    }
    return Dataset.from_splits("synthetic", [f"class-{c}" for c in range(num_classes)], splits)


def _make_split(n: int, size: int, types: list[CellType], seed: int, split_id: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty(n, np.int64)
    for chunk, start in enumerate(range(0, n, CHUNK)):
        stop = min(start + CHUNK, n)
        r = rng(seed, "synthetic", split_id, chunk)
        labels[start:stop] = _render_chunk(r, types, images[start:stop])
    return images, labels


@dataclass(frozen=True)
class _Draws:
    """Every random number of a chunk, drawn in one fixed order whatever the classes,
    so an image's randomness does not depend on its neighbours' labels."""

    center: np.ndarray  # (n, 2) cell centre
    angle: np.ndarray  # (n,) cell rotation
    scale: np.ndarray  # (n,) cell size factor
    nscale: np.ndarray  # (n,) nucleus size factor
    body: np.ndarray  # (n, 2, 3) outline bumps
    lobes: np.ndarray  # (n, 9, 3) nucleus lobe jitter
    count: np.ndarray  # (n,) lobe / fragment count, or kidney bend
    granules: np.ndarray  # (n, _MAX_GRANULES, 4) radius, angle, size, density
    rbc: np.ndarray  # (n, 4, 4) red cells: angle, distance, size, presence
    rbc_turn: np.ndarray  # (n,) rotation of the red cells' ring
    stain: np.ndarray  # (n, 6, 4) per layer, then per slide: strength, then hue of each channel
    light: np.ndarray  # (n, 4) brightness, then tint of each channel
    texture: np.ndarray  # (n, 3, g, g) smooth noise: background, cytoplasm, chromatin

    def take(self, idx: np.ndarray) -> _Draws:
        return _Draws(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


def _draw(r: np.random.Generator, n: int) -> _Draws:
    def u(*shape: int) -> np.ndarray:
        return r.random((n, *shape), dtype=np.float32)

    return _Draws(
        center=u(2) * 0.24 - 0.12,
        angle=u() * np.float32(2 * np.pi),
        scale=u() * 0.3 + 0.85,
        nscale=u() * 0.24 + 0.88,
        body=u(2, 3),
        lobes=u(9, 3),
        count=u(),
        granules=u(_MAX_GRANULES, 4),
        rbc=u(4, 4),
        rbc_turn=u(),
        stain=u(6, 4),
        light=u(4),
        texture=r.standard_normal((n, 3, _TEXTURE_GRID, _TEXTURE_GRID), dtype=np.float32),
    )


def _render_chunk(r: np.random.Generator, types: list[CellType], out: np.ndarray) -> np.ndarray:
    """Fill ``out`` (the first images of a chunk) and return their labels.

    A whole chunk's randomness is drawn even when fewer images are needed, so
    the images that are rendered do not depend on how many are.
    """
    labels = r.integers(len(types), size=CHUNK).astype(np.int64)[: len(out)]
    draws = _draw(r, CHUNK)
    size = out.shape[1]
    batch = max(1, _PIXEL_BUDGET // (size * size))
    for c, cell in enumerate(types):
        idx = np.flatnonzero(labels == c)
        for start in range(0, len(idx), batch):
            sub = idx[start : start + batch]
            out[sub] = _render(cell, draws.take(sub), size)
    return labels


# ---------------------------------------------------------------- rendering


def _render(cell: CellType, d: _Draws, size: int) -> np.ndarray:
    """Images of one cell type, (m, size, size, 3) uint8.

    Written for few passes over the pixels: masks are thresholded in place and
    every layer is computed straight into the canvas.
    """
    grid = (np.arange(size, dtype=np.float32) + 0.5) * np.float32(2 / size) - 1
    px = np.float32(1 / size)  # half a pixel: the blur that keeps sub-pixel blobs visible
    radius = cell.body_r * d.scale
    pose = _Pose(d.center[:, 0], d.center[:, 1], radius, np.cos(d.angle), np.sin(d.angle))
    canvas = _Canvas(len(radius), size, layers=6 if cell.granules else 5)
    slide = _slide(d.stain[:, 5])
    contrast = np.array([0.5, 0.15, cell.chromatin], np.float32)[:, None, None]
    # (m, 3, S, S) around 1; never negative, so no density brightens past the light
    texture = _upsample(np.maximum(1 + contrast * d.texture, 0), grid)

    np.copyto(canvas.layer(_stain(_BACKGROUND_RGB, d.stain[:, 0], slide)), texture[:, 0])
    body = _mask(_field(*pose.place(*_body_blobs(d)), grid, px), 0.4, radius, size)
    rbc = _red_cells(d, grid, px, size)
    rbc -= body  # the white cell lies on top
    np.maximum(rbc, 0, out=canvas.layer(_stain(_RBC_RGB, d.stain[:, 1], slide)))
    np.multiply(body, texture[:, 1], out=canvas.layer(_stain(cell.cyto_rgb, d.stain[:, 2], slide)))
    lobes = pose.place(*_NUCLEUS_LAYOUTS[cell.nucleus](cell, d))
    nucleus = _mask(_field(*lobes, grid, px), 0.4, radius * cell.nuc_size, size)
    np.multiply(nucleus, texture[:, 2], out=canvas.layer(_stain(cell.nuc_rgb, d.stain[:, 3], slide)))
    if cell.granules:
        granules = _field(*pose.place(*_granule_blobs(cell, d)), grid, px)
        np.minimum(granules, 1.5, out=canvas.layer(_stain(cell.gran_rgb, d.stain[:, 4], slide)))
    return canvas.develop(d.light)


class _Canvas:
    """Layer densities (m, L, S, S) and their per-image absorbance (m, L, 3)."""

    def __init__(self, m: int, size: int, layers: int) -> None:
        self.density = np.empty((m, layers, size, size), np.float32)
        self.absorb = np.empty((m, layers, 3), np.float32)
        self.used = 0

    def layer(self, absorb: np.ndarray) -> np.ndarray:
        """Register a layer's absorbance; returns the density view to write into."""
        self.absorb[:, self.used] = absorb
        self.used += 1
        return self.density[:, self.used - 1]

    def develop(self, light: np.ndarray) -> np.ndarray:
        """Beer-Lambert: image = light * exp(-sum of density x absorbance), as uint8 NHWC.

        Illumination (brightness and a slight tint per image) enters as one more
        layer of density 1, so it costs no extra pass.
        """
        tint = (0.88 + 0.12 * light[:, :1]) * (0.97 + 0.03 * light[:, 1:])
        self.layer(-np.log(255 * tint)).fill(1)
        m, layers, size, _ = self.density.shape
        optical = np.matmul(self.absorb.transpose(0, 2, 1), self.density.reshape(m, layers, -1))
        np.negative(optical, out=optical)
        np.exp(optical, out=optical)
        # contiguous before the caller scatters it into the chunk: much faster than a strided scatter
        return np.ascontiguousarray(optical.astype(np.uint8).reshape(m, 3, size, size).transpose(0, 2, 3, 1))


def _slide(jitter: np.ndarray) -> np.ndarray:
    """Per-image factor (m, 3) on every stain's absorbance, as whole slides differ in
    staining; it shifts all colours of an image together."""
    hue = np.exp((jitter[:, 1:] - 0.5) * (2 * _SLIDE_HUE))
    return hue * (1 - _SLIDE_STRENGTH + 2 * _SLIDE_STRENGTH * jitter[:, :1])


def _stain(rgb: tuple[float, float, float], jitter: np.ndarray, slide: np.ndarray) -> np.ndarray:
    """Absorbance (m, 3) of a stain whose colour on white is ``rgb``, on this image's
    slide, varied per layer: strength +-10% and hue +-8% per channel."""
    base = -np.log(np.asarray(rgb, np.float32))
    return base * slide * np.exp((jitter[:, 1:] - 0.5) * 0.16) * (0.9 + 0.2 * jitter[:, :1])


@dataclass(frozen=True)
class _Pose:
    """Where a cell sits: maps blobs from the cell's frame (body_r units) to the image."""

    x: np.ndarray
    y: np.ndarray
    radius: np.ndarray
    cos: np.ndarray
    sin: np.ndarray

    def place(
        self, dx: np.ndarray, dy: np.ndarray, s: np.ndarray, w: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        r, c, s_ = self.radius[:, None], self.cos[:, None], self.sin[:, None]
        x = self.x[:, None] + r * (dx * c - dy * s_)
        y = self.y[:, None] + r * (dx * s_ + dy * c)
        return x, y, r * s, w


def _field(x: np.ndarray, y: np.ndarray, s: np.ndarray, w: np.ndarray, grid: np.ndarray, px: np.float32) -> np.ndarray:
    """Sum of K Gaussian blobs per image, (m, K) each -> (m, S, S), as one batched matmul.

    Each blob is widened by the pixel footprint (keeping its mass), so granules
    smaller than a pixel fade instead of vanishing between pixel centres.
    """
    s2 = s * s + px * px
    w = w * (s * s / s2)
    gx = np.exp(-np.square(grid - x[..., None]) / s2[..., None])  # (m, K, S)
    gy = np.exp(-np.square(grid - y[..., None]) / s2[..., None]) * w[..., None]
    return np.matmul(gy.transpose(0, 2, 1), gx)


def _mask(field: np.ndarray, level: float, scale: np.ndarray, size: int) -> np.ndarray:
    """Threshold a blob field, in place, with an edge about one pixel wide (antialiased)."""
    # Near a blob's edge the field changes by ~2*level/scale per unit length; a pixel is 2/size.
    half = np.minimum(2 * level / (scale * size), level).astype(np.float32)
    gain = (1 / (2 * half))[:, None, None]
    field *= gain
    field += 0.5 - level * gain
    return np.clip(field, 0, 1, out=field)


def _body_blobs(d: _Draws) -> tuple[np.ndarray, ...]:
    """A round cell with two random bumps, so outlines are not perfect circles."""
    m = len(d.angle)
    ang = d.body[:, :, 0] * np.float32(2 * np.pi)
    zero, one = np.zeros((m, 1), np.float32), np.ones((m, 1), np.float32)
    dx = np.concatenate([zero, 0.35 * np.cos(ang)], axis=1)
    dy = np.concatenate([zero, 0.35 * np.sin(ang)], axis=1)
    s = np.concatenate([one, 0.6 + 0.1 * d.body[:, :, 1]], axis=1)
    w = np.concatenate([one, 0.15 + 0.25 * d.body[:, :, 2]], axis=1)
    return dx, dy, s, w


def _round(cell: CellType, d: _Draws) -> tuple[np.ndarray, ...]:
    """One big lobe off-centre plus two small bumps that dent its outline."""
    size = cell.nuc_size * d.nscale[:, None]
    j = d.lobes[:, :2]
    ang = j[:, :, 0] * np.float32(2 * np.pi)
    dist = size * (0.35 + 0.25 * j[:, :, 1])
    zero = np.zeros_like(size)
    dx = cell.nuc_offset + np.concatenate([zero, dist * np.cos(ang)], axis=1)
    dy = np.concatenate([zero, dist * np.sin(ang)], axis=1)
    s = np.concatenate([size, 0.55 * size * (0.9 + 0.2 * j[:, :, 2])], axis=1)
    w = np.broadcast_to(np.array([1.0, 0.7, 0.7], np.float32), s.shape)
    return dx, dy, s, w


def _bilobed(cell: CellType, d: _Draws) -> tuple[np.ndarray, ...]:
    """Two lobes joined by a thin bridge."""
    size = cell.nuc_size * d.nscale[:, None]
    j = d.lobes[:, :3]
    side = np.array([-1.0, 1.0, 0.0], np.float32)
    dx = side * (0.40 + 0.15 * j[:, :, 0])
    dy = (j[:, :, 1] - 0.5) * 0.3 * np.abs(side) + 0.1
    s = size * np.array([1.0, 1.0, 0.45], np.float32) * (0.85 + 0.3 * j[:, :, 2])
    w = np.broadcast_to(np.array([1.0, 1.0, 0.9], np.float32), s.shape)
    return dx, dy, s, w


def _arc(count: np.ndarray, max_lobes: int, spread: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``count`` lobes evenly on an arc around the cell centre, opening to the left."""
    k = np.arange(max_lobes, dtype=np.float32)
    phi = (k / np.maximum(count[:, None] - 1, 1) - 0.5) * spread[:, None]
    return radius * np.cos(phi), radius * np.sin(phi)


def _multilobed(cell: CellType, d: _Draws) -> tuple[np.ndarray, ...]:
    """3-5 small lobes on an arc, each pair joined by a thin strand."""
    count = 3 + np.floor(d.count * 3).astype(np.float32)  # 3, 4 or 5
    j = d.lobes
    lx, ly = _arc(count, 5, np.float32(np.pi) * (0.35 * count - 0.2), 0.42)
    lx, ly = lx + (j[:, :5, 0] - 0.5) * 0.15 - 0.15, ly + (j[:, :5, 1] - 0.5) * 0.15
    bx, by = (lx[:, :-1] + lx[:, 1:]) / 2, (ly[:, :-1] + ly[:, 1:]) / 2
    present = (np.arange(5) < count[:, None]).astype(np.float32)
    size = cell.nuc_size * d.nscale[:, None]
    s = np.concatenate([size * (0.85 + 0.3 * j[:, :5, 2]), np.broadcast_to(0.4 * size, bx.shape)], axis=1)
    w = np.concatenate([present, 0.9 * present[:, 1:]], axis=1)
    return np.concatenate([lx, bx], axis=1), np.concatenate([ly, by], axis=1), s, w


def _kidney(cell: CellType, d: _Draws) -> tuple[np.ndarray, ...]:
    """Seven overlapping lobes on a wide arc: a bean or horseshoe, depending on the bend."""
    j = d.lobes[:, :7]
    spread = np.float32(np.pi) * (0.7 + 0.5 * d.count)
    lx, ly = _arc(np.full(len(d.count), 7, np.float32), 7, spread, 0.36)
    lx, ly = lx - 0.1 + (j[:, :, 0] - 0.5) * 0.08, ly + (j[:, :, 1] - 0.5) * 0.08
    s = cell.nuc_size * d.nscale[:, None] * (0.85 + 0.3 * j[:, :, 2])
    return lx, ly, s, np.ones_like(s)


def _fragments(cell: CellType, d: _Draws) -> tuple[np.ndarray, ...]:
    """2-5 separate small clumps scattered over a small area."""
    j = d.lobes[:, :5]
    count = 2 + np.floor(d.count * 4)
    r = 0.9 * np.sqrt(j[:, :, 0])
    ang = j[:, :, 1] * np.float32(2 * np.pi)
    s = cell.nuc_size * d.nscale[:, None] * (0.6 + 0.6 * j[:, :, 2])
    w = (np.arange(5) < count[:, None]).astype(np.float32)
    return r * np.cos(ang), r * np.sin(ang), s, w


_NUCLEUS_LAYOUTS = {
    "round": _round,
    "bilobed": _bilobed,
    "multilobed": _multilobed,
    "kidney": _kidney,
    "fragments": _fragments,
}


def _granule_blobs(cell: CellType, d: _Draws) -> tuple[np.ndarray, ...]:
    """``cell.granules`` granules scattered uniformly over the cell."""
    g = d.granules[:, : cell.granules]
    r = 0.85 * np.sqrt(g[:, :, 0])
    ang = g[:, :, 1] * np.float32(2 * np.pi)
    s = cell.gran_size * (0.7 + 0.6 * g[:, :, 2])
    return r * np.cos(ang), r * np.sin(ang), s, 0.5 + 0.5 * g[:, :, 3]


def _red_cells(d: _Draws, grid: np.ndarray, px: np.float32, size: int) -> np.ndarray:
    """Up to four red cells spread around the edges, each a disc with a paler centre."""
    rb = d.rbc
    slot = (np.arange(4, dtype=np.float32) + 0.7 * rb[:, :, 0]) / 4  # one per quarter turn: few overlaps
    ang = (slot + d.rbc_turn[:, None]) * np.float32(2 * np.pi)
    dist = 0.85 + 0.45 * rb[:, :, 1]
    s = 0.34 + 0.1 * rb[:, :, 2]
    w = (rb[:, :, 3] < 0.75).astype(np.float32)
    x, y = dist * np.cos(ang), dist * np.sin(ang)
    disc = _mask(_field(x, y, s, w, grid, px), 0.5, np.full(len(ang), 0.38, np.float32), size)
    pallor = _field(x, y, 0.5 * s, 0.6 * w, grid, px)
    disc -= pallor
    return disc


def _upsample(noise: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Smooth noise on the image grid from a coarse (g, g) grid, by normalized Gaussian
    interpolation (so a constant stays constant).

    Batched small matmuls on purpose: one big GEMM would be multithreaded by BLAS,
    which is many times slower for these skinny shapes, worst on a busy machine.
    """
    g = noise.shape[-1]
    knots = np.linspace(-1, 1, g, dtype=np.float32)
    weights = np.exp(-np.square((grid[:, None] - knots[None, :]) * (g / 2.5)))
    weights /= weights.sum(axis=1, keepdims=True)  # (S, g)
    return weights @ noise @ weights.T
