"""MGS and sampling_step: the sampling view and MLE-guided search of spec/dynamics.md §5.

The update is checked against what the task loss saw: ``task_loss`` is called at θ (c₀) and then at
θ + ε_i for each candidate, so recording the parameters inside it gives every ε_i without reaching into
the optimizer. With SGD at lr 1 and no clipping the inner step is θ ← θ + Δ, so Δ = Σ w_i ε_i is
checked on the parameters themselves.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import statistics

import pytest
import torch
import torch.nn.functional as F

from danlu.zeroth.mgs import MGS, sampling_step

F64 = torch.float64


# --- helpers ---------------------------------------------------------------------------------------


def make_params(dtype=F64, seed=0, shapes=((3, 4), (4,))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=F64).to(dtype).requires_grad_() for s in shapes]


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in params])


def surrogate_for(params, target=0.3):
    """A smooth surrogate whose closure calls backward itself (the usual torch closure)."""

    def closure():
        for p in params:
            p.grad = None
        xs = [p.float() if p.dtype in (torch.bfloat16, torch.float16) else p for p in params]
        loss = sum(((x - target) ** 2).sum() + 0.1 * (x**4).sum() for x in xs)
        loss.backward()
        return loss

    return closure


def surrogate_grad(params, target=0.3) -> torch.Tensor:
    """∇ of :func:`surrogate_for`'s loss, flattened, float64."""
    return torch.cat([(2 * (p.detach().double() - target) + 0.4 * p.detach().double() ** 3).reshape(-1)
                      for p in params])


class Recorder:
    """A task loss (Σ|θ − 0.1| by default) that logs the parameters and value of every call."""

    def __init__(self, params, fn=None, offset=0.0):
        self.params, self.offset = params, offset
        self.fn = fn or (lambda: float(sum((p.double() - 0.1).abs().sum() for p in params)))
        self.thetas, self.values = [], []

    def __call__(self):
        self.thetas.append(flat(self.params))
        value = self.fn() + self.offset
        self.values.append(value)
        return value

    def epsilons(self) -> list[torch.Tensor]:
        return [t - self.thetas[0] for t in self.thetas[1:]]


def sgd_mgs(params, **kwargs):
    """MGS over SGD at lr 1 with clipping off: the step is θ ← θ + Δ."""
    kwargs.setdefault("max_grad_norm", None)
    return MGS(None, torch.optim.SGD(params, lr=1.0), **kwargs)


def ref_log_q(eps: torch.Tensor, a: torch.Tensor, pi: float = 0.5) -> torch.Tensor:
    """The reference's density: log[π·e^{−½‖ε−a‖²} + (1−π)·e^{−½‖ε‖²}] (unit variances)."""
    return torch.logaddexp(math.log(pi) - 0.5 * (eps - a).square().sum(),
                           math.log(1 - pi) - 0.5 * eps.square().sum())


# --- the sampling view (sampling_step) --------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 0.1])
def test_sampling_step_recovers_the_newton_step_on_a_quadratic(alpha):
    """Spec §5.4 [N]: l = gᵀΔ + ½ΔᵀAΔ, proposal N(0, 4I), n = 2e5 ⇒ Δ* ≈ −A⁻¹g (p = N(−A⁻¹g, αA⁻¹)).
    Over 20 seeds the estimate's SE is about 0.003 and 0.005 per coordinate at α = 0.5; tolerance 0.03."""
    A = torch.tensor([[3.0, 0.5], [0.5, 1.0]], dtype=F64)
    g = torch.tensor([1.0, -2.0], dtype=F64)
    newton = -torch.linalg.solve(A, g)  # (−0.7273, 2.3636)
    est = sampling_step(
        loss_fn=lambda D: D @ g + 0.5 * ((D @ A) * D).sum(1),
        proposal_sampler=lambda n, gen: 2.0 * torch.randn(n, 2, generator=gen, dtype=F64),
        log_q=lambda D: -D.square().sum(1) / 8.0,
        alpha=alpha,
        n=200_000,
        generator=torch.Generator().manual_seed(0),
    )
    assert est.dtype == F64 and est.shape == (2,)
    assert (est - newton).abs().max() < 0.03, (est, newton)
    # Not a gradient step: the Newton point is 0.40 away from the line of −g (9° off it).
    u = g / g.norm()
    assert (est - (est @ u) * u).norm() > 0.3


def test_sampling_step_first_order_in_a_ball():
    """Spec §5.4: linear l, uniform proposal in the ε-ball ⇒ Δ* ∥ −g; ‖Δ*‖ → ε as α → 0, → 0 as α → ∞."""
    g = torch.tensor([0.3, -1.0, 2.0], dtype=F64)
    eps = 0.5

    def ball(n, gen):
        z = torch.randn(n, 3, generator=gen, dtype=F64)
        r = eps * torch.rand(n, 1, generator=gen, dtype=F64) ** (1 / 3)
        return z / z.norm(dim=1, keepdim=True) * r

    def run(alpha):
        return sampling_step(lambda D: D @ g, ball, None, alpha, 100_000, torch.Generator().manual_seed(1))

    for alpha in (1e-3, 1e-1):
        d = run(alpha)
        assert float(d @ -g / (d.norm() * g.norm())) > 0.99
    assert run(1e-3).norm() > 0.9 * eps
    assert run(1e3).norm() < 0.05 * eps


