"""The affine subspace w = w_start + P c that phase 3 trains in, over parameter shards.

Rank r holds only its rows P_r of the basis. A gradient is projected as the all-reduce of
P_r^T g_r, so every rank sees the same d coordinates; a coordinate step is lifted to parameter
space as the all-gather of the slices P_r p.
"""
from __future__ import annotations

import torch

from dldr.comm import Comm, LocalComm


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
        """P^T g in float64, identical on every rank."""
        local = self.basis.T @ flat_grad[self.shard].to(self.basis.dtype)
        return self.comm.all_reduce_sum(local).double()

    def lift(self, coords: torch.Tensor) -> torch.Tensor:
        """P c as a full parameter-space vector, identical on every rank."""
        return self.comm.all_gather_cat(self.basis @ coords.to(self.basis.dtype))

    def average(self, value: float) -> float:
        """The mean of a per-rank scalar, so that every rank takes the same decisions."""
        total = self.comm.all_reduce_sum(torch.tensor([value], dtype=torch.float64))
        return float(total[0]) / self.comm.world_size
