"""GradientPenalty, igr_strength, flood: the identities of spec/dynamics.md §3 and the wrapper contract."""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import danlu
from danlu.wrappers.gradient_penalty import GradientPenalty, flood, igr_strength

METHODS = ("finite_difference", "double_backward")
INNERS = {
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01),
    "Lion": lambda ps: danlu.Lion(ps, lr=1e-3, weight_decay=0.1),
}


# --- helpers ---------------------------------------------------------------------------------------


def mlp_problem(dtype: torch.dtype = torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(32, 4, generator=g, dtype=torch.float64)
    y = torch.sin(X @ torch.randn(4, 1, generator=g, dtype=torch.float64))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    return model.to(dtype), X.to(dtype), y.to(dtype)


def closure_with_backward(model, opt, X, y, log=None):
    """The usual torch/Lightning closure: zero_grad, forward, backward, return the loss."""

    def closure():
        if log is not None:
            log.append([p.detach().clone() for p in model.parameters()])
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(X), y)
        loss.backward()
        return loss

    return closure


def closure_without_backward(model, X, y, log=None):
    def closure():
        if log is not None:
            log.append([p.detach().clone() for p in model.parameters()])
        return F.mse_loss(model(X), y)

    return closure


def snapshot(model_or_params):
    ps = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    return [p.detach().clone() for p in ps]


def assert_bitwise(a, b, what="params"):
    assert len(a) == len(b)
    for i, (x, z) in enumerate(zip(a, b)):
        assert x.dtype == z.dtype and torch.equal(x, z), f"{what}[{i}] differ (max {(x - z).abs().max()})"


def penalised_grad(model, X, y, strength, method):
    """The gradient the wrapper hands to its inner optimizer (SGD at lr 0 leaves θ and .grad as is)."""
    opt = GradientPenalty(torch.optim.SGD(model.parameters(), lr=0.0), strength, method=method)
    opt.step(closure_without_backward(model, X, y))
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


# L = ½(y − a·b·x)² with a and b separate tensors, so ‖∇L‖² spans two tensors jointly.
def scalar_pair(a: float, b: float):
    return (torch.tensor(a, dtype=torch.float64, requires_grad=True),
            torch.tensor(b, dtype=torch.float64, requires_grad=True))


def pair_loss(a, b, x=1.0, y=1.0):
    return 0.5 * (y - a * b * x) ** 2


def pair_grad_np(theta, lam, x=1.0, y=1.0):
    """Analytic ∇[L + λ‖∇L‖²] for L = ½(y − abx)², r = y − abx, ‖∇L‖² = r²x²(a² + b²)."""
    a, b = theta
    r = y - a * b * x
    g = np.array([-r * b * x, -r * a * x])
    grad_pen = np.array([
        -2 * r * b * x**3 * (a * a + b * b) + 2 * a * r * r * x * x,
        -2 * r * a * x**3 * (a * a + b * b) + 2 * b * r * r * x * x,
    ])
    return g + lam * grad_pen


def rk4_flow(theta0, T, lam, n=64, **kw):
    """Gradient flow θ' = −∇[L + λ‖∇L‖²] by fixed-step RK4 in float64."""
    th = np.array(theta0, dtype=np.float64)
    dt = T / n
    f = lambda t: -pair_grad_np(t, lam, **kw)  # noqa: E731
    for _ in range(n):
        k1 = f(th)
        k2 = f(th + dt / 2 * k1)
        k3 = f(th + dt / 2 * k2)
        k4 = f(th + dt * k3)
        th = th + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return th


# --- the penalised gradient ------------------------------------------------------------------------


def test_double_backward_is_the_exact_penalised_gradient():
    lam, x, y = 0.07, 1.3, 0.4
    for a0, b0 in [(1.5, 0.2), (-0.7, 0.9), (0.3, -1.1)]:
        a, b = scalar_pair(a0, b0)
        opt = GradientPenalty(torch.optim.SGD([a, b], lr=0.0), lam, method="double_backward")
        opt.step(lambda: pair_loss(a, b, x, y))
        got = np.array([a.grad.item(), b.grad.item()])
        np.testing.assert_allclose(got, pair_grad_np((a0, b0), lam, x, y), rtol=1e-13, atol=1e-15)


def test_finite_difference_and_double_backward_agree_to_second_order():
    model, X, y = mlp_problem()
    plain = penalised_grad(copy.deepcopy(model), X, y, 0.0, "double_backward")
    lams = [2e-2, 1e-2, 5e-3, 2.5e-3, 1e-3, 1e-4]
    err, pen = [], []
    for lam in lams:
        fd = penalised_grad(copy.deepcopy(model), X, y, lam, "finite_difference")
        db = penalised_grad(copy.deepcopy(model), X, y, lam, "double_backward")
        err.append(float((fd - db).norm()))
        pen.append(float((db - plain).norm()))
    # The penalty term itself is first order in λ ...
    for i in range(3):
        assert 1.9 < pen[i] / pen[i + 1] < 2.1, pen
    # ... and the finite-difference error second order: ~4× per halving, ~100× per decade.
    for i in range(3):
        assert 3.5 < err[i] / err[i + 1] < 4.5, err
    assert 80 < err[4] / err[5] < 125, err
    assert err[1] < 0.05 * pen[1]


def test_finite_difference_on_the_two_parameter_problem_is_second_order():
    lam_err = []
    for lam in (1e-2, 1e-3):
        a, b = scalar_pair(1.5, 0.2)
        opt = GradientPenalty(torch.optim.SGD([a, b], lr=0.0), lam)
        opt.step(lambda: pair_loss(a, b))
        got = np.array([a.grad.item(), b.grad.item()])
        lam_err.append(np.linalg.norm(got - pair_grad_np((1.5, 0.2), lam)))
    assert 80 < lam_err[0] / lam_err[1] < 125, lam_err


def test_linear_loss_has_no_penalty_gradient():
    w = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([0.5, 0.25, -1.0], dtype=torch.float64)
    for method in METHODS:
        w.grad = None  # the previous wrapper's gradient did not come from this wrapper's closure
        opt = GradientPenalty(torch.optim.SGD([w], lr=0.0), 0.3, method=method)
        opt.step(lambda: (w * c).sum())
        assert torch.equal(w.grad, c)


# --- gradient descent's implicit regularization (spec §3.1, §3.3) -----------------------------------


def test_gd_shrinks_a2_minus_b2_by_exactly_one_minus_h2_r2_x2():
    h, x, y = 0.3, 1.2, 0.5
    a, b = scalar_pair(1.5, 0.2)
    opt = GradientPenalty(torch.optim.SGD([a, b], lr=h), 0.0)  # strength 0: plain gradient descent
    for _ in range(20):
        d_before = (a * a - b * b).item()
        r = (y - a * b * x).item()
        opt.step(lambda: pair_loss(a, b, x, y))
        d_after = (a * a - b * b).item()
        assert d_after == pytest.approx(d_before * (1 - h * h * r * r * x * x), rel=1e-12, abs=1e-15)


def test_gradient_flow_conserves_a2_minus_b2():
    theta0 = (1.5, 0.2)
    end = rk4_flow(theta0, T=5.0, lam=0.0, n=5000, x=1.2, y=0.5)
    before, after = theta0[0] ** 2 - theta0[1] ** 2, end[0] ** 2 - end[1] ** 2
    assert abs(after - before) <= 1e-10
    assert abs(end[0] * end[1] * 1.2 - 0.5) < 1e-3  # it did travel to the minimum


def test_penalised_flow_shrinks_a2_minus_b2_at_rate_h_r2_x2():
    """With λ = igr_strength(h), d/dt(a² − b²) = −h·r²x²·(a² − b²) exactly (GD's rate to leading order)."""
    h, x, y = 0.2, 1.2, 0.5
    lam = igr_strength(h)
    for a0, b0 in [(1.5, 0.2), (0.4, -0.9)]:
        a, b = scalar_pair(a0, b0)
        opt = GradientPenalty(torch.optim.SGD([a, b], lr=0.0), lam, method="double_backward")
        opt.step(lambda: pair_loss(a, b, x, y))
        rate = -2 * a0 * a.grad.item() + 2 * b0 * b.grad.item()
        r = y - a0 * b0 * x
        assert rate == pytest.approx(-h * r * r * x * x * (a0 * a0 - b0 * b0), rel=1e-12)


def test_gd_follows_the_penalised_flow_to_third_order():
    """Spec §3.3 numbers: ‖GD(h) − flow_L(h)‖ is O(h²) and ‖GD(h) − flow_L̃(h)‖ is O(h³),
    L̃ = L + (h/4)‖∇L‖², L = ½(1 − ab)², θ₀ = (1.5, 0.2); flows by fixed-step RK4 in float64."""
    theta0 = np.array([1.5, 0.2])
    hs = [0.1, 0.05, 0.025, 0.0125]
    spec_plain = [1.09e-2, 2.83e-3, 7.2e-4, 1.8e-4]
    spec_igr = [1.67e-3, 2.2e-4, 2.8e-5, 3.5e-6]
    plain, igr = [], []
    for h in hs:
        a, b = scalar_pair(*theta0)
        GradientPenalty(torch.optim.SGD([a, b], lr=h), 0.0).step(lambda: pair_loss(a, b))
        gd = np.array([a.item(), b.item()])
        plain.append(np.linalg.norm(gd - rk4_flow(theta0, h, 0.0)))
        igr.append(np.linalg.norm(gd - rk4_flow(theta0, h, igr_strength(h))))
    np.testing.assert_allclose(plain, spec_plain, rtol=0.03)
    np.testing.assert_allclose(igr, spec_igr, rtol=0.03)
    for i in range(3):
        assert 1.8 < math.log2(plain[i] / plain[i + 1]) < 2.1
        assert 2.8 < math.log2(igr[i] / igr[i + 1]) < 3.1


def test_explicit_penalty_at_small_lr_moves_toward_the_large_lr_end_point():
    """GD at H ends more balanced (smaller a² − b², lower sharpness a² + b²) than GD at h ≪ H; adding
    igr_strength(H) explicitly at h recovers that shift (FD method, L = ½(1 − ab)²)."""
    H, h = 0.2, 0.05

    def run(lr, strength, steps):
        a, b = scalar_pair(1.5, 0.2)
        opt = GradientPenalty(torch.optim.SGD([a, b], lr=lr), strength)
        for _ in range(steps):
            opt.step(lambda: pair_loss(a, b))
        return a.item() ** 2 - b.item() ** 2, a.item() ** 2 + b.item() ** 2

    big, small, explicit = run(H, 0.0, int(40 / H)), run(h, 0.0, int(40 / h)), run(h, igr_strength(H), int(40 / h))
    assert big[0] < small[0] and big[1] < small[1]
    recovered = (small[0] - explicit[0]) / (small[0] - big[0])
    assert 0.5 < recovered < 1.5, recovered
    assert explicit[1] < small[1]


# --- flooding --------------------------------------------------------------------------------------


def test_flood_value_and_gradient_sign():
    w = torch.tensor([0.4, -0.3], dtype=torch.float64, requires_grad=True)
    loss_fn = lambda: (w**2).sum() + w[0]  # noqa: E731
    base = loss_fn()
    (g,) = torch.autograd.grad(base, w)
    L = base.item()
    for level, sign in [(L - 0.1, 1.0), (L + 0.1, -1.0), (0.0, 1.0), (10.0, -1.0)]:
        out = flood(loss_fn(), level)
        assert out.item() == pytest.approx(L if L >= level else 2 * level - L, rel=1e-15)
        (gf,) = torch.autograd.grad(out, w)
        assert torch.equal(gf, sign * g)
    assert flood(0.3, 0.1) == pytest.approx(0.3) and flood(0.05, 0.1) == pytest.approx(0.15)


def _two_step_displacement(theta0: torch.Tensor, eps: float, order: str) -> torch.Tensor:
    def loss_fn(t):
        return torch.log(torch.cosh(t @ torch.tensor([[1.0, 0.5], [-0.3, 1.2], [0.7, -0.4]], dtype=t.dtype)
                                    - 0.2)).sum() + 0.1 * (t**4).sum()

    theta = theta0.clone().requires_grad_()
    opt = torch.optim.SGD([theta], lr=eps)
    # level far below the loss: flood = L (descent); far above: flood = 2b − L (ascent)
    levels = {"descent": -1e3, "ascent": 1e3}
    for kind in (("descent", "ascent") if order == "descent_first" else ("ascent", "descent")):
        opt.zero_grad()
        flood(loss_fn(theta), levels[kind]).backward()
        opt.step()
    return theta.detach() - theta0, loss_fn


@pytest.mark.parametrize("order", ["descent_first", "ascent_first"])
def test_flood_descent_plus_ascent_is_gradient_descent_on_grad_norm(order):
    """Spec §3.3: one descent and one ascent step of lr ε move θ by −(ε²/2)∇‖g‖² + O(ε³), either order."""
    theta0 = torch.tensor([0.3, -0.8, 0.5], dtype=torch.float64)
    _, loss_fn = _two_step_displacement(theta0, 0.1, order)
    t = theta0.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss_fn(t), t, create_graph=True)
    (grad_norm2,) = torch.autograd.grad(g.square().sum(), t)
    errs = []
    for eps in (0.04, 0.02, 0.01):
        disp, _ = _two_step_displacement(theta0, eps, order)
        target = -(eps**2 / 2) * grad_norm2
        errs.append(float((disp - target).norm()))
        assert errs[-1] < 0.2 * float(target.norm())
    for i in range(2):
        assert 7.0 < errs[i] / errs[i + 1] < 9.0, errs  # O(ε³)


def test_flooded_training_loss_hovers_at_the_level():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 8, generator=g, dtype=torch.float64)
    y = X @ torch.randn(8, 1, generator=g, dtype=torch.float64)
    level = 0.05
    finals = {}
    for flooded in (False, True):
        w = torch.zeros(8, 1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.SGD([w], lr=0.05)
        losses = []
        for _ in range(600):
            opt.zero_grad()
            loss = F.mse_loss(X @ w, y)
            losses.append(loss.item())
            (flood(loss, level) if flooded else loss).backward()
            opt.step()
        finals[flooded] = losses[-100:]
    assert max(finals[False]) < 0.1 * level
    assert 0.8 * level < min(finals[True]) and max(finals[True]) < 1.2 * level
    assert sum(finals[True]) / 100 == pytest.approx(level, rel=0.02)


# --- the wrapper: equivalences ---------------------------------------------------------------------


@pytest.mark.parametrize("inner", list(INNERS))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("with_backward", [True, False])
def test_strength_zero_is_the_inner_optimizer_bitwise(inner, method, with_backward):
    model, X, y = mlp_problem(torch.float32)
    model2 = copy.deepcopy(model)
    ref = INNERS[inner](model2.parameters())
    opt = GradientPenalty(INNERS[inner](model.parameters()), 0.0, method=method)
    calls = []
    base = closure_with_backward(model, opt, X, y) if with_backward else closure_without_backward(model, X, y)

    def closure():
        calls.append(1)
        return base()

    for _ in range(4):
        out = opt.step(closure)
        out2 = ref.step(closure_with_backward(model2, ref, X, y))
        assert torch.equal(out.detach(), out2.detach())
    assert len(calls) == 4
    assert_bitwise(snapshot(model), snapshot(model2))


@pytest.mark.parametrize("inner", list(INNERS))
def test_finite_difference_step_is_inner_step_on_the_gradient_at_the_shifted_point(inner):
    """θ is restored exactly between the passes: the wrapper's step equals inner.step() at θ with
    .grad = ∇L(θ + 2λg), computed by hand on a twin."""
    lam = 0.05
    model, X, y = mlp_problem(torch.float32)
    model2 = copy.deepcopy(model)
    log = []
    opt = GradientPenalty(INNERS[inner](model.parameters()), lam)
    twin = INNERS[inner](model2.parameters())
    closure = closure_with_backward(model, opt, X, y, log)
    for _ in range(3):
        log.clear()
        theta = snapshot(model2)
        expected_loss = F.mse_loss(model2(X), y).detach()
        loss = opt.step(closure)

        ps = list(model2.parameters())
        twin.zero_grad()
        F.mse_loss(model2(X), y).backward()
        with torch.no_grad():
            for p in ps:
                p.add_(p.grad, alpha=2 * lam)
        shifted = snapshot(ps)
        twin.zero_grad()
        F.mse_loss(model2(X), y).backward()
        with torch.no_grad():
            for p, t in zip(ps, theta):
                p.copy_(t)
        twin.step()

        assert len(log) == 2
        assert_bitwise(log[0], theta, "params seen by the first pass")
        assert_bitwise(log[1], shifted, "params seen by the second pass")
        assert torch.equal(loss.detach(), expected_loss), "step returns the loss at θ"
        assert_bitwise(snapshot(model), snapshot(model2))
        for p, q in zip(model.parameters(), model2.parameters()):
            assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", METHODS)
def test_parameters_restored_exactly(dtype, method):
    model, X, y = mlp_problem(dtype)
    log = []
    opt = GradientPenalty(torch.optim.SGD(model.parameters(), lr=0.0), 0.1, method=method)
    before = snapshot(model)
    opt.step(closure_without_backward(model, X, y, log))
    assert_bitwise(snapshot(model), before)
    if method == "finite_difference":
        assert any(not torch.equal(s, b) for s, b in zip(log[1], before)), "the second pass saw θ + 2λg"
    assert all(p.grad.dtype == dtype for p in model.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_closure_with_or_without_backward_and_lightning_style_agree(method):
    results = []
    kinds = ["without", "with", "lightning"] if method == "finite_difference" else ["without"]
    for kind in kinds:
        model, X, y = mlp_problem(torch.float32)
        opt = GradientPenalty(torch.optim.AdamW(model.parameters(), lr=1e-2), 0.05, method=method)
        if kind == "without":
            closure = closure_without_backward(model, X, y)
        elif kind == "with":
            closure = closure_with_backward(model, opt, X, y)
        else:
            def closure():  # Lightning: zero_grad through the optimizer, backward, detached loss back
                opt.zero_grad()
                loss = F.mse_loss(model(X), y)
                loss.backward()
                return loss.detach()
        losses = [float(opt.step(closure).detach()) for _ in range(3)]
        results.append((snapshot(model), losses))
    for params, losses in results[1:]:
        assert_bitwise(params, results[0][0])
        assert losses == results[0][1]


@pytest.mark.parametrize("method", METHODS)
def test_step_returns_the_loss_at_theta_runs_the_closure_with_grad_and_counts_passes(method):
    model, X, y = mlp_problem()
    opt = GradientPenalty(torch.optim.SGD(model.parameters(), lr=0.1), 0.02, method=method)
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        return F.mse_loss(model(X), y)

    expected = F.mse_loss(model(X), y)
    with torch.no_grad():
        out = opt.step(closure)
    assert torch.equal(out.detach(), expected.detach())
    assert seen == [True] * (2 if method == "finite_difference" else 1)
    sentinel = torch.tensor(123.0)
    before = snapshot(model)
    assert opt.step(lambda: sentinel) is sentinel  # no gradient at all: nothing moves
    assert_bitwise(snapshot(model), before)


@pytest.mark.parametrize("method", METHODS)
def test_parameter_without_grad_is_skipped(method):
    model, X, y = mlp_problem()
    unused = nn.Parameter(torch.randn(3, dtype=torch.float64))
    frozen = nn.Parameter(torch.randn(2, dtype=torch.float64), requires_grad=False)
    opt = GradientPenalty(torch.optim.AdamW([*model.parameters(), unused, frozen], lr=0.1), 0.05, method=method)
    log = []

    def closure():
        log.append((unused.detach().clone(), frozen.detach().clone()))
        return F.mse_loss(model(X), y)

    u0, f0 = unused.detach().clone(), frozen.detach().clone()
    for _ in range(2):
        opt.step(closure)
    assert torch.equal(unused, u0) and torch.equal(frozen, f0)
    assert unused.grad is None and frozen.grad is None
    assert all(torch.equal(u, u0) and torch.equal(f, f0) for u, f in log)
    assert unused not in opt.optimizer.state


@pytest.mark.parametrize("inner", list(INNERS))
@pytest.mark.parametrize("method", METHODS)
def test_training_reduces_the_loss(inner, method):
    model, X, y = mlp_problem(torch.float32)
    opt = GradientPenalty(INNERS[inner](model.parameters()), 0.01, method=method)
    if inner == "Lion":
        opt.param_groups[0]["lr"] = 1e-2
    closure = closure_without_backward(model, X, y)
    first = float(closure().detach())
    for _ in range(40):
        last = float(opt.step(closure).detach())
    assert last < 0.5 * first


# --- the wrapper: state, copies, schedulers ---------------------------------------------------------


def test_state_dict_round_trip_bitwise_lockstep():
    model, X, y = mlp_problem(torch.float32)
    opt = GradientPenalty(torch.optim.AdamW(model.parameters(), lr=1e-2), 0.03)
    closure = closure_with_backward(model, opt, X, y)
    for _ in range(3):
        opt.step(closure)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert {"state", "param_groups", "danlu_gradient_penalty"} <= set(sd) and not {"wrapper", "inner"} & set(sd)
    assert sd["danlu_gradient_penalty"]["type"] == "GradientPenalty"
    assert sd["danlu_gradient_penalty"]["hyper"] == {"strength": 0.03, "method": "finite_difference"}

    model2 = copy.deepcopy(model)
    opt2 = GradientPenalty(torch.optim.AdamW(model2.parameters(), lr=1e-2), 0.5, method="double_backward")
    opt2.load_state_dict(sd)
    assert opt2.strength == 0.03 and opt2.method == "finite_difference"
    closure2 = closure_with_backward(model2, opt2, X, y)
    for _ in range(3):
        opt.step(closure)
        opt2.step(closure2)
        assert_bitwise(snapshot(model2), snapshot(model))


def test_state_dict_with_bad_hyperparameter_is_refused_before_any_change():
    model, X, y = mlp_problem(torch.float32)
    opt = GradientPenalty(torch.optim.AdamW(model.parameters(), lr=1e-2), 0.03)
    opt.step(closure_without_backward(model, X, y))
    sd = copy.deepcopy(opt.state_dict())
    sd["danlu_gradient_penalty"]["hyper"]["strength"] = -1.0
    sd["param_groups"][0]["lr"] = 0.5
    with pytest.raises(ValueError, match=r"Invalid strength: -1\.0"):
        opt.load_state_dict(sd)
    assert opt.strength == 0.03 and opt.param_groups[0]["lr"] == 1e-2


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_continue_identically(how):
    model, X, y = mlp_problem(torch.float32)
    opt = GradientPenalty(danlu.Lion(model.parameters(), lr=1e-3), 0.02)
    opt.step(closure_without_backward(model, X, y))
    model2, opt2 = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    assert opt2.optimizer is not opt.optimizer and opt2.strength == 0.02
    assert opt2.param_groups[0]["params"][0] is next(model2.parameters())
    for _ in range(3):
        opt.step(closure_without_backward(model, X, y))
        opt2.step(closure_without_backward(model2, X, y))
    assert_bitwise(snapshot(model2), snapshot(model))


def test_lr_scheduler_on_the_wrapper_changes_the_inner_lr():
    model, X, y = mlp_problem(torch.float32)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = GradientPenalty(inner, 0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k in range(3):
            opt.step(closure_without_backward(model, X, y))
            sched.step()
            assert inner.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** (k + 1))
    # and the step uses it: lr 0 stops all movement
    opt.param_groups[0]["lr"] = 0.0
    before = snapshot(model)
    opt.step(closure_without_backward(model, X, y))
    assert_bitwise(snapshot(model), before)


def test_strength_can_be_changed_between_steps():
    model, X, y = mlp_problem()
    opt = GradientPenalty(torch.optim.SGD(model.parameters(), lr=0.0), 0.0)
    calls = []
    opt.step(lambda: calls.append(1) or F.mse_loss(model(X), y))
    opt.strength = igr_strength(0.4)
    opt.step(lambda: calls.append(1) or F.mse_loss(model(X), y))
    assert len(calls) == 3 and opt.strength == 0.1
    assert "strength=0.1" in repr(opt) and "SGD" in repr(opt)


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("strength", [0.0, 0.1])
@pytest.mark.parametrize("closure", [None, "loss", 3.0])
def test_missing_closure_raises_before_any_change(method, strength, closure):
    model, X, y = mlp_problem()
    opt = GradientPenalty(torch.optim.AdamW(model.parameters(), lr=0.1), strength, method=method)
    F.mse_loss(model(X), y).backward()
    grads = [p.grad for p in model.parameters()]
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"^GradientPenalty\.step needs a closure"):
        opt.step(closure) if closure is not None else opt.step()
    assert_bitwise(snapshot(model), before)
    assert all(p.grad is g for p, g in zip(model.parameters(), grads)), "grads were touched"
    assert len(opt.optimizer.state) == 0


def test_double_backward_refuses_a_closure_that_calls_backward():
    model, X, y = mlp_problem()
    opt = GradientPenalty(torch.optim.AdamW(model.parameters(), lr=0.1), 0.1, method="double_backward")
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"WITHOUT calling backward"):
        opt.step(closure_with_backward(model, opt, X, y))
    assert_bitwise(snapshot(model), before)
    assert len(opt.optimizer.state) == 0