@pytest.mark.parametrize(
    "kwargs, regex",
    [
        (dict(alpha=0.0), r"^Invalid alpha: 0\.0 \(expected a number in \(0, inf\]\)$"),
        (dict(n=0), r"^Invalid n: 0 \(expected a number in \[1, inf\]\)$"),
    ],
)
def test_sampling_step_validates(kwargs, regex):
    args = dict(loss_fn=lambda D: D.sum(1), proposal_sampler=lambda n, g: torch.zeros(n, 2), log_q=None,
                alpha=1.0, n=4)
    with pytest.raises(ValueError, match=regex):
        sampling_step(**{**args, **kwargs})


def _zo_samples(estimator: str, sigma: float, m: int, seed: int):
    """danlu.ZeroOrder's own estimate ĝ on a piecewise-constant f, with every step Δ = θ' − θ it evaluated
    f at (read off the parameters inside the closure) and f(θ + Δ) there."""
    from danlu.zeroth.zero_order import ZeroOrder

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 5, generator=gen, dtype=F64)
    y = (x @ torch.randn(5, generator=gen, dtype=F64) > 0).to(F64)
    theta = torch.randn(5, generator=gen, dtype=F64).requires_grad_()
    theta0 = theta.detach().clone()

    def error(t: torch.Tensor) -> float:  # the 0-1 error: piecewise constant, no gradient anywhere
        return float(((x @ t > 0).to(F64) != y).to(F64).mean())

    steps, values = [], []

    def closure() -> float:
        steps.append(theta.detach() - theta0)
        values.append(error(theta.detach()))
        return values[-1]

    kw = {} if estimator == "two_sided" else {"baseline": "mean"}
    zo = ZeroOrder([theta], sigma=sigma, samples=m, estimator=estimator, seed=seed,
                   optimizer=torch.optim.SGD([theta], lr=0.0), **kw)
    zo.step(closure)
    g_hat = theta.grad.detach().clone()
    D = torch.stack(steps)
    return D, torch.tensor(values, dtype=F64), g_hat, lambda S: torch.tensor([error(theta0 + d) for d in S], dtype=F64)


@pytest.mark.parametrize("estimator", ["two_sided", "one_sided"])
def test_zeroth_order_is_the_large_alpha_limit_of_the_sampling_view(estimator):
    """Su's sampling view (kexue.fm/archives/7521) with the Gaussian proposal as the support, on the very
    steps ZeroOrder evaluates. Steps Δ_i = σu_i drawn from q = N(0, σ²I) (``log_q=None``: the target is
    q·e^{−l/α}, Su's ball replaced by a Gaussian), w_i = softmax_i(−l_i/α). Expanding the softmax at α = ∞,
    w_i = 1/N − (l_i − l̄)/(Nα) + O(α⁻²), so with Δ̄ = mean Δ_i

        α·(Δ*(α) − Δ̄) = −(1/N)·Σ_i (l_i − l̄)·Δ_i + O(1/α) = −σ²·ĝ + O(1/α),

    ĝ = ZeroOrder's estimate on the same steps: two-sided (the antithetic ±σu_j; Δ̄ = 0 and the pairs'
    l⁺ − l⁻ appear) or one-sided with baseline 'mean' (c_i = (f_i − f̄)/σ). An exact limit identity on the
    samples, for any f (here the 0-1 error, where no gradient exists). Su's α → ∞ limit Δ* → 0 is this
    with its leading term: the zeroth-order gradient step of size σ²/α.

    Tolerance: with r = max|l_i − l̄|/α ≤ 1e-2 the softmax's second-order remainder is below r²/N per
    weight, so ‖α(Δ* − Δ̄) + σ²ĝ‖ ≤ 2·r·max|l_i − l̄|·max‖Δ_i‖ (asserted at r = 1e-2 and 1e-4); the error
    must also shrink ∝ 1/α (≤ 0.02× for 100× the α), i.e. it is a limit, not a coincidence; and at
    small α the same weights pick the best step instead (Su's α → 0 end)."""
    sigma, m = 0.3, 64
    D, values, g_hat, loss_fn = _zo_samples(estimator, sigma, m, seed=3)
    assert D.shape[0] == (2 * m if estimator == "two_sided" else m)
    assert len(set(values.tolist())) > 2 and g_hat.norm() > 0  # the candidates do not tie
    spread = float((values - values.mean()).abs().max())
    target = -sigma**2 * g_hat
    mean_step = D.mean(0)
    if estimator == "two_sided":
        assert mean_step.abs().max() < 1e-12  # antithetic: the ± pairs cancel

    def scaled(alpha: float) -> torch.Tensor:
        est = sampling_step(loss_fn, lambda n, gen: D, None, alpha, D.shape[0])
        return alpha * (est - mean_step)

    errors = []
    for r in (1e-2, 1e-4):
        alpha = spread / r
        err = float((scaled(alpha) - target).norm())
        assert err <= 2 * r * spread * float(D.norm(dim=1).max()), (r, err)
        errors.append(err)
    assert errors[1] <= 0.02 * errors[0]
    assert float((scaled(spread / 1e-4) - target).norm() / target.norm()) < 1e-3
    # α → 0: all the mass on the lowest loss (the mean of the steps that reach it).
    best = D[values == values.min()].mean(0)
    assert torch.allclose(sampling_step(loss_fn, lambda n, gen: D, None, 1e-6, D.shape[0]), best, atol=1e-12)


def test_sampling_view_on_a_gaussian_support_is_the_scaled_gradient_step_for_linear_l():
    """The population form of the limit above, exact for linear l = gᵀΔ: q(Δ)·e^{−gᵀΔ/α} ∝ N(Δ; −σ²g/α, σ²I),
    so α·E_p[Δ] = −σ²g = −σ²∇f_σ at every α (∇f_σ = g for linear f). By SNIS with n = 4e5 at α = 1 and
    α = 10 (σ = 0.5, g = (1, −2, 0.5)): the SE of α·Δ* per coordinate is ≈ α·σ·√(e^{σ²‖g‖²/α²}/n) (the
    effective sample size n·e^{−σ²‖g‖²/α²}), 0.0015 and 0.008 (over 20 seeds: ≤ 0.0020 and ≤ 0.0094),
    so the tolerance is 0.016 at α = 1 and 0.064 at α = 10 (8 SE)."""
    g = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    sigma = 0.5
    for alpha, tol in ((1.0, 0.016), (10.0, 0.064)):
        est = sampling_step(lambda D: D @ g, lambda n, gen: sigma * torch.randn(n, 3, generator=gen, dtype=F64),
                            None, alpha, 400_000, torch.Generator().manual_seed(7))
        assert (alpha * est + sigma**2 * g).abs().max() < tol, (alpha, alpha * est)


# --- the MGS update: weights and their limits ---------------------------------------------------------


def one_step(params, task=None, **kwargs):
    opt = sgd_mgs(params, **kwargs)
    rec = task or Recorder(params)
    before = flat(params)
    opt.step(surrogate_for(params), rec)
    return opt, rec, before, flat(params) - before


def test_update_is_the_weighted_mean_of_the_scored_candidates():
    """Δ = Σ w_i ε_i with log w = log_softmax(β(c₀ − c_i) − log q_i), log q the reference's density."""
    params = make_params()
    a = -surrogate_grad(params)
    opt, rec, _, delta = one_step(params, beta=3.0, noise=0.5)
    info = opt.last_step
    eps = rec.epsilons()
    assert len(rec.values) == 5 and info["task_loss"] == rec.values[0]
    assert info["candidate_losses"] == rec.values[1:]
    assert info["mle"] == [True, False, True, False]
    c0, c = rec.values[0], torch.tensor(rec.values[1:], dtype=F64)
    log_q = torch.stack([ref_log_q(e, a) for e in eps])
    w = torch.softmax(3.0 * (c0 - c) - log_q, 0)
    torch.testing.assert_close(torch.tensor(info["weights"], dtype=F64), w, rtol=1e-9, atol=1e-12)
    assert math.isclose(sum(info["weights"]), 1.0, rel_tol=1e-12)
    torch.testing.assert_close(delta, sum(wi * e for wi, e in zip(w, eps)), rtol=1e-9, atol=1e-12)


def test_candidates_are_mle_step_plus_noise_or_noise():
    """ε_i = a + n_i on the MLE component and n_i on the zero one; 'uniform' noise has per-tensor std
    σ·mean|a_T| (the reference default)."""
    params = make_params(shapes=((60, 50), (50,)))
    a = -surrogate_grad(params)
    sizes = [p.numel() for p in params]
    _, rec, _, _ = one_step(params, noise=0.7, candidates=4)
    for i, e in enumerate(rec.epsilons()):
        n = e - a if i % 2 == 0 else e
        for n_t, a_t in zip(n.split(sizes), a.split(sizes)):
            want = 0.7 * a_t.abs().mean()
            assert abs(float(n_t.std()) / float(want) - 1) < (0.05 if n_t.numel() > 1000 else 0.35)
            assert abs(float(n_t.mean())) < 4 * float(want) / math.sqrt(n_t.numel())
    # 'constant': std σ whatever a is.
    params = make_params(shapes=((60, 50),))
    _, rec, _, _ = one_step(params, noise=0.2, noise_scale="constant", mix=0.0)
    for e in rec.epsilons():
        assert abs(float(e.std()) / 0.2 - 1) < 0.05


def test_beta_to_infinity_moves_to_the_best_candidate():
    params = make_params()
    opt, rec, _, delta = one_step(params, beta=1e8, noise=0.5, candidates=6)
    best = min(range(6), key=lambda i: rec.values[1 + i])
    w = opt.last_step["weights"]
    assert w[best] == pytest.approx(1.0, abs=1e-12) and math.isclose(sum(w), 1.0, rel_tol=1e-12)
    torch.testing.assert_close(delta, rec.epsilons()[best], rtol=1e-9, atol=1e-12)


def test_beta_zero_without_density_is_the_plain_candidate_mean():
    params = make_params()
    opt, rec, _, delta = one_step(params, beta=0.0, q_density="none", noise=0.5, candidates=5)
    assert opt.last_step["weights"] == pytest.approx([0.2] * 5, abs=1e-15)
    torch.testing.assert_close(delta, torch.stack(rec.epsilons()).mean(0), rtol=1e-9, atol=1e-12)


def test_exact_density_uses_the_sampled_variances():
    """'exact': q = π·N(a, diag s²) + (1−π)·N(0, diag s²), s_T = σ·mean|a_T| per tensor."""
    params = make_params()
    a = -surrogate_grad(params)
    sizes = [p.numel() for p in params]
    s = torch.cat([torch.full((n,), 0.5 * float(a_t.abs().mean()), dtype=F64)
                   for n, a_t in zip(sizes, a.split(sizes))])
    opt, rec, _, _ = one_step(params, beta=2.0, noise=0.5, q_density="exact")
    c0, c = rec.values[0], torch.tensor(rec.values[1:], dtype=F64)
    log_q = torch.stack([torch.logaddexp(math.log(0.5) - 0.5 * ((e - a) / s).square().sum(),
                                         math.log(0.5) - 0.5 * (e / s).square().sum()) for e in rec.epsilons()])
    w = torch.softmax(2.0 * (c0 - c) - log_q, 0)
    torch.testing.assert_close(torch.tensor(opt.last_step["weights"], dtype=F64), w, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_huge_task_losses_do_not_underflow(offset):
    """exp(−1e4) is 0 in float64 (the reference's np.exp path gives NaN weights); the weights depend on
    c₀ − c_i only, so shifting every task loss changes nothing."""
    runs = []
    for shift in (0.0, offset):
        params = make_params()
        opt = sgd_mgs(params, beta=0.5, noise=0.5)
        opt.step(surrogate_for(params), Recorder(params, offset=shift))
        runs.append((opt.last_step["weights"], flat(params)))
    (w0, t0), (w1, t1) = runs
    assert all(math.isfinite(w) for w in w1) and math.isclose(sum(w1), 1.0, rel_tol=1e-12)
    assert max(w1) < 1.0 - 1e-6, "the losses were meant to give mixed weights"
    # float64 rounding of c + offset: the error of c₀ − c_i is ≲ 2.2e-16·offset, times β = 0.5.
    assert w1 == pytest.approx(w0, abs=1e-15 * offset)
    torch.testing.assert_close(t1, t0, rtol=0, atol=1e-6)


def test_mix_and_assignment():
    def flags(**kw):
        params = make_params()
        opt = sgd_mgs(params, **kw)
        opt.step(surrogate_for(params), Recorder(params))
        assert math.isclose(sum(opt.last_step["weights"]), 1.0, rel_tol=1e-12)
        return opt.last_step["mle"]

    assert flags(candidates=5) == [True, False, True, False, True]
    for q in ("reference", "exact"):  # log π or log(1 − π) = −inf in the density: still finite weights
        assert flags(candidates=3, mix=1.0, q_density=q) == [True] * 3
        assert flags(candidates=3, mix=0.0, q_density=q) == [False] * 3
    assert flags(candidates=8, mix=0.25) == [True, False, False, False, True, False, False, False]
    assert flags(candidates=10, mix=0.3).count(True) == 3
    # 'random': each candidate MLE with probability π, from the owned generator.
    params = make_params()
    opt = sgd_mgs(params, candidates=50, mix=0.3, assignment="random", noise=0.01)
    picks = []
    for _ in range(4):
        opt.step(surrogate_for(params), Recorder(params))
        picks += opt.last_step["mle"]
    assert abs(sum(picks) / 200 - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 200)


def test_mix_one_with_tiny_noise_is_the_clipped_surrogate_step():
    """π = 1, σ → 0: every candidate is a, so Δ = a = −clip(∇l̃) (the reference's MLE-only ablation)."""
    params = make_params()
    g = surrogate_grad(params)
    opt = MGS(None, torch.optim.SGD(params, lr=1.0), mix=1.0, noise=1e-9, max_grad_norm=1.0)
    before = flat(params)
    opt.step(surrogate_for(params), Recorder(params))
    torch.testing.assert_close(flat(params) - before, -g / g.norm(), rtol=1e-6, atol=1e-8)


# --- the statistical claim: MGS lowers the 0-1 error where continued CE does not --------------------


def _outlier_data(seed: int):
    """Two overlapping Gaussian classes on x₁ = ∓1 (sd 0.7) and 20 class-0 outliers at x₁ ≈ 6: CE's linear
    optimum bends to the outliers and errs on ≈ 40% of the points; the best linear rule gives up the
    outliers and errs on ≈ 16%."""
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.zeros(100), torch.ones(100), torch.zeros(20)]).long()
    X = torch.randn(220, 2, generator=g, dtype=F64) * 0.7
    X[:200, 0] += torch.where(y[:200] == 1, 1.0, -1.0).double()
    X[200:] = torch.randn(20, 2, generator=g, dtype=F64) * 0.3 + torch.tensor([6.0, 0.0], dtype=F64)
    return X, y


