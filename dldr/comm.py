"""The cross-rank operations the phases need, behind one small interface.

The phases never talk to a process group directly: they receive a ``Comm``. ``LocalComm`` is the
single-process case, where every collective is the identity; the Ray Train engine supplies a
``torch.distributed`` implementation with the same methods.
"""
from __future__ import annotations

from typing import Protocol

import torch


class Comm(Protocol):
    rank: int
    world_size: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``tensor`` over ranks, identical on every rank."""

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """The rank-ordered concatenation of each rank's 1-D ``tensor`` (lengths may differ)."""


class LocalComm:
    rank = 0
    world_size = 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor
