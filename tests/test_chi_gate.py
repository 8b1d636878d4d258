"""ChiGated: Su's β̃ + χ_{t/k} accumulation recipe (kexue.fm/archives/8634) around unmodified optimizers.

The references below are written from the essay's equations in float64 numpy, independently of the
wrapper: micro-step t = 1, 2, ... (1-based), χ_{t/k} = 1 iff k | t, β̃ = 1 − (1 − β)/k, the inner rule
run on every micro-gradient with the lr α_t·χ_{t/k}.
"""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch

import danlu
from danlu.wrappers.chi_gate import ChiGated

D, B, N = 5, 3, 13  # parameters, rows per micro-batch, micro-steps


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(N, B, D)), rng.normal(size=(N, B)), rng.normal(size=D)


def _grad(theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """∇ of the micro-batch loss mean((Xθ − y)²)/2, in closed form."""
    return X.T @ (X @ theta - y) / len(y)


def _tilde(beta: float, k: int, rescale: bool) -> float:
    return 1.0 - (1.0 - beta) / k if rescale else beta


def _chi(t: int, k: int) -> float:
    return 1.0 if t % k == 0 else 0.0


def ref_ema_sgdm(lrs, beta, k, rescale, wd=0.0, seed=0):
    """EMA heavy ball: m_t = β̃m_{t−1} + (1−β̃)g_t; θ_t = θ_{t−1}(1 − χαλ) − χ·α·m_t."""
    X, y, theta = _data(seed)
    bt, m = _tilde(beta, k, rescale), np.zeros(D)
    for t in range(1, N + 1):
        g = _grad(theta, X[t - 1], y[t - 1])
        m = bt * m + (1 - bt) * g
        a = _chi(t, k) * lrs[t - 1]
        theta = theta * (1 - a * wd) - a * m
    return theta


def ref_torch_sgd(lrs, mu, k, rescale, wd=0.0, seed=0):
    """torch.optim.SGD's rule b_t = μ̃b_{t−1} + (1 − d̃)g_t (b_1 = g_1), with d = 0 and d̃ = 1 − 1/k;
    coupled L2 (g += λθ); θ_t = θ_{t−1} − χ·α·b_t."""
    X, y, theta = _data(seed)
    mt, dt = _tilde(mu, k, rescale), _tilde(0.0, k, rescale)
    b = None
    for t in range(1, N + 1):
        g = _grad(theta, X[t - 1], y[t - 1]) + wd * theta
        b = g.copy() if b is None else mt * b + (1 - dt) * g
        theta = theta - _chi(t, k) * lrs[t - 1] * b
    return theta


def ref_adamw(lrs, betas, k, rescale, eps=1e-8, wd=0.0, seed=0):
    """AdamW with its own counter per micro-step (unmodified): m, v EMAs with β̃1, β̃2,
    m̂ = m/(1 − β̃1^t), v̂ = v/(1 − β̃2^t), θ ← θ(1 − χαλ) − χα·m̂/(√v̂ + ε)."""
    X, y, theta = _data(seed)
    b1, b2 = (_tilde(b, k, rescale) for b in betas)
    m, v = np.zeros(D), np.zeros(D)
    for t in range(1, N + 1):
        g = _grad(theta, X[t - 1], y[t - 1])
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        a = _chi(t, k) * lrs[t - 1]
        theta = theta * (1 - a * wd) - a * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return theta


def ref_lion(lrs, betas, k, rescale, wd=0.0, seed=0):
    """Lion: c = β̃1m + (1−β̃1)g; θ ← θ(1 − χαλ) − χα·sign(c); m ← β̃2m + (1−β̃2)g (Tiger: β1 = β2)."""
    X, y, theta = _data(seed)
    b1, b2 = (_tilde(b, k, rescale) for b in betas)
    m = np.zeros(D)
    for t in range(1, N + 1):
        g = _grad(theta, X[t - 1], y[t - 1])
        c = b1 * m + (1 - b1) * g
        a = _chi(t, k) * lrs[t - 1]
        theta = theta * (1 - a * wd) - a * np.sign(c)
        m = b2 * m + (1 - b2) * g
    return theta


def _problem(seed: int = 0):
    X, y, theta0 = _data(seed)
    p = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    X, y = torch.tensor(X), torch.tensor(y)

    def micro(t: int) -> None:  # 0-based micro-batch index
        p.grad = None
        (0.5 * ((X[t] @ p - y[t]) ** 2).mean()).backward()

    return p, micro


def _run(make, k, rescale, lrs=None, sched=None):
    p, micro = _problem()
    opt = ChiGated(make([p]), k, rescale_betas=rescale)
    s = sched(opt) if sched else None
    for t in range(N):
        if lrs is not None:
            for g in opt.param_groups:
                g["lr"] = lrs[t]
        micro(t)
        opt.step()
        if s is not None:
            s.step()
    return p.detach().numpy(), opt


CASES = [
    ("danlu.SGDM", lambda ps: danlu.SGDM(ps, lr=0.3, momentum=0.9, weight_decay=0.1),
     lambda lrs, k, r: ref_ema_sgdm(lrs, 0.9, k, r, wd=0.1)),
    ("torch.SGD", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.1),
     lambda lrs, k, r: ref_torch_sgd(lrs, 0.9, k, r, wd=0.1)),
    ("torch.AdamW", lambda ps: torch.optim.AdamW(ps, lr=0.05, betas=(0.9, 0.99), weight_decay=0.1),
     lambda lrs, k, r: ref_adamw(lrs, (0.9, 0.99), k, r, wd=0.1)),
    ("danlu.AdamW", lambda ps: danlu.AdamW(ps, lr=0.05, betas=(0.9, 0.99), weight_decay=0.1),
     lambda lrs, k, r: ref_adamw(lrs, (0.9, 0.99), k, r, wd=0.1)),
    ("torch.Adam", lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.8, 0.9)),
     lambda lrs, k, r: ref_adamw(lrs, (0.8, 0.9), k, r)),
    ("danlu.Lion", lambda ps: danlu.Lion(ps, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1),
     lambda lrs, k, r: ref_lion(lrs, (0.9, 0.99), k, r, wd=0.1)),
    ("danlu.Tiger", lambda ps: danlu.Tiger(ps, lr=0.01, beta=0.95, weight_decay=0.1),
     lambda lrs, k, r: ref_lion(lrs, (0.95, 0.95), k, r, wd=0.1)),
]