def _error(model, X, y) -> float:
    return float((model(X).argmax(1) != y).double().mean())


def test_mgs_lowers_the_01_error_where_continued_cross_entropy_does_not():
    """5 seeds; CE-pretrained (LBFGS to the optimum) linear classifier; 100 updates each of continued CE
    (SGD, lr 0.1) and MGS (SGD lr 1, 'constant' noise σ = 0.3: at the CE optimum a ≈ 0 and the 'uniform'
    scale would vanish). Rule: MGS's mean final 0-1 error is at least 0.10 below continued CE's, and
    lower on every seed. (Measured: CE 0.416, MGS 0.166.)"""
    ce_err, mgs_err = [], []
    for seed in range(5):
        X, y = _outlier_data(seed)
        torch.manual_seed(seed)
        base = torch.nn.Linear(2, 2).double()
        with torch.no_grad():
            base.weight.zero_()
            base.bias.zero_()
        lbfgs = torch.optim.LBFGS(base.parameters(), lr=1, max_iter=200, line_search_fn="strong_wolfe")

        def ce_closure(model=base, opt=lbfgs):
            opt.zero_grad()
            loss = F.cross_entropy(model(X), y)
            loss.backward()
            return loss

        lbfgs.step(ce_closure)

        ce = copy.deepcopy(base)
        sgd = torch.optim.SGD(ce.parameters(), lr=0.1)
        for _ in range(100):
            sgd.zero_grad()
            F.cross_entropy(ce(X), y).backward()
            sgd.step()
        ce_err.append(_error(ce, X, y))

        model = copy.deepcopy(base)
        opt = MGS(None, torch.optim.SGD(model.parameters(), lr=1.0), noise=0.3, noise_scale="constant", seed=seed)
        for _ in range(100):
            opt.step(lambda: F.cross_entropy(model(X), y), lambda: _error(model, X, y))
        mgs_err.append(_error(model, X, y))
    assert all(m < c for m, c in zip(mgs_err, ce_err)), (mgs_err, ce_err)
    assert statistics.mean(mgs_err) < statistics.mean(ce_err) - 0.10, (mgs_err, ce_err)


# --- determinism, state, copies, schedulers ---------------------------------------------------------


def trajectory(seed, n=4, **kwargs):
    params = make_params(torch.float32)
    opt = MGS(params, torch.optim.AdamW(params, lr=0.05), seed=seed, **kwargs)
    out = []
    for _ in range(n):
        opt.step(surrogate_for(params), Recorder(params))
        out.append(flat(params))
    return out


def test_same_seed_same_trajectory_and_global_rng_untouched():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b, c = trajectory(7), trajectory(7), trajectory(8)
    assert torch.equal(torch.get_rng_state(), state), "MGS used the global RNG"
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[-1], c[-1])
    assert all(torch.equal(x, y) for x, y in zip(trajectory(3, assignment="random"),
                                                 trajectory(3, assignment="random")))


