"""P-BFGS: BFGS on the subspace coordinates with Armijo backtracking (Li et al. 2022, Alg. 2).

Every iteration uses one mini-batch: the closure's gradient, projected to d coordinates, drives
an inverse-Hessian BFGS update, and the step length is found by backtracking on the same batch.
Only d x d state is kept, in float64. Each BFGS start (the first update, and the first after a
reset) scales the identity by s^T y / y^T y, as L-BFGS does: on mini-batches an unscaled
H_0 = I makes the first steps the wrong length and costs backtracking trials. After a failed
trial, the next step length is interpolated (see ``backtrack``) instead of the paper's fixed
alpha * beta: the rare steps that overshoot far then take two or three trials instead of five or
six, and trials are what a step costs beyond SGD's. Trial forwards run without autograd, and the
given buffers (BatchNorm running statistics) are restored in memory after each one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from dldr.optim.base import SubspaceOptimizer
from dldr.subspace import Subspace

MIN_SHRINK = 0.1


def inverse_hessian_update(inv_hessian: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """H <- V^T H V + rho s s^T with V = I - rho y s^T and rho = 1 / y^T s, expanded (Nocedal & Wright
    6.17) into three rank-one updates of the symmetric H: six small ops, where each costs more than its
    d x d arithmetic."""
    hy = inv_hessian @ y
    rho = 1.0 / float(y @ s)
    return (
        inv_hessian.addr(s, s, alpha=rho * (1.0 + rho * float(y @ hy)))
        .addr_(hy, s, alpha=-rho)
        .addr_(s, hy, alpha=-rho)
    )


def backtrack(alpha: float, rise: float, slope: float, beta: float) -> float:
    """The next trial after ``alpha`` failed: the minimiser of the parabola through f(0), f'(0) and f(alpha).

    It is kept within [0.1, beta] times alpha (Nocedal & Wright, section 3.5), so no trial is longer
    than the paper's alpha * beta; a loss that is not finite shrinks alpha tenfold.
    """
    curvature = rise - slope * alpha  # > 0 once the Armijo test failed: rise > sigma alpha slope > alpha slope
    shrink = -slope * alpha / (2 * curvature) if math.isfinite(curvature) else 0.0
    return alpha * min(beta, max(MIN_SHRINK, shrink))


class PBFGS(SubspaceOptimizer):
    """Quasi-Newton steps w <- w + alpha P p in the span of a ``Subspace``.

    ``step(closure)``: the closure zeroes the gradients, computes the mini-batch loss, calls
    ``backward()`` when gradients are enabled, and returns the loss. It is called once with
    gradients and then without, at each line-search trial, on the same batch.

    Args:
        params: the model's trainable parameters, in the order the subspace's rows follow.
        subspace: the basis P (this rank's rows) that steps are taken in (``dldr.subspace.Subspace``).
        buffers: tensors a trial forward may change (BatchNorm running statistics); they are restored
            after each trial, so that only the accepted step's training forward moves them.
        sigma: Armijo's sufficient-decrease constant, in (0, 1) (default: 0.4).
        beta: backtracking factor, in (0, 1): the most of a failed trial's step the next one keeps
            (default: 0.55).
        max_trials: line-search trials per step; when none is accepted, w stays where it was, the
            inverse Hessian is reset and the step counts as a line-search failure (default: 20).
        interpolate: after a failed trial, step to the minimiser of the parabola through f(0), f'(0) and
            f(alpha), kept within [0.1, beta] alpha; False: beta alpha, the paper's (default: True).
        curvature_eps: the least y^T s for which a BFGS update is made; smaller pairs are skipped,
            which keeps the inverse Hessian positive definite (default: 1e-10).
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        subspace: Subspace,
        buffers: Iterable[torch.Tensor] = (),
        sigma: float = 0.4,
        beta: float = 0.55,
        max_trials: int = 20,
        interpolate: bool = True,
        curvature_eps: float = 1e-10,
    ):
        if not 0 < sigma < 1 or not 0 < beta < 1 or max_trials < 1:
            raise ValueError(f"need 0 < sigma < 1, 0 < beta < 1, max_trials >= 1; got {sigma}, {beta}, {max_trials}")
        super().__init__(
            params,
            subspace,
            dict(sigma=sigma, beta=beta, max_trials=max_trials, interpolate=interpolate, curvature_eps=curvature_eps),
        )
        self.buffers = list(buffers)

    def _state(self) -> dict[str, Any]:
        state = self._store
        if not state:
            # on the parameters' device, with the projected gradient, where load_state_dict puts it too
            d, like = self.subspace.dim, dict(dtype=torch.float64, device=self._flat.params[0].device)
            state.update(
                coords=torch.zeros(d, **like),
                inv_hessian=torch.eye(d, **like),
                prev_grad=torch.zeros(d, **like),
                prev_step=torch.zeros(d, **like),
                n_iter=0,
                trials=0,
                line_search_failures=0,
                curvature_skips=0,
                descent_resets=0,
                fresh=True,
            )
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        group = self.param_groups[0]
        state = self._state()
        with torch.enable_grad():
            loss = closure()
        f0 = self.subspace.average(float(loss))
        if not math.isfinite(f0):
            raise FloatingPointError(f"non-finite loss {f0} at P-BFGS iteration {state['n_iter']}")
        grad = self.subspace.project(self._flat.grad())
        inv_hessian = state["inv_hessian"]
        if state["n_iter"] > 0:
            y, s = grad - state["prev_grad"], state["prev_step"]
            curvature = float(y @ s)
            if curvature > group["curvature_eps"]:
                if state["fresh"]:  # H_0 = (s^T y / y^T y) I, Nocedal & Wright (6.20), the scale torch.optim.LBFGS uses
                    inv_hessian = curvature / float(y @ y) * inv_hessian
                inv_hessian = inverse_hessian_update(inv_hessian, s, y)
                state["fresh"] = False
            else:
                state["curvature_skips"] += 1
        direction = -inv_hessian @ grad
        slope = float(grad @ direction)
        if slope >= 0:
            inv_hessian = torch.eye(len(grad), dtype=grad.dtype, device=grad.device)
            direction = -grad
            slope = -float(grad @ grad)
            state["descent_resets"] += 1
            state["fresh"] = True
        alpha = self._line_search(closure, f0, direction, slope, group, state)
        if alpha is None:
            inv_hessian = torch.eye(len(grad), dtype=grad.dtype, device=grad.device)
            step = torch.zeros_like(grad)
            state["line_search_failures"] += 1
            state["fresh"] = True
        else:
            step = alpha * direction
            state["coords"] = state["coords"] + step
        state.update(inv_hessian=inv_hessian, prev_grad=grad, prev_step=step, n_iter=state["n_iter"] + 1)
        return loss

    def _line_search(
        self,
        closure: Callable[[], torch.Tensor],
        f0: float,
        direction: torch.Tensor,
        slope: float,
        group: dict[str, Any],
        state: dict[str, Any],
    ) -> float | None:
        """Armijo backtracking on the current batch; leaves w at the accepted point, or unchanged."""
        lifted = self.subspace.lift(direction)
        base = self._flat.get()
        saved = [b.clone() for b in self.buffers]
        alpha = 1.0
        for _ in range(group["max_trials"]):
            self._flat.set_combination(base, lifted, alpha)
            f = self.subspace.average(float(closure()))
            for b, v in zip(self.buffers, saved, strict=True):
                b.copy_(v)
            state["trials"] += 1
            if f <= f0 + group["sigma"] * alpha * slope:
                return alpha
            alpha = backtrack(alpha, f - f0, slope, group["beta"]) if group["interpolate"] else alpha * group["beta"]
        self._flat.set(base)
        return None
