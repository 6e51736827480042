"""Analytic label recovery from the head's gradient (or, for updates, −delta as its proxy).

For mean cross-entropy over B samples with a linear head ``W h + b`` the head's
gradients are

    dL/db_k = (1/B) Σ_n (p_nk − y_nk)        dL/dW_k = (1/B) Σ_n (p_nk − y_nk) h_n

- B = 1 (iDLG, Zhao et al. 2020): h ≥ 0 after the encoder's final ReLU, so the
  row sum of dL/dW_k is (p_k − y_k)·Σh: negative exactly for the true class.
- B > 1 (LLG, Wainakh et al. 2022, on the bias): a class with a negative bias
  gradient is certainly present; each occurrence of a class lowers its bias
  gradient by exactly 1/B (LLG has to estimate this "impact" from weight row
  sums; with the bias it is known). Take every negative class once, add 1/B
  to its gradient per occurrence, then repeatedly take the minimum until B
  labels. This treats the mean predicted probabilities p̄_k as equal across
  classes; it is exact when they are (near-uniform predictions, e.g. early
  training) and degrades as the model grows confident.

Update view: −delta / (lr · local_steps) is the mean step gradient (with
momentum, divided by ``momentum_steps`` instead). It equals
the gradient for one full-batch step and approximates it otherwise (the
weights move between steps); LLG then counts over all ``batch_size`` local
samples, assuming the schedule visits each sample equally often.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from simfl.core.weights import FlatWeights
from simfl.privacy.attacks.observation import Observation


def head_gradient(flat: FlatWeights, obs: Observation, head: str = "head") -> tuple[torch.Tensor, torch.Tensor]:
    """The head's (weight, bias) gradient, or its proxy −delta / (lr · steps) for updates."""
    named = flat.as_dict(obs.shared)
    weight, bias = named[f"{head}.weight"], named[f"{head}.bias"]
    if obs.view == "update":
        assert obs.lr is not None  # Observation requires lr > 0 for updates
        scale = -1.0 / (obs.lr * momentum_steps(obs.local_steps, obs.momentum))
        return weight * scale, bias * scale
    return weight, bias


def momentum_steps(steps: int, momentum: float) -> float:
    """How many gradients an SGD update sums: Σ_t (1 − μ^(t+1)) / (1 − μ), i.e. ``steps`` without momentum.

    With momentum μ, step t moves by lr · Σ_{s≤t} μ^(t−s) g_s; for a constant
    gradient the update is −lr · g times this count, so dividing by it keeps
    −update / lr on the scale of one gradient (weight decay is neglected).
    """
    if momentum == 0:
        return float(steps)
    return sum((1.0 - momentum ** (t + 1)) / (1.0 - momentum) for t in range(steps))


def idlg_label(weight_grad: torch.Tensor) -> int:
    """The class whose head row has the (only) negative gradient sum."""
    return int(weight_grad.sum(1).argmin())


def llg_labels(bias_grad: torch.Tensor, count: int) -> torch.Tensor:
    """A sorted label multiset of size ``count`` from the head's bias gradient (LLG on the bias)."""
    g = bias_grad.detach().double().clone()
    negative = torch.nonzero(g < 0).squeeze(1)
    # With noisy or clipped gradients more classes than samples can look present: keep the strongest.
    negative = negative[g[negative].argsort()][:count]
    labels = negative.tolist()
    g[negative] += 1.0 / count
    while len(labels) < count:
        k = int(g.argmin())
        labels.append(k)
        g[k] += 1.0 / count
    return torch.tensor(sorted(labels), dtype=torch.long)


def recover_labels(flat: FlatWeights, obs: Observation, head: str = "head") -> torch.Tensor:
    """The victim's labels (B,): given by the threat model, else recovered analytically."""
    if obs.labels is not None:
        return obs.labels
    weight, bias = head_gradient(flat, obs, head)
    if obs.batch_size == 1:
        return torch.tensor([idlg_label(weight)], dtype=torch.long)
    return llg_labels(bias, obs.batch_size)


def batch_labels(flat: FlatWeights, observations: Sequence[Observation], device: torch.device | str = "cpu"
                 ) -> torch.Tensor:
    """(V, B) every victim's labels (:func:`recover_labels`), stacked on ``device``."""
    return torch.stack([recover_labels(flat, o) for o in observations]).to(device)
