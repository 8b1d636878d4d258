"""Gradient accumulation folded into momentum (spec dynamics.md §2): the exact identities and the API.

Exactness conditions throughout: equal micro-batch sizes, mean-reduced loss, no batch-coupled layers,
float64, and the big-batch run steps once per window on the concatenation of the window's micro-batches.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import danlu


def _data(n: int, seed: int = 0, d: int = 6):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.sin(X @ torch.randn(d, 1, generator=g, dtype=torch.float64)) + 0.1 * torch.randn(
        n, 1, generator=g, dtype=torch.float64
    )
    return X, y


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)).double()


def _loss(model, X, y):
    return ((model(X) - y) ** 2).mean()


def _run_accum(make, k: int, windows: int, X, y, *, fused: bool = False, repeat_micro: bool = False):
    """``windows`` updates of k micro-batches each; returns the model and the optimizer."""
    model = _model()
    opt = make(model.parameters(), k)
    handle = opt.fuse_into_backward() if fused else None
    mb = X.shape[0] // (windows * k)
    flags = []
    for w in range(windows):
        for i in range(k):
            j = (w * k + (0 if repeat_micro else i)) * mb
            opt.zero_grad()
            _loss(model, X[j : j + mb], y[j : j + mb]).backward()
            opt.step()
            flags.append(opt.is_update_step)
    if handle is not None:
        handle.remove()
    assert flags == ([False] * (k - 1) + [True]) * windows
    return model, opt


def _run_big(make, k: int, windows: int, X, y, *, repeat_micro: bool = False):
    """The same data as one batch per window, with accum_steps=1."""
    model = _model()
    opt = make(model.parameters(), 1)
    mb = X.shape[0] // (windows * k)
    for w in range(windows):
        if repeat_micro:
            j = w * k * mb
            Xb, yb = X[j : j + mb].repeat(k, 1), y[j : j + mb].repeat(k, 1)
        else:
            Xb, yb = X[w * k * mb : (w + 1) * k * mb], y[w * k * mb : (w + 1) * k * mb]
        opt.zero_grad()
        _loss(model, Xb, yb).backward()
        opt.step()
    return model, opt


def _max_diff(m1, m2) -> float:
    return max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters()))


EXACT = {
    "SGDM": lambda ps, k: danlu.SGDM(ps, lr=0.2, momentum=0.9, weight_decay=0.01, accum_steps=k),
    "Tiger": lambda ps, k: danlu.Tiger(ps, lr=1e-2, beta=0.9, weight_decay=0.01, accum_steps=k),
}


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("name", sorted(EXACT))
def test_accumulation_equals_big_batch(name, k):
    """SGDM and Tiger: k micro-batches ≡ one step on the k-times-larger batch (float64, to rounding)."""
    X, y = _data(k * 8 * 4)
    accum, _ = _run_accum(EXACT[name], k, 8, X, y)
    big, _ = _run_big(EXACT[name], k, 8, X, y)
    assert _max_diff(accum, big) < 1e-12


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize(
    "name,make",
    [
        ("AdamW", lambda ps, k: danlu.AdamW(ps, lr=1e-2, weight_decay=0.01, accum_steps=k)),
        ("Lion", lambda ps, k: danlu.Lion(ps, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, accum_steps=k)),
    ],
)
def test_accumulation_exact_for_identical_micro_batches(name, make, k):
    """AdamW (v) and Lion with β1≠β2 are exact when the k micro-gradients are identical ..."""
    X, y = _data(k * 6 * 4)
    accum, _ = _run_accum(make, k, 6, X, y, repeat_micro=True)
    big, _ = _run_big(make, k, 6, X, y, repeat_micro=True)
    assert _max_diff(accum, big) < 1e-12


def test_adamw_accumulation_is_approximate_for_distinct_micro_batches():
    """... and only approximate otherwise: v holds the mean of squares, not the square of the mean,
    which is larger (Jensen), so the accumulated run's v dominates the big batch's after one window."""
    make = lambda ps, k: danlu.AdamW(ps, lr=1e-2, weight_decay=0.0, accum_steps=k)  # noqa: E731
    X, y = _data(4 * 8)
    accum, opt_a = _run_accum(make, 4, 1, X, y)
    big, opt_b = _run_big(make, 4, 1, X, y)
    assert _max_diff(accum, big) > 1e-6
    for pa, pb in zip(accum.parameters(), big.parameters()):
        va, vb = opt_a.state[pa]["exp_avg_sq"], opt_b.state[pb]["exp_avg_sq"]
        assert torch.all(va >= vb * (1 - 1e-12))
        torch.testing.assert_close(opt_a.state[pa]["exp_avg"], opt_b.state[pb]["exp_avg"], rtol=1e-12, atol=1e-15)


def test_lion_accumulation_is_approximate_but_close():
    """Lion β1≠β2: the window-mean gradient is replaced by the last micro-gradient in the interpolation."""
    make = lambda ps, k: danlu.Lion(ps, lr=1e-3, betas=(0.9, 0.99), accum_steps=k)  # noqa: E731
    X, y = _data(4 * 10 * 8)
    accum, _ = _run_accum(make, 4, 10, X, y)
    big, _ = _run_big(make, 4, 10, X, y)
    diff = _max_diff(accum, big)
    assert 0 < diff <= 10 * 2e-3  # at most every update's sign flipped: 10 updates × 2·lr


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: danlu.SGDM(ps, lr=0.1, momentum=0.8, weight_decay=0.1),
        lambda ps: danlu.AdamW(ps, lr=1e-2),
        lambda ps: danlu.Lion(ps, lr=1e-3, weight_decay=0.1),
        lambda ps: danlu.Tiger(ps, lr=1e-3),
    ],
    ids=["SGDM", "AdamW", "Lion", "Tiger"],
)
def test_accum_steps_1_every_step_updates_and_state_has_no_window(make):
    model = _model()
    opt = make(model.parameters())
    X, y = _data(16)
    for _ in range(3):
        opt.zero_grad()
        _loss(model, X, y).backward()
        opt.step()
        assert opt.is_update_step
    assert all("window" not in s for s in opt.state.values())
    assert "window" not in opt.state_dict()["state"][0]


def test_sgdm_k1_matches_ema_reference():
    """SGDM (k=1) is the EMA heavy ball: m ← βm + (1−β)g; θ ← θ(1−ηλ) − ηm."""
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(7, 3, generator=gen, dtype=torch.float64).requires_grad_()
    theta, m = p.detach().clone(), torch.zeros(7, 3, dtype=torch.float64)
    opt = danlu.SGDM([p], lr=0.05, momentum=0.7, weight_decay=0.2)
    for _ in range(25):
        g = torch.randn(7, 3, generator=gen, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        m = 0.7 * m + 0.3 * g
        theta = theta * (1 - 0.05 * 0.2) - 0.05 * m
    torch.testing.assert_close(p.detach(), theta, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
def test_adamw_k1_matches_torch_adamw(dtype, tol):
    gen = torch.Generator().manual_seed(4)
    shapes = [(5, 4), (4,), (3, 2, 2)]
    ours = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    kw = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1)
    a, b = danlu.AdamW(ours, **kw), torch.optim.AdamW(theirs, **kw, foreach=False)
    for _ in range(30):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, generator=gen, dtype=dtype)
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize(
    "make",
    [
        lambda ps, k: danlu.SGDM(ps, lr=0.1, accum_steps=k),
        lambda ps, k: danlu.AdamW(ps, lr=1e-2, accum_steps=k),
        lambda ps, k: danlu.Lion(ps, lr=1e-3, accum_steps=k),
        lambda ps, k: danlu.Tiger(ps, lr=1e-3, accum_steps=k),
    ],
    ids=["SGDM", "AdamW", "Lion", "Tiger"],
)
def test_fuse_into_backward_is_bitwise_the_same_trajectory(make, k):
    X, y = _data(k * 5 * 4)
    plain, _ = _run_accum(make, k, 5, X, y)
    fused, opt = _run_accum(make, k, 5, X, y, fused=True)
    for a, b in zip(plain.parameters(), fused.parameters()):
        assert torch.equal(a, b)
        assert b.grad is None


def test_fuse_into_backward_holds_at_most_one_gradient():
    """Memory: with the hooks, no two parameters ever hold a gradient at the same time."""
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)]).double()
    params = list(model.parameters())
    opt = danlu.AdamW(params, lr=1e-3, accum_steps=2)
    live = []
    for p in params:  # registered first, so it runs before the optimizer's hook frees .grad
        p.register_post_accumulate_grad_hook(lambda _p: live.append(sum(q.grad is not None for q in params)))
    with opt.fuse_into_backward():
        for _ in range(4):
            model(torch.randn(3, 8, dtype=torch.float64)).pow(2).mean().backward()
            opt.step()
    assert len(live) == 4 * len(params) and max(live) == 1
    with pytest.raises(RuntimeError, match="already active"):
        h = opt.fuse_into_backward()
        h2 = opt.fuse_into_backward()  # noqa: F841
    h.remove()


def test_scheduler_counts_updates():
    model = _model()
    opt = danlu.SGDM(model.parameters(), lr=0.1, accum_steps=3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    X, y = _data(12)
    for _ in range(6):
        opt.zero_grad()
        _loss(model, X, y).backward()
        opt.step()
        if opt.is_update_step:
            sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: danlu.AdamW(ps, lr=1e-2, accum_steps=3),
        lambda ps: danlu.Lion(ps, lr=1e-3, accum_steps=3),
        lambda ps: danlu.SGDM(ps, lr=0.1, accum_steps=3),
    ],
    ids=["AdamW", "Lion", "SGDM"],
)
def test_state_dict_mid_window_round_trip(make):
    """A checkpoint taken in the middle of a window resumes bit for bit (micro-step position included)."""
    X, y = _data(40)
    model = _model()
    opt = make(model.parameters())
    for i in range(4):  # one full window + one micro-step
        opt.zero_grad()
        _loss(model, X[i * 4 : i * 4 + 4], y[i * 4 : i * 4 + 4]).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    model2 = copy.deepcopy(model)
    opt2 = make(model2.parameters())
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for i in range(4, 10):
        for mdl, o in ((model, opt), (model2, opt2)):
            o.zero_grad()
            _loss(mdl, X[i * 4 : i * 4 + 4], y[i * 4 : i * 4 + 4]).backward()
            o.step()
        assert opt.is_update_step == opt2.is_update_step
        for a, b in zip(model.parameters(), model2.parameters()):
            assert torch.equal(a, b)


def test_state_dict_with_other_accum_steps_is_refused():
    model = _model()
    opt = danlu.SGDM(model.parameters(), lr=0.1, accum_steps=2)
    X, y = _data(8)
    _loss(model, X, y).backward()
    opt.step()
    other = danlu.SGDM(_model().parameters(), lr=0.1, accum_steps=4)
    with pytest.raises(ValueError, match="accum_steps=2"):
        other.load_state_dict(opt.state_dict())
    assert len(other.state) == 0


def test_param_without_grad_in_last_micro_step_still_moves():
    """A parameter that absorbed gradients earlier in the window moves at the window's end."""
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    opt = danlu.SGDM([a, b], lr=1.0, momentum=0.5, accum_steps=2)
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    opt.step()
    a.grad, b.grad = torch.ones(3), None
    opt.step()
    assert opt.is_update_step
    torch.testing.assert_close(a.detach(), torch.full((3,), -0.5))
    torch.testing.assert_close(b.detach(), torch.full((3,), -0.25))


def test_pickle_keeps_accumulation_position():
    model = _model()
    opt = danlu.Tiger(model.parameters(), lr=1e-3, accum_steps=3)
    X, y = _data(8)
    _loss(model, X, y).backward()
    opt.step()
    clone = copy.deepcopy(opt)
    assert clone.accum_steps == 3 and clone._micro_step == 1 and not clone.is_update_step
