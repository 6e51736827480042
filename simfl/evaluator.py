"""The evaluation classifier behind "attacker accuracy": trained once per dataset, cached.

Attacker accuracy asks whether a reconstruction shows the right class to a
classifier that never saw any client's data. This one trains centrally on the
dataset's validation split (clients draw from the train split only), and its
own accuracy on the test split is reported beside every attacker accuracy, so
a user can tell a weak evaluator from a weak attack.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from simfl.acquisition import apply_shift, draw_devices
from simfl.config import ModelConfig, OptimizerConfig, ShiftConfig, TrainingConfig
from simfl.data import Dataset
from simfl.models import build_model
from simfl.seeding import torch_generator
from simfl.training import evaluate, train_client
from simfl.weights import FlatWeights

# Bump when the recipe below changes, so stale cached classifiers are not reused.
RECIPE_VERSION = 2
ARCH = ModelConfig(arch="convnet", norm="group", width=32)
RECIPE = TrainingConfig(local_epochs=12, batch_size=64, optimizer=OptimizerConfig(kind="adam", lr=1e-3))
# Extra copies of the validation split seen through random devices: reconstructions come from
# clients whose scanners differ, and a classifier that only knows one scanner would cap
# attacker accuracy at its own failures there. Generic, so one cached classifier serves
# every scenario on a dataset.
AUGMENT = (
    ShiftConfig(color_jitter=0.15, jitter=0.1),
    ShiftConfig(color_jitter=0.15, jitter=0.1, blur=0.7, noise=0.02),
)


@dataclass(frozen=True)
class Evaluator:
    """The classifier's weights (flat, over ``ARCH``) and its own test accuracy."""

    weights: torch.Tensor
    test_accuracy: float
    key: str

    def model(self, channels: int, image_size: int, num_classes: int, device: torch.device | str = "cpu") -> nn.Module:
        """The classifier as an eval-mode module on ``device``."""
        model = build_model(ARCH, channels, image_size, num_classes).to(device)
        FlatWeights(model).load(self.weights.to(device))
        return model.eval()


def cache_key(dataset: Dataset) -> str:
    """Content hash of what the classifier is trained and tested on, and of how."""
    h = hashlib.sha256()
    for part in (dataset.val_x, dataset.val_y, dataset.test_x, dataset.test_y):
        h.update(np.ascontiguousarray(part).data)
    recipe = [RECIPE_VERSION, ARCH.model_dump_json(), RECIPE.model_dump_json(), *(a.model_dump_json() for a in AUGMENT)]
    h.update("|".join(map(str, recipe)).encode())
    return f"{dataset.name}_{dataset.image_size}px_{h.hexdigest()[:16]}"


def train_evaluator(dataset: Dataset, seed: int = 0) -> Evaluator:
    """Train on the validation split, score on the test split (deterministic for a seed)."""
    torch.manual_seed(seed)
    model = build_model(ARCH, dataset.channels, dataset.image_size, dataset.num_classes)
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