def test_state_dict_round_trip_reproduces_the_next_step():
    """Saved through torch.save / torch.load(weights_only=True), into an MGS built with another seed."""
    params = make_params(torch.float32)
    opt = MGS(None, torch.optim.AdamW(params, lr=0.05), assignment="random", seed=1)
    for _ in range(3):
        opt.step(surrogate_for(params), Recorder(params))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    params2 = [p.detach().clone().requires_grad_() for p in params]
    opt2 = MGS(None, torch.optim.AdamW(params2, lr=0.05), assignment="random", seed=99)
    opt2.load_state_dict(sd)
    for _ in range(2):
        opt.step(surrogate_for(params), Recorder(params))
        opt2.step(surrogate_for(params2), Recorder(params2))
        assert torch.equal(flat(params), flat(params2))
        assert opt.last_step == opt2.last_step


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle_continue_identically(how):
    params = make_params(torch.float32)
    opt = MGS(params[:1], torch.optim.SGD(params, lr=0.1, momentum=0.9))
    opt.step(surrogate_for(params), Recorder(params))
    params2, opt2 = copy.deepcopy((params, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((params, opt)))
    assert opt2.param_groups is opt2.optimizer.param_groups
    for _ in range(2):
        opt.step(surrogate_for(params), Recorder(params))
        opt2.step(surrogate_for(params2), Recorder(params2))
        assert torch.equal(flat(params), flat(params2))


def test_lr_scheduler_on_the_wrapper_changes_the_inner_lr():
    params = make_params(torch.float32)
    inner = torch.optim.SGD(params, lr=0.1)
    opt = MGS(None, inner, noise=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        opt.step(surrogate_for(params), Recorder(params))
        sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.025)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.0)
    before = flat(params)
    opt.step(surrogate_for(params), Recorder(params))
    assert torch.equal(flat(params), before), "lr 0 must not move the parameters"


# --- which parameters are searched --------------------------------------------------------------------


def test_params_subset_searched_the_rest_trained_on_the_surrogate():
    """Only ``params`` are perturbed; the inner optimizer's other params step on the clipped surrogate."""
    head, body = make_params(shapes=((3, 4), (5,)))
    opt = MGS([head], torch.optim.SGD([head, body], lr=0.1), noise=0.5)
    g = surrogate_grad([head, body])
    clip = min(1.0, 1.0 / (float(g.norm()) + 1e-6))
    body0 = body.detach().clone()
    rec = Recorder([head, body])
    opt.step(surrogate_for([head, body]), rec)
    for e in rec.epsilons():
        assert e[:12].abs().max() > 0 and torch.equal(e[12:], torch.zeros(5, dtype=F64)), "body was perturbed"
    torch.testing.assert_close(body.detach(), body0 - 0.1 * clip * g[12:], rtol=1e-12, atol=1e-12)


def test_params_without_surrogate_gradient_are_not_searched_nor_stepped():
    used, unused = make_params(shapes=((3, 4), (4,)))
    opt = MGS(None, torch.optim.SGD([used, unused], lr=0.1, momentum=0.9), noise=0.5)
    unused0 = unused.detach().clone()

    def closure():
        loss = ((used - 0.3) ** 2).sum()
        loss.backward()
        return loss

    rec = Recorder([used, unused])
    for _ in range(2):
        opt.step(closure, rec)
    assert unused.grad is None and torch.equal(unused.detach(), unused0)
    assert all(torch.equal(e[12:], torch.zeros(4, dtype=F64)) for e in rec.epsilons())
    assert unused not in opt.optimizer.state


