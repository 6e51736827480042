"""Parity of simfl's attacks with the authors' reference implementation (``breaching`` 0.1.2).

Why: simfl re-implements Inverting Gradients (Geiping et al. 2020) batched over
victims with ``torch.func``, and the analytic inversion of a fully connected
layer. Both must keep doing what the authors' own library does, or numbers from
simfl studies stop being comparable with the literature. This script runs both
implementations on the same victims, the same model weights, the same shared
gradients and the same budget, and prints how far apart their reconstructions are.

Victims (B = 1, gradient view, labels known) on simfl's smoke ConvNet (width 16,
GroupNorm, 28×28×3, 8 classes), at initialisation and after a few SGD steps on
the synthetic training split:

- ``synthetic``: simfl's embedded offline images (test split);
- ``skimage``: 28×28 patches of the biomedical pictures scikit-image ships
  (``ihc.png``, ``retina.jpg``, ``cell.png``, ``microaneurysms.png``), read
  from the package folder, never downloaded; label = picture index.

The reference is breaching's ``OptimizationBasedAttacker`` built from its
``invertinggradients`` hydra config (``breaching.get_attack_config``) and called
through ``reconstruct`` with a hand-made server payload and user data (no
breaching case, dataset or server), and ``AnalyticAttacker.invert_fc_layer`` on
the head. The budgets are aligned: iterations, Adam lr 0.1, step decay, signed
gradients, box [0, 1], one restart, known labels, and the SAME initial image
(simfl's own draw, passed as ``initial_data``). Known differences that remain:

- TV: breaching's convolutional TV pads with zeros, so it also charges the last
  row and column's intensity, and it averages over H·W positions where simfl
  averages over H·(W−1) differences. Its scale is set to tv · W / (W − 1) so
  that interior differences weigh exactly the same; the border term remains.
- breaching returns the iterate after the lowest objective seen (best so far);
  simfl returns the last iterate.
- lr milestones: breaching floors N / 2.667, N / 1.6, N / 1.142; simfl takes
  3/8, 5/8, 7/8 of N (1000 iterations: 374 vs 375; the others agree).

The TV border term is what separates the two most (several dB on these 28 px
images: the reference darkens the last row and column and, through TV, more).
``--reference-tv simfl`` registers simfl's TV in breaching's own regularizer
registry under a new name and configures the reference with it instead of its
TV: what then remains is the optimiser itself. simfl's TV is the one of the
paper's original code (mean absolute neighbour differences, no padding).

Metrics are simfl's (PSNR; Gaussian-window SSIM, not breaching's CW-SSIM).

    pip install -e ".[parity]"                 # the reference (optional extra)
    python benchmarks/attack_parity.py         # full: 8 victims per source, 1000 iterations
    python benchmarks/attack_parity.py --quick # 2 victims per source, 20 iterations (smoke)
    python benchmarks/attack_parity.py --reference-tv simfl   # the reference with simfl's TV

Runs on one torch thread by default: on a busy 2-core machine two threads can
be many times slower. Both sides are deterministic on the CPU for a given seed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import statistics
import sys
import time
import types
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version as package_version
from typing import Any

import numpy as np
import skimage.data
import skimage.io
import skimage.transform
import torch
import torch.nn.functional as F
from torch import nn

from simfl.core.config import ModelConfig
from simfl.core.determinism import pin_this_script
from simfl.core.models import build_model
from simfl.core.training import to_input
from simfl.core.weights import FlatWeights
from simfl.data import DataConfig, SyntheticConfig, load_dataset
from simfl.privacy.attacks import InvertingGradients, Observation, observe_gradient
from simfl.privacy.attacks.analytic import recover
from simfl.privacy.attacks.functional import draw, total_variation, victim_generators
from simfl.privacy.metrics import psnr, ssim

with warnings.catch_warnings():  # breaching's objectives use the deprecated torch.jit.script
    warnings.simplefilter("ignore")
    try:
        import breaching

        HAVE_BREACHING = True
    except ImportError:
        HAVE_BREACHING = False

INSTALL_HINT = (
    'attack_parity: the reference (breaching) is not installed; install the extra: pip install -e ".[parity]"'
)
MODEL = ModelConfig(arch="convnet", width=16)
CHANNELS, SIZE, CLASSES = 3, 28, 8
LR, TV = 0.1, 0.1
TRAIN_LR, TRAIN_BATCH = 0.05, 32
# Pictures scikit-image ships: the side of a crop as a share of the picture's shorter side, and the
# crop centres (row, column) as shares of the picture, chosen on structure (glands, vessels, the cell).
PICTURES = {
    "ihc.png": (0.25, ((0.5, 0.5), (0.3, 0.65), (0.65, 0.35), (0.8, 0.6))),
    "retina.jpg": (0.2, ((0.47, 0.2), (0.3, 0.35), (0.7, 0.3), (0.25, 0.6))),
    "cell.png": (0.3, ((0.57, 0.77), (0.45, 0.68), (0.68, 0.86), (0.06, 0.5))),
    "microaneurysms.png": (0.6, ((0.5, 0.5), (0.3, 0.3), (0.7, 0.7), (0.3, 0.7))),
}
SIMFL_TV = "simfl_total_variation"
SETUP = {"dtype": torch.float, "device": torch.device("cpu")}


@dataclass(frozen=True)
class Victims:
    """One image source's victims: names, images (V, C, H, W) in [0, 1], labels (V,)."""

    source: str
    names: list[str]
    images: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class Row:
    """One victim's scores on both sides."""

    source: str
    state: str
    victim: str
    psnr: tuple[float, float]  # (simfl, reference)
    ssim: tuple[float, float]


