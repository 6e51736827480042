"""Analytic recovery: what a shared gradient gives away in closed form, before any optimisation.

For one sample, the gradient of a fully connected layer ``y = W u + b`` is
``dW = δ uᵀ`` and ``db = δ``: every row ``k`` with ``db_k ≠ 0`` gives the
layer's input ``u = dW_k / db_k`` exactly (Geiping et al. 2020; breaching's
``invert_fc_layer``; Fowl et al. 2022 build malicious layers on it). We use all
rows at once, ``u = Σ_k db_k dW_k / Σ_k db_k²`` (the least-squares solution,
equal to every row's ratio when the gradient is rank one), in float64.

What this recovers, at batch size 1 in the gradient view:

- the head's input: the latent the classifier saw (z′ under the latent defence);
- the input of every other linear layer with a bias: for the ConvNet, the
  encoder's pooled features (16·width values); for LeNet, its 400 pooled and
  120 hidden features; for ResNet-18 only with ``latent_dim`` other than 512
  (else it has no linear layer before the head);
- under the latent defence, the victim's own noise: ρ is a shared weight and
  ∂L/∂ρ = (∂L/∂z′) ⊙ ε ⊙ σ′(ρ). With ``mean_shift`` the shared ∂L/∂μ *is*
  ∂L/∂z′, so ε follows exactly whatever λ. Without it, ∂L/∂z′ = Wᵀδ (head
  weights and the head's bias gradient δ, both known) exactly when λ = 0;
  with λ > 0 the privacy term adds a part that depends on the image, and the
  recovered ε is then an estimate (feature inversion solves for it jointly
  with the image instead). Then the clean latent z = z′ − μ − σ ⊙ ε. Where
  the clients keep ρ (and μ) local (``shared_noise: false``) nothing of the
  noise is sent, and neither ε nor z is recovered; z′ and the layer inputs
  before the noise still are.

At batch size B > 1 the gradients are sums over samples. For the head, a
class that occurs exactly once in the batch dominates its row (its δ is
p − 1 ≈ −1, the others' p ≪ 1), so ``dW_k / db_k`` approximates that sample's
latent, exactly as the other samples' probabilities of class k go to 0:
:func:`recover_head_inputs_per_class` returns those, and says they are
approximate. Hidden layers mix all samples; nothing per sample is recovered there.

In the update view, −update / (lr · steps) is the mean step gradient: exact for
one local step (the same ratios), an approximation over several (the weights
move), as for label recovery (``labels.head_gradient``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from simfl.core.weights import FlatWeights
from simfl.privacy.attacks.labels import momentum_steps
from simfl.privacy.attacks.observation import Observation

# Rows whose bias gradient is below this share of the largest carry no usable signal.
_ROW_FLOOR = 1e-12


def linear_layers(model: nn.Module) -> list[str]:
    """Module paths of the linear layers with a bias, in forward order (the head last)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None]


def gradient_view(flat: FlatWeights, obs: Observation) -> dict[str, torch.Tensor]:
    """The observation as per-parameter gradients (float64); updates as −update / (lr · momentum steps)."""
    named = flat.as_dict(obs.shared.to(flat.vector.device))
    scale = 1.0
    if obs.view == "update":
        assert obs.lr is not None
        scale = -1.0 / (obs.lr * momentum_steps(obs.local_steps, obs.momentum))
    return {name: t.double() * scale for name, t in named.items()}


def layer_input(weight_grad: torch.Tensor, bias_grad: torch.Tensor) -> torch.Tensor:
    """The input of a linear layer from one sample's (weight, bias) gradient: Σ_k b_k W_k / Σ_k b_k²."""
    b = bias_grad.double()
    norm = b.pow(2).sum()
    if norm <= _ROW_FLOOR:
        return torch.full(weight_grad.shape[1:], float("nan"), dtype=torch.float64, device=weight_grad.device)
    return (b.unsqueeze(1) * weight_grad.double()).sum(0) / norm


