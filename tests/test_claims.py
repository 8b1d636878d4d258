"""The claims of the spec (/work/shared/spec/adaptive.md, "Tests / claims" of §1–§4) as tests.

Exact claims are checked bit for bit or to float64 rounding; statistical claims ([derived] in the
spec) over several seeds with the tolerance stated next to each assertion.
"""

from __future__ import annotations

import math

import pytest
import torch

import danlu
from danlu.optim.adax import adax_beta_hat

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _param(x: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(x.clone())


def _step(opt: torch.optim.Optimizer, p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Set ``p.grad = grad``, step, and return Δθ."""
    before = p.detach().clone()
    p.grad = grad.clone()
    opt.step()
    return p.detach() - before


def _rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt())


# ==================================================================================================
# §1 Lion / Tiger
# ==================================================================================================


class TestLion:
    def test_step1_sign_part_is_exactly_lr(self) -> None:
        """§1 test 1: from θ0 = 0, λ = 0, every coordinate with g ≠ 0 moves by exactly ±η; g = 0 stays."""
        lr = 3e-4
        g = torch.randn(1000, generator=_gen(0), dtype=F64)
        g[::7] = 0.0  # c = 0 there (m = 0): sign(0) = 0
        p = _param(torch.zeros(1000, dtype=F64))
        opt = danlu.Lion([p], lr=lr, betas=(0.9, 0.99))
        delta = _step(opt, p, g)
        assert torch.equal(delta, -lr * torch.sign(g))
        nz = g != 0
        assert torch.equal(delta[nz].abs(), torch.full_like(delta[nz], lr))
        assert torch.equal(delta[~nz], torch.zeros_like(delta[~nz]))
        # Unit RMS per coordinate: RMS of the sign part over the nonzero coordinates is exactly η.
        assert _rms(delta[nz]) == pytest.approx(lr, rel=1e-15)

    @pytest.mark.parametrize("dtype", [torch.float32, F64])
    def test_step1_full_formula_and_momentum(self, dtype: torch.dtype) -> None:
        """§1 test 1: Δθ = −η·sign(g) − ηλθ0 and exp_avg = (1 − β2)·g after step 1 from m = 0."""
        lr, wd, b1, b2 = 1e-3, 0.1, 0.9, 0.99
        gen = _gen(1)
        theta0 = torch.randn(64, 32, generator=gen, dtype=dtype)
        g = torch.randn(64, 32, generator=gen, dtype=dtype)
        p = _param(theta0)
        opt = danlu.Lion([p], lr=lr, betas=(b1, b2), weight_decay=wd)
        p.grad = g.clone()
        opt.step()
        # Same op order as the formula θ0·(1 − ηλ) − η·sign(g): bitwise.
        expected = theta0 * (1.0 - lr * wd) - lr * torch.sign(g)
        assert torch.equal(p.detach(), expected)
        # And to rounding against the additive form θ0 − η·sign(g) − ηλθ0.
        tol = dict(rtol=0, atol=4 * torch.finfo(dtype).eps)
        torch.testing.assert_close(p.detach(), theta0 - lr * torch.sign(g) - lr * wd * theta0, **tol)
        assert torch.equal(opt.state[p]["exp_avg"], g * (1.0 - b2))

    def test_sign_part_magnitude_is_lr_at_every_step(self) -> None:
        """§1: with λ = 0 every coordinate with c ≠ 0 moves by η at every step (float64 rounding)."""
        lr = 1e-3
        gen = _gen(2)
        p = _param(torch.randn(500, generator=gen, dtype=F64))
        opt = danlu.Lion([p], lr=lr, betas=(0.9, 0.99))
        for _ in range(20):
            delta = _step(opt, p, torch.randn(500, generator=gen, dtype=F64))
            # |θ| ≲ 4, so θ − η is exact to ~4·eps·4 absolute
            torch.testing.assert_close(delta.abs(), torch.full_like(delta, lr), rtol=0, atol=1e-14)

    def test_beta1_zero_is_signsgd(self) -> None:
        """§1 test 3: β1 = 0 (any β2) gives signSGD θ ← θ(1 − ηλ) − η·sign(g), bitwise over many steps."""
        lr, wd = 1e-2, 0.05
        gen = _gen(3)
        theta = torch.randn(300, generator=gen)
        p = _param(theta)
        ref = theta.clone()
        opt = danlu.Lion([p], lr=lr, betas=(0.0, 0.95), weight_decay=wd)
        for _ in range(100):
            g = torch.randn(300, generator=gen)
            _step(opt, p, g)
            ref.mul_(1.0 - lr * wd).add_(torch.sign(g), alpha=-lr)
        assert torch.equal(p.detach(), ref)

    def test_zero_gradient_decay_and_lr_wd_transfer(self) -> None:
        """§1 test 6: zero gradients ⇒ θ_t = θ0·(1 − ηλ)^t; (η, λ) and (η/3, 3λ) decay alike."""
        eta, lam, steps = 1e-2, 0.5, 200
        theta0 = torch.randn(100, generator=_gen(4), dtype=F64)
        finals = []
        for e, wd in [(eta, lam), (eta / 3, 3 * lam)]:
            p = _param(theta0)
            opt = danlu.Lion([p], lr=e, betas=(0.9, 0.99), weight_decay=wd)
            for _ in range(steps):
                _step(opt, p, torch.zeros_like(theta0))
            torch.testing.assert_close(p.detach(), theta0 * (1.0 - e * wd) ** steps, rtol=1e-12, atol=0)
            finals.append(p.detach().clone())
        torch.testing.assert_close(finals[0], finals[1], rtol=1e-12, atol=0)
        # Sanity: the decay did act (norm shrank by (1 − 5e-3)^200 ≈ 0.367).
        ratio = float(finals[0].norm() / theta0.norm())
        assert ratio == pytest.approx((1 - eta * lam) ** steps, rel=1e-12)

    @pytest.mark.parametrize("cls", ["Lion", "Tiger"])
    def test_one_state_tensor(self, cls: str) -> None:
        """§1 test 5: Lion (and Tiger) keep exactly one state tensor, ``exp_avg``, the param's shape."""
        p = _param(torch.randn(7, 5))
        opt = danlu.Lion([p]) if cls == "Lion" else danlu.Tiger([p], lr=1e-3)
        _step(opt, p, torch.randn(7, 5))
        st = opt.state[p]
        assert set(st) == {"exp_avg"}
        assert st["exp_avg"].shape == p.shape and st["exp_avg"].dtype == p.dtype
        n_state = sum(v.numel() for v in st.values() if isinstance(v, torch.Tensor))
        assert n_state == p.numel()  # AdamW would need 2·numel

    @pytest.mark.parametrize("beta", [0.965, 0.9, 0.5])
    def test_tiger_equals_lion_with_equal_betas_bitwise(self, beta: float) -> None:
        """§0: Tiger(β) is Lion(betas=(β, β)), bit for bit over many steps (with weight decay)."""
        gen = _gen(5)
        theta0 = torch.randn(40, 30, generator=gen)
        grads = [torch.randn(40, 30, generator=gen) for _ in range(200)]
        p1, p2 = _param(theta0), _param(theta0)
        lion = danlu.Lion([p1], lr=1e-3, betas=(beta, beta), weight_decay=0.1)
        tiger = danlu.Tiger([p2], lr=1e-3, beta=beta, weight_decay=0.1)
        for g in grads:
            _step(lion, p1, g)
            _step(tiger, p2, g)
            assert torch.equal(p1.detach(), p2.detach())
        assert torch.equal(lion.state[p1]["exp_avg"], tiger.state[p2]["exp_avg"])

    def test_equal_betas_no_decay_is_signum(self) -> None:
        """§1 test 3: β1 = β2 = β, λ = 0 gives SIGNUM: m ← βm + (1−β)g; θ ← θ − η·sign(m) (float64 oracle)."""
        beta, lr = 0.9, 1e-2
        gen = _gen(6)
        theta = torch.randn(200, generator=gen, dtype=F64)
        p = _param(theta)
        opt = danlu.Lion([p], lr=lr, betas=(beta, beta))
        m = torch.zeros_like(theta)
        for _ in range(100):
            g = torch.randn(200, generator=gen, dtype=F64)
            _step(opt, p, g)
            m = beta * m + (1 - beta) * g
            theta = theta - lr * torch.sign(m)
        torch.testing.assert_close(p.detach(), theta, rtol=0, atol=1e-13)


# ==================================================================================================
# §3 AdaX
# ==================================================================================================


class TestAdaX:
    def test_beta_hat_curve(self) -> None:
        """§3 test 2 (β2 = 1e-4): β̂_1 = 0, β̂_2 = 0.5, β̂_10 ≈ 0.9, β̂_1000 = 0.99905, β̂_1e4 = 0.99994.

        Tolerances are half a unit in the last quoted digit (exact values: β̂_2 = (1+β2)/(2+β2) =
        0.500025, β̂_10 = 0.90004, β̂_1000 = 0.999049, β̂_1e4 = 0.999942).
        """
        b2 = 1e-4

        def bh(t: float) -> float:
            return float(adax_beta_hat(torch.tensor(t, dtype=F64), b2))

        assert abs(bh(1)) <= 1e-15
        assert bh(2) == pytest.approx(0.5, abs=1e-4)
        assert bh(2) == pytest.approx((1 + b2) / (2 + b2), rel=1e-14)
        assert bh(10) == pytest.approx(0.9, abs=1e-4)
        assert bh(1000) == pytest.approx(0.99905, abs=5e-6)
        assert bh(1e4) == pytest.approx(0.99994, abs=5e-6)
        # float64 result; monotone increasing toward 1
        ts = torch.arange(1, 20001, dtype=F64)
        curve = adax_beta_hat(ts, b2)
        assert curve.dtype == F64
        assert bool((curve[1:] > curve[:-1]).all()) and float(curve[-1]) < 1.0
        # For t ≪ 1/β2 it is ≈ 1 − 1/t (the plain mean of past g²)
        assert float(curve[99]) == pytest.approx(1 - 1 / 100, abs=1e-4)

    @pytest.mark.parametrize("beta2,steps", [(1e-4, 300), (0.01, 400)])
    def test_normalised_recursion_equals_raw_formula(self, beta2: float, steps: int) -> None:
        """§3 test 4 / §0: state ``exp_avg_sq`` is v_t/((1+β2)^t − 1), v_t = (1+β2)v_{t−1} + β2·g², in float64."""
        gen = _gen(10)
        n = 64
        p = _param(torch.randn(n, generator=gen, dtype=F64))
        opt = danlu.AdaX([p], lr=1e-3, betas=(0.9, beta2))
        v = torch.zeros(n, dtype=F64)
        for t in range(1, steps + 1):
            g = torch.randn(n, generator=gen, dtype=F64) * (1 + 0.5 * math.sin(t))
            _step(opt, p, g)
            v = (1 + beta2) * v + beta2 * g * g
            vhat = v / ((1 + beta2) ** t - 1)
            torch.testing.assert_close(opt.state[p]["exp_avg_sq"], vhat, rtol=1e-11, atol=0)
        assert float(opt.state[p]["step"]) == steps

    def test_full_trajectory_matches_raw_oracle(self) -> None:
        """AdaX-W θ trajectory vs an oracle written from the paper's raw v (float64, ε on √v̂, decay ×lr)."""
        lr, b1, b2, eps, wd = 1e-2, 0.9, 0.01, 1e-6, 0.05
        gen = _gen(11)
        theta = torch.randn(50, generator=gen, dtype=F64)
        p = _param(theta)
        opt = danlu.AdaX([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
        m = torch.zeros_like(theta)
        v = torch.zeros_like(theta)
        for t in range(1, 201):
            g = torch.randn(50, generator=gen, dtype=F64)
            _step(opt, p, g)
            m = b1 * m + (1 - b1) * g
            v = (1 + b2) * v + b2 * g * g
            vhat = v / ((1 + b2) ** t - 1)
            theta = theta - lr * wd * theta - lr * m / (vhat.sqrt() + eps)
        torch.testing.assert_close(p.detach(), theta, rtol=1e-10, atol=1e-12)

    def test_first_update(self) -> None:
        """§3 test 1: v̂_1 = g²; Δθ_1 = −η(1−β1)·g/(|g| + ε) ≈ −0.1·η·sign(g)."""
        lr, eps = 1e-3, 1e-6
        g = torch.randn(1000, generator=_gen(12), dtype=F64)
        p = _param(torch.randn(1000, generator=_gen(13), dtype=F64))
        opt = danlu.AdaX([p], lr=lr, betas=(0.9, 1e-4), eps=eps)
        delta = _step(opt, p, g)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], g * g, rtol=1e-14, atol=0)
        torch.testing.assert_close(delta, -lr * 0.1 * g / (g.abs() + eps), rtol=1e-9, atol=1e-18)
        big = g.abs() > 1e-2  # where ε/|g| < 1e-4
        torch.testing.assert_close(delta[big], -0.1 * lr * torch.sign(g[big]), rtol=1e-4, atol=0)

    def test_long_run_step_counter_stays_finite_in_float32(self) -> None:
        """§3 numerics (i): at t = 2e6 the raw v ∝ (1+β2)^t = e^200 overflows float32; danlu's step doesn't."""
        b2 = 1e-4
        assert not math.isfinite(float(torch.tensor((1 + b2), dtype=torch.float32) ** 2e6))  # the hazard
        gen = _gen(14)
        p = _param(torch.randn(256, generator=gen))
        opt = danlu.AdaX([p], lr=1e-3, betas=(0.9, b2))
        _step(opt, p, torch.randn(256, generator=gen))  # creates the state
        st = opt.state[p]
        st["step"] = torch.tensor(2e6, dtype=F64)
        before_v = st["exp_avg_sq"].clone()
        for _ in range(3):
            delta = _step(opt, p, torch.randn(256, generator=gen))
            assert torch.isfinite(delta).all() and torch.isfinite(p).all()
            assert torch.isfinite(st["exp_avg_sq"]).all() and torch.isfinite(st["exp_avg"]).all()
            assert delta.abs().max() > 0
        assert float(st["step"]) == 2e6 + 3
        # β̂ → 1 so v̂ hardly moves: 1 − β̂ = β2/expm1(200) ≈ 1e-91
        torch.testing.assert_close(st["exp_avg_sq"], before_v, rtol=1e-6, atol=0)
        assert p.dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32


# ==================================================================================================
# §4 Adafactor
# ==================================================================================================


def _state_numel(st: dict) -> int:
    return sum(v.numel() for k, v in st.items() if isinstance(v, torch.Tensor) and k != "step")


class TestAdafactor:
    @pytest.mark.parametrize("shape", [(256, 128), (128, 300), (512, 512)])
    def test_factored_state_is_n_plus_m(self, shape: tuple[int, int]) -> None:
        """§4 test 1: an n×m matrix (n, m ≥ 128) keeps n + m numbers (row, col) plus the 0-d step."""
        n, m = shape
        p = _param(torch.randn(n, m))
        opt = danlu.Adafactor([p])
        _step(opt, p, torch.randn(n, m))
        st = opt.state[p]
        assert set(st) == {"step", "exp_avg_sq_row", "exp_avg_sq_col"}
        assert st["step"].dim() == 0
        assert _state_numel(st) == n + m
        assert sorted([st["exp_avg_sq_row"].numel(), st["exp_avg_sq_col"].numel()]) == sorted([n, m])

    def test_small_dim_not_factored(self) -> None:
        """§4 test 1: under the optax/Su rule a 64×1000 matrix keeps a full v."""
        p = _param(torch.randn(64, 1000))
        opt = danlu.Adafactor([p])
        _step(opt, p, torch.randn(64, 1000))
        st = opt.state[p]
        assert set(st) == {"step", "exp_avg_sq"}
        assert st["exp_avg_sq"].shape == (64, 1000)

    @pytest.mark.parametrize("signed", [False, True])
    def test_rank1_g2_recovered_exactly_at_step1(self, signed: bool) -> None:
        """§4 test 2: if G² = a²b²ᵀ is rank 1, V̂_1 = G² + ε1 and the step equals the unfactored one."""
        gen = _gen(20 + signed)
        n, m = 200, 150
        a = torch.randn(n, generator=gen, dtype=F64)
        b = torch.randn(m, generator=gen, dtype=F64)
        if not signed:
            a, b = a.abs() + 0.1, b.abs() + 0.1
        g = torch.outer(a, b)
        theta0 = torch.randn(n, m, generator=gen, dtype=F64)
        p_f, p_u = _param(theta0), _param(theta0)
        opt_f = danlu.Adafactor([p_f], min_dim_size_to_factor=128)
        opt_u = danlu.Adafactor([p_u], min_dim_size_to_factor=10**9)
        d_f = _step(opt_f, p_f, g)
        d_u = _step(opt_u, p_u, g)
        st = opt_f.state[p_f]
        assert "exp_avg_sq_row" in st and "exp_avg_sq" in opt_u.state[p_u]
        torch.testing.assert_close(d_f, d_u, rtol=1e-12, atol=0)
        # V̂ reconstructed from the row/col state: R·C/mean(R) (broadcast over the reduced dims).
        row, col = st["exp_avg_sq_row"], st["exp_avg_sq_col"]
        vhat = row * col / row.mean()
        torch.testing.assert_close(vhat, g * g + 1e-30, rtol=1e-12, atol=0)
        torch.testing.assert_close(opt_u.state[p_u]["exp_avg_sq"], g * g + 1e-30, rtol=1e-15, atol=0)

    def test_step1_unfactored_is_sign_times_relative_step(self) -> None:
        """§4 test 3: the first unfactored step is −0.01·max(1e-3, RMS θ0)·g/√(g² + ε1) ≈ sign(g)."""
        gen = _gen(22)
        theta0 = torch.randn(1000, generator=gen, dtype=F64) * 0.2
        g = torch.randn(1000, generator=gen, dtype=F64)
        p = _param(theta0)
        opt = danlu.Adafactor([p])
        delta = _step(opt, p, g)
        torch.testing.assert_close(delta, -0.01 * _rms(theta0) * torch.sign(g), rtol=1e-12, atol=0)

    @pytest.mark.parametrize("clip", [1.0, 0.5, 0.2])
    @pytest.mark.parametrize("shape", [(200, 160), (300,)])
    def test_clipped_update_rms_never_exceeds_threshold(self, clip: float, shape: tuple[int, ...]) -> None:
        """§4 test 4: RMS(Δθ)/α_t ≤ d at every step (no momentum), α_t = ρ_t·max(ε2, RMS(θ_{t−1}))."""
        gen = _gen(23)
        p = _param(torch.randn(*shape, generator=gen, dtype=F64) * 0.05)
        opt = danlu.Adafactor([p], clip_threshold=clip)
        ratios = []
        for t in range(1, 51):
            # heavy-tailed: Student-t(1) (Cauchy) entries with a per-step scale jump
            u = torch.rand(*shape, generator=gen, dtype=F64)
            g = torch.tan(math.pi * (u - 0.5)) * (100.0 if t % 7 == 0 else 1.0)
            alpha = min(1e-2, 1 / math.sqrt(t)) * max(1e-3, _rms(p.detach()))
            delta = _step(opt, p, g)
            ratios.append(_rms(delta) / alpha)
        assert max(ratios) <= clip * (1 + 1e-12), max(ratios)
        # clipping was active (the bound is reached), so the test is not vacuous
        assert max(ratios) == pytest.approx(clip, rel=1e-9)

    def test_scale_equivariance(self) -> None:
        """§4 test 5: θ0 → s·θ0 (RMS > ε2) gives s·Δθ for the same gradients, over several steps."""
        gen = _gen(24)
        theta0 = torch.randn(160, 130, generator=gen, dtype=F64) * 0.05
        grads = [torch.randn(160, 130, generator=gen, dtype=F64) for _ in range(10)]
        for s in (3.0, 0.25):
            p1, ps = _param(theta0), _param(s * theta0)
            o1, os_ = danlu.Adafactor([p1]), danlu.Adafactor([ps])
            for g in grads:
                d1 = _step(o1, p1, g)
                ds = _step(os_, ps, g)
                # Δθ is read back as θ_t − θ_{t−1}: allow the rounding of θ (|θ| < 1) as atol.
                torch.testing.assert_close(ds, s * d1, rtol=1e-10, atol=s * 1e-15)
            torch.testing.assert_close(ps.detach(), s * p1.detach(), rtol=1e-12, atol=0)

    def test_zero_init_moves_by_eps2_times_rho(self) -> None:
        """§4 test 5: a zero-initialised vector moves by ε2·ρ_1 = 1e-3·1e-2 per coordinate at step 1."""
        g = torch.randn(500, generator=_gen(25), dtype=F64)
        p = _param(torch.zeros(500, dtype=F64))
        opt = danlu.Adafactor([p])
        delta = _step(opt, p, g)
        torch.testing.assert_close(delta.abs(), torch.full_like(delta, 1e-3 * 1e-2), rtol=1e-12, atol=0)
        assert torch.equal(torch.sign(delta), -torch.sign(g))


# ==================================================================================================
# §2.2 Amos
# ==================================================================================================


class TestAmos:
    @pytest.mark.parametrize("layout", ["matrix_all_dims", "vector_default"])
    @pytest.mark.parametrize("xi,eta", [(0.1, 0.5), (0.03, 2.0)])
    def test_step1_identities(self, layout: str, xi: float, eta: float) -> None:
        """§2.2 test 1: v over the whole tensor ⇒ γ1 = b1 = ξ², Δθ = −ξη̃·g/RMS(g) − (ξ²/2)·θ0."""
        gen = _gen(30)
        shape = (24, 40) if layout == "matrix_all_dims" else (500,)
        theta0 = torch.randn(*shape, generator=gen, dtype=F64)
        g = torch.randn(*shape, generator=gen, dtype=F64) * 3.0
        p = _param(theta0)
        group = dict(params=[p], eta=eta)
        if layout == "matrix_all_dims":
            group["reduce_dims"] = (0, 1)
        opt = danlu.Amos([group], lr=xi)
        delta = _step(opt, p, g)
        st = opt.state[p]
        assert st["v"].numel() == 1 and st["b"].numel() == 1
        assert float(st["b"]) == pytest.approx(xi**2, rel=1e-14)  # b1 = γ1 = ξ²
        grad_part = -xi * eta * g / _rms(g)
        decay_part = -(xi**2 / 2) * theta0
        torch.testing.assert_close(delta, grad_part + decay_part, rtol=1e-12, atol=1e-15)
        assert _rms(grad_part) == pytest.approx(xi * eta, rel=1e-14)
        # γ1 = ξ² read back from the decay part: θ0 = 0 isolates the gradient part exactly
        p0 = _param(torch.zeros(*shape, dtype=F64))
        opt0 = danlu.Amos([dict(group, params=[p0])], lr=xi)
        d0 = _step(opt0, p0, g)
        assert _rms(d0) == pytest.approx(xi * eta, rel=1e-13)
        torch.testing.assert_close(d0, grad_part, rtol=1e-13, atol=0)
        # the decay part alone (gradient part subtracted) is −(γ1/2)θ0 with γ1 = ξ²
        gamma1 = float(((d0 - delta) * theta0).sum() / (theta0 * theta0).sum()) * 2
        assert gamma1 == pytest.approx(xi**2, rel=1e-9)

    @staticmethod
    def _noise_run(theta0_rms: float, steps: int, seed: int, k: int = 5000, xi: float = 0.1, eta: float = 0.5):
        gen = _gen(seed)
        theta0 = torch.randn(k, generator=gen) * theta0_rms
        p = _param(theta0)
        opt = danlu.Amos([dict(params=[p], eta=eta)], lr=xi)  # 1-D: scalar v (default)
        bs = {}
        for t in range(1, steps + 1):
            p.grad = torch.randn(k, generator=gen)
            opt.step()
            if t in (250, 500, 1000):
                bs[t] = float(opt.state[p]["b"])
        return _rms(p.detach()) / eta, bs

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_pull_toward_target_scale_under_noise(self, seed: int) -> None:
        """§2.2 test 3 [derived] (ξ = 0.1, η̃ = 0.5, k = 5000, pure-noise g), after 1000 steps:

        from 0 RMS(θ) rises to ≈0.83η̃ (asserted in [0.6, 1.0]·η̃); from 4η̃ it falls to ≈1.2η̃
        (asserted in [0.9, 1.6]·η̃). Simulated: 0.84 and 1.23 at t = 1000, 0.82 and 1.19 at t = 5000.
        """
        up, _ = self._noise_run(0.0, 1000, seed)
        down, _ = self._noise_run(4 * 0.5, 1000, seed + 100)
        assert 0.6 <= up <= 1.0, up
        assert 0.9 <= down <= 1.6, down

    def test_b_grows_like_t_squared_under_noise(self) -> None:
        """§2.2 test 4 [derived]: b ≈ 226 at t = 1000 and b ∝ t^~2 (dfac ∝ 1/t²).

        Asserted: b_1000 within 10% of 226; local log-log slope between t = 250, 500, 1000 in [1.6, 2.6]
        (simulated ≈ 2.4 over 500→1000, 2.1 over 1e3→1e4).
        """
        _, bs = self._noise_run(0.0, 1000, seed=7)
        assert bs[1000] == pytest.approx(226, rel=0.10)
        for lo, hi in [(250, 500), (500, 1000)]:
            slope = math.log(bs[hi] / bs[lo]) / math.log(hi / lo)
            assert 1.6 <= slope <= 2.6, (lo, hi, slope)

    def test_memory_linear_weight(self) -> None:
        """§2.2 test 6: a (3072, 768) Linear-style weight (torch layout of BERT's (768, 3072) kernel):
        v and b have 3072 elements each (one per output unit), vs 2.36M for Adam's v."""
        p = _param(torch.zeros(3072, 768))
        opt = danlu.Amos([p], lr=0.01)
        _step(opt, p, torch.randn(3072, 768, generator=_gen(31)))
        st = opt.state[p]
        assert st["v"].shape == (3072, 1) and st["b"].shape == (3072, 1)
        assert st["v"].numel() == 3072 and st["b"].numel() == 3072
        assert set(st) == {"step", "v", "b"}
        # the same through the module helper on nn.Linear(768, 3072)
        lin = torch.nn.Linear(768, 3072, bias=False)
        opt2 = danlu.Amos(danlu.amos_groups(lin), lr=0.01)
        lin.weight.grad = torch.ones_like(lin.weight)
        opt2.step()
        assert opt2.state[lin.weight]["v"].numel() == 3072 and opt2.state[lin.weight]["b"].numel() == 3072

    def test_jestimator_parabola_fixture(self) -> None:
        """§2.2 test 2: ξ = 1, η̃ = 1, scalar slots, Σ(θ − [1, −1, 1])² from [−1, 10, 1], 10k steps, float32.

        jestimator asserts assertSequenceAlmostEqual (7 places). Runs in ≈1 s on CPU.
        """
        target = torch.tensor([1.0, -1.0, 1.0])
        p = _param(torch.tensor([-1.0, 10.0, 1.0]))
        opt = danlu.Amos([dict(params=[p], eta=1.0, reduce_dims=(0,))], lr=1.0)
        for _ in range(10_000):
            p.grad = 2.0 * (p.detach() - target)
            opt.step()
        assert opt.state[p]["v"].numel() == 1
        torch.testing.assert_close(p.detach(), target, rtol=0, atol=5e-8)

    def test_jestimator_rosenbrock_fixture(self) -> None:
        """§2.2 test 2: Rosenbrock, ξ = 0.5, β = 0.5, clip 1, momentum 0.9, scalar slots, 10k steps → (1, 1)."""
        p = _param(torch.tensor([0.0, 0.0]))
        opt = danlu.Amos([dict(params=[p], eta=1.0, reduce_dims=(0,))], lr=0.5, beta=0.5, clip_value=1.0, momentum=0.9)
        for _ in range(10_000):
            x, y = p.detach().unbind()
            p.grad = torch.stack([-2.0 * (1.0 - x) - 400.0 * x * (y - x * x), 200.0 * (y - x * x)])
            opt.step()
        torch.testing.assert_close(p.detach(), torch.tensor([1.0, 1.0]), rtol=0, atol=1e-5)
