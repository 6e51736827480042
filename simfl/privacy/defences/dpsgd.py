"""DP-SGD (Abadi et al., CCS 2016) in each client's local training, through Opacus.

Every local step is Opacus's sampled Gaussian mechanism: a Poisson-sampled
batch (each of the client's ``n`` samples in with probability
``q = min(1, batch_size / n)``), per-sample gradients (see below), each
clipped to L2 norm ``max_grad_norm``,
summed, Gaussian noise of std ``noise_multiplier · max_grad_norm`` added, and
divided by the expected batch size (:class:`opacus.optimizers.DPOptimizer`).
All randomness (batches and noise) comes from the client's (seed, client,
round) generator, so a run is reproducible.

Privacy is record-level, per client: the guarantee each client's own samples
get across every round it took part in, from Opacus's RDP or PRV accountant
at ``delta`` (:func:`epsilon`). The shared update is post-processing of the
noisy steps, so it inherits that guarantee; the server sees only updates.

Per-sample gradients come from Opacus's ExpandedWeights module
(:class:`~opacus.grad_sample.gsm_exp_weights.GradSampleModuleExpandedWeights`,
PrivacyEngine's ``grad_sample_mode="ew"``), not its hooks-based
``GradSampleModule``. With Opacus 1.6 and torch 2.14 the hooks-based one
(full backward hooks on every layer) (1) crashes on resnet18: torchvision's
in-place ReLU and ``out += identity`` modify hooked outputs in place; (2) gives
silently wrong Conv2d per-sample gradients on channels-last input, which is
what ``to_input``'s permute produces; and (3) leaves hooks on the model that
make ``torch.func`` transforms over it fail for good. ExpandedWeights keeps no
state on the model between calls: it only acts on a forward through the
wrapper, so evaluation, attacks and any plain use of the model never see it.

The wrapper is built once per model (kept on the model itself) and reused for
every client the process trains; the ``DPOptimizer`` around each client's own
optimiser is cheap and built per client. Per-sample gradients are cleared
before each client and after the gradient view.
"""

from __future__ import annotations

import functools
import importlib
import math
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat
from torch import nn

from simfl.core.config import TrainingConfig
from simfl.core.models import SplitNet
from simfl.core.plugins import PluginConfig
from simfl.core.training import make_optimizer
from simfl.core.weights import FlatWeights
from simfl.privacy.defences.base import DEFENCES, Defence, SearchKnob
from simfl.privacy.disclosure import Disclosure

if TYPE_CHECKING:
    from opacus.grad_sample.gsm_exp_weights import GradSampleModuleExpandedWeights

# Where the model keeps its per-sample-gradient wrapper: a plain attribute (not a
# registered submodule, which would make a cycle in the module tree), so the
# wrapper lives exactly as long as the model and every DPSGD object shares it.
_GSM_ATTR = "_simfl_grad_sample_module"


def opacus() -> ModuleType:
    """Opacus's parts (:mod:`simfl.privacy.defences.opacus_parts`), imported when DP-SGD first needs them.

    Importing Opacus costs about 1.7 s of CPU (it imports ``torch.distributed.tensor``,
    sympy and ``scipy.stats``), and every actor of every run imports this module
    through the defence registry, while most runs never train with DP-SGD.
    """
    return importlib.import_module("simfl.privacy.defences.opacus_parts")


def sample_rate(n: int, batch_size: int) -> float:
    """Poisson sampling rate of a client with ``n`` samples: expected batch ``batch_size`` (all if fewer)."""
    return min(1.0, batch_size / n)


def local_steps(n: int, cfg: TrainingConfig) -> int:
    """Local DP steps per round: as many as plain training takes (``local_steps``, or epochs × batches)."""
    if cfg.local_steps is not None:
        return cfg.local_steps
    return cfg.local_epochs * -(-n // cfg.batch_size)


@functools.lru_cache(maxsize=4096)
def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """ε at ``delta`` after ``steps`` Poisson-sampled Gaussian steps, from Opacus's accountant.

    ``accountant``: ``"rdp"`` (Rényi DP, Mironov et al.) or ``"prv"`` (Gopi et al.;
    Opacus returns its upper bound). No steps: 0; no noise: ∞.

    Memoised: one call costs ~0.03–0.2 s (RDP) to seconds (PRV, whose cost and
    memory grow with ``steps`` and ε), and clients with equal shard sizes and
    participation share their arguments.
    """
    if steps <= 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = opacus().create_accountant(accountant)
    # Exactly the history Opacus's own ``step`` builds for `steps` identical steps.
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta=delta))