@dataclass(frozen=True)
class Recovered:
    """What one victim's shared gradient gives away (float64; None where it does not apply).

    ``inputs``: each linear layer's input (module path → vector). ``latent``: the
    head's input (z′ under the latent defence). ``noise``, ``clean_latent``: the
    latent defence's ε and z = z′ − μ − σ ⊙ ε. ``noise_exact``: whether ε is
    exact (``mean_shift``, or λ = 0), else an estimate. ``upstream``: ∂L/∂z′.
    """

    inputs: dict[str, torch.Tensor]
    latent: torch.Tensor
    upstream: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    clean_latent: torch.Tensor | None = None
    noise_exact: bool = False

    def deepest_features(self, layers: list[str]) -> tuple[str, torch.Tensor]:
        """The earliest recovered layer input (closest to the image), and its layer's path."""
        name = layers[0]
        return name, self.inputs[name]


def sigma_derivative(rho: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """dσ/dρ for σ = σ_max · tanh(softplus(ρ) / σ_max) (the latent defence's noise scale)."""
    t = torch.tanh(F.softplus(rho) / sigma_max)
    return (1.0 - t.pow(2)) * torch.sigmoid(rho)


def recover(model: nn.Module, flat: FlatWeights, obs: Observation, lam: float = 0.0) -> Recovered:
    """Everything :mod:`simfl.privacy.attacks.analytic` recovers from one victim's batch-1 observation.

    ``lam``: the victim's λ of the latent defence (0 without it); with
    ``lam > 0`` and no ``mean_shift``, the recovered ε is an estimate.
    """
    if obs.batch_size != 1:
        raise ValueError("analytic recovery of layer inputs needs batch size 1 (see recover_head_inputs_per_class)")
    grads = gradient_view(flat, obs)
    weights = {name: t.double() for name, t in flat.as_dict(obs.weights.to(flat.vector.device)).items()}
    inputs = {name: layer_input(grads[f"{name}.weight"], grads[f"{name}.bias"]) for name in linear_layers(model)}
    latent = inputs["head"]
    latent_layer = getattr(model, "latent", None)
    if "latent.rho" not in grads or latent_layer is None or not bool(grads["latent.rho"].any()):
        return Recovered(inputs=inputs, latent=latent)  # no noise layer, or its parameters kept local (never sent)
    rho = weights["latent.rho"]
    shift = weights.get("latent.shift")
    if "latent.shift" in grads:
        upstream, exact = grads["latent.shift"], True  # ∂L/∂μ = ∂L/∂z′, the privacy term included
    else:
        upstream, exact = weights["head.weight"].T @ grads["head.bias"], lam == 0.0
    sigma_max = float(latent_layer.sigma_max)
    denominator = upstream * sigma_derivative(rho, sigma_max)
    usable = denominator.abs() > _ROW_FLOOR * denominator.abs().max().clamp_min(1e-300)
    noise = torch.where(usable, grads["latent.rho"] / torch.where(usable, denominator, 1.0), torch.nan)
    sigma = sigma_max * torch.tanh(F.softplus(rho) / sigma_max)
    clean = latent - sigma * noise - (shift if shift is not None else 0.0)
    return Recovered(inputs=inputs, latent=latent, upstream=upstream, noise=noise, clean_latent=clean,
                     noise_exact=exact)


def recover_head_inputs_per_class(flat: FlatWeights, obs: Observation, labels: torch.Tensor) -> dict[int, torch.Tensor]:
    """Batch B > 1: the latent of each sample whose class occurs once in the batch (approximate; see above).

    ``labels``: the batch's labels (given or recovered, e.g. by ``labels.llg_labels``).
    Returns {sample index: its approximate latent}; samples sharing a class are absent.
    """
    grads = gradient_view(flat, obs)
    weight, bias = grads["head.weight"], grads["head.bias"]
    out = {}
    for k in labels.unique().tolist():
        samples = (labels == k).nonzero().flatten().tolist()
        if len(samples) == 1 and abs(float(bias[k])) > _ROW_FLOOR:
            out[samples[0]] = weight[k] / bias[k]
    return out
