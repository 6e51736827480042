"""BiDO: bilateral dependency optimisation, HSIC variant (Peng et al., KDD 2022).

Each client minimises

    CE(f(x), y) + a1 · Σ_j nHSIC(X, Z_j) − a2 · Σ_j nHSIC(Y, Z_j)

over hidden representations Z_j of the batch (nHSIC: normalised HSIC,
``simfl.defences.hsic``). The first term makes the representations forget
the input beyond what the label needs (what an inversion attack exploits);
the second keeps them tied to the label, so accuracy holds.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, PositiveFloat
from torch import nn

from simfl.defences.base import DEFENCES, Defence
from simfl.defences.hsic import gaussian_kernel, label_kernel, normalized_hsic
from simfl.models import SplitNet
from simfl.plugins import PluginConfig


class BiDOConfig(PluginConfig):
    """``bido``: a1·HSIC(X, Z) − a2·HSIC(Y, Z) over hidden layers added to each client's loss."""

    kind: Literal["bido"] = "bido"
    a1: NonNegativeFloat = Field(0.05, description="weight of the input-dependence term HSIC(X, Z) (minimised)")
    a2: NonNegativeFloat = Field(0.5, description="weight of the label-dependence term HSIC(Y, Z) (maximised)")
    kernel_sigma: PositiveFloat = Field(5.0, description="Gaussian kernel width, times the median heuristic")
    layers: Literal["latent", "all"] = Field(
        "all", description="all: every block's ReLU output of a convnet/lenet encoder; latent: the encoder output"
    )


@DEFENCES.register(BiDOConfig)
class BiDO(Defence):
    """BiDO-HSIC: the dependence terms above added to each client's local objective.

    Layers (``layers``): ``latent``, the encoder's output; ``all``, the output of
    every ``nn.ReLU`` that is a direct child of a ``nn.Sequential`` encoder (for
    convnet/lenet, each block's output and the final latent), else the encoder's
    output. Forward hooks capture them, registered once in :meth:`build`, and
    they store anything only while :meth:`objective` runs its own forward: in
    evaluation, in attacks and under ``torch.func.functional_call``/``vmap``
    they do nothing. The model keeps exactly the undefended weight layout
    (no parameters, no buffers), and building draws no random numbers.

    No :meth:`disclosure` (None): BiDO changes only the training loss, and the
    model weights are public to the attacker. In the gradient view at batch
    size 1 the HSIC terms are exactly 0 (one sample shows no dependence), so
    the shared gradient is the plain cross-entropy gradient and a naive
    attacker already models the defended client exactly. With larger gradient
    batches, and in the update view, the HSIC terms' gradients are part of what
    the client shares and the naive attacker does not model them: there the
    naive attacker is weaker than an adaptive one would be (not built yet).
    """

    client_figures: ClassVar[dict[str, tuple[str, ...]]] = {"hsic_xz": ("mean",), "hsic_yz": ("mean",)}

    def __init__(self, cfg: BiDOConfig, shape: tuple[int, int, int], seed: int) -> None:
        super().__init__(cfg, shape, seed)
        self.a1 = float(cfg.a1)
        self.a2 = float(cfg.a2)
        self.sigma = float(cfg.kernel_sigma)
        self.layers = cfg.layers
        self._recording = False
        self._records: list[torch.Tensor] = []

        # A closure, not a bound method: ``copy.deepcopy`` copies a function by
        # reference, so a copied model's hooks still report to this defence.
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if self._recording:
                self._records.append(output)

        self._hook = hook

    @classmethod
    def naive_is_exact(cls, attacks: Any) -> bool:
        """At gradient-view batch size 1 the HSIC terms vanish (one sample shows no dependence)."""
        return attacks is not None and attacks.view == "gradient" and attacks.batch_size == 1

    # ------------------------------------------------------------ model

    def hidden_layers(self, model: SplitNet) -> list[nn.Module]:
        """The modules whose outputs are the Z_j, in forward order."""
        encoder = model.encoder
        if self.layers == "all" and isinstance(encoder, nn.Sequential):
            relus: list[nn.Module] = [m for m in encoder.children() if isinstance(m, nn.ReLU)]
            if relus:
                return relus
        return [encoder]

    def build(self, model: SplitNet) -> SplitNet:
        """Hook the hidden layers (once per layer, even if built twice or copied); weights untouched."""
        for layer in self.hidden_layers(model):
            if not any(h is self._hook for h in layer._forward_hooks.values()):
                layer.register_forward_hook(self._hook)
        return model

    # ------------------------------------------------------------ client side

    def objective(
        self, model: nn.Module, module: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """CE + a1·Σ nHSIC(X, Z_j) − a2·Σ nHSIC(Y, Z_j); logs both sums (the training signal BiDO moves)."""
        self._records = []
        self._recording = True
        try:
            logits = module(x)
        finally:
            self._recording = False
            hidden, self._records = self._records, []
        if not hidden:
            raise RuntimeError("BiDO recorded no hidden layer: build the model with this defence first")
        ce = F.cross_entropy(logits, y)
        kx = gaussian_kernel(x, self.sigma)
        ky = label_kernel(y, self.shape[2], self.sigma)
        with torch.set_grad_enabled(torch.is_grad_enabled() and (self.a1 > 0 or self.a2 > 0)):
            kz = [gaussian_kernel(z, self.sigma) for z in hidden]
        hsic_xz = _dependence(kx, kz, self.a1 > 0)
        hsic_yz = _dependence(ky, kz, self.a2 > 0)
        objective = ce + self.a1 * hsic_xz - self.a2 * hsic_yz
        return objective, ce, logits, {"hsic_xz": hsic_xz.detach(), "hsic_yz": hsic_yz.detach()}


def _dependence(k: torch.Tensor, kz: list[torch.Tensor], differentiate: bool) -> torch.Tensor:
    """Σ_j nHSIC(k, Kz_j); without a graph when its weight is 0 (then only logged: no backward cost)."""
    with torch.set_grad_enabled(differentiate and torch.is_grad_enabled()):
        return torch.stack([normalized_hsic(k, kz_j) for kz_j in kz]).sum()
