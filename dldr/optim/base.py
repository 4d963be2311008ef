"""What the subspace optimizers share: one parameter group, a flat view, float64 state."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from dldr.params import FlatParams
from dldr.subspace import Subspace


class SubspaceOptimizer(Optimizer):
    """Keeps its whole state, float64 d-vectors and d x d matrices, under the first parameter."""

    def __init__(self, params: Iterable[nn.Parameter], subspace: Subspace, defaults: dict[str, Any]):
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError(f"{type(self).__name__} does not support parameter groups")
        self._flat = FlatParams(self.param_groups[0]["params"])
        if subspace.shard.stop > self._flat.numel:
            raise ValueError(f"subspace shard {subspace.shard} is outside the {self._flat.numel} parameters")
        self.subspace = subspace

    @property
    def _store(self) -> dict[str, Any]:
        return self.state[self._flat.params[0]]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch.optim casts floating state to the parameters' dtype (float32); ours is float64.
        for key, value in state_dict["state"].get(0, {}).items():
            if torch.is_tensor(value) and value.is_floating_point():
                self._store[key] = value.to(torch.float64).clone()
