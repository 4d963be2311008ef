"""The cross-rank operations the phases need, behind one small interface.

The phases never talk to a process group directly: they receive a ``Comm``. ``LocalComm`` is the
single-process case, where every collective is the identity; ``TorchComm`` runs the same
methods over the default ``torch.distributed`` process group (Gloo or NCCL), which is what Ray
Train sets up on its workers.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn


class Comm(Protocol):
    rank: int
    world_size: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``tensor`` over ranks, identical on every rank."""

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """The rank-ordered concatenation of each rank's 1-D ``tensor`` (lengths may differ)."""

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (small picklable values only)."""

    def data_parallel(self, model: nn.Module) -> nn.Module:
        """``model`` wrapped so that ``backward()`` leaves the gradient averaged over ranks."""


class LocalComm:
    rank = 0
    world_size = 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def data_parallel(self, model: nn.Module) -> nn.Module:
        return model


class TorchComm:
    """The default process group of an initialised ``torch.distributed``."""

    def __init__(self, device: torch.device):
        if not dist.is_initialized():
            raise RuntimeError("TorchComm needs torch.distributed to be initialised")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = device

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.to(self.device, copy=True)
        dist.all_reduce(out)
        return out.to(tensor.device)

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        # Gloo and NCCL gather equal lengths only: pad each slice to the longest, then trim.
        length = torch.tensor([tensor.numel()], device=self.device)
        sizes = [torch.empty_like(length) for _ in range(self.world_size)]
        dist.all_gather(sizes, length)  # a tensor collective: this runs at every P-BFGS step
        lengths = [int(n) for n in sizes]
        padded = torch.zeros(max(lengths), dtype=tensor.dtype, device=self.device)
        padded[: tensor.numel()] = tensor
        parts = [torch.empty_like(padded) for _ in lengths]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, lengths)]).to(tensor.device)

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def data_parallel(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