def _clear(model: nn.Module) -> None:
    """Drop per-sample and clipped-sum gradients (ExpandedWeights refuses to add to stale ones)."""
    for p in model.parameters():
        p.grad_sample = None  # type: ignore[attr-defined]  # Opacus's attributes on torch Parameters
        p.summed_grad = None  # type: ignore[attr-defined]


class DPSGDConfig(PluginConfig):
    """``dpsgd``: Opacus DP-SGD in local training (Poisson batches, per-sample clipping, Gaussian noise)."""

    kind: Literal["dpsgd"] = "dpsgd"
    noise_multiplier: NonNegativeFloat = Field(1.0, description="noise std as a multiple of max_grad_norm")
    max_grad_norm: PositiveFloat = Field(1.0, description="per-sample gradient clipping bound (L2)")
    delta: float = Field(1e-5, gt=0.0, lt=1.0, description="δ of the (ε, δ) each client's ε is reported at")
    accountant: Literal["rdp", "prv"] = Field("rdp", description="Opacus accountant: rdp (Rényi DP) or prv")

    def check(self, scenario: Any) -> None:
        """BatchNorm is swapped for GroupNorm (see :meth:`DPSGD.build`); only the loss gradient is clipped."""
        if scenario.attacks is not None and scenario.attacks.bn_stats == "batch":
            raise ValueError("attacks.bn_stats: batch needs BatchNorm, which defence: dpsgd replaces by GroupNorm")
        if scenario.training.algorithm.kind == "fedprox":
            raise ValueError("defence: dpsgd clips the loss gradient only; FedProx's term is not supported")