def test_inner_with_fused_backward_hooks_is_refused_before_any_change():
    model, X, y = mlp_problem(torch.float32)
    inner = danlu.SGDM(model.parameters(), lr=0.1, accum_steps=2)
    opt = GradientPenalty(inner, 0.1)
    before = snapshot(model)
    with inner.fuse_into_backward():
        with pytest.raises(RuntimeError, match=r"fuse_into_backward\(\) hooks are active"):
            opt.step(closure_without_backward(model, X, y))
    assert_bitwise(snapshot(model), before)
    assert len(inner.state) == 0


def test_accumulating_inner_absorbs_the_penalised_gradient():
    """With accum_steps=2 the wrapper's two micro-steps equal the inner optimizer fed the same
    penalised gradients by hand (FD gradients taken on a twin)."""
    lam = 0.05
    model, X, y = mlp_problem(torch.float32)
    model2 = copy.deepcopy(model)
    opt = GradientPenalty(danlu.SGDM(model.parameters(), lr=0.1, accum_steps=2), lam)
    twin = danlu.SGDM(model2.parameters(), lr=0.1, accum_steps=2)
    halves = [(X[:16], y[:16]), (X[16:], y[16:])]
    for Xb, yb in halves * 2:
        opt.step(closure_without_backward(model, Xb, yb))
        ps = list(model2.parameters())
        twin.zero_grad()
        F.mse_loss(model2(Xb), yb).backward()
        theta = snapshot(ps)
        with torch.no_grad():
            for p in ps:
                p.add_(p.grad, alpha=2 * lam)
        twin.zero_grad()
        F.mse_loss(model2(Xb), yb).backward()
        with torch.no_grad():
            for p, t in zip(ps, theta):
                p.copy_(t)
        twin.step()
        assert opt.optimizer.is_update_step == twin.is_update_step
        assert_bitwise(snapshot(model), snapshot(model2))


