"""The affine subspace w = w_start + P c that phase 3 trains in, over parameter shards.

Rank r holds only its rows P_r of the basis. A gradient is projected as the all-reduce of
P_r^T g_r, so every rank sees the same d coordinates; a coordinate step is lifted to parameter
space as the all-gather of the slices P_r p.
"""
from __future__ import annotations

import torch

from dldr.comm import Comm, LocalComm

PROJECT_BLOCK_ROWS = 1 << 14  # 5 MB of float64 per block: the conversion stays in cache


class Subspace:
    def __init__(self, basis: torch.Tensor, shard: slice, comm: Comm | None = None):
        if basis.ndim != 2 or basis.shape[0] != shard.stop - shard.start:
            raise ValueError(f"basis of shape {tuple(basis.shape)} does not fit shard {shard}")
        self.basis = basis
        self.shard = shard
        self.comm = comm or LocalComm()

    @property
    def dim(self) -> int:
        return self.basis.shape[1]

    def project(self, flat_grad: torch.Tensor) -> torch.Tensor:
        """P^T g, accumulated in float64 and identical on every rank.

        A float32 dot product over millions of rows loses digits that BFGS then amplifies, and
        loses different ones for different shardings; float64 keeps N = 1 and N = 2 together.
        The basis is converted a block of rows at a time, so the copy stays small.
        """
        grad = flat_grad[self.shard]
        local = torch.zeros(self.dim, dtype=torch.float64, device=self.basis.device)
        for start in range(0, self.basis.shape[0], PROJECT_BLOCK_ROWS):
            rows = slice(start, start + PROJECT_BLOCK_ROWS)
            local += self.basis[rows].double().T @ grad[rows].double()
        return self.comm.all_reduce_sum(local)

    def lift(self, coords: torch.Tensor) -> torch.Tensor:
        """P c as a full parameter-space vector, identical on every rank."""
        return self.comm.all_gather_cat(self.basis @ coords.to(self.basis.dtype))

    def average(self, value: float) -> float:
        """The mean of a per-rank scalar, so that every rank takes the same decisions."""
        total = self.comm.all_reduce_sum(torch.tensor([value], dtype=torch.float64))
        return float(total[0]) / self.comm.world_size
