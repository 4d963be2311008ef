"""P-SGD: SGD with momentum on the subspace coordinates, i.e. on the projected gradient P P^T g.

The momentum buffer lives in the d coordinates, so a step costs one projection and one lift.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from dldr.optim.base import SubspaceOptimizer
from dldr.subspace import Subspace


class PSGD(SubspaceOptimizer):
    """SGD with heavy-ball momentum on the coordinates c of w = w_start + P c.

    Args:
        params: the model's trainable parameters, in the order the subspace's rows follow.
        subspace: the basis P (this rank's rows) that steps are taken in (``dldr.subspace.Subspace``).
        lr: the learning rate, above 0 (a scheduler may change it, as with torch.optim.SGD).
        momentum: the momentum factor, in [0, 1) (default: 0.9).
    """

    def __init__(self, params: Iterable[nn.Parameter], subspace: Subspace, lr: float, momentum: float = 0.9):
        if lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"need lr > 0 and 0 <= momentum < 1; got {lr}, {momentum}")
        super().__init__(params, subspace, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        group = self.param_groups[0]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad = self.subspace.project(self._flat.grad())
        state = self._store
        if not state:
            state.update(coords=torch.zeros_like(grad), momentum_buffer=grad.clone())
        else:
            state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
        step = -group["lr"] * state["momentum_buffer"]
        state["coords"] += step
        self._flat.add_(self.subspace.lift(step))
        return loss
