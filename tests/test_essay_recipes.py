"""Recipes of the essays (issue 12): the Amos-essay lr rule in general form (ScaleAwareStep, 9344),
the variance-optimal policy-gradient baseline and the alternating ZO/gradient scheme (7737), and the
claim that Adam's first updates are ≈ sign updates (9473)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import danlu


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 5, generator=g, dtype=torch.float64), torch.randn(32, 3, generator=g, dtype=torch.float64)


def _train(model, opt, steps, sched=None):
    x, y = _data()
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        if sched is not None:
            sched.step()


# --- ScaleAwareStep ----------------------------------------------------------------------------------

def test_scale_aware_step_on_lion_is_scale_aware_groups():
    """For sign updates ‖u‖ = √k, so the general rule is exactly the static η = α0σ, λ = α0/(2qσ)."""
    a, b = _mlp(), _mlp()
    o1 = danlu.Lion(danlu.scale_aware_groups(a, alpha0=3e-3, q=2.0), betas=(0.9, 0.99))
    o2 = danlu.ScaleAwareStep(danlu.Lion(b.parameters(), lr=3e-3, betas=(0.9, 0.99)), q=2.0, model=b)
    _train(a, o1, 8)
    _train(b, o2, 8)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)


def test_scale_aware_step_follows_the_formula_for_adamw_with_a_schedule():
    """θ ← θ + α_t·√k·σ·Δ/‖Δ‖ − (α0·α_t/(2q))·θ, α_t the scheduled lr, against a float64 reference."""
    model = _mlp(1)
    ref = copy.deepcopy(model)
    inner = danlu.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    opt = danlu.ScaleAwareStep(inner, model=model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, danlu.scale_aware_lr_lambda(halve_at=3))
    sigmas = [float(p.detach().std()) if p.dim() >= 2 else 0.5 for p in ref.parameters()]
    scales = [math.sqrt(p.numel()) * s for p, s in zip(ref.parameters(), sigmas)]
    ref_inner = danlu.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    x, y = _data()
    for t in range(6):
        lr = 1e-2 / (t / 3 + 1)
        ref_inner.zero_grad()
        ((ref(x) - y) ** 2).mean().backward()
        old = [p.detach().clone() for p in ref.parameters()]
        for g in ref_inner.param_groups:
            g["lr"] = lr
        ref_inner.step()
        with torch.no_grad():
            for p, p0, k in zip(ref.parameters(), old, scales):
                d = p - p0
                p.copy_(p0 + lr * k * d / d.norm() - 1e-2 * lr / 2 * p0)
    _train(model, opt, 6, sched)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-13)


def test_scale_aware_step_moves_each_tensor_by_alpha_sqrt_k_sigma():
    model = _mlp(2)
    before = [p.detach().clone() for p in model.parameters()]
    opt = danlu.ScaleAwareStep(torch.optim.SGD(model.parameters(), lr=1e-3), model=model, decay=False)
    _train(model, opt, 1)
    sigma = {0: float(before[0].std()), 4: float(before[4].std())}
    for i, (p, p0) in enumerate(zip(model.parameters(), before)):
        want = 1e-3 * math.sqrt(p.numel()) * sigma.get(i, 0.5)
        assert float((p - p0).norm()) == pytest.approx(want, rel=1e-12)


def test_scale_aware_step_state_round_trip_keeps_the_init_scales():
    model = _mlp(3)
    opt = danlu.ScaleAwareStep(danlu.SGDM(model.parameters(), lr=1e-2), model=model)
    _train(model, opt, 3)
    sd = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    # built from trained weights (a resume): the scales come from the checkpoint, not from them
    opt2 = danlu.ScaleAwareStep(danlu.SGDM(twin.parameters(), lr=1e-2), model=twin)
    opt2.load_state_dict(sd)
    _train(model, opt, 2)
    _train(twin, opt2, 2)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    # a plain SGDM dict (a tool that kept only state and param_groups): refused, the scales are gone
    bare = {"state": copy.deepcopy(sd["state"]), "param_groups": copy.deepcopy(sd["param_groups"])}
    for st in bare["state"].values():
        st.pop("sas_scale")
    with pytest.raises(ValueError, match="no sas_scale"):
        opt2.load_state_dict(bare)


def test_scale_aware_step_refuses_inner_weight_decay_and_skips_mid_window():
    model = _mlp(4)
    with pytest.raises(ValueError, match="expected 0: ScaleAwareStep applies the decay"):
        danlu.ScaleAwareStep(danlu.AdamW(model.parameters(), lr=1e-3))
    opt = danlu.ScaleAwareStep(danlu.Tiger(model.parameters(), lr=1e-2, accum_steps=2), model=model)
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # mid-window: no decay either
    _train(model, opt, 1)
    assert not torch.equal(next(model.parameters()), before[0])


# --- policy-gradient baseline (7737) -----------------------------------------------------------------

def _categorical(seed=0, n=6):
    torch.manual_seed(seed)
    logits = torch.randn(5, dtype=torch.float64, requires_grad=True)
    reward = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0], dtype=torch.float64)
    return logits, reward


def test_optimal_baseline_formula_and_leave_one_out():
    logits, reward = _categorical()
    ys = torch.tensor([0, 3, 3, 1, 4, 2])
    lp = torch.log_softmax(logits, 0)[ys]
    s = danlu.score_sq_norms(lp, [logits])
    # score of a categorical: ∇ log p(y) = e_y − p, so ‖·‖² = 1 − 2p_y + ‖p‖²
    p = torch.softmax(logits, 0).detach()
    torch.testing.assert_close(s, 1 - 2 * p[ys] + p.square().sum())
    r = reward[ys]
    loss = danlu.reinforce_loss(lp, r, "optimal", params=[logits])
    b = torch.stack([(torch.cat([r[:i], r[i + 1:]]) * torch.cat([s[:i], s[i + 1:]])).sum()
                     / torch.cat([s[:i], s[i + 1:]]).sum() for i in range(6)])
    torch.testing.assert_close(loss, -((r - b) * lp).mean())
    torch.testing.assert_close(danlu.reinforce_loss(lp, r, "optimal", sq_norms=s), loss)


def test_optimal_baseline_is_unbiased_and_lowers_the_variance():
    """Exact expectation over a 3-sample draw is infeasible; over 4000 draws of n = 4 the mean gradient
    matches the true ∇E[r] within 4 standard errors, and its mean squared deviation is below the
    leave-one-out mean baseline's (the optimal weights help when score norms and rewards correlate)."""
    logits, reward = _categorical(1)
    p = torch.softmax(logits, 0).detach()
    true = p * (reward - (p * reward).sum())  # ∇_logits E[r]
    gen = torch.Generator().manual_seed(0)
    grads = {"optimal": [], "leave_one_out": []}
    for _ in range(4000):
        ys = torch.multinomial(p, 4, replacement=True, generator=gen)
        for base in grads:
            lp = torch.log_softmax(logits, 0)[ys]
            kw = {"params": [logits]} if base == "optimal" else {}
            (g,) = torch.autograd.grad(danlu.reinforce_loss(lp, reward[ys], base, **kw), logits)
            grads[base].append(-g)
    for base, gs in grads.items():
        gs = torch.stack(gs)
        se = gs.std(0) / math.sqrt(len(gs))
        assert ((gs.mean(0) - true).abs() <= 4 * se + 1e-12).all(), base
    msd = {b: (torch.stack(g) - true).square().sum(1).mean().item() for b, g in grads.items()}
    assert msd["optimal"] < msd["leave_one_out"], msd