def synthetic_victims(count: int, seed: int) -> Victims:
    """The first ``count`` images of the synthetic test split."""
    ds = load_dataset(DataConfig(synthetic=SyntheticConfig(val_size=1, test_size=count)), 1, seed)
    images = to_input(torch.from_numpy(ds.test_x[:count]))
    labels = torch.from_numpy(ds.test_y[:count]).long()
    return Victims("synthetic", [f"test/{i}" for i in range(count)], images, labels)


def patch(picture: np.ndarray, share: float, centre: tuple[float, float]) -> np.ndarray:
    """A square crop (side ``share`` of the shorter side) around ``centre``, resized to SIZE², RGB in [0, 1]."""
    if picture.ndim == 2:
        picture = np.stack([picture] * CHANNELS, axis=-1)
    h, w = picture.shape[:2]
    side = int(min(h, w) * share)
    top = min(max(int(centre[0] * h) - side // 2, 0), h - side)
    left = min(max(int(centre[1] * w) - side // 2, 0), w - side)
    crop = picture[top : top + side, left : left + side, :CHANNELS].astype(np.float64) / 255.0
    return skimage.transform.resize(crop, (SIZE, SIZE), anti_aliasing=True).clip(0.0, 1.0)


def skimage_victims(count: int) -> Victims:
    """``count`` patches, round-robin over the pictures scikit-image ships (read from its folder)."""
    folder = os.path.dirname(skimage.data.__file__)
    pictures = {name: skimage.io.imread(os.path.join(folder, name)) for name in PICTURES}
    names, patches, labels = [], [], []
    for i in range(count):
        label, name = i % len(PICTURES), list(PICTURES)[i % len(PICTURES)]
        k = i // len(PICTURES)
        share, centres = PICTURES[name]
        patches.append(patch(pictures[name], share, centres[k % len(centres)]))
        names.append(f"{name.split('.')[0]}/{k}")
        labels.append(label)
    images = torch.from_numpy(np.stack(patches)).permute(0, 3, 1, 2).float().contiguous()
    return Victims("skimage", names, images, torch.tensor(labels, dtype=torch.long))


def trained_weights(model: nn.Module, flat: FlatWeights, steps: int, seed: int) -> tuple[torch.Tensor, float, float]:
    """Weights after ``steps`` SGD steps on the synthetic training split; (weights, first loss, last loss)."""
    ds = load_dataset(DataConfig(synthetic=SyntheticConfig(val_size=1, test_size=1)), steps * TRAIN_BATCH, seed)
    x, y = to_input(torch.from_numpy(ds.train_x)), torch.from_numpy(ds.train_y).long()
    optimizer = torch.optim.SGD(model.parameters(), lr=TRAIN_LR, momentum=0.9)
    model.train()
    losses = []
    for s in range(steps):
        batch = slice(s * TRAIN_BATCH, (s + 1) * TRAIN_BATCH)
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return flat.snapshot(), losses[0], losses[-1]


def observations(model: nn.Module, flat: FlatWeights, weights: torch.Tensor, victims: Victims) -> list[Observation]:
    """Each victim's shared gradient of its one image at ``weights``."""
    return [
        observe_gradient(model, flat, weights, victims.images[i : i + 1], victims.labels[i : i + 1])
        for i in range(len(victims.names))
    ]


def simfl_side(
    model: nn.Module, flat: FlatWeights, obs: Sequence[Observation], seeds: Sequence[int], iterations: int, tv: float
) -> tuple[torch.Tensor, float]:
    """simfl's Inverting Gradients on all victims in one batched call: (images (V, C, H, W), seconds)."""
    attack = InvertingGradients(iterations=iterations, lr=LR, tv_weight=tv, restarts=1, signed=True)
    start = time.perf_counter()
    result = attack(model, flat, obs, seeds)
    return result.images[:, 0], time.perf_counter() - start


def attack_config(name: str, overrides: list[str]) -> Any:
    """breaching's hydra config ``name`` (under its config/attack) with ``overrides``, quietly composed."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return breaching.get_attack_config(name, overrides=overrides)


def reference_tv(tv: float) -> float:
    """breaching's TV scale for simfl's weight ``tv``: interior differences weigh the same (module docstring)."""
    return tv * SIZE / (SIZE - 1)


class SimflTotalVariation(nn.Module):
    """simfl's TV (no border term) as a breaching regularizer, for ``--reference-tv simfl`` only."""

    def __init__(self, setup: dict, scale: float = TV, **kwargs: Any) -> None:
        super().__init__()
        self.scale = scale

    def initialize(self, *args: Any, **kwargs: Any) -> None:
        """breaching's regularizer hook; nothing to prepare."""

    def forward(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.scale * total_variation(tensor)


def reference_attacker(model: nn.Module, iterations: int, tv: float, tv_kind: str) -> Any:
    """breaching's Inverting Gradients with simfl's budget; ``tv_kind`` "simfl" swaps in simfl's TV."""
    if tv_kind == "simfl":
        # Registered under a new name in breaching's own regularizer registry; its TV stays as it is.
        breaching.attacks.auxiliaries.regularizers.regularizer_lookup[SIMFL_TV] = SimflTotalVariation
        regularizer = ["~regularization.total_variation", f"+regularization.{SIMFL_TV}.scale={tv}"]
    else:
        regularizer = [f"regularization.total_variation.scale={reference_tv(tv)}"]
    cfg = attack_config("invertinggradients", [
        f"optim.max_iterations={iterations}", f"optim.step_size={LR}", "optim.optimizer=adam",
        "optim.signed=hard", "optim.boxed=True", "optim.step_size_decay=step-lr", "optim.callback=1000000",
        "restarts.num_trials=1", *regularizer,
    ])
    return breaching.attacks.prepare_attack(model, nn.CrossEntropyLoss(), cfg, SETUP)


def named_list(model: nn.Module, flat: FlatWeights, vector: torch.Tensor) -> list[torch.Tensor]:
    """``vector``'s entries per model parameter, in ``model.parameters()`` order (breaching's layout)."""
    named = flat.as_dict(vector)
    return [named[name].detach().clone() for name, _ in model.named_parameters()]


def reference_side(
    attacker: Any, model: nn.Module, flat: FlatWeights, obs: Sequence[Observation], initial: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """breaching's reconstruction of each victim from its shared gradient: (images (V, C, H, W), seconds)."""
    metadata = types.SimpleNamespace(shape=(CHANNELS, SIZE, SIZE), modality="vision")  # no mean/std: data in [0, 1]
    out = []
    start = time.perf_counter()
    for o, init in zip(obs, initial):
        payload = [{"parameters": named_list(model, flat, o.weights), "buffers": None, "metadata": metadata}]
        shared = [{
            "gradients": named_list(model, flat, o.shared),
            "buffers": None,
            "metadata": {"num_data_points": 1, "labels": o.labels, "local_hyperparams": None},
        }]
        data, _ = attacker.reconstruct(payload, shared, server_secrets={}, initial_data=init)
        out.append(data["data"][0].detach())
    return torch.stack(out), time.perf_counter() - start


def analytic_gap(
    model: nn.Module, flat: FlatWeights, obs: Sequence[Observation], victims: Victims
) -> tuple[float, float, float]:
    """Head-input inversion: (max |simfl − reference|, max |simfl − true latent|, max |true latent|)."""
    attacker = breaching.attacks.prepare_attack(model, nn.CrossEntropyLoss(), attack_config("analytic", []), SETUP)
    gap, error, scale = 0.0, 0.0, 0.0
    for i, o in enumerate(obs):
        ours = recover(model, flat, o).latent
        grads = flat.as_dict(o.shared)
        theirs = attacker.invert_fc_layer(grads["head.weight"], grads["head.bias"], o.labels).double()
        flat.load(o.weights)
        with torch.no_grad():
            true = model.features(victims.images[i : i + 1])[0].double()
        gap = max(gap, float((ours - theirs).abs().max()))
        error = max(error, float((ours - true).abs().max()))
        scale = max(scale, float(true.abs().max()))
    return gap, error, scale


def spread(values: Sequence[float]) -> str:
    """Mean, median and range of paired differences."""
    return (f"mean {statistics.mean(values):+.3f}, median {statistics.median(values):+.3f}, "
            f"range [{min(values):+.3f}, {max(values):+.3f}]")


def report(rows: Sequence[Row]) -> None:
    """The per-victim table, then per source/state means and paired differences (simfl − reference)."""
    print("| source | state | victim | simfl PSNR | reference PSNR | simfl SSIM | reference SSIM |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r.source} | {r.state} | {r.victim} | {r.psnr[0]:.2f} | {r.psnr[1]:.2f} | "
              f"{r.ssim[0]:.3f} | {r.ssim[1]:.3f} |")
    groups = dict.fromkeys((r.source, r.state) for r in rows)
    for source, state in groups:
        group = [r for r in rows if (r.source, r.state) == (source, state)]
        mean = [statistics.mean(getattr(r, m)[side] for r in group) for m in ("psnr", "ssim") for side in (0, 1)]
        print(f"{source} {state} ({len(group)} victims): PSNR simfl {mean[0]:.2f} dB, reference {mean[1]:.2f} dB; "
              f"SSIM simfl {mean[2]:.3f}, reference {mean[3]:.3f}")
        print(f"  ΔPSNR (simfl − reference): {spread([r.psnr[0] - r.psnr[1] for r in group])} dB")
        print(f"  ΔSSIM (simfl − reference): {spread([r.ssim[0] - r.ssim[1] for r in group])}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 victims per source, 20 iterations (smoke check)")
    parser.add_argument("--iterations", type=int, help="IG iterations, both sides (default 1000, 20 with --quick)")
    parser.add_argument("--victims", type=int, help="victims per image source (default 8, 2 with --quick)")
    parser.add_argument("--train-steps", type=int, default=30, help="SGD steps of the trained state (default 30)")
    parser.add_argument("--tv", type=float, default=TV, help=f"TV weight, both sides (default {TV}; 0: no border term)")
    parser.add_argument("--reference-tv", choices=("breaching", "simfl"), default="breaching",
                        help="the reference's TV: its own (default) or simfl's, registered in its regularizer registry")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a busy shared machine 2 threads run far slower)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.iterations = args.iterations or (20 if args.quick else 1000)
    args.victims = args.victims or (2 if args.quick else 8)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not HAVE_BREACHING:
        print(INSTALL_HINT)
        return 0
    pin_this_script(args.threads)  # the kernels simfl's actors run, for both implementations
    torch.manual_seed(args.seed)
    model = build_model(MODEL, CHANNELS, SIZE, CLASSES)
    flat = FlatWeights(model)
    initial = flat.snapshot()
    trained, first_loss, last_loss = trained_weights(model, flat, args.train_steps, args.seed)
    sources = [synthetic_victims(args.victims, args.seed), skimage_victims(args.victims)]
    tv_line = (f"reference: its own TV, scale {reference_tv(args.tv):.4f}" if args.reference_tv == "breaching"
               else "reference: simfl's TV in breaching's regularizer registry")
    print(f"simfl vs breaching {package_version('breaching')}: Inverting Gradients, {args.iterations} iterations, "
          f"Adam lr {LR} (step decay), signed gradients, box [0, 1], 1 restart, labels known, same initial images; "
          f"TV {args.tv} ({tv_line}); torch threads {torch.get_num_threads()}")
    print(f"model: convnet width 16, {CHANNELS}x{SIZE}x{SIZE}, {CLASSES} classes; trained state: {args.train_steps} "
          f"SGD steps (loss {first_loss:.3f} -> {last_loss:.3f})")
    attacker = reference_attacker(model, args.iterations, args.tv, args.reference_tv)
    rows: list[Row] = []
    seconds = {"simfl": 0.0, "reference": 0.0}
    gaps: list[tuple[float, float, float]] = []
    for state, weights in (("init", initial), ("trained", trained)):
        for victims in sources:
            obs = observations(model, flat, weights, victims)
            seeds = [args.seed * 100_003 + i for i in range(len(obs))]
            start_images = draw(victim_generators(seeds, len(obs)), (1, CHANNELS, SIZE, SIZE), torch.device("cpu"))
            ours, ours_s = simfl_side(model, flat, obs, seeds, args.iterations, args.tv)
            theirs, theirs_s = reference_side(attacker, model, flat, obs, start_images)
            seconds["simfl"] += ours_s
            seconds["reference"] += theirs_s
            gaps.append(analytic_gap(model, flat, obs, victims))
            scores = [(psnr(x, victims.images), ssim(x, victims.images)) for x in (ours, theirs)]
            for i, name in enumerate(victims.names):
                rows.append(Row(victims.source, state, name, (float(scores[0][0][i]), float(scores[1][0][i])),
                                (float(scores[0][1][i]), float(scores[1][1][i]))))
            print(f"[{state} {victims.source}: simfl {ours_s:.1f} s, reference {theirs_s:.1f} s]", flush=True)
    report(rows)
    gap, error, scale = (max(g[k] for g in gaps) for k in range(3))
    print(f"analytic head inversion ({len(rows)} victims): max |simfl - reference| = {gap:.3e}; "
          f"max |simfl - true latent| = {error:.3e} (latents up to {scale:.3f})")
    print(f"wall time: simfl {seconds['simfl']:.1f} s (victims batched per source/state), reference "
          f"{seconds['reference']:.1f} s (one victim at a time)")
    finite = all(math.isfinite(v) for r in rows for v in (*r.psnr, *r.ssim))
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