@pytest.mark.parametrize("thing", ["params", "model", "list", "lbfgs"])
def test_wrapping_something_that_is_not_an_optimizer_is_refused(thing):
    model = nn.Linear(3, 1)
    arg = {
        "params": lambda: model.parameters(),
        "model": lambda: model,
        "list": lambda: list(model.parameters()),
        "lbfgs": lambda: torch.optim.LBFGS(model.parameters()),
    }[thing]()
    regex = r"LBFGS .*not supported" if thing == "lbfgs" else r"wraps a torch\.optim\.Optimizer"
    with pytest.raises(TypeError, match=regex):
        GradientPenalty(arg, 0.1)


@pytest.mark.parametrize(
    "kwargs, exc, regex",
    [
        ({"strength": -0.1}, ValueError, r"^Invalid strength: -0\.1 \(expected a number in \[0, inf\]\)$"),
        ({"strength": float("nan")}, ValueError, r"^Invalid strength: nan \(expected a finite number"),
        ({"strength": float("inf")}, ValueError, r"^Invalid strength: inf \(expected a finite number"),
        ({"strength": "0.1"}, TypeError, r"^Invalid strength: '0\.1' \(expected a real number\)$"),
        ({"strength": True}, TypeError, r"^Invalid strength: True \(expected a real number\)$"),
        ({"strength": torch.tensor(0.1)}, TypeError,
         r"^Invalid strength: tensor\(0\.1000\) \(expected a Python number"),
        ({"strength": 0.1, "method": "fd"}, ValueError,
         r"^Invalid method: 'fd' \(expected one of 'finite_difference', 'double_backward'\)$"),
        ({"strength": 0.1, "method": None}, TypeError, r"^Invalid method: None \(expected one of "),
        ({"strength": 0.1, "lr": 0.1}, TypeError, r"unexpected keyword argument 'lr'"),
        ({}, TypeError, r"missing 1 required positional argument: 'strength'"),
    ],
)
def test_bad_hyperparameters(kwargs, exc, regex):
    inner = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    with pytest.raises(exc, match=regex):
        GradientPenalty(inner, **kwargs)


