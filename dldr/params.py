"""The flat parameter vector w of a model and its contiguous shard slices.

w is the concatenation of the trainable parameters in ``named_parameters()`` order. Buffers
(BatchNorm statistics) are not part of w: they are not in the subspace.
"""

from __future__ import annotations

import torch
from torch import nn


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable(model))


def shard_slices(dim: int, num_shards: int) -> list[slice]:
    """Cut range(dim) into ``num_shards`` contiguous slices whose sizes differ by at most one."""
    if not 1 <= num_shards <= dim:
        raise ValueError(f"cannot cut {dim} parameters into {num_shards} shards")
    base, extra = divmod(dim, num_shards)
    bounds = [0]
    for r in range(num_shards):
        bounds.append(bounds[-1] + base + (r < extra))
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


class FlatParams:
    """Views a model's trainable parameters as one vector without keeping a copy of it."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = list(params)
        self.numel = sum(p.numel() for p in self.params)

    def get(self, rows: slice | None = None) -> torch.Tensor:
        """A copy of w, or of its ``rows`` only: a rank's snapshot never copies the other shards."""
        if rows is None:
            return torch.cat([p.detach().reshape(-1) for p in self.params])
        pieces, offset = [], 0
        for p in self.params:
            lo, hi = max(rows.start, offset), min(rows.stop, offset + p.numel())
            if lo < hi:
                pieces.append(p.detach().reshape(-1)[lo - offset : hi - offset])
            offset += p.numel()
        return torch.cat(pieces)

    def grad(self) -> torch.Tensor:
        return torch.cat(
            [p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1) for p in self.params]
        )

    @torch.no_grad()
    def set(self, flat: torch.Tensor) -> None:
        for p, chunk in zip(self.params, self._split(flat), strict=True):
            p.copy_(chunk.view_as(p))

    @torch.no_grad()
    def add_(self, flat: torch.Tensor, alpha: float = 1.0) -> None:
        chunks = [c.view_as(p) for p, c in zip(self.params, self._split(flat), strict=True)]
        torch._foreach_add_(self.params, chunks, alpha=alpha)

    @torch.no_grad()
    def set_combination(self, base: torch.Tensor, direction: torch.Tensor, alpha: float) -> None:
        """w <- base + alpha * direction, written into the parameters in place."""
        for p, b, d in zip(self.params, self._split(base), self._split(direction), strict=True):
            torch.add(b.view_as(p), d.view_as(p), alpha=alpha, out=p)

    def _split(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if flat.numel() != self.numel:
            raise ValueError(f"flat vector has {flat.numel()} entries, the model {self.numel}")
        return torch.split(flat, [p.numel() for p in self.params])
