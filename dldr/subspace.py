"""The affine subspace w = w_start + P c that phase 3 trains in, over parameter shards.

Rank r holds only its rows P_r of the basis. A gradient is projected as the all-reduce of
P_r^T g_r, so every rank sees the same d coordinates; a coordinate step is lifted to parameter
space as the all-gather of the slices P_r p.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dldr.comm import Comm, LocalComm

PROJECT_BLOCK_ROWS = 256  # float32 sums this short stay at the inputs' own rounding
# rows of a bfloat16 P widened to float32 at a time: 10 MB at d = 40, a multiple of PROJECT_BLOCK_ROWS
WIDEN_ROWS = 1 << 16


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
        A bfloat16 P is widened to float32 ``WIDEN_ROWS`` rows at a time and summed the same way.
        """
        grad = flat_grad[self.shard].to(self.dtype)
        local = sum(_block_sums(p, grad[rows]) for rows, p in self._wide_rows())
        return self.comm.all_reduce_sum(local)

    def lift(self, coords: torch.Tensor) -> torch.Tensor:
        """P c as a full parameter-space vector (float32 for a bfloat16 P), identical on every rank."""
        coords = coords.to(self.dtype)
        if self.basis.dtype == self.dtype:
            return self.comm.all_gather_cat(self.basis @ coords)
        step = torch.empty(self.basis.shape[0], dtype=self.dtype, device=self.basis.device)
        for rows, p in self._wide_rows():
            torch.mv(p, coords, out=step[rows])
        return self.comm.all_gather_cat(step)

    @property
    def dtype(self) -> torch.dtype:
        """The precision products with P are computed in: P's own, float32 for a bfloat16 P."""
        return self.basis.dtype if self.basis.dtype in (torch.float32, torch.float64) else torch.float32

    def _wide_rows(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """P's rows in ``dtype``: all of them at once, or a bfloat16 P's ``WIDEN_ROWS`` at a time."""
        rows = self.basis.shape[0]
        if self.basis.dtype == self.dtype:
            yield slice(0, rows), self.basis
            return
        for start in range(0, rows, WIDEN_ROWS):
            part = slice(start, min(start + WIDEN_ROWS, rows))
            yield part, self.basis[part].to(self.dtype)

    def average(self, value: float) -> float:
        """The mean of a per-rank scalar, so that every rank takes the same decisions."""
        if self.comm.world_size == 1:  # no collective: a step's small tensor ops cost more than its algebra
            return value
        total = self.comm.all_reduce_sum(torch.tensor([value], dtype=torch.float64))
        return float(total[0]) / self.comm.world_size


def _block_sums(p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """p^T grad in float64, from float32 sums over blocks of PROJECT_BLOCK_ROWS rows."""
    rows, dim = p.shape
    body = rows - rows % PROJECT_BLOCK_ROWS
    blocks = grad[:body].view(-1, 1, PROJECT_BLOCK_ROWS) @ p[:body].view(-1, PROJECT_BLOCK_ROWS, dim)
    return blocks.view(-1, dim).double().sum(0) + p[body:].double().T @ grad[body:].double()
