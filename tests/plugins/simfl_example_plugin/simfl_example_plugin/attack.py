"""``class_mean``: a baseline attack with no optimisation: the mean of the server's images of the victim's label.

What any attack must beat: it learns the labels (given, or read off the
gradient as iDLG does) and answers with the average image of that class in
the data the server holds. Importing this module registers it in simfl's
attack registry; the entry point in this package's pyproject makes simfl
import it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from simfl.core.weights import FlatWeights
from simfl.privacy.attacks.base import ATTACKS, AttackConfig, AttackResult, AuxData
from simfl.privacy.attacks.functional import AttackBase
from simfl.privacy.attacks.labels import batch_labels
from simfl.privacy.attacks.observation import Observation


class ClassMeanConfig(AttackConfig):
    """``class_mean``: the mean of the server's images of each recovered label (a baseline with no optimisation)."""

    kind: Literal["class_mean"] = "class_mean"
    per_class: bool = Field(True, description="average the server's images of the victim's label (false: all of "
                            "them, one image for every victim)")


@ATTACKS.register(ClassMeanConfig)
@dataclass
class ClassMean(AttackBase):
    """Each victim's image: the mean server image of its label (of every label where the server has none)."""

    per_class: bool = True
    aux: AuxData | None = None

    def applies(self) -> bool:
        """The mean needs the server's data."""
        return self.aux is not None

    def __call__(
        self, model: nn.Module, flat: FlatWeights, observations: Sequence[Observation], seeds: Sequence[int]
    ) -> AttackResult:
        """The class means for every victim's labels; draws no random numbers (``seeds`` are not needed)."""
        if self.aux is None:
            raise ValueError("class_mean needs the server's data (build_attack(config, aux))")
        start = time.perf_counter()
        device = flat.vector.device
        images, aux_labels = self.aux.inputs(device), self.aux.labels.to(device)
        if tuple(images.shape[1:]) != observations[0].image_shape:
            raise ValueError(f"class_mean: the server's images are {tuple(images.shape[1:])}, the victims' "
                             f"{observations[0].image_shape}")
        labels = batch_labels(flat, observations, device)  # (V, B)
        overall = images.mean(0)
        means = torch.stack([images[aux_labels == k].mean(0) if self.per_class and bool((aux_labels == k).any())
                             else overall for k in range(int(labels.max()) + 1)])
        victims = len(observations)
        return AttackResult(
            images=means[labels],  # (V, B, C, H, W)
            labels=labels,
            objective=torch.full((victims,), float("nan")),  # no objective over images
            iterations=torch.zeros(victims, dtype=torch.long),
            seconds=time.perf_counter() - start,
        )
