"""The evaluation classifier behind "attacker accuracy": trained once per dataset, cached.

Attacker accuracy asks whether a reconstruction shows the right class to a
classifier that never saw any client's data. This one trains centrally on the
dataset's validation split (clients draw from the train split only), and its
own accuracy on the test split is reported beside every attacker accuracy, so
a user can tell a weak evaluator from a weak attack.

Its architecture is never one a scenario can attack. The rule: the evaluator
is :class:`EvalResNet` (``ARCH_NAME``), a small residual network defined here
and nowhere else, whereas the attacked model is always one of
``simfl.core.models.build_model``'s (``convnet``, ``lenet``, ``resnet18``). A
reconstruction is optimised through the attacked model's gradients, so an
evaluator of that same architecture could recognise what that architecture
alone sees in it (it was the ConvNet of the default scenarios); an unrelated
one has to see the class. One fixed evaluator also keeps attacker accuracy
comparable across scenarios that attack different models, and keeps it one
classifier per dataset (cached). Its name is in every attacks-table row
(``evaluator_arch``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from simfl.core.config import OptimizerConfig, ShiftConfig, TrainingConfig
from simfl.core.models import AvgPoolTo, SplitNet, norm_layer
from simfl.core.seeding import derive_seed, torch_generator
from simfl.core.training import evaluate, train_client
from simfl.core.weights import FlatWeights
from simfl.data import Dataset
from simfl.data.acquisition import apply_shift, draw_devices

# Bump when the recipe below changes, so stale cached classifiers are not reused.
RECIPE_VERSION = 3
# The architecture (see EvalResNet): base width, normalisation; its name goes into every attacks-table row.
WIDTH = 32
NORM = "group"
ARCH_NAME = f"eval-resnet8-w{WIDTH}-{NORM}norm"
RECIPE = TrainingConfig(local_epochs=12, batch_size=64, optimizer=OptimizerConfig(kind="adam", lr=1e-3))
# Extra copies of the validation split seen through random devices: reconstructions come from
# clients whose scanners differ, and a classifier that only knows one scanner would cap
# attacker accuracy at its own failures there. Generic, so one cached classifier serves
# every scenario on a dataset.
AUGMENT = (
    ShiftConfig(color_jitter=0.15, jitter=0.1),
    ShiftConfig(color_jitter=0.15, jitter=0.1, blur=0.7, noise=0.02),
)


class _Residual(nn.Module):
    """Two 3x3 convolutions with a skip connection (a 1x1 projection where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        norm = norm_layer(NORM)
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), norm(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), norm(cout),
        )
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(body(x) + skip(x))``."""
        return self.act(self.body(x) + self.skip(x))


class EvalResNet(SplitNet):
    """The evaluator's architecture: a ResNet-8 (a stem, then three residual stages of one block each).

    Widths ``WIDTH``, 2x and 4x, ``NORM`` normalisation, global average pooling
    into a linear head (``features`` is the pooled 4x``WIDTH`` vector). The stem
    strides by 2, and from 64 px on it also max-pools by 2, so the first stage
    works at 14 px for 28 px images and at a quarter of the side for larger ones:
    about the training time of the ConvNet it replaces at 28 px (measured on CPU),
    and less above. Against the attackable models (``simfl.core.models``): the ConvNet
    and LeNet are plain convolution stacks with a fully connected encoder layer;
    ResNet-18 is residual too, but 18 layers deep with four stages of two blocks
    at 64-512 channels and a full-resolution stem up to 32 px.
    """

    def __init__(self, channels: int, image_size: int, num_classes: int) -> None:
        w = WIDTH
        stem: list[nn.Module] = [nn.Conv2d(channels, w, 3, 2, 1, bias=False), norm_layer(NORM)(w), nn.ReLU()]
        if image_size >= 64:
            stem.append(nn.MaxPool2d(2))
        encoder = nn.Sequential(
            *stem, _Residual(w, w, 1), _Residual(w, 2 * w, 2), _Residual(2 * w, 4 * w, 2), AvgPoolTo(1), nn.Flatten(),
        )
        super().__init__(encoder, 4 * w, num_classes)


def build_evaluator(channels: int, image_size: int, num_classes: int) -> EvalResNet:
    """The evaluator's network, initialised from torch's global RNG."""
    return EvalResNet(channels, image_size, num_classes)


@dataclass(frozen=True)
class Evaluator:
    """The classifier's weights (flat, over :class:`EvalResNet`), its own test accuracy, and its architecture."""

    weights: torch.Tensor
    test_accuracy: float
    key: str
    arch: str = ARCH_NAME

    def model(self, channels: int, image_size: int, num_classes: int, device: torch.device | str = "cpu") -> nn.Module:
        """The classifier as an eval-mode module on ``device``."""
        model = build_evaluator(channels, image_size, num_classes).to(device)
        FlatWeights(model).load(self.weights.to(device))
        return model.eval()


def cache_key(dataset: Dataset) -> str:
    """Content hash of what the classifier is trained and tested on, and of how."""
    h = hashlib.sha256()
    for part in (dataset.val_x, dataset.val_y, dataset.test_x, dataset.test_y):
        h.update(np.ascontiguousarray(part).data)
    recipe = [RECIPE_VERSION, ARCH_NAME, RECIPE.model_dump_json(), *(a.model_dump_json() for a in AUGMENT)]
    h.update("|".join(map(str, recipe)).encode())
    return f"{dataset.name}_{dataset.image_size}px_{h.hexdigest()[:16]}"


def train_evaluator(dataset: Dataset, seed: int = 0) -> Evaluator:
    """Train on the validation split, score on the test split (deterministic for a seed)."""
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        torch.manual_seed(derive_seed(seed, "evaluator-init"))
        model = build_evaluator(dataset.channels, dataset.image_size, dataset.num_classes)
    flat = FlatWeights(model)
    x, y = augmented(dataset.val_x, dataset.val_y, seed)
    train_client(model, flat, flat.snapshot(), x, y, RECIPE, torch_generator(seed, "evaluator"))
    tx, ty = torch.from_numpy(np.array(dataset.test_x)), torch.from_numpy(dataset.test_y.astype(np.int64))
    _, correct, n = evaluate(model, tx, ty, 512)
    return Evaluator(flat.snapshot(), correct / n, cache_key(dataset))


def augmented(images: np.ndarray, labels: np.ndarray, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images plus one copy per ``AUGMENT`` shift, every image through its own device."""
    ids = np.arange(len(images))
    copies = [images] + [
        apply_shift(images, shift, draw_devices(shift, seed, f"evaluator-{k}", ids, images.shape[-1]), seed + k)
        for k, shift in enumerate(AUGMENT)
    ]
    y = np.concatenate([labels] * len(copies)).astype(np.int64)
    return torch.from_numpy(np.concatenate(copies)), torch.from_numpy(y)


def load_or_train(dataset: Dataset, cache_dir: Path) -> tuple[Evaluator, bool]:
    """The cached classifier for this dataset, training and caching it first if needed.

    Returns (evaluator, loaded_from_cache). The cache holds only tensors and a
    float, read back with ``weights_only=True``; the file is written under a
    temporary name and renamed, so a crash never leaves a half-written one.
    """
    key = cache_key(dataset)
    path = Path(cache_dir).expanduser() / f"{key}.pt"
    if path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
            return Evaluator(saved["weights"], float(saved["test_accuracy"]), key), True
        except Exception:  # unreadable or foreign file: retrain and replace it
            pass
    evaluator = train_evaluator(dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"weights": evaluator.weights, "test_accuracy": evaluator.test_accuracy}, tmp)
    tmp.replace(path)
    return evaluator, False