def test_closure_without_backward_and_task_loss_that_touches_grads():
    """The wrapper backpropagates a closure that did not; a task loss that zeroes or accumulates .grad
    cannot change the step (the surrogate gradients, of searched and other params, are held apart while
    candidates are scored)."""
    outs = []
    for variant in ("backward", "no_backward", "meddling"):
        params = make_params()
        opt = MGS(params[:1], torch.optim.SGD(params, lr=0.5), noise=0.5)
        closure = surrogate_for(params)
        if variant == "no_backward":
            def closure(ps=params):
                return sum(((p - 0.3) ** 2).sum() + 0.1 * (p**4).sum() for p in ps)
        rec = Recorder(params)
        task = rec
        if variant == "meddling":
            def task(ps=params, rec=rec, opt=opt):
                with torch.enable_grad():
                    sum((p**2).sum() for p in ps).backward()
                    opt.zero_grad()
                    sum((p**3).sum() for p in ps).backward()
                return rec()
        loss = opt.step(closure, task)
        assert isinstance(loss, torch.Tensor) and loss.requires_grad
        outs.append(flat(params))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("restore", ["snapshot", "replay"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_params_are_restored_between_candidates(dtype, restore):
    """Every candidate is scored at θ + ε_i from the same θ. 'snapshot' restores bitwise; 'replay' too
    for 16-bit tensors (from copies of those: θ + ε − ε is far from θ in 16 bits), and 32-bit ones to
    a few ulp."""
    params = make_params(dtype)
    opt = MGS(None, torch.optim.SGD(params, lr=0.1), noise=1.0, candidates=6, restore=restore)
    seen = []

    def task():
        seen.append([p.detach().clone() for p in params])
        return float(sum(p.double().abs().sum() for p in params))

    before = [p.detach().clone() for p in params]
    opt.optimizer.param_groups[0]["lr"] = 0.0  # θ after the step = θ after the last restore
    opt.step(surrogate_for(params), task)
    after = [p.detach().clone() for p in params]
    for p, b, a in zip(params, before, after):
        assert p.dtype == dtype
        if dtype == torch.float32 and restore == "replay":
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        else:
            assert torch.equal(a, b)
    assert all(not torch.equal(s[0], before[0]) for s in seen[1:]), "candidates were not perturbed"
    assert all(torch.equal(s[0], before[0]) for s in seen[:1]), "c₀ was not scored at θ"
    opt.optimizer.param_groups[0]["lr"] = 0.1
    opt.step(surrogate_for(params), task)
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in params)
    assert not torch.equal(params[0].detach(), before[0])


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, regex",
    [
        (dict(beta=-1.0), ValueError, r"^Invalid beta: -1\.0 \(expected a number in \[0, inf\]\)$"),
        (dict(beta=float("inf")), ValueError, r"^Invalid beta: inf \(expected a finite number"),
        (dict(candidates=0), ValueError, r"^Invalid candidates: 0 \(expected a number in \[1, inf\]\)$"),
        (dict(candidates=2.0), TypeError, r"^Invalid candidates: 2\.0 \(expected an int\)$"),
        (dict(mix=1.5), ValueError, r"^Invalid mix: 1\.5 \(expected a number in \[0, 1\]\)$"),
        (dict(mix=-0.1), ValueError, r"^Invalid mix: -0\.1 \(expected a number in \[0, 1\]\)$"),
        (dict(noise=0.0), ValueError, r"^Invalid noise: 0\.0 \(expected a number in \(0, inf\]\)$"),
        (dict(noise=-1.0), ValueError, r"^Invalid noise: -1\.0 \(expected a number in \(0, inf\]\)$"),
        (dict(noise="1"), TypeError, r"^Invalid noise: '1' \(expected a real number\)$"),
        (dict(noise_scale="layer"), ValueError,
         r"^Invalid noise_scale: 'layer' \(expected one of 'uniform', 'constant'\)$"),
        (dict(assignment="even"), ValueError,
         r"^Invalid assignment: 'even' \(expected one of 'alternate', 'random'\)$"),
        (dict(q_density="sigma"), ValueError,
         r"^Invalid q_density: 'sigma' \(expected one of 'reference', 'none', 'exact'\)$"),
        (dict(max_grad_norm=0.0), ValueError, r"^Invalid max_grad_norm: 0\.0 \(expected a number in \(0, inf\]\)$"),
        (dict(restore="copy"), ValueError, r"^Invalid restore: 'copy' \(expected one of 'snapshot', 'replay'\)$"),
        (dict(seed=-1), ValueError, r"^Invalid seed: -1 \(expected a number in \[0, "),
        (dict(seed=1.5), TypeError, r"^Invalid seed: 1\.5 \(expected an int\)$"),
        (dict(foo=1), TypeError, r"unexpected keyword argument 'foo'"),
    ],
)
def test_bad_hyperparameters(kwargs, exc, regex):
    params = make_params()
    with pytest.raises(exc, match=regex):
        MGS(None, torch.optim.SGD(params, lr=0.1), **kwargs)


def test_setters_validate():
    params = make_params()
    opt = MGS(None, torch.optim.SGD(params, lr=0.1))
    opt.beta = 5
    assert opt.beta == 5.0
    with pytest.raises(ValueError, match=r"^Invalid mix: 2\.0"):
        opt.mix = 2.0
    assert opt.mix == 0.5


def test_bad_optimizer_and_params():
    params = make_params()
    inner = torch.optim.SGD(params, lr=0.1)
    with pytest.raises(TypeError, match=r"^MGS wraps a torch\.optim\.Optimizer, got list"):
        MGS(None, params)
    with pytest.raises(TypeError, match=r"^MGS wraps a torch\.optim\.Optimizer, got type"):
        MGS(None, torch.optim.SGD)
    with pytest.raises(TypeError, match="LBFGS"):
        MGS(None, torch.optim.LBFGS(params))
    with pytest.raises(ValueError, match=r"params\[0\] \(shape \(2,\)\) is not a parameter of the inner optimizer"):
        MGS([torch.zeros(2, requires_grad=True)], inner)
    with pytest.raises(ValueError, match="empty params"):
        MGS(iter([]), inner)
    with pytest.raises(ValueError, match="more than once"):
        MGS([params[0], params[0]], inner)
    with pytest.raises(TypeError, match="single Tensor"):
        MGS(params[0], inner)
    with pytest.raises(TypeError, match=r"params\[1\] is a str"):
        MGS([params[0], "w"], inner)
    assert MGS([{"params": params[1]}], inner)._search == [params[1]]


def _fresh(dtype=torch.float32, **kw):
    params = make_params(dtype)
    return params, MGS(None, torch.optim.SGD(params, lr=0.1, momentum=0.9), noise=0.5, **kw)


@pytest.mark.parametrize("missing", ["both", "task_loss", "closure"])
def test_missing_closures_raise_type_error_and_change_nothing(missing):
    params, opt = _fresh()
    before = flat(params)
    args = {"both": (), "task_loss": (surrogate_for(params),), "closure": (None, Recorder(params))}[missing]
    with pytest.raises(TypeError, match="task_loss" if missing == "task_loss" else "closure"):
        opt.step(*args)
    assert torch.equal(flat(params), before) and not opt.optimizer.state


