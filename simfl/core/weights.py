"""A model's floating-point state as one contiguous vector that the model trains in place.

Parameters and float buffers are re-pointed at slices of a single flat tensor.
Loading the global model is then one ``copy_``, an update is one subtraction,
and aggregation works on vectors: no per-client ``state_dict`` churn.
"""

from __future__ import annotations

import torch
from torch import nn


class FlatWeights:
    """Binds ``model``'s parameters and float buffers to views of one flat vector."""

    def __init__(self, model: nn.Module) -> None:
        entries: list[tuple[nn.Module, str, torch.Tensor, bool]] = []
        qualified: list[str] = []
        for prefix, module in model.named_modules():
            for name, param in module.named_parameters(recurse=False):
                entries.append((module, name, param, True))
                qualified.append(f"{prefix}.{name}" if prefix else name)
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None and buf.is_floating_point():
                    entries.append((module, name, buf, False))
                    qualified.append(f"{prefix}.{name}" if prefix else name)
        total = sum(t.numel() for _, _, t, _ in entries)
        device = entries[0][2].device if entries else torch.device("cpu")
        self.vector = torch.empty(total, dtype=torch.float32, device=device)
        # True where the entry is a trainable parameter; server optimisers only touch those.
        self.trainable = torch.zeros(total, dtype=torch.bool, device=device)
        # (qualified name, offset, shape) per entry, for ``as_dict``.
        self.layout: list[tuple[str, int, torch.Size]] = []
        offset = 0
        for (module, name, tensor, is_param), qname in zip(entries, qualified, strict=True):
            n = tensor.numel()
            self.layout.append((qname, offset, tensor.shape))
            view = self.vector[offset : offset + n].view_as(tensor)
            view.copy_(tensor.detach())
            if is_param:
                tensor.data = view
            else:
                module._buffers[name] = view
            self.trainable[offset : offset + n] = is_param
            offset += n

    def load(self, vector: torch.Tensor) -> None:
        """Copy ``vector`` into the model's weights."""
        self.vector.copy_(vector)

    def snapshot(self) -> torch.Tensor:
        """A detached copy of the current weights."""
        return self.vector.detach().clone()

    def as_dict(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Name → view of ``vector`` (any leading batch dims), for ``torch.func.functional_call``.

        Attacks evaluate the model at many weight vectors at once (one per victim,
        under ``vmap``) without touching the model's own storage.
        """
        lead = vector.shape[:-1]
        return {
            name: vector[..., offset : offset + shape.numel()].reshape(*lead, *shape)
            for name, offset, shape in self.layout
        }

    def __len__(self) -> int:
        return self.vector.numel()


def flat_gradient(loss: torch.Tensor, model: nn.Module, flat: FlatWeights) -> torch.Tensor:
    """``loss``'s gradient over ALL ``flat`` entries (zero on buffers and on parameters it does not use)."""
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    out = torch.zeros_like(flat.vector)
    out[flat.trainable] = torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params, strict=True)]
    )
    return out