@pytest.mark.parametrize("name,make,ref", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("k", [1, 3, 4])
@pytest.mark.parametrize("rescale", [True, False])
def test_matches_float64_reference(name, make, ref, k, rescale):
    theta, _ = _run(make, k, rescale)
    lr = make([torch.nn.Parameter(torch.zeros(1))]).param_groups[0]["lr"]
    np.testing.assert_allclose(theta, ref([lr] * N, k, rescale), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,make,ref", CASES, ids=[c[0] for c in CASES])
def test_k1_is_bitwise_the_inner_optimizer(name, make, ref):
    p, micro = _problem()
    q, micro_q = _problem()
    opt, plain = ChiGated(make([p]), 1), make([q])
    for t in range(N):
        micro(t)
        micro_q(t)
        opt.step()
        plain.step()
        assert opt.is_update_step
    assert torch.equal(p, q)
    g, h = opt.param_groups[0], plain.param_groups[0]
    assert all(g[key] == h[key] for key in h if key != "params")


@pytest.mark.parametrize("make", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_theta_unchanged_on_gated_off_steps(make):
    p, micro = _problem()
    opt = ChiGated(make([p]), 4)
    pattern = []
    for t in range(N):
        micro(t)
        before = p.detach().clone()
        opt.step()
        pattern.append(opt.is_update_step)
        assert torch.equal(p, before) != opt.is_update_step
    assert pattern == [(t + 1) % 4 == 0 for t in range(N)]
    state = opt.state[p]
    moment = state.get("momentum_buffer", state.get("exp_avg"))
    assert moment is not None and bool(moment.abs().sum() > 0)  # the state absorbed every micro-batch


def test_beta_tilde_values():
    p = torch.nn.Parameter(torch.zeros(2))
    g = ChiGated(torch.optim.SGD([p], lr=0.1, momentum=0.9), 4).param_groups[0]
    assert g["momentum"] == pytest.approx(0.975, abs=1e-15) and g["dampening"] == pytest.approx(0.75, abs=1e-15)
    g = ChiGated(torch.optim.AdamW([p], betas=(0.9, 0.999)), 2).param_groups[0]
    assert g["betas"] == pytest.approx((0.95, 0.9995), abs=1e-15) and isinstance(g["betas"], tuple)
    assert ChiGated(danlu.Tiger([p], beta=0.96), 4).param_groups[0]["beta"] == pytest.approx(0.99, abs=1e-15)
    assert ChiGated(danlu.SGDM([p], momentum=0.9), 8).param_groups[0]["momentum"] == pytest.approx(0.9875)
    assert ChiGated(danlu.Lion([p], betas=(0.9, 0.99)), 2).param_groups[0]["betas"] == pytest.approx((0.95, 0.995))
    # β̃^k ≈ β (the essay's approximation), spec dynamics.md §2.1: 0.9025, 0.9037, 0.9043 for β = 0.9.
    for k, want in ((2, 0.9025), (4, 0.9037), (8, 0.9043)):
        bt = ChiGated(danlu.SGDM([p], momentum=0.9), k).param_groups[0]["momentum"]
        assert bt ** k == pytest.approx(want, abs=1e-4)
    # rescale off: untouched, no bookkeeping keys
    g = ChiGated(torch.optim.SGD([p], lr=0.1, momentum=0.9), 4, rescale_betas=False).param_groups[0]
    assert g["momentum"] == 0.9 and g["dampening"] == 0 and not any(str(key).startswith("chi_base") for key in g)


def test_beta_tilde_plus_chi_approximates_exact_accumulation():
    """For β near 1 the recipe is close to danlu's exact rule (accum_steps=k), and χ alone is not."""
    def run(kind):
        p, micro = _problem()
        if kind == "exact":
            opt = danlu.SGDM([p], lr=0.2, momentum=0.99, accum_steps=4)
        else:
            opt = ChiGated(danlu.SGDM([p], lr=0.2, momentum=0.99), 4, rescale_betas=kind == "tilde")
        for t in range(12):
            micro(t)
            opt.step()
        return p.detach().clone()

    exact, tilde, chi = run("exact"), run("tilde"), run("chi")
    start = _problem()[0].detach()
    assert (tilde - exact).norm() < 0.05 * (exact - start).norm()
    assert (chi - exact).norm() > 0.5 * (exact - start).norm()


def test_state_dict_round_trip_mid_window_and_no_double_rescale():
    make = lambda ps: torch.optim.AdamW(ps, lr=0.05, betas=(0.9, 0.99), weight_decay=0.1)  # noqa: E731
    p, micro = _problem()
    opt = ChiGated(make([p]), 4)
    for t in range(6):  # position 2 in the second window
        micro(t)
        opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["chi_micro_step"] == 2
    assert sd["danlu_chi_gate"]["hyper"] == {"k": 4, "rescale_betas": True}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)

    q = torch.nn.Parameter(p.detach().clone())
    opt2 = ChiGated(make([q]), 4)
    opt2.load_state_dict(loaded)
    opt2.load_state_dict(opt2.state_dict())  # loading again does not rescale again
    assert opt2.param_groups[0]["betas"] == pytest.approx((0.975, 0.9975), abs=1e-15)
    assert not opt2.is_update_step
    for t in range(6, N):
        micro(t)
        opt.step()
        q.grad = torch.tensor(_grad(q.detach().numpy(), *(a[t] for a in _data()[:2])))
        opt2.step()
        assert opt2.is_update_step == opt.is_update_step
    assert torch.equal(p, q)
    np.testing.assert_allclose(p.detach().numpy(), ref_adamw([0.05] * N, (0.9, 0.99), 4, True, wd=0.1),
                               rtol=1e-12, atol=1e-12)


def test_load_bare_inner_state_dict_rescales_once_and_rescale_off_restores():
    p = torch.nn.Parameter(torch.zeros(2))
    plain = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    opt = ChiGated(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.8), 4)
    opt.load_state_dict(plain.state_dict())  # plain β = 0.9, no chi_ keys
    g = opt.param_groups[0]
    assert g["momentum"] == pytest.approx(0.975) and g["chi_base_momentum"] == 0.9 and g["chi_micro_step"] == 0
    opt.rescale_betas = False
    assert g["momentum"] == 0.9 and g["dampening"] == 0 and "chi_base_momentum" not in g
    opt.rescale_betas = True
    opt.k = 2
    assert g["momentum"] == pytest.approx(0.95) and g["dampening"] == pytest.approx(0.5)
    # saved hyperparameters replace the current ones (the wrappers' convention)
    other = ChiGated(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9), 3)
    other.load_state_dict(opt.state_dict())
    assert other.k == 2 and other.param_groups[0]["momentum"] == pytest.approx(0.95)


