"""Optimizers over the d coordinates of a subspace, in the torch.optim style."""

from dldr.optim.pbfgs import PBFGS, inverse_hessian_update
from dldr.optim.psgd import PSGD

__all__ = ["PBFGS", "PSGD", "inverse_hessian_update"]
