"""The affine subspace w = w_start + P c that phase 3 trains in, over parameter shards.

Rank r holds only its rows P_r of the basis. A gradient is projected as the all-reduce of
P_r^T g_r, so every rank sees the same d coordinates; a coordinate step is lifted to parameter
space as the all-gather of the slices P_r p.
"""
from __future__ import annotations

import torch

from dldr.comm import Comm, LocalComm

PROJECT_BLOCK_ROWS = 256  # float32 sums this short stay at the inputs' own rounding


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
        """P^T g, summed in float32 over blocks of 256 rows and in float64 across blocks.

        One float32 dot product over millions of rows loses digits that BFGS then amplifies
        (3e-5 relative to a float64 sum at 4M rows), and loses different ones for different
        shardings. Short blocks keep the error near the float32 inputs' own rounding (4e-7) in
        one float32 pass over P: 4x faster than converting P to float64 block by block.
        """
        grad = flat_grad[self.shard].to(self.basis.dtype)
        rows, dim = self.basis.shape
        body = rows - rows % PROJECT_BLOCK_ROWS
        blocks = grad[:body].view(-1, 1, PROJECT_BLOCK_ROWS) @ self.basis[:body].view(-1, PROJECT_BLOCK_ROWS, dim)
        local = blocks.view(-1, dim).double().sum(0) + self.basis[body:].double().T @ grad[body:].double()
        return self.comm.all_reduce_sum(local)

    def lift(self, coords: torch.Tensor) -> torch.Tensor:
        """P c as a full parameter-space vector, identical on every rank."""
        return self.comm.all_gather_cat(self.basis @ coords.to(self.basis.dtype))

    def average(self, value: float) -> float:
        """The mean of a per-rank scalar, so that every rank takes the same decisions."""
        if self.comm.world_size == 1:  # no collective: a step's small tensor ops cost more than its algebra
            return value
        total = self.comm.all_reduce_sum(torch.tensor([value], dtype=torch.float64))
        return float(total[0]) / self.comm.world_size