def test_bad_state_dict_leaves_everything_unchanged():
    p, micro = _problem()
    opt = ChiGated(torch.optim.SGD([p], lr=0.05, momentum=0.9), 4)
    micro(0)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(before)
    bad["param_groups"][0]["chi_micro_step"] = 4
    with pytest.raises(ValueError, match="chi_micro_step"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(before)
    bad["danlu_chi_gate"]["hyper"]["k"] = 0
    with pytest.raises(ValueError, match="k"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(before)
    bad["param_groups"][0]["chi_base_momentum"] = 1.5
    with pytest.raises(ValueError, match="momentum"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(before)
    bad.pop("danlu_chi_gate")
    bad["param_groups"][0]["nesterov"] = True
    with pytest.raises(ValueError, match="nesterov"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert torch.equal(after["state"][0]["momentum_buffer"], before["state"][0]["momentum_buffer"])


def test_scheduler_reads_the_scheduled_lr_every_micro_step():
    lam = lambda t: 1.0 / (1 + t)  # noqa: E731  (per micro-step)
    sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lam)  # noqa: E731
    theta, opt = _run(lambda ps: danlu.SGDM(ps, lr=0.3, momentum=0.9), 4, True, sched=sched)
    np.testing.assert_allclose(theta, ref_ema_sgdm([0.3 * lam(t) for t in range(N)], 0.9, 4, True), rtol=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.3 * lam(N))  # the lr is never left at 0

    # StepOnUpdate: the schedule counts updates
    p, micro = _problem()
    opt = ChiGated(torch.optim.AdamW([p], lr=0.05, betas=(0.9, 0.99), weight_decay=0.1), 4)
    s = danlu.StepOnUpdate(torch.optim.lr_scheduler.LambdaLR(opt, lam))
    for t in range(N):
        micro(t)
        opt.step()
        s.step()
    lrs = [0.05 * lam(t // 4) for t in range(N)]
    np.testing.assert_allclose(p.detach().numpy(), ref_adamw(lrs, (0.9, 0.99), 4, True, wd=0.1), rtol=1e-12)


def test_momentum_schedule_is_rescaled_not_overwritten():
    p, micro = _problem()
    opt = ChiGated(torch.optim.SGD([p], lr=0.01, momentum=0.9), 4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=N + 1, base_momentum=0.8,
                                                max_momentum=0.95)
    for t in range(N):
        micro(t)
        set_by_schedule = opt.param_groups[0]["momentum"]
        opt.step()
        g = opt.param_groups[0]
        if t > 0:  # OneCycleLR writes plain β; the wrapper rescales that value, once
            assert g["chi_base_momentum"] == set_by_schedule
        assert g["momentum"] == pytest.approx(1 - (1 - g["chi_base_momentum"]) / 4, abs=1e-15)
        sched.step()


def test_errors_and_nothing_half_updated():
    p = torch.nn.Parameter(torch.zeros(2))
    for bad in (0, -1):
        with pytest.raises(ValueError, match="k"):
            ChiGated(torch.optim.SGD([p], lr=0.1, momentum=0.9), bad)
    for bad in (1.5, True, "2", None):
        with pytest.raises(TypeError, match="k"):
            ChiGated(torch.optim.SGD([p], lr=0.1, momentum=0.9), bad)
    with pytest.raises(TypeError, match="rescale_betas"):
        ChiGated(torch.optim.SGD([p], lr=0.1, momentum=0.9), 2, rescale_betas=1)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        ChiGated([p], 2)
    inner = torch.optim.RMSprop([p], lr=0.1, alpha=0.9)
    with pytest.raises(TypeError, match="momentum coefficients"):
        ChiGated(inner, 2)
    assert inner.param_groups[0]["alpha"] == 0.9 and not any(str(k).startswith("chi_") for k in inner.param_groups[0])
    ChiGated(inner, 2, rescale_betas=False)  # the χ gate alone works for any lr-proportional optimizer
    for opt in (torch.optim.LBFGS([p]), torch.optim.Rprop([p]), danlu.Amos([p])):
        with pytest.raises(TypeError, match="lr"):
            ChiGated(opt, 2, rescale_betas=False)
    with pytest.raises(ValueError, match="accum_steps"):
        ChiGated(danlu.SGDM([p], accum_steps=2), 2)
    with pytest.raises(TypeError, match="already"):
        ChiGated(ChiGated(danlu.SGDM([p]), 2), 2)
    nesterov = torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match="nesterov"):
        ChiGated(nesterov, 2)
    assert nesterov.param_groups[0]["momentum"] == 0.9 and nesterov.param_groups[0]["dampening"] == 0
    with pytest.raises(TypeError, match="tensor"):
        ChiGated(torch.optim.Adam([p], betas=(torch.tensor(0.9), torch.tensor(0.99))), 2)

    # two groups, the second bad: neither is rescaled
    q = torch.nn.Parameter(torch.zeros(2))
    two = torch.optim.SGD([{"params": [p]}, {"params": [q], "momentum": 0.9, "nesterov": True}], lr=0.1,
                          momentum=0.5)
    with pytest.raises(ValueError, match="param group 1"):
        ChiGated(two, 4)
    assert two.param_groups[0]["momentum"] == 0.5

    # add_param_group with a bad group: refused and removed
    opt = ChiGated(torch.optim.SGD([p], lr=0.1, momentum=0.9), 4)
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [q], "momentum": 1.0})
    assert len(opt.param_groups) == 1
    # k setter refuses a window shorter than the micro-steps already taken
    p.grad = torch.ones(2)
    opt.step()
    opt.step()
    with pytest.raises(ValueError, match="micro-steps"):
        opt.k = 2
    assert opt.k == 4 and opt.param_groups[0]["momentum"] == pytest.approx(0.975)


def test_failing_inner_step_restores_lr_and_window():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = ChiGated(danlu.SGDM([p], lr=0.1), 4)

    def closure():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["chi_micro_step"] == 0
    p.grad = torch.ones(2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["chi_micro_step"] == 0
    lr = torch.tensor(0.1)
    opt.param_groups[0]["lr"] = lr
    p.grad = torch.ones(2)
    opt.step()
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.1)


def test_add_param_group_joins_window_and_is_rescaled():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = ChiGated(danlu.SGDM([p], lr=0.1, momentum=0.9), 4)
    p.grad = torch.ones(2)
    opt.step()
    opt.add_param_group({"params": [q], "momentum": 0.8})
    g = opt.param_groups[1]
    assert g["momentum"] == pytest.approx(0.95) and g["chi_micro_step"] == 1


def test_zero_gradient_micro_step_still_decays_the_momentum():
    """danlu treats a no-closure step with every lr 0 and all-zero gradients as DCP's state
    initialisation; a gated-off micro-step must still absorb (here: decay by β̃)."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = ChiGated(danlu.SGDM([p], lr=0.1, momentum=0.9), 4)
    p.grad = torch.ones(2)
    opt.step()
    m1 = opt.state[p]["momentum_buffer"].clone()
    p.grad = torch.zeros(2)
    opt.step()
    assert torch.allclose(opt.state[p]["momentum_buffer"], 0.975 * m1) and opt.param_groups[0]["chi_micro_step"] == 2


def test_state_init_step_does_not_advance_the_window():
    p = torch.nn.Parameter(torch.ones(2))
    opt = ChiGated(danlu.SGDM([p], lr=0.1), 4)
    opt.param_groups[0]["lr"] = 0.0
    p.grad = torch.zeros(2)
    opt.step()
    assert opt.param_groups[0]["chi_micro_step"] == 0 and "momentum_buffer" in opt.state[p]


def test_pickle_and_deepcopy():
    p, micro = _problem()
    opt = ChiGated(torch.optim.AdamW([p], lr=0.05), 3)
    micro(0)
    opt.step()
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.k == 3 and clone.rescale_betas and clone.param_groups[0]["chi_micro_step"] == 1
        assert clone.param_groups[0]["betas"] == opt.param_groups[0]["betas"]
    assert "ChiGated(k=3, rescale_betas=True" in repr(opt)