def test_optimal_baseline_errors():
    logits, reward = _categorical()
    lp = torch.log_softmax(logits, 0)[torch.tensor([0, 1, 2])]
    with pytest.raises(ValueError, match="exactly one of params= .* or sq_norms="):
        danlu.reinforce_loss(lp, reward[:3], "optimal")
    with pytest.raises(ValueError, match="serve baseline='optimal' only"):
        danlu.reinforce_loss(lp, reward[:3], "mean", params=[logits])
    with pytest.raises(ValueError, match="sq_norms must be 3 finite non-negative"):
        danlu.reinforce_loss(lp, reward[:3], "optimal", sq_norms=torch.tensor([1.0, -1.0, 2.0]))
    with pytest.raises(ValueError, match="at least 2 samples"):
        danlu.reinforce_loss(lp[:1], reward[:1], "optimal", sq_norms=torch.ones(1))
    with pytest.raises(ValueError, match="carries no graph"):
        danlu.score_sq_norms(lp.detach(), [logits])


# --- the alternating scheme (7737) -------------------------------------------------------------------

def test_alternating_runs_the_cycle_and_round_trips():
    torch.manual_seed(0)
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    gd = torch.optim.SGD([w], lr=0.1)
    zo = danlu.ZeroOrder([w], lr=1e-3, samples=4, sigma=1e-2, seed=0)
    alt = danlu.Alternating(gd, zo, gradient_steps=2, zero_order_steps=1)

    def loss():
        gd.zero_grad()
        out = ((w - target) ** 2).sum()
        out.backward()
        return out

    def metric():
        return float((w - target).abs().max())

    kinds = [alt.step(loss, metric)[0] for _ in range(6)]
    assert kinds == ["gradient", "gradient", "zero_order"] * 2
    sd = copy.deepcopy(alt.state_dict())
    assert sd["t"] == 6 and alt.next_kind == "gradient"
    w2 = w.detach().clone().requires_grad_()
    alt2 = danlu.Alternating(torch.optim.SGD([w2], lr=0.1), danlu.ZeroOrder([w2], lr=1e-3, samples=4, sigma=1e-2),
                             gradient_steps=2, zero_order_steps=1)
    alt2.load_state_dict(sd)
    assert alt2.t == 6
    bad = danlu.Alternating(torch.optim.SGD([w2], lr=0.1), danlu.ZeroOrder([w2], lr=1e-3, samples=4, sigma=1e-2))
    with pytest.raises(ValueError, match="saved with \\(gradient_steps, zero_order_steps\\)=\\(2, 1\\)"):
        bad.load_state_dict(sd)
    with pytest.raises(TypeError, match="must be a danlu.ZeroOrder"):
        danlu.Alternating(gd, torch.optim.SGD([w], lr=0.1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 1"):
        danlu.Alternating(gd, zo, gradient_steps=0, zero_order_steps=0)


# --- Adam's first updates ≈ sign (9473) --------------------------------------------------------------

def test_adams_first_update_is_the_sign_and_early_ones_stay_close():
    """Su (9473): with bias correction, Adam's first update is m̂/√v̂ = g/|g| = sign(g) exactly (ε = 0), and
    while gradients are consistent the early updates stay ≈ ±1 per coordinate."""
    torch.manual_seed(0)
    p = torch.randn(200, dtype=torch.float64, requires_grad=True)
    opt = danlu.AdamW([p], lr=1.0, betas=(0.9, 0.999), eps=0.0, weight_decay=0.0)
    g0 = torch.randn(200, dtype=torch.float64)
    p0 = p.detach().clone()
    p.grad = g0.clone()
    opt.step()
    torch.testing.assert_close(p0 - p.detach(), torch.sign(g0), rtol=0, atol=1e-15)
    # steps 2–5 with gradients that keep their sign (g0 scaled by noise in [0.5, 1.5]): |u| stays within
    # [1/3, 3]·... and its sign stays sign(g0)
    for _ in range(4):
        prev = p.detach().clone()
        p.grad = g0 * (0.5 + torch.rand(200, dtype=torch.float64))
        opt.step()
        u = prev - p.detach()
        assert torch.equal(torch.sign(u), torch.sign(g0))
        assert (u.abs() > 0.5).all() and (u.abs() < 1.6).all()


def test_scale_aware_step_group_added_later_takes_the_configured_sigma():
    """A group added through the wrapper gets ‖ε0‖ = √k·σ with the wrapper's bias_sigma for a constant vector."""
    model = _mlp(5)
    extra = nn.Parameter(torch.zeros(9, dtype=torch.float64))
    opt = danlu.ScaleAwareStep(torch.optim.SGD(model.parameters(), lr=1e-3), model=model, bias_sigma=0.2, decay=False)
    opt.add_param_group({"params": [extra], "lr": 1e-2})
    extra.grad = torch.ones(9, dtype=torch.float64)
    opt.step()
    assert float(opt.state[extra]["sas_scale"]) == pytest.approx(3 * 0.2)
    assert float(extra.detach().norm()) == pytest.approx(1e-2 * 3 * 0.2, rel=1e-12)
