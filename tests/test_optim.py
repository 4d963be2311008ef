import copy
import math

import pytest
import torch
from torch import nn

from dldr import phases
from dldr.config import Config
from dldr.optim import PBFGS, PSGD, inverse_hessian_update
from dldr.optim.pbfgs import backtrack
from dldr.subspace import Subspace
from tests.helpers import bn_problem, model_closure, orthonormal


class Vector(nn.Module):
    """A model that is one parameter vector w, for losses written directly in w."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())


def _closure(opt, model, loss_fn):
    def closure():
        opt.zero_grad()
        loss = loss_fn(model.w)
        if torch.is_grad_enabled():
            loss.backward()
        return loss

    return closure


def test_inverse_hessian_update_matches_textbook_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    h = a @ a.T + torch.eye(6, dtype=torch.float64)
    s, y = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    y = y + 3 * s  # y^T s > 0
    sy = s @ y
    # Nocedal & Wright (6.17), expanded
    expected = h + (sy + y @ h @ y) * torch.outer(s, s) / sy**2 - (h @ torch.outer(y, s) + torch.outer(s, y) @ h) / sy
    updated = inverse_hessian_update(h, s, y)
    torch.testing.assert_close(updated, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(updated @ y, s)  # secant condition
    assert torch.linalg.eigvalsh(updated).min() > 0


def test_first_update_scales_the_identity_as_lbfgs_does():
    """H_0 = (s^T y / y^T y) I before the first BFGS update (Nocedal & Wright 6.20)."""
    curvature = torch.tensor([1.0, 10.0], dtype=torch.float64)
    model = Vector(torch.tensor([1.0, 1.0], dtype=torch.float64))
    opt = PBFGS(model.parameters(), Subspace(torch.eye(2, dtype=torch.float64), slice(0, 2)))
    closure = _closure(opt, model, lambda w: 0.5 * (curvature * w**2).sum())
    opt.step(closure)
    s = opt.state[model.w]["prev_step"].clone()
    assert opt.state[model.w]["fresh"] and s.abs().min() > 0
    opt.step(closure)
    y = curvature * s  # the change of a quadratic's gradient
    expected = inverse_hessian_update((s @ y) / (y @ y) * torch.eye(2, dtype=torch.float64), s, y)
    torch.testing.assert_close(opt.state[model.w]["inv_hessian"], expected)
    assert not opt.state[model.w]["fresh"]


def test_pbfgs_solves_a_convex_quadratic_in_the_subspace_within_3d_iterations():
    num_params, dim = 300, 12
    basis = orthonormal(num_params, dim)
    g = torch.Generator().manual_seed(1)
    q = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
    hessian = q @ torch.diag(torch.linspace(1.0, 10.0, dim, dtype=torch.float64)) @ q.T
    target = torch.randn(dim, generator=g, dtype=torch.float64)
    w_start = torch.randn(num_params, generator=g, dtype=torch.float64)

    def loss_fn(w):
        c = basis.T @ (w - w_start)
        return 0.5 * (c - target) @ hessian @ (c - target)

    model = Vector(w_start)
    opt = PBFGS(model.parameters(), Subspace(basis, slice(0, num_params)))
    closure = _closure(opt, model, loss_fn)
    for _ in range(3 * dim):
        opt.step(closure)
        coords = opt.state[model.w]["coords"]
        if torch.linalg.norm(coords - target) < 1e-8:
            break
    assert torch.linalg.norm(coords - target) < 1e-8, f"not solved in {3 * dim} iterations"
    # the parameters are exactly w_start + P c, and the optimizer never failed a line search
    torch.testing.assert_close(model.w.detach(), w_start + basis @ coords)
    assert opt.state[model.w]["line_search_failures"] == 0


def test_geometric_armijo_backtracks_to_the_first_acceptable_step():
    # f(c) = 1.5 c^2 from c = 1 with B = I: alpha = 1 and beta overshoot, beta^2 satisfies
    # f(alpha) <= f(0) + sigma alpha g p (see the numbers in the assertions)
    basis = torch.ones(1, 1, dtype=torch.float64)
    model = Vector(torch.ones(1, dtype=torch.float64))
    opt = PBFGS(model.parameters(), Subspace(basis, slice(0, 1)), sigma=0.4, beta=0.55, interpolate=False)
    opt.step(_closure(opt, model, lambda w: 1.5 * (w**2).sum()))
    state = opt.state[model.w]
    alpha = 0.55**2
    assert state["trials"] == 3
    torch.testing.assert_close(state["coords"], torch.tensor([-3.0 * alpha], dtype=torch.float64))
    torch.testing.assert_close(model.w.detach(), torch.tensor([1.0 - 3.0 * alpha], dtype=torch.float64))


def test_interpolated_armijo_lands_on_the_minimum_of_a_quadratic():
    # the same f(c) = 1.5 c^2 from c = 1: after alpha = 1 overshoots to c = -2, the parabola through
    # f(0), f'(0) and f(1) is f itself, so the second trial is its minimiser c = 0 (alpha = 1/3)
    basis = torch.ones(1, 1, dtype=torch.float64)
    model = Vector(torch.ones(1, dtype=torch.float64))
    opt = PBFGS(model.parameters(), Subspace(basis, slice(0, 1)), sigma=0.4, beta=0.55)
    opt.step(_closure(opt, model, lambda w: 1.5 * (w**2).sum()))
    state = opt.state[model.w]
    assert state["trials"] == 2
    torch.testing.assert_close(state["coords"], torch.tensor([-1.0], dtype=torch.float64))
    torch.testing.assert_close(model.w.detach(), torch.tensor([0.0], dtype=torch.float64))


@pytest.mark.parametrize(
    ("rise", "expected"),
    [
        (6.0 - 1.5, 1 / 3),  # the quadratic above: the minimiser itself
        (-3.5, 0.55),  # just above the Armijo line (-3.6): the parabola's minimiser 0.82 is cut to beta
        (1e6, 0.1),  # far overshoot: at least a tenth of alpha is kept
        (math.inf, 0.1),
        (math.nan, 0.1),  # a diverged trial
    ],
)
def test_backtrack_interpolates_within_its_safeguards(rise, expected):
    assert backtrack(1.0, rise, slope=-9.0, beta=0.55) == pytest.approx(expected)
    assert backtrack(0.5, rise, slope=-9.0, beta=0.55) < 0.5 * 0.55 + 1e-12  # never longer than beta alpha


@pytest.mark.parametrize(("rule", "trials"), [("interpolate", 2), ("geometric", 3)])
def test_armijo_backtrack_flag_picks_the_rule(rule, trials):
    # the quadratic of the two tests above, through the configuration the CLI fills
    model = Vector(torch.ones(1, dtype=torch.float64))
    subspace = Subspace(torch.ones(1, 1, dtype=torch.float64), slice(0, 1))
    opt = phases.make_optimizer(Config(armijo_backtrack=rule), model, subspace)
    opt.step(_closure(opt, model, lambda w: 1.5 * (w**2).sum()))
    assert opt.state[model.w]["trials"] == trials


def test_failed_line_search_takes_no_step_and_resets_the_inverse_hessian():
    model = Vector(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = PBFGS(model.parameters(), Subspace(torch.eye(2, dtype=torch.float64), slice(0, 2)), max_trials=5)
    state_h = 2 * torch.eye(2, dtype=torch.float64)
    # trial forwards see a loss far above the gradient forward, so no trial is accepted
    loss_fn = lambda w: (w**2).sum() + (0.0 if torch.is_grad_enabled() else 100.0)
    opt.step(_closure(opt, model, loss_fn))
    opt.state[model.w]["inv_hessian"] = state_h
    opt.step(_closure(opt, model, loss_fn))
    state = opt.state[model.w]
    assert state["line_search_failures"] == 2 and state["trials"] == 10
    torch.testing.assert_close(model.w.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(state["inv_hessian"], torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(state["coords"], torch.zeros(2, dtype=torch.float64))


def test_non_descent_direction_resets_to_steepest_descent():
    model = Vector(torch.tensor([1.0, 1.0], dtype=torch.float64))
    opt = PBFGS(model.parameters(), Subspace(torch.eye(2, dtype=torch.float64), slice(0, 2)))
    closure = _closure(opt, model, lambda w: 0.25 * (w**2).sum())
    opt.step(closure)  # creates the state; alpha = 1 step of -g = -w / 2
    state = opt.state[model.w]
    state["inv_hessian"] = -torch.eye(2, dtype=torch.float64)
    state["prev_step"] = torch.zeros(2, dtype=torch.float64)  # no curvature pair: B is used as is
    before = model.w.detach().clone()
    opt.step(closure)
    assert state["descent_resets"] == 1
    torch.testing.assert_close(model.w.detach(), before / 2)  # the step -g = -w/2 with alpha = 1


def test_negative_curvature_pair_is_skipped():
    model = Vector(torch.tensor([0.1], dtype=torch.float64))
    opt = PBFGS(model.parameters(), Subspace(torch.ones(1, 1, dtype=torch.float64), slice(0, 1)))
    closure = _closure(opt, model, lambda w: -(w**2).sum() + (w**4).sum())  # concave for |w| < 0.4
    opt.step(closure)
    opt.step(closure)
    state = opt.state[model.w]
    assert state["curvature_skips"] == 1
    torch.testing.assert_close(state["inv_hessian"], torch.eye(1, dtype=torch.float64))


def test_trial_forwards_leave_batchnorm_buffers_as_one_training_forward_would():
    model, x, y, basis, num = bn_problem()
    reference = copy.deepcopy(model)
    reference(x)  # the single training forward that may move the running statistics
    opt = PBFGS(model.parameters(), Subspace(basis, slice(0, num)), buffers=list(model.buffers()))
    opt.step(model_closure(opt, model, x, y))
    assert opt.state[next(model.parameters())]["trials"] >= 1
    for got, want in zip(model.buffers(), reference.buffers()):
        assert torch.equal(got, want)


def test_resumed_pbfgs_continues_exactly():
    def run(steps, resume_at=None):
        model, x, y, basis, num = bn_problem()
        opt = PBFGS(model.parameters(), Subspace(basis, slice(0, num)), buffers=list(model.buffers()))
        for k in range(steps):
            if k == resume_at:
                saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
                model, *_ = bn_problem()
                model.load_state_dict(saved_model)
                opt = PBFGS(model.parameters(), Subspace(basis, slice(0, num)), buffers=list(model.buffers()))
                opt.load_state_dict(saved_opt)
            opt.step(model_closure(opt, model, x + 0.1 * k, y))
        return model, opt.state[next(model.parameters())]

    straight, straight_state = run(10)
    resumed, resumed_state = run(10, resume_at=5)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    for key, value in straight_state.items():
        if torch.is_tensor(value):
            assert value.dtype == resumed_state[key].dtype == torch.float64
            assert torch.equal(value, resumed_state[key]), key
        else:
            assert value == resumed_state[key], key
    assert straight_state["n_iter"] == 10


def test_psgd_matches_dense_projected_momentum_sgd():
    num_params, dim, lr, momentum = 50, 5, 0.05, 0.9
    basis = orthonormal(num_params, dim)
    g = torch.Generator().manual_seed(2)
    a = torch.randn(num_params, num_params, generator=g, dtype=torch.float64)
    loss_fn = lambda w: 0.5 * w @ (a @ a.T / num_params) @ w + w.sum()
    w0 = torch.randn(num_params, generator=g, dtype=torch.float64)

    model = Vector(w0)
    opt = PSGD(model.parameters(), Subspace(basis, slice(0, num_params)), lr=lr, momentum=momentum)
    w, buf = w0.clone(), torch.zeros(num_params, dtype=torch.float64)
    for k in range(6):
        opt.step(_closure(opt, model, loss_fn))
        w_req = w.clone().requires_grad_(True)
        grad = torch.autograd.grad(loss_fn(w_req), w_req)[0]
        buf = basis @ (basis.T @ grad) + (momentum * buf if k else 0)
        w = w - lr * buf
    torch.testing.assert_close(model.w.detach(), w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(basis @ opt.state[model.w]["coords"], w - w0, rtol=1e-10, atol=1e-12)


def test_non_finite_loss_stops_pbfgs_before_any_update():
    model = Vector(torch.ones(2, dtype=torch.float64))
    opt = PBFGS(model.parameters(), Subspace(torch.eye(2, dtype=torch.float64), slice(0, 2)))
    with pytest.raises(FloatingPointError):
        opt.step(_closure(opt, model, lambda w: w.sum() * float("nan")))
    torch.testing.assert_close(model.w.detach(), torch.ones(2, dtype=torch.float64))


def test_projection_of_a_long_float32_gradient_matches_float64_over_shards():
    # 1M rows (not a multiple of the 256-row blocks), cut into two shards: one float32 dot product
    # this long is off by about 1e-5; the blocked sums must stay near float32's own rounding
    g = torch.Generator().manual_seed(0)
    rows, dim = 1_000_003, 3
    basis = torch.randn(rows, dim, generator=g)
    grad = torch.randn(rows, generator=g)
    expected = basis.double().T @ grad.double()
    cut = 400_001
    projected = sum(Subspace(basis[shard], shard).project(grad) for shard in (slice(0, cut), slice(cut, rows)))
    assert projected.dtype == torch.float64
    assert (projected - expected).abs().max() / expected.abs().max() < 1e-6
