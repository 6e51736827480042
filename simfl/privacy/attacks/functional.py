"""Pieces every attack shares: stacking victims, replaying the victim functionally, the result.

Attacks are batched across victims: V observations from different clients are
stacked into (V, P) weight vectors and reconstructed in one optimisation that
is ``torch.func.vmap``-ed over victims. Every per-victim quantity below is a
function of that victim's slice only, so a victim's result does not depend on
who else is in the batch (up to float rounding of batched kernels). Victims
that all start from the same weights (one engine round) are vmapped over their
images only, with the weights passed once, unbatched.

Attacks run the model in eval mode with the running statistics found in
``weights``: vmap cannot do BatchNorm's in-place running-stat updates. With
GroupNorm (the default) train and eval mode coincide; models with BatchNorm
leak differently in train mode, where the victim normalised with batch statistics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, Self, TypeVar

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from simfl.core.weights import FlatWeights
from simfl.privacy.attacks.observation import Observation, View, local_batches
from simfl.privacy.disclosure import Disclosure, LossFn, ModelWrapper

T = TypeVar("T")


class AttackBase:
    """Base of the attack dataclasses: adapting to a :class:`Disclosure`, applicability, the objective at given images.

    Adapting replaces every field the attack has and the disclosure sets (the
    victim's module, loss, clipping, the server's own decoder, how the victim
    computes what it shares), and sets ``informed`` where the attack has it
    (true unless the disclosure is a naive attacker's view).
    """

    def adapted(self, disclosure: Disclosure) -> Self:
        """A copy that knows the defence as the disclosure describes it."""
        mine = {f.name for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        changes: dict[str, object] = {
            f.name: getattr(disclosure, f.name)
            for f in dataclasses.fields(disclosure)
            if getattr(disclosure, f.name) is not None and f.name in mine and f.name != "knows_defence"
        }
        if "informed" in mine:
            changes["informed"] = disclosure.knows_defence
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def applies(self) -> bool:
        """Whether the attack has what it needs to run (e.g. the server decoder exists only under its defence)."""
        return True

    def objective_at(
        self, model: nn.Module, flat: FlatWeights, observations: Sequence[Observation], images: torch.Tensor
    ) -> torch.Tensor:
        """(V,) the attack's objective at ``images`` (V, B, C, H, W): the true ones, to check convergence.

        NaN for attacks without an objective over images (learned inversions).
        """
        return torch.full((len(observations),), float("nan"))


class PerRound(Generic[T]):
    """What a learned attack builds once per distinct global weights (one per round: its victims share them)."""

    def __init__(self, build: Callable[[Observation], T]) -> None:
        self.build = build
        self.made: list[tuple[torch.Tensor, T]] = []

    def __call__(self, obs: Observation) -> T:
        """The thing built for ``obs``'s weights, building it on first sight of those weights."""
        for weights, thing in self.made:
            if weights is obs.weights or torch.equal(weights, obs.weights):
                return thing
        thing = self.build(obs)
        self.made.append((obs.weights, thing))
        return thing


@dataclass
class Stacked:
    """V observations with equal shapes, stacked along a leading victim dimension."""

    weights: torch.Tensor  # (V, P)
    target: torch.Tensor  # (V, Pt) observed pseudo-gradient over trainable entries
    sgd: torch.Tensor  # (V, 3) each victim's local (lr, momentum, weight_decay); lr 1 for gradients
    view: View
    batch_size: int
    image_shape: tuple[int, int, int]
    local_steps: int
    local_batch_size: int
    shared_weights: bool  # every victim started from the same weights (the engine's case)

    @property
    def victims(self) -> int:
        """V, the number of victims stacked."""
        return self.weights.shape[0]

    @property
    def lr(self) -> torch.Tensor:
        """(V,) local learning rates (1 for the gradient view)."""
        return self.sgd[:, 0]

    @property
    def weight_arg(self) -> tuple[torch.Tensor, int | None]:
        """(weights, vmap in_dim) to pass to the vmapped objective.

        With shared weights, one unbatched (P,) vector (in_dim None): the forward
        and first backward are ordinary convolutions over all V·B images instead
        of grouped ones over per-victim copies of the kernels. The double
        backward still needs per-victim kernels (each victim's gradient mismatch
        differs), so the gain is modest (5–10% on the smoke model, CPU). Both
        paths give each victim the same maths as running it alone.
        """
        if self.shared_weights:
            return self.weights[0], None
        return self.weights, 0


def stack(observations: Sequence[Observation], flat: FlatWeights) -> Stacked:
    """Stack victims; the observed update becomes −update / lr, a sum of SGD step directions.

    Dividing by lr puts both views on the gradient's scale, so objectives and
    tolerances mean the same for either view and for victims with different lr.
    Local SGD hyperparameters (lr, momentum, weight decay) are kept per victim.
    """
    if not observations:
        raise ValueError("no observations")
    first = observations[0]
    shape_keys = ("view", "batch_size", "image_shape", "local_steps", "local_batch_size")
    for obs in observations:
        for key in shape_keys:
            if getattr(obs, key) != getattr(first, key):
                raise ValueError(f"victims batched together must share {key}")
    device = flat.vector.device
    mask = flat.trainable
    weights = torch.stack([o.weights.to(device) for o in observations])
    shared = torch.stack([o.shared.to(device) for o in observations])[:, mask]
    sgd = torch.tensor([[o.lr or 1.0, o.momentum, o.weight_decay] for o in observations], device=device)
    target = shared if first.view == "gradient" else -shared / sgd[:, :1]
    return Stacked(
        weights=weights,
        target=target,
        sgd=sgd,
        view=first.view,
        batch_size=first.batch_size,
        image_shape=first.image_shape,
        local_steps=first.local_steps,
        local_batch_size=first.local_batch_size or first.batch_size,
        shared_weights=all(torch.equal(weights[0], w) for w in weights[1:]),
    )


Simulator = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Params = dict[str, torch.Tensor]


def victim_simulator(
    module: nn.Module, flat: FlatWeights, stacked: Stacked, loss_fn: LossFn, clip_norm: float | None = None
) -> Simulator:
    """``simulate(weights, sgd, images, targets)``: one victim's pseudo-gradient on dummy data.

    Gradient view: the loss gradient over trainable entries. Update view: the
    victim's local SGD (``sgd`` = (lr, momentum, weight_decay), as
    ``torch.optim.SGD``) replayed differentiably, returned as (start − end) / lr,
    i.e. the sum of step directions; matches ``stack``'s target. Written for ONE
    victim; callers vmap it over the stacked victims (``weights`` batched or not).

    Parameters are differentiated as a dict of tensors, one per module
    parameter, and concatenated only at the end: differentiating slices of one
    flat vector instead makes every backward scatter each parameter's gradient
    into a full-length zero vector and sum those (~10% of a batched IG step on CPU).
    """
    trainable: list[tuple[str, int, torch.Size]] = []
    constant: list[tuple[str, int, torch.Size]] = []  # buffers (BatchNorm running statistics)
    for name, offset, shape in flat.layout:
        is_param = shape.numel() > 0 and bool(flat.trainable[offset])
        (trainable if is_param else constant).append((name, offset, shape))
    batches = local_batches(stacked.batch_size, stacked.local_batch_size, stacked.local_steps)
    batches = [b.to(flat.vector.device) for b in batches]
    # Skip terms that are zero for every victim (plain SGD): fewer ops to differentiate
    # twice. Exact either way: for a victim without them, adding 0·v or 0·θ changes nothing.
    use_momentum = bool(stacked.sgd[:, 1].any())
    use_decay = bool(stacked.sgd[:, 2].any())

    def unflatten(w: torch.Tensor, entries: list[tuple[str, int, torch.Size]]) -> Params:
        return {name: w[offset : offset + shape.numel()].view(shape) for name, offset, shape in entries}

    def loss_at(theta: Params, buffers: Params, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Differentiate the trainable entries only: buffers stay constants, as for the victim.
        return loss_fn(functional_call(module, (theta, buffers), (x,)), t)

    grad_theta = grad(loss_at)
    if clip_norm is not None:
        # DP-SGD's victim: each sample's gradient clipped to clip_norm, then averaged over the batch
        # (the noise is zero-mean and unknown, so the attacker models its mean: none).
        per_sample = vmap(grad_theta, in_dims=(None, None, 0, 0))

        def clipped(theta: Params, buffers: Params, x: torch.Tensor, t: torch.Tensor) -> Params:
            per = per_sample(theta, buffers, x.unsqueeze(1), t.unsqueeze(1))
            norms = torch.stack([g.reshape(g.shape[0], -1).pow(2).sum(1) for g in per.values()]).sum(0).sqrt()
            factor = (clip_norm / (norms + 1e-6)).clamp(max=1.0)
            return {k: torch.einsum("b,b...->...", factor, g) / g.shape[0] for k, g in per.items()}

        grad_theta = clipped

    def simulate(w: torch.Tensor, sgd: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        theta, buffers = unflatten(w, trainable), unflatten(w, constant)
        if stacked.view == "gradient":
            total = grad_theta(theta, buffers, x, t)
        else:
            lr, momentum, decay = sgd[0], sgd[1], sgd[2]
            total, velocity = None, None
            for idx in batches:  # torch.optim.SGD: v = momentum·v + (g + decay·θ); θ −= lr·v
                step = grad_theta(theta, buffers, x.index_select(0, idx), t.index_select(0, idx))
                if use_decay:
                    step = {k: step[k] + decay * theta[k] for k in step}
                if use_momentum and velocity is not None:
                    step = {k: momentum * velocity[k] + step[k] for k in step}
                velocity = step
                theta = {k: theta[k] - lr * velocity[k] for k in theta}
                total = velocity if total is None else {k: total[k] + velocity[k] for k in total}
        return torch.cat([total[name].reshape(-1) for name, _, _ in trainable])

    return simulate


@contextmanager
def attacker_module(model: nn.Module, wrapper: ModelWrapper | None) -> Iterator[nn.Module]:
    """The module to differentiate, in eval mode for the duration of the attack."""
    module = wrapper(model) if wrapper is not None else model
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def victim_generators(seeds: Sequence[int], victims: int) -> list[torch.Generator]:
    """One RNG per victim, so a victim's init noise is the same alone or batched."""
    if len(seeds) != victims:
        raise ValueError(f"need one seed per victim ({victims}), got {len(seeds)}")
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def draw(
    generators: Sequence[torch.Generator], shape: Sequence[int], device: torch.device, normal: bool = False
) -> torch.Tensor:
    """Stack one draw per victim generator: uniform in [0, 1) (images) or standard normal."""
    sample = torch.randn if normal else torch.rand
    return torch.stack([sample(*shape, generator=g) for g in generators]).to(device)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (Geiping et al.'s image prior)."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy

