"""L-BFGS batched over victims: one history and one step size per victim.

``torch.optim.LBFGS`` keeps one history for all its parameters, takes inner
products over all of them and stops on a joint criterion, so optimising the
stacked (V, n) dummy variables with it would couple the victims (a victim's
direction would depend on the others). This version runs the same two-loop
recursion with a fixed step (torch's default: no line search, lr on every
iteration but the first, which takes min(1, 1/|g|_1)·lr) independently per row.

Difference from torch: a pair failing the curvature test (y·s <= 1e-10) still
occupies its ring slot with zero weight instead of being skipped, so that
victim's effective history is one shorter; per victim this is deterministic and
independent of the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# z (V, n) -> (objective (V,), gradient (V, n)), each row depending on its own z only.
Objective = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


def batched_lbfgs(
    fn: Objective,
    z0: torch.Tensor,
    iterations: int,
    lr: float = 1.0,
    history_size: int = 100,
    tolerance_grad: float = 1e-7,
    tolerance_change: float = 1e-9,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimise each row of ``fn`` from ``z0``; return each row's best point, its value, and its iterations.

    A row's iterations count the steps it took before it converged or stopped,
    so they do not depend on the other rows.

    Keeping the best point seen (not the last) guards against a fixed step
    diverging, which DLG's L-BFGS without line search sometimes does.
    """
    victims, n = z0.shape
    z = z0.clone()
    f, g = fn(z)
    best_z, best_f = z.clone(), torch.where(torch.isfinite(f), f, torch.inf)
    S = torch.zeros(victims, history_size, n, dtype=z.dtype, device=z.device)
    Y = torch.zeros_like(S)
    rho = torch.zeros(victims, history_size, dtype=z.dtype, device=z.device)
    h_diag = torch.ones(victims, dtype=z.dtype, device=z.device)
    active = torch.isfinite(f) & (g.abs().amax(-1) > tolerance_grad)
    d = -g
    t = torch.zeros(victims, dtype=z.dtype, device=z.device)
    prev_g = g
    steps = torch.zeros(victims, dtype=torch.long, device=z.device)
    for it in range(iterations):
        if not bool(active.any()):
            break
        if it > 0:
            y, s = g - prev_g, d * t[:, None]
            ys = _dot(y, s)
            ok = (ys > 1e-10)[:, None]
            slot = (it - 1) % history_size
            S[:, slot] = torch.where(ok, s, 0.0)
            Y[:, slot] = torch.where(ok, y, 0.0)
            rho[:, slot] = torch.where(ok[:, 0], 1.0 / ys, 0.0)
            h_diag = torch.where(ok[:, 0], ys / _dot(y, y), h_diag)
            d = _two_loop(-g, S, Y, rho, h_diag, newest=slot, filled=min(it, history_size))
        t = torch.full_like(t, lr)
        if it == 0:
            t = torch.clamp(1.0 / g.abs().sum(-1), max=1.0) * lr
        active = active & (_dot(g, d) < -tolerance_change)
        prev_g, prev_f = g, f
        z = torch.where(active[:, None], z + t[:, None] * d, z)
        steps += active.long()
        f, g = fn(z)
        finite = torch.isfinite(f)
        better = finite & (f < best_f)
        best_z = torch.where(better[:, None], z, best_z)
        best_f = torch.where(better, f, best_f)
        moved = (d * t[:, None]).abs().amax(-1) > tolerance_change
        changed = (f - prev_f).abs() >= tolerance_change
        active = active & finite & (g.abs().amax(-1) > tolerance_grad) & changed & moved
    return best_z, best_f, steps


def _two_loop(
    q: torch.Tensor,
    S: torch.Tensor,
    Y: torch.Tensor,
    rho: torch.Tensor,
    h_diag: torch.Tensor,
    newest: int,
    filled: int,
) -> torch.Tensor:
    """Per-row L-BFGS direction H·q; slots with rho = 0 (unused or rejected) contribute nothing."""
    size = S.shape[1]
    order = [(newest - k) % size for k in range(filled)]
    alphas = []
    for slot in order:
        a = rho[:, slot] * _dot(S[:, slot], q)
        q = q - a[:, None] * Y[:, slot]
        alphas.append(a)
    r = q * h_diag[:, None]
    for slot, a in zip(reversed(order), reversed(alphas), strict=True):
        b = rho[:, slot] * _dot(Y[:, slot], r)
        r = r + S[:, slot] * (a - b)[:, None]
    return r
