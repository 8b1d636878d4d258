"""Tiger's own recipe (kexue.fm/archives/9512, bojone/tiger): the per-tensor relative lr, the groups
that set it up, the NaN skip-and-shrink strategy, and the β presets; against a float64 reference
written from the essay and the reference code's equations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import danlu


def _reference_tiger(params, grads_seq, *, alpha, beta, wd, scales, centers, shrink=0.99):
    """The reference's update (k = 1): lr_t = α·RMS(θ_{t−1}) (whole / per row) or α·factor; on a NaN
    gradient m stays and θ ← (θ − c)·s + c; else m = βm + (1−β)g, θ ← θ − lr_t·(sign(m) + λθ)."""
    thetas = [p.detach().clone() for p in params]
    ms = [torch.zeros_like(t) for t in thetas]
    for grads in grads_seq:
        for i, g in enumerate(grads):
            th = thetas[i]
            if not torch.isfinite(g).all():
                thetas[i] = (th - centers[i]) * shrink + centers[i]
                continue
            kind = scales[i]
            if kind == "rms":
                lr = alpha * th.square().mean().sqrt()
            elif kind == "row_rms":
                lr = alpha * th.square().mean(-1, keepdim=True).sqrt()
            else:
                lr = alpha * kind
            ms[i] = beta * ms[i] + (1 - beta) * g
            thetas[i] = th - lr * (torch.sign(ms[i]) + wd[i] * th)
    return thetas


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.lin = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)


def test_tiger_groups_roles_and_settings():
    net = _Net()
    groups = danlu.tiger_groups(net, lr=2e-3, weight_decay=0.01)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(net.emb.weight)]["lr_scale"] == "row_rms" and by_id[id(net.emb.weight)]["weight_decay"] == 0.01
    assert by_id[id(net.lin.weight)]["lr_scale"] == "rms" and by_id[id(net.lin.weight)]["lr"] == 2e-3
    for p in (net.lin.bias, net.norm.bias, net.norm.weight):
        g = by_id[id(p)]
        assert g["lr_scale"] is None and g["lr"] == pytest.approx(1e-3) and g["weight_decay"] == 0.0
    assert by_id[id(net.norm.weight)]["shrink_center"] == 1.0 and by_id[id(net.norm.bias)]["shrink_center"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    with pytest.raises(ValueError, match="Invalid lr"):
        danlu.tiger_groups(net, lr=-1.0)


@pytest.mark.parametrize("on_nan", ["propagate", "skip"])
def test_tiger_recipe_matches_the_reference_in_float64(on_nan):
    torch.manual_seed(0)
    net = _Net().double()
    params = list(net.parameters())
    opt = danlu.Tiger(danlu.tiger_groups(net, lr=1e-2, weight_decay=0.1), beta=0.9, on_nan=on_nan)
    kinds = {id(net.emb.weight): "row_rms", id(net.lin.weight): "rms"}
    scales = [kinds.get(id(p), 0.5) for p in params]
    wd = [0.1 if id(p) in kinds else 0.0 for p in params]
    centers = [1.0 if p is net.norm.weight else 0.0 for p in params]
    grads_seq = [[torch.randn_like(p) for p in params] for _ in range(6)]
    if on_nan == "skip":
        grads_seq[3][1] = grads_seq[3][1].clone()
        grads_seq[3][1][0, 0] = math.nan  # the Linear's weight at step 4
        grads_seq[4][3] = torch.full_like(grads_seq[4][3], math.inf)  # the norm gain at step 5
    want = _reference_tiger(params, grads_seq, alpha=1e-2, beta=0.9, wd=wd, scales=scales, centers=centers)
    for grads in grads_seq:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-14)
    assert all(torch.isfinite(opt.state[p]["exp_avg"]).all() for p in params)


def test_skip_leaves_other_tensors_and_momentum_alone():
    torch.manual_seed(1)
    a, b = torch.randn(5, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    opt = danlu.Tiger([a, b], lr=1e-2, on_nan="skip", shrink=0.5, shrink_center=2.0)
    a.grad, b.grad = torch.randn(5, 3), torch.randn(4)
    opt.step()
    m_a = opt.state[a]["exp_avg"].clone()
    a0, b0 = a.detach().clone(), b.detach().clone()
    a.grad = torch.randn(5, 3)
    a.grad[2, 1] = math.nan
    b.grad = torch.randn(4)
    opt.step()
    torch.testing.assert_close(a.detach(), (a0 - 2.0) * 0.5 + 2.0, rtol=0, atol=0)
    assert torch.equal(opt.state[a]["exp_avg"], m_a)
    assert not torch.equal(b.detach(), b0) and torch.isfinite(b).all()


def test_skip_with_finite_gradients_is_bitwise_the_plain_step():
    torch.manual_seed(2)
    ps = [torch.randn(6, 4, requires_grad=True), torch.randn(3, requires_grad=True)]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    o1 = danlu.Tiger(ps, lr=3e-3, weight_decay=0.1, lr_scale="rms")
    o2 = danlu.Tiger(qs, lr=3e-3, weight_decay=0.1, lr_scale="rms", on_nan="skip")
    for _ in range(4):
        gs = [torch.randn_like(p) for p in ps]
        for p, q, g in zip(ps, qs, gs):
            p.grad, q.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


def test_skip_under_accumulation_leaves_the_bad_micro_batch_out():
    """k = 2: a window whose second micro-gradient is NaN moves θ by the first one's momentum (after the
    shrink), equal to a run that never saw the bad micro-batch but shrank at the same point."""
    torch.manual_seed(3)
    p = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    o1 = danlu.Tiger([p], lr=1e-2, beta=0.9, accum_steps=2, on_nan="skip", lr_scale="rms")
    g1 = torch.randn(4, 3, dtype=torch.float64)
    bad = torch.full((4, 3), math.nan, dtype=torch.float64)
    p.grad = g1.clone()
    o1.step()
    p.grad = bad
    o1.step()
    assert o1.is_update_step
    # by hand: m = β·0 + (1−β)/2·g1; θ shrinks, then θ ← θ − α·RMS(θ)·sign(m)
    with torch.no_grad():
        m = 0.05 * g1
        th = q * 0.99
        want = th - 1e-2 * th.square().mean().sqrt() * torch.sign(m)
    torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-15)
    torch.testing.assert_close(o1.state[p]["exp_avg"], m, rtol=0, atol=1e-16)


def test_zero_rms_tensor_stays_put_and_row_rms_is_per_row():
    z = torch.zeros(3, 4, requires_grad=True)
    e = torch.tensor([[1.0, 1.0], [10.0, 10.0]], requires_grad=True)
    opt = danlu.Tiger([{"params": [z], "lr_scale": "rms"}, {"params": [e], "lr_scale": "row_rms"}], lr=0.1, beta=0.0)
    z.grad = torch.ones(3, 4)
    e.grad = torch.ones(2, 2)
    opt.step()
    assert torch.equal(z, torch.zeros(3, 4))  # the recipe's lr is α·RMS(θ) = 0 (documented)
    torch.testing.assert_close(e.detach(), torch.tensor([[0.9, 0.9], [9.0, 9.0]]))


def test_recipe_options_round_trip_and_validate():
    p = torch.randn(3, 3, requires_grad=True)
    opt = danlu.Tiger([p], lr_scale="row_rms", on_nan="skip", shrink=0.9, shrink_center=1.0)
    p.grad = torch.randn(3, 3)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    q = p.detach().clone().requires_grad_()
    other = danlu.Tiger([q])
    other.load_state_dict(sd)
    g = other.param_groups[0]
    assert (g["lr_scale"], g["on_nan"], g["shrink"], g["shrink_center"]) == ("row_rms", "skip", 0.9, 1.0)
    # a state dict saved before these options existed loads with the defaults
    old = copy.deepcopy(sd)
    for k in ("lr_scale", "on_nan", "shrink", "shrink_center"):
        del old["param_groups"][0][k]
    other.load_state_dict(old)
    assert other.param_groups[0]["lr_scale"] is None and other.param_groups[0]["on_nan"] == "propagate"


def test_beta_presets_are_the_means_of_lions():
    assert danlu.Tiger.BETA_NLP == pytest.approx((0.95 + 0.98) / 2)
    assert danlu.Tiger.BETA_CV == pytest.approx((0.9 + 0.99) / 2)
    assert danlu.Tiger([torch.zeros(1, requires_grad=True)]).param_groups[0]["beta"] == danlu.Tiger.BETA_NLP


def test_lion_presets():
    kw = danlu.lion_preset("vit-imagenet")
    assert kw == {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 10.0}
    assert danlu.lion_preset(" LM-7.5B ")["betas"] == (0.95, 0.98)
    for name, preset in danlu.LION_PRESETS.items():
        assert preset.source and "arXiv:2302.06675" in preset.source or "9473" in preset.source, name
        danlu.Lion([torch.zeros(2, requires_grad=True)], **danlu.lion_preset(name))  # valid settings
    # the paper's worked examples keep lr·λ of their baseline (§5: lr ÷ k, λ × k)
    assert 1e-4 * 10.0 == pytest.approx(1e-3 * 1.0) and 3e-5 * 0.1 == pytest.approx(3e-4 * 0.01)
    with pytest.raises(ValueError, match="Unknown Lion preset 'gpt'; known: vit-imagenet"):
        danlu.lion_preset("gpt")
    with pytest.raises(TypeError):
        danlu.lion_preset(3)  # type: ignore[arg-type]