@DEFENCES.register(DPSGDConfig)
class DPSGD(Defence):
    """DP-SGD local training (Opacus); ε per client logged as ``dp_epsilon`` with ``dp_steps``."""

    # ε per client; per round its cohort mean and maximum (the least protected client so far).
    client_figures: ClassVar[dict[str, tuple[str, ...]]] = {"dp_epsilon": ("mean", "max"), "dp_steps": ("mean",)}
    # σ sets ε; the clipping norm and learning rate set what utility a σ costs, so a study tunes them
    # beside the search (``search.tune``) rather than leaving DP-SGD with the non-private recipe.
    search_knob: ClassVar[SearchKnob | None] = SearchKnob("noise_multiplier", 0.05, 5.0, falls=True, log=True)

    def __init__(self, cfg: DPSGDConfig, shape: tuple[int, int, int], seed: int) -> None:
        super().__init__(cfg, shape, seed)
        self.noise_multiplier = float(cfg.noise_multiplier)
        self.max_grad_norm = float(cfg.max_grad_norm)
        self.delta = float(cfg.delta)
        self.accountant = str(cfg.accountant)
        self._batch_size: int | None = None  # the local batch size, from the training config (see `batches`)

    # ------------------------------------------------------------ model

    def build(self, model: SplitNet) -> SplitNet:
        """BatchNorm mixes samples, so per-sample clipping is meaningless with it: Opacus's own
        ``ModuleValidator.fix`` swaps each BatchNorm for a GroupNorm (the layout every process then shares)."""
        validator = opacus().ModuleValidator
        if validator.validate(model, strict=False):
            model = validator.fix(model)
        return model

    # ------------------------------------------------------------ client side

    def training_module(self, model: nn.Module) -> GradSampleModuleExpandedWeights:
        """The model's per-sample-gradient wrapper, built on first use and reused for every later client."""
        module = model.__dict__.get(_GSM_ATTR)
        if module is None:
            opacus().ModuleValidator.validate(model, strict=True)  # Opacus's own check (e.g. no BatchNorm)
            module = opacus().GradSampleModuleExpandedWeights(model, loss_reduction="mean")
            object.__setattr__(model, _GSM_ATTR, module)
        return module

    def batches(self, n: int, cfg: TrainingConfig, generator: torch.Generator) -> list[torch.Tensor]:
        """Poisson-sampled batches, the sampling the accountant assumes; as many as plain training takes.

        A batch can come out empty (probability (1 − q)^n ≤ e^−batch_size each):
        :meth:`empty_step` then takes Opacus's noise-only step, as the accounted
        sampled Gaussian mechanism does.
        """
        self._batch_size = cfg.batch_size
        if n == 0:
            return []
        sampler = opacus().UniformWithReplacementSampler(
            num_samples=n, sample_rate=sample_rate(n, cfg.batch_size), generator=generator, steps=local_steps(n, cfg)
        )
        return [torch.tensor(idx, dtype=torch.long) for idx in sampler]

    def optimizer(
        self, model: nn.Module, cfg: TrainingConfig, generator: torch.Generator, n: int
    ) -> torch.optim.Optimizer:
        """The client's optimiser wrapped in a DPOptimizer (clip, noise from ``generator``, ÷ expected batch)."""
        optimizer = opacus().HostNoiseDPOptimizer(
            make_optimizer(model, cfg),
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=max(1, round(sample_rate(max(n, 1), cfg.batch_size) * n)),
            loss_reduction="mean",
            generator=generator,
        )
        # Once clipped into p.grad, the per-sample gradients are spent: drop them before the
        # next forward (ExpandedWeights refuses to run on stale ones; it also frees B× the weights).
        optimizer.attach_step_hook(opacus().release_grad_samples)
        return optimizer

    def empty_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """An empty Poisson batch still releases noise: Opacus's empty-batch step (zero per-sample gradients)."""
        optimizer.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.grad_sample = torch.zeros(0, *p.shape, device=p.device, dtype=p.dtype)  # type: ignore[attr-defined]
        optimizer.step()

    def begin(self, model: nn.Module, flat: FlatWeights, generator: torch.Generator, state: dict[str, Any]) -> None:
        """Start the client from clean per-sample gradients (an interrupted one may have left some)."""
        _clear(model)

    def account(self, state: dict[str, Any], n: int, steps: int) -> dict[str, float]:
        """Add this round's steps to the client's total and report its ε so far.

        The sampling rate is the same every round (a client keeps its ``n``
        samples), so all its steps form one Poisson-subsampled Gaussian history.
        """
        if self._batch_size is None:
            raise RuntimeError("DPSGD.account before DPSGD.batches: the sampling rate is unknown")
        total = int(state.get("dp_steps", 0)) + int(steps)
        state["dp_steps"] = total
        q = sample_rate(n, self._batch_size) if n > 0 else 0.0
        eps = epsilon(self.noise_multiplier, q, total, self.delta, self.accountant)
        return {"dp_epsilon": eps, "dp_steps": float(total)}

    def shared_gradient(
        self, model: nn.Module, flat: FlatWeights, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
        state: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """What a DP client releases for the batch (x, y): Σ clip(g_i) + N(0, (σC)²), divided by len(y).

        One DPOptimizer ``pre_step`` on the batch (clipping, noise from
        ``generator``, scaling), read out of ``p.grad``; no optimiser step, so the
        model stays at the weights ``flat`` holds, in train mode, with grads and
        per-sample grads cleared. This is one step of the same mechanism on a
        fixed batch (not Poisson-sampled): an observation for the attack
        experiments, not part of the ``dp_epsilon`` a client reports.
        """
        model.train()
        module = self.training_module(model)
        params = list(model.parameters())
        optimizer = opacus().HostNoiseDPOptimizer(
            torch.optim.SGD(params, lr=0.0),
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=len(y),
            loss_reduction="mean",
            generator=generator,
        )
        _clear(model)
        try:
            optimizer.zero_grad(set_to_none=True)
            objective = self.objective(model, module, x, y)[0]
            objective.backward()
            optimizer.pre_step()
            out = torch.zeros_like(flat.vector)
            out[flat.trainable] = torch.cat(
                [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1) for p in params]
            )
        finally:
            optimizer.zero_grad(set_to_none=True)
            _clear(model)
        return out

    # ------------------------------------------------------------ attackers

    @classmethod
    def naive_is_exact(cls, attacks: Any) -> bool:
        """Never: a naive attacker ignores the clipping and the noise."""
        return False

    def disclosure(self, context: dict[str, Any] | None = None) -> Disclosure:
        """The clipping bound, and the mechanism itself (clip and noise) to simulate victims on the server's data."""
        return Disclosure(clip_norm=self.max_grad_norm, shared_gradient=self.shared_gradient)
