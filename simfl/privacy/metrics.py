"""Privacy metrics for gradient-inversion attacks: how much of a batch leaked.

Pure torch/scipy, no Ray. Images are float tensors in [0, data_range] of shape
(N, C, H, W). Every per-image metric is computed in float64 and returned in
float64: these numbers go into reports and are averaged over many batches, and
SSIM's ``E[x^2] - E[x]^2`` terms lose digits in float32.

Honesty rules this module enforces, because published numbers often break them:

* SSIM is the standard Gaussian-window SSIM of Wang et al. (2004), numerically
  the one ``skimage.metrics.structural_similarity`` returns with
  ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``. It is NOT
  the complex-wavelet CW-SSIM that the "breaching" toolkit reports under the
  name "SSIM" (CW-SSIM is far more forgiving, so the two are not comparable).
* Reconstructions are matched to originals by an optimal one-to-one assignment
  (Hungarian), never by letting each reconstruction pick its best original.
* Label recovery is scored as a multiset and refuses answers of the wrong size.
* Baselines (uniform noise, dataset mean) are scored by the same pipeline, so a
  reported number can be read against what "no leakage" looks like.
* Instance leakage is scored apart from resemblance: :func:`nn_rank` asks
  whether a reconstruction's nearest image among many real candidates is its
  own original, which a class-level guess (the class mean) cannot achieve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

# SSIM constants of Wang et al. 2004, as scikit-image uses them.
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # skimage's value: radius int(3.5 * 1.5 + 0.5) = 5, an 11-tap window
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
SSIM_WIN_SIZE = 2 * SSIM_RADIUS + 1

# PSNR of identical images is +inf; one inf turns every batch mean into inf.
# 100 dB means an RMS error of 1e-5 of the data range, far below 8-bit
# quantisation (~59 dB at best), so only exact or float-rounding copies reach it.
PSNR_MAX_DB = 100.0

# Pool candidates per distance pass: bounds the float64 working copy (~77 MB at 224x224x3).
NN_CHUNK = 64


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")


def mse(a: Tensor, b: Tensor) -> Tensor:
    """Per-image mean squared error, shape (N,), float64.

    Per image rather than per batch because batch means hide which samples
    leaked: one perfect reconstruction among noise is a privacy failure.
    """
    _check_pair(a, b)
    d = a.double() - b.double()
    return d.square().flatten(1).mean(dim=1)


def psnr(a: Tensor, b: Tensor, data_range: float = 1.0, max_db: float = PSNR_MAX_DB) -> Tensor:
    """Per-image PSNR in dB, shape (N,), float64, capped at ``max_db``.

    mse == 0 (an exact copy) would give +inf; it is reported as ``max_db``
    instead, as is anything above it, so batch means stay finite. Pass
    ``max_db=float("inf")`` to get the uncapped value (then exact copies are inf).
    """
    m = mse(a, b)
    # Explicit handling of mse == 0: no log of zero, then the cap.
    val = 10.0 * torch.log10(float(data_range) ** 2 / m.clamp_min(torch.finfo(torch.float64).tiny))
    val = torch.where(m == 0, torch.full_like(val, float(max_db)), val)
    return val.clamp_max(max_db)


def _gaussian_kernel1d(device: torch.device) -> Tensor:
    # scipy.ndimage._gaussian_kernel1d: exp(-x^2 / (2 sigma^2)), normalised to sum 1.
    x = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    phi = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return phi / phi.sum()


def _reflect_index(n: int, pad: int, device: torch.device) -> Tensor:
    # scipy.ndimage mode="reflect" (d c b a | a b c d | d c b a), any pad length.
    i = torch.arange(-pad, n + pad, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def _gaussian_filter(x: Tensor) -> Tensor:
    """11-tap Gaussian filter of (M, 1, H, W) maps, reflect-padded like skimage."""
    h, w = x.shape[-2:]
    k = _gaussian_kernel1d(x.device)
    x = x.index_select(-2, _reflect_index(h, SSIM_RADIUS, x.device))
    x = x.index_select(-1, _reflect_index(w, SSIM_RADIUS, x.device))
    x = nn.functional.conv2d(x, k.view(1, 1, -1, 1))
    return nn.functional.conv2d(x, k.view(1, 1, 1, -1))


def ssim(a: Tensor, b: Tensor, data_range: float = 1.0, win_size: int | None = None) -> Tensor:
    """Per-image standard SSIM (Wang et al. 2004), shape (N,), float64.

    Matches ``skimage.metrics.structural_similarity(x, y, data_range=data_range,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    channel_axis=<C>)``: 11-tap Gaussian window (sigma 1.5, truncate 3.5),
    K1=0.01, K2=0.03, population covariances, SSIM map averaged over the valid
    region (a border of (win_size-1)//2 cropped), per channel, then the channel
    means averaged. We implement it rather than call skimage so it runs batched
    on any device; it is not CW-SSIM (see the module docstring).

    ``win_size`` only sets the cropped border, as in skimage (the filter stays
    11-tap). Default: 11, or for images smaller than 11 pixels (where skimage
    raises) the largest odd size that fits, e.g. 7 for 8x8 images; the result
    then equals skimage called with that ``win_size``. Such small-image values
    average few positions and should be read with care.
    """
    _check_pair(a, b)
    n, c, h, w = a.shape
    if win_size is None:
        side = min(h, w)
        win_size = SSIM_WIN_SIZE if side >= SSIM_WIN_SIZE else side - (1 - side % 2)
    if win_size % 2 != 1 or win_size < 1:
        raise ValueError(f"win_size must be a positive odd number, got {win_size}")
    if win_size > min(h, w):
        raise ValueError(f"win_size {win_size} exceeds image extent {h}x{w}")

    x = a.double().reshape(n * c, 1, h, w)
    y = b.double().reshape(n * c, 1, h, w)
    # One filter pass over the five moment maps.
    maps = torch.cat([x, y, x * x, y * y, x * y], dim=0)
    ux, uy, uxx, uyy, uxy = _gaussian_filter(maps).chunk(5, dim=0)
    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy

    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))

    p = (win_size - 1) // 2
    s = s[..., p : h - p, p : w - p].reshape(n, c, -1)
    # Per-channel means first, then over channels (equal crop sizes, but keep skimage's order).
    return s.mean(dim=2).mean(dim=1)


def _pairwise_cost(recon: Tensor, orig: Tensor, cost: str) -> Tensor:
    """(n_recon, n_orig) cost matrix, one row at a time to bound memory."""
    rows = []
    for r in recon:
        rr = r.unsqueeze(0).expand_as(orig)
        if cost == "mse":
            rows.append(mse(rr, orig))
        elif cost == "neg_ssim":
            rows.append(-ssim(rr, orig))
        else:
            raise ValueError(f"unknown cost {cost!r}; expected 'mse' or 'neg_ssim'")
    return torch.stack(rows)


def match(recon: Tensor, orig: Tensor, cost: Literal["mse", "neg_ssim"] = "mse") -> Tensor:
    """Optimal one-to-one assignment of reconstructions to originals in a batch.

    Returns ``perm`` (LongTensor, shape (n_recon,)) with ``orig[perm[i]]`` the
    original matched to ``recon[i]``; the total pairwise cost (per-image MSE,
    or -SSIM) is minimal over all one-to-one assignments (Hungarian algorithm,
    ``scipy.optimize.linear_sum_assignment``).

    Why not greedy best-of-batch (each reconstruction scored against its
    nearest original): two reconstructions can claim the same original, so one
    good reconstruction counts twice and an original nobody recovered is never
    counted; the reported leakage is then optimistic for the attacker. Greedy
    pairing without replacement avoids double claims but is order-dependent and
    not optimal in total cost. Attacks output an unordered batch, so an optimal
    bijection is the fair alignment.

    ``n_recon`` may be smaller than the batch (every reconstruction gets a
    distinct original), not larger.
    """
    if recon.dim() != 4 or orig.dim() != 4 or recon.shape[1:] != orig.shape[1:]:
        raise ValueError(f"incompatible shapes {tuple(recon.shape)} and {tuple(orig.shape)}")
    if recon.shape[0] > orig.shape[0]:
        raise ValueError(f"more reconstructions ({recon.shape[0]}) than originals ({orig.shape[0]})")
    if recon.shape[0] == 0:
        return torch.empty(0, dtype=torch.long)
    costs = _pairwise_cost(recon, orig, cost).cpu().numpy()
    rows, cols = linear_sum_assignment(costs)
    perm = np.empty(recon.shape[0], dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm)


def nn_rank(images: Tensor, pool: Tensor, truth: Tensor) -> Tensor:
    """Where each image's own original ranks among a pool of real candidates, by pixel distance: (N,) int64.

    ``images`` (N, C, H, W) are reconstructions (or baseline guesses), ``pool``
    (M, C, H, W) the candidate originals, ``truth`` (N,) the index in ``pool``
    of each image's own original. Distance is Euclidean over all pixels of the
    [0, 1] images, in float64 (the same ordering as per-image MSE). Rank 1 means
    the original is the image's nearest neighbour: the attack singled out this
    instance among its peers, which resemblance scores (PSNR, SSIM) do not show
    and a class-mean guess cannot do. Ties count against the image (rank = 1 +
    the number of other candidates at a distance less than *or equal to* the
    original's), so a guess equidistant from several candidates never scores a hit.
    """
    truth = torch.as_tensor(truth).flatten().long().cpu()
    if images.dim() != 4 or pool.dim() != 4 or images.shape[1:] != pool.shape[1:]:
        raise ValueError(f"incompatible shapes {tuple(images.shape)} and {tuple(pool.shape)}")
    if truth.numel() != images.shape[0]:
        raise ValueError(f"{truth.numel()} true indices for {images.shape[0]} images")
    if truth.numel() and (truth.min() < 0 or truth.max() >= pool.shape[0]):
        raise ValueError(f"true indices must be in [0, {pool.shape[0]})")
    x = images.flatten(1).double()
    dist = torch.cat(
        [torch.cdist(x, pool[s : s + NN_CHUNK].flatten(1).to(x), compute_mode="donot_use_mm_for_euclid_dist")
         for s in range(0, pool.shape[0], NN_CHUNK)], dim=1,
    ).cpu()
    own = dist.gather(1, truth.unsqueeze(1))
    # Every candidate as near as the original, the original itself included once: that one is rank 1.
    return (dist <= own).sum(dim=1).long()


def label_accuracy(recovered: Tensor, true: Tensor) -> float:
    """Share of a batch's labels recovered, comparing multisets (order-free).

    Batch label-recovery attacks (e.g. iDLG-style counting from the last layer)
    return which labels occur and how often, not which sample has which, so we
    score sum over classes of min(recovered count, true count) / B. Answers of a
    different size than the batch are refused: padding with extra guesses would
    otherwise inflate the score.
    """
    recovered = torch.as_tensor(recovered).flatten().long().cpu()
    true = torch.as_tensor(true).flatten().long().cpu()
    if true.numel() == 0:
        raise ValueError("empty label batch")
    if recovered.numel() != true.numel():
        raise ValueError(f"recovered {recovered.numel()} labels for a batch of {true.numel()}")
    if (recovered < 0).any() or (true < 0).any():
        raise ValueError("labels must be non-negative class indices")
    k = int(max(recovered.max(), true.max())) + 1
    hits = torch.minimum(torch.bincount(recovered, minlength=k), torch.bincount(true, minlength=k))
    return float(hits.sum()) / true.numel()


def class_mean_images(class_means: Tensor, labels: Tensor) -> Tensor:
    """The label-aware, image-free guess: for each label, its class's mean image (``class_means`` (K, C, H, W)).

    At batch size 1 the label is read off the gradient exactly, so an attacker
    gets this image for free, with no inversion at all: an attack leaks the
    *instance* only where it beats this guess, not merely the global mean.
    """
    labels = torch.as_tensor(labels).flatten().long().cpu()
    if class_means.dim() != 4:
        raise ValueError(f"expected class means of shape (K, C, H, W), got {tuple(class_means.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= class_means.shape[0]):
        raise ValueError(f"labels must be in [0, {class_means.shape[0]}), got {labels.tolist()}")
    return class_means[labels].clone()


def baseline_images(
    orig: Tensor,
    kind: Literal["random", "mean"],
    generator: torch.Generator | None,
    reference_mean: Tensor | None = None,
) -> Tensor:
    """Stand-in "reconstructions" that carry no information about ``orig``.

    Scoring them like real reconstructions shows the floor each metric gives
    with zero leakage (e.g. the dataset mean alone already scores a
    non-trivial PSNR on medical images with dark backgrounds).

    * ``"random"``: uniform noise in [0, 1) of ``orig``'s shape, drawn from
      ``generator`` (required, so baselines are reproducible).
    * ``"mean"``: the dataset mean image ``reference_mean`` (C, H, W),
      repeated for every image; ``generator`` is unused.

    The label-aware guess is :func:`class_mean_images`.
    """
    if orig.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(orig.shape)}")
    if kind == "random":
        if generator is None:
            raise ValueError("kind='random' needs a seeded generator")
        dtype = orig.dtype if orig.dtype.is_floating_point else torch.float32
        noise = torch.rand(orig.shape, generator=generator, dtype=dtype, device=generator.device)
        return noise.to(orig.device)
    if kind == "mean":
        if reference_mean is None:
            raise ValueError("kind='mean' needs reference_mean (C, H, W)")
        if tuple(reference_mean.shape) != tuple(orig.shape[1:]):
            raise ValueError(f"reference_mean shape {tuple(reference_mean.shape)} != {tuple(orig.shape[1:])}")
        return reference_mean.to(orig.device).unsqueeze(0).expand_as(orig).clone()
    raise ValueError(f"unknown baseline kind {kind!r}; expected 'random' or 'mean'")


def score(
    recon: Tensor,
    orig: Tensor,
    data_range: float = 1.0,
    cost: Literal["mse", "neg_ssim"] = "mse",
) -> dict[str, Tensor]:
    """Match reconstructions to originals (Hungarian), then score each pair.

    Returns ``{"mse", "psnr", "ssim"}`` (float64, one value per reconstruction,
    against its matched original) and ``"perm"`` (the matching, see ``match``).
    Use the same call on ``baseline_images`` to get the no-leakage reference.
    """
    perm = match(recon, orig, cost=cost)
    matched = orig[perm.to(orig.device)]
    return {
        "mse": mse(recon, matched),
        "psnr": psnr(recon, matched, data_range=data_range),
        "ssim": ssim(recon, matched, data_range=data_range),
        "perm": perm,
    }


def predict(classifier: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """The classifier's labels for ``images`` (N,), on CPU.

    Runs in eval mode (BatchNorm running stats, no dropout) under no_grad, in
    batches to bound memory; the classifier's previous mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    param = next(iter(classifier.parameters()), None)
    device = param.device if param is not None else images.device
    was_training = classifier.training
    classifier.eval()
    try:
        with torch.no_grad():
            return torch.cat(
                [classifier(images[s : s + batch_size].to(device)).argmax(dim=1).cpu()
                 for s in range(0, images.shape[0], batch_size)]
            )
    finally:
        classifier.train(was_training)


def attacker_accuracy(
    classifier: nn.Module, recon: Tensor, true_labels: Tensor, batch_size: int = 256
) -> float:
    """Share of reconstructions a separately trained classifier labels correctly.

    Pixel metrics miss semantic leakage (a blurry but recognisable lesion); an
    independent evaluation classifier measures it. ``true_labels`` are aligned
    with ``recon`` (apply ``match``'s perm first).
    """
    true_labels = torch.as_tensor(true_labels).flatten().long()
    if recon.shape[0] == 0:
        raise ValueError("no reconstructions to classify")
    if true_labels.numel() != recon.shape[0]:
        raise ValueError(f"{true_labels.numel()} labels for {recon.shape[0]} reconstructions")
    pred = predict(classifier, recon, batch_size)
    return int((pred == true_labels.cpu()).sum()) / recon.shape[0]


@dataclass(frozen=True)
class Baselines:
    """One victim's batch scored for the image-free guesses (``random_``, ``mean_``, ``class_mean_`` columns).

    They do not depend on the attack: :func:`score_baselines` computes them
    once per victim, and every attack's :func:`score_batch` on that victim
    shares them (the same values it would compute again).
    """

    columns: dict[str, list]
    pool: Tensor  # the nn_rank candidates: the batch's originals, then the peers
    original_correct: Tensor  # (B,) the classifier's verdict on each original


def score_baselines(
    orig: Tensor,
    true_labels: Tensor,
    classifier: nn.Module,
    mean_image: Tensor,
    generator: torch.Generator,
    class_means: Tensor,
    peers: Tensor | None = None,
) -> Baselines:
    """The image-free guesses of one victim's batch, scored as :func:`score_batch` scores a reconstruction."""
    true_labels = torch.as_tensor(true_labels).flatten().long().cpu()
    pool = orig if peers is None else torch.cat([orig, peers.to(orig)])
    guesses = {
        "random_": baseline_images(orig, "random", generator),
        "mean_": baseline_images(orig, "mean", None, reference_mean=mean_image),
        "class_mean_": class_mean_images(class_means, true_labels).to(orig.device),
    }
    columns: dict[str, list] = {}
    for prefix, images in guesses.items():
        columns.update(_scored(prefix, images, orig, true_labels, classifier, pool)[0])
    return Baselines(columns, pool, predict(classifier, orig) == true_labels)


def _scored(prefix: str, images: Tensor, orig: Tensor, true_labels: Tensor, classifier: nn.Module, pool: Tensor
            ) -> tuple[dict[str, list], Tensor]:
    """``images`` against the batch: each metric's column (named with ``prefix``), and the Hungarian matching."""
    scored = score(images, orig)
    matched_labels = true_labels[scored["perm"]]
    columns: dict[str, list] = {prefix + name: scored[name].tolist() for name in ("mse", "psnr", "ssim")}
    columns[prefix + "attacker_correct"] = (predict(classifier, images) == matched_labels).tolist()
    rank = nn_rank(images, pool, scored["perm"])
    columns[prefix + "nn_match"] = (rank == 1).tolist()
    columns[prefix + "nn_rank"] = rank.tolist()
    return columns, scored["perm"]


def score_batch(
    recon: Tensor,
    orig: Tensor,
    true_labels: Tensor,
    recovered_labels: Tensor,
    classifier: nn.Module,
    mean_image: Tensor | None = None,
    generator: torch.Generator | None = None,
    class_means: Tensor | None = None,
    peers: Tensor | None = None,
    baselines: Baselines | None = None,
) -> list[dict[str, float | int | bool]]:
    """One victim's batch scored per reconstructed image, beside three image-free baselines.

    Every metric is computed for the reconstruction and, by the same pipeline
    (Hungarian matching included), for uniform noise (``random_*``), for the
    evaluation data's mean image (``mean_*``) and for the class-mean image of
    each true label (``class_mean_*``, :func:`class_mean_images`: what knowing
    the labels alone gives, and at batch size 1 they are read off the gradient
    exactly). ``attacker_correct`` is the
    classifier's verdict on the reconstruction against its matched original's
    label; ``evaluator_on_original`` is its verdict on that original, the
    ceiling attacker accuracy can reach with this classifier.

    Instance identification (:func:`nn_rank`): ``nn_rank`` is the rank of the
    matched original among a pool of real candidates by pixel distance to the
    reconstruction, ``nn_match`` whether it is the nearest (rank 1). The pool is
    the batch's originals followed by ``peers`` (M, C, H, W) in [0, 1], images
    that are not the victim's (the caller's choice, e.g. same-label images seen
    through the victim's device); ``nn_pool_size`` is B + M. Without ``peers``
    the pool is the batch alone, and at B = 1 every guess trivially ranks 1.

    ``baselines``: this batch's :func:`score_baselines`, when several
    reconstructions of it are scored (then ``mean_image``, ``generator``,
    ``class_means`` and ``peers`` are not needed); computed here otherwise.
    """
    true_labels = torch.as_tensor(true_labels).flatten().long().cpu()
    if baselines is None:
        if mean_image is None or generator is None or class_means is None:
            raise ValueError("score_batch: give the baselines, or mean_image, generator and class_means to score them")
        baselines = score_baselines(orig, true_labels, classifier, mean_image, generator, class_means, peers)
    label_acc = label_accuracy(recovered_labels, true_labels)
    columns, perm = _scored("", recon, orig, true_labels, classifier, baselines.pool)
    columns["matched_image"] = perm.tolist()
    columns["true_label"] = true_labels[perm].tolist()
    columns["evaluator_on_original"] = baselines.original_correct[perm].tolist()
    columns.update(baselines.columns)
    pool = baselines.pool
    return [
        {"image": i, "label_accuracy": label_acc, "nn_pool_size": len(pool), **{k: v[i] for k, v in columns.items()}}
        for i in range(len(recon))
    ]