@pytest.mark.parametrize("restore", ["snapshot", "replay"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("at", [0, 1, 3], ids=["c0", "candidate-0", "candidate-2"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "raise"])
def test_failed_task_loss_restores_everything(dtype, at, bad, restore):
    """A non-finite (or raising) task loss at θ or at any candidate: an error, θ restored (bitwise; with
    'replay' a few ulp in 32 bits), no inner step, the generator rewound, so the next good step is the
    step a fresh optimizer takes."""
    params, opt = _fresh(dtype, restore=restore)
    ref_params, ref_opt = _fresh(dtype, restore=restore)
    before = [p.detach().clone() for p in params]
    rng = opt.state_dict()["danlu_mgs"]["rng"].clone()
    calls = []

    def task():
        calls.append(1)
        if len(calls) - 1 == at:
            if bad == "raise":
                raise KeyError("decoder failed")
            return bad
        return float(sum(p.double().abs().sum() for p in params))

    with pytest.raises(KeyError if bad == "raise" else RuntimeError,
                       match="decoder failed" if bad == "raise" else rf"task_loss\(\) returned {bad}.*restored"):
        opt.step(surrogate_for(params), task)
    for p, b in zip(params, before):
        if dtype == torch.float32 and restore == "replay":
            torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-6)
        else:
            assert torch.equal(p.detach(), b)
    assert not opt.optimizer.state, "the inner optimizer stepped"
    assert torch.equal(opt.state_dict()["danlu_mgs"]["rng"], rng), "the generator advanced"
    assert all(p.grad is not None for p in params), ".grad holds the surrogate gradient"
    good = lambda ps: (lambda: float(sum(p.double().abs().sum() for p in ps)))  # noqa: E731
    for p, b in zip(params, before):
        p.data.copy_(b)  # 'replay', fp32: drop the few-ulp restore error, to compare with a fresh optimizer
    opt.step(surrogate_for(params), good(params))
    ref_opt.step(surrogate_for(ref_params), good(ref_params))
    assert all(torch.equal(p, q) for p, q in zip(params, ref_params))


def test_task_loss_of_the_wrong_type():
    params, opt = _fresh()
    with pytest.raises(TypeError, match="one-element tensor"):
        opt.step(surrogate_for(params), lambda: torch.zeros(3))
    with pytest.raises(TypeError, match="must return a number, got str"):
        opt.step(surrogate_for(params), lambda: "0.5")
    opt.step(surrogate_for(params), lambda: torch.tensor([0.5]))  # a one-element tensor is fine


def test_nonfinite_surrogate_gradient_raises_before_anything_moves():
    params, opt = _fresh()
    before = flat(params)

    def closure():
        loss = sum((p**2).sum() for p in params)
        loss.backward()
        params[0].grad[0, 0] = float("nan")
        return loss

    with pytest.raises(RuntimeError, match="surrogate gradient is not finite"):
        opt.step(closure, Recorder(params))
    assert torch.equal(flat(params), before) and not opt.optimizer.state


def test_complex_and_sparse_are_refused_before_anything_moves():
    z = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    opt = MGS(None, torch.optim.SGD([z], lr=0.1))
    with pytest.raises(TypeError, match="complex"):
        opt.step(lambda: (z.abs() ** 2).sum(), lambda: 0.0)
    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = MGS(None, torch.optim.SGD(emb.parameters(), lr=0.1))
    w0 = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(lambda: emb(torch.tensor([1, 2])).sum(), lambda: 0.0)
    assert torch.equal(emb.weight.detach(), w0)


def test_load_state_dict_refuses_bad_hyper_and_rng_unchanged():
    params, opt = _fresh()
    opt.step(surrogate_for(params), Recorder(params))
    good = copy.deepcopy(opt.state_dict())
    for key, value, regex in [("hyper", ("beta", -1.0), r"Invalid beta: -1\.0"),
                              ("hyper", ("candidates", 0), r"Invalid candidates: 0"),
                              ("rng", torch.zeros(3, dtype=torch.uint8), r"'rng' must be the uint8 generator state")]:
        sd = copy.deepcopy(good)
        if key == "hyper":
            sd["danlu_mgs"]["hyper"][value[0]] = value[1]
        else:
            sd["danlu_mgs"]["rng"] = value
        opt.step(surrogate_for(params), Recorder(params))
        before = copy.deepcopy(opt.state_dict())
        with pytest.raises(ValueError, match=regex):
            opt.load_state_dict(sd)
        after = opt.state_dict()
        assert torch.equal(after["danlu_mgs"]["rng"], before["danlu_mgs"]["rng"])
        assert after["danlu_mgs"]["hyper"] == before["danlu_mgs"]["hyper"]