def test_bad_values_assigned_later_are_refused():
    opt = GradientPenalty(torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1), 0.1)
    with pytest.raises(ValueError, match=r"^Invalid strength: -1 "):
        opt.strength = -1
    with pytest.raises(ValueError, match=r"^Invalid method: 'exact' "):
        opt.method = "exact"
    assert opt.strength == 0.1 and opt.method == "finite_difference"


def test_igr_strength():
    assert igr_strength(0.1) == 0.025 and igr_strength(0) == 0.0
    with pytest.raises(ValueError, match=r"^Invalid lr: -0\.1 \(expected a number in \[0, inf\]\)$"):
        igr_strength(-0.1)
    with pytest.raises(ValueError, match=r"^Invalid lr: nan \(expected a finite number"):
        igr_strength(float("nan"))
    with pytest.raises(TypeError, match=r"^Invalid lr: '0\.1' \(expected a real number\)$"):
        igr_strength("0.1")


@pytest.mark.parametrize(
    "level, exc, regex",
    [
        (float("nan"), ValueError, r"^Invalid level: nan \(expected a finite number in \[-inf, inf\]\)$"),
        (float("inf"), ValueError, r"^Invalid level: inf \(expected a finite number"),
        ("0.1", TypeError, r"^Invalid level: '0\.1' \(expected a real number\)$"),
        (None, TypeError, r"^Invalid level: None \(expected a real number\)$"),
    ],
)
def test_flood_bad_level(level, exc, regex):
    with pytest.raises(exc, match=regex):
        flood(torch.tensor(0.3), level)
