"""The parts of Opacus that DP-SGD trains with, and simfl's one change to them (noise drawn on the host).

A module of its own so that Opacus is imported only by a process that trains or
attacks with DP-SGD (:func:`simfl.privacy.defences.dpsgd.opacus`): its import
alone costs about 1.7 s of CPU in each actor.
"""

from __future__ import annotations

import torch
from opacus.accountants.utils import create_accountant
from opacus.grad_sample.gsm_exp_weights import GradSampleModuleExpandedWeights
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator

__all__ = ["GradSampleModuleExpandedWeights", "HostNoiseDPOptimizer", "ModuleValidator",
           "UniformWithReplacementSampler", "create_accountant", "release_grad_samples"]


class HostNoiseDPOptimizer(DPOptimizer):
    """Opacus's DPOptimizer with its Gaussian noise drawn on the CPU, from the client's generator, then moved.

    Opacus draws the noise on the parameters' device. A CUDA normal draw's
    values depend on the GPU's multiprocessor count (its launch grid), so the
    same (seed, client, round) would give other noise on another GPU model or
    MIG slice, and other noise than on the CPU. Drawn on the CPU, the noise is
    the same wherever the client trains (costs one host draw and copy of the
    weights' size per step). Otherwise exactly Opacus's ``add_noise`` (its
    non-secure mode): ``torch.normal(0, σC)`` per parameter, none when σ = 0.
    """

    def add_noise(self) -> None:
        """Add N(0, (σC)²) noise drawn on the CPU to each summed, clipped gradient and set it as ``p.grad``."""
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            if std == 0:
                noise = torch.zeros_like(p.summed_grad)
            else:
                noise = torch.normal(0.0, std, size=p.summed_grad.shape, generator=self.generator,
                                     dtype=p.summed_grad.dtype).to(p.summed_grad.device)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)



def release_grad_samples(optimizer: DPOptimizer) -> None:
    """DPOptimizer step hook (after clipping, noise and scaling; before the update)."""
    for p in optimizer.params:
        p.grad_sample = None
