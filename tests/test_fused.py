"""``fused=True``: one compiled pass per bucket (danlu._core.fused) equals the per-tensor path.

Compiles use the real inductor backend on small buckets; each test builds few optimizers, since every
fused optimizer compiles its buckets once.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import danlu

FUSABLE = {
    "Lion": lambda ps, **kw: danlu.Lion(ps, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, **kw),
    "Tiger": lambda ps, **kw: danlu.Tiger(ps, lr=1e-2, beta=0.9, weight_decay=0.1, **kw),
    # Su's recipe: the per-row RMS lr (whole-tensor for 1-D) and the branch-free NaN skip in the graph.
    "Tiger-recipe": lambda ps, **kw: danlu.Tiger(ps, lr=3e-2, beta=0.9, weight_decay=0.1, lr_scale="row_rms",
                                                 on_nan="skip", **kw),
    "SGDM": lambda ps, **kw: danlu.SGDM(ps, lr=0.1, momentum=0.9, weight_decay=0.1, **kw),
    "AdamW": lambda ps, **kw: danlu.AdamW(ps, lr=1e-2, weight_decay=0.1, **kw),
    "AdaX": lambda ps, **kw: danlu.AdaX(ps, lr=1e-2, weight_decay=0.1, **kw),
    "Adafactor": lambda ps, **kw: danlu.Adafactor(ps, beta1=0.9, weight_decay=0.1, min_dim_size_to_factor=4, **kw),
    "Amos": lambda ps, **kw: danlu.Amos(ps, lr=0.1, momentum=0.9, clip_value=1.0, extra_l2=1e-3, **kw),
    "EGD": lambda ps, **kw: danlu.EGD(ps, lr=0.1, signed=True, **kw),
}
# (32, 6): a leading dim that divides by 16, which the compiled reductions sum in blocks (sum_along).
SHAPES = [((6, 5), torch.float64), ((5,), torch.float64), ((0, 3), torch.float64), ((3, 4, 5), torch.float64),
          ((32, 6), torch.float64), ((4, 4), torch.float32)]


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dt) for s, dt in SHAPES]


def _grads(step):
    g = torch.Generator().manual_seed(100 + step)
    return [None if (i == 1 and step % 2) else torch.randn(s, generator=g, dtype=torch.float64).to(dt)
            for i, (s, dt) in enumerate(SHAPES)]


def _step(opt, params, step, sched):
    for p, g in zip(params, _grads(step)):
        p.grad = g
    opt.step()
    sched.step()


def _assert_close(a, b):
    for x, y in zip(a, b):
        tol = dict(rtol=1e-12, atol=1e-14) if x.dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(x, y, **tol)


@pytest.mark.parametrize("name", list(FUSABLE))
def test_fused_equals_per_tensor_and_state_dicts_cross_paths(name):
    """Weight decay, a changing lr, a zero-size tensor, a parameter whose grad is None every other step,
    float64 and float32 in one group (two buckets); then a fused state dict loaded into a per-tensor
    optimizer continues like the fused one."""
    torch._dynamo.reset()
    make = FUSABLE[name]
    loop_p, fused_p = _params(), _params()
    loop, fused = make(loop_p), make(fused_p, fused=True)
    lambda_lr = lambda t: 1.0 / (1 + t)  # noqa: E731
    s_loop = torch.optim.lr_scheduler.LambdaLR(loop, lambda_lr)
    s_fused = torch.optim.lr_scheduler.LambdaLR(fused, lambda_lr)
    for t in range(4):
        _step(loop, loop_p, t, s_loop)
        _step(fused, fused_p, t, s_fused)
        _assert_close(loop_p, fused_p)
    assert fused.param_groups[0]["fused"] is True
    driver = fused._fused_steps  # the compiled path ran (no silent fallback): one function per bucket
    buckets = {(p.dtype, tuple(sorted((k, v.dtype) for k, v in fused.state[p].items() if torch.is_tensor(v))))
               for p in fused_p if p.numel()}
    assert driver.disabled is None and len(driver._functions) == len(buckets) >= 2  # float64 and float32
    # Cross-path resume: the fused optimizer's state into a per-tensor one, and back.
    copy_p = [p.detach().clone() for p in fused_p]
    resumed = make(copy_p)
    s_resumed = torch.optim.lr_scheduler.LambdaLR(resumed, lambda_lr)  # the usual resume order
    sd = copy.deepcopy(fused.state_dict())
    sd["param_groups"][0]["fused"] = False
    resumed.load_state_dict(sd)
    s_resumed.load_state_dict(s_fused.state_dict())
    for t in range(4, 6):
        _step(fused, fused_p, t, s_fused)
        _step(resumed, copy_p, t, s_resumed)
    _assert_close(fused_p, copy_p)


@pytest.mark.parametrize("name,sched", [("SGDM", "LambdaLR"), ("SGDM", "OneCycleLR"), ("SGDM", "ReduceLROnPlateau"),
                                        ("AdamW", "OneCycleLR")])
def test_fused_step_does_not_recompile_under_schedulers(name, sched):
    """lr, betas/momentum (OneCycleLR cycles them) and weight decay reach the compiled bucket as 0-d
    tensors the optimizer fills: one graph per bucket (and one for AdamW's bias corrections) across 20
    scheduled steps, Python floats included
    (ReduceLROnPlateau writes floats)."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    opt = getattr(danlu, name)(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    make = {
        "LambdaLR": lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (t + 1)),
        "OneCycleLR": lambda: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=30),
        "ReduceLROnPlateau": lambda: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5),
    }
    scheduler = make[sched]()
    lrs, momenta = set(), set()
    for i in range(20):
        model(torch.randn(3, 8)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        scheduler.step(float(i % 3)) if sched == "ReduceLROnPlateau" else scheduler.step()
        lrs.add(opt.param_groups[0]["lr"])
        momenta.add(opt.param_groups[0]["momentum"] if name == "SGDM" else opt.param_groups[0]["betas"][0])
    assert len(lrs) > 3 and (sched != "OneCycleLR" or len(momenta) > 3)
    # One graph per bucket, plus one for the bucket's step scalars where the kernel derives them.
    assert counters["stats"]["unique_graphs"] == 1 + (type(opt)._derive is not None)


def test_fused_bad_input_is_refused_before_anything_changes():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(TypeError, match=r"^Invalid fused: 1 \(expected a bool\)$"):
        danlu.Lion([p], fused=1)
    with pytest.raises(ValueError, match=r"^Invalid fused: True \(expected False with accum_steps=2"):
        danlu.SGDM([p], accum_steps=2, fused=True)
    with pytest.raises(ValueError, match=r"^Invalid fused: True \(expected False for parameters with layout "
                                         r"torch.sparse_coo"):
        danlu.AdamW([p, torch.nn.Parameter(torch.randn(3).to_sparse())], fused=True)
    with pytest.raises(TypeError, match="does not support complex parameters"):
        danlu.Amos([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))], fused=True)
    opt = danlu.Tiger([p])
    with pytest.raises(TypeError, match="Invalid fused"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "fused": "yes"})
    assert len(opt.param_groups) == 1


def _failing_compile(*args):
    raise torch._dynamo.exc.InternalTorchDynamoError("no C++ compiler")


def _loop_and_fused_steps(name, steps=3):
    """Per-tensor and fused ``name`` over ``steps`` steps; returns both, their parameters and the warnings."""
    loop_p, fused_p = _params(), _params()
    loop, fused = FUSABLE[name](loop_p), FUSABLE[name](fused_p, fused=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for t in range(steps):
            for opt, ps in ((loop, loop_p), (fused, fused_p)):
                for p, g in zip(ps, _grads(t)):
                    p.grad = g
                opt.step()
    return loop, loop_p, fused, fused_p, seen


def test_failed_compilation_falls_back_with_one_warning(monkeypatch):
    """No compiler (or an unsupported platform): the per-tensor path runs, with one warning."""

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: _failing_compile)
    loop, loop_p, fused, fused_p, seen = _loop_and_fused_steps("Lion")
    msgs = [str(w.message) for w in seen if "fused=True" in str(w.message)]
    assert len(msgs) == 1 and "no C++ compiler" in msgs[0]
    for a, b in zip(loop_p, fused_p):
        assert torch.equal(a, b)  # the per-tensor path itself


def test_fused_optimizer_deepcopies_and_pickles():
    """The compiled functions are not part of the optimizer's state: a copy compiles its own."""
    torch._dynamo.reset()
    ps = _params()[:2]
    opt = FUSABLE["Tiger"](ps, fused=True)
    for p, g in zip(ps, _grads(0)[:2]):
        p.grad = g
    opt.step()
    clone = copy.deepcopy((ps, opt))
    for (p, q), g in zip(zip(ps, clone[0]), _grads(1)[:2]):
        p.grad = g
        q.grad = None if g is None else g.clone()
    opt.step()
    clone[1].step()
    for a, b in zip(ps, clone[0]):
        assert torch.equal(a, b)


def test_failed_bucket_compilation_after_the_scalars_ran_does_not_step_twice(monkeypatch):
    """AdamW's bucket runs in two graphs (its step scalars, then the pass over the elements). If only
    the second fails to compile, the counters have already moved: the per-tensor fallback finishes the
    bucket with those scalars instead of incrementing the counters again."""

    # The scalars' function runs eagerly (so the counters move); the bucket's fails to compile.
    monkeypatch.setattr(torch, "compile",
                        lambda fn, **kw: fn if fn.__name__.startswith("danlu_scalars") else _failing_compile)
    loop, loop_p, fused, fused_p, _ = _loop_and_fused_steps("AdamW")
    for a, b in zip(loop_p, fused_p):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [float(fused.state[p]["step"]) for p in fused_p if p.numel()] == [
        float(loop.state[p]["step"]) for p in loop_p if p.numel()]


@pytest.mark.parametrize("name", ["Lion", "Amos", "EGD", "Adafactor"])
def test_fused_step_propagates_nonfinite_gradients(name):
    """A NaN or ±inf gradient entry shows as NaN in θ on the fused path as on the per-tensor one
    (inductor simplifies g·0 to 0, so the propagation must not be written as g·0)."""
    torch._dynamo.reset()
    out = []
    for fused in (False, True):
        p = torch.nn.Parameter(torch.ones(8, 4))
        opt = FUSABLE[name]([p], fused=fused)
        g = torch.full((8, 4), 0.5)
        g[0, 0], g[1, 1], g[2, 2] = float("inf"), float("nan"), -float("inf")
        p.grad = g
        opt.step()
        out.append(p.detach().clone())
    loop, fused = out
    bad = torch.zeros(8, 4, dtype=torch.bool)
    bad[0, 0] = bad[1, 1] = bad[2, 2] = True
    assert torch.isnan(fused[bad]).all() and torch.isnan(loop[bad]).all()
    # Elsewhere as the per-tensor path (Amos's per-row statistics spread the NaN over the row,
    # Adafactor's factored ones over the whole matrix).
    torch.testing.assert_close(fused, loop, rtol=1e-6, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("name", ["Lion", "AdamW"])
def test_fused_bf16_state_rounds_like_the_per_tensor_path(name):
    """bfloat16 state on the fused path: the rounding keys come from the scalars graph, the rounding from
    the element graph (with the float32 → bfloat16 round trips kept), and the result is the per-tensor
    path's: every state entry equal or, where the float32 value before rounding differs in its last bit,
    the other bfloat16 neighbour; the counters and parameters agree."""
    torch._dynamo.reset()
    shapes = [(6, 5), (5,), (0, 3), (32, 6)]
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) for s in shapes]
    loop_p = [p.clone() for p in init]
    fused_p = [p.clone() for p in init]
    loop = FUSABLE[name](loop_p, state_dtype=torch.bfloat16)
    fused = FUSABLE[name](fused_p, state_dtype=torch.bfloat16, fused=True)
    for t in range(4):
        for group in (loop.param_groups[0], fused.param_groups[0]):
            group["lr"] = 1e-2 / (1 + t)
        grads = [torch.randn(s, generator=g) for s in shapes]
        for a, b, gr in zip(loop_p, fused_p, grads):
            a.grad, b.grad = gr.clone(), gr.clone()
        loop.step()
        fused.step()
    assert fused._fused_steps.disabled is None and len(fused._fused_steps._derive_functions) == 1
    equal = total = 0
    for a, b in zip(loop_p, fused_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        sa, sb = loop.state[a], fused.state[b]
        if not a.numel():
            continue
        assert torch.equal(sa["sr_step"], sb["sr_step"]) and int(sb["sr_step"]) == 4
        for k in fused._low_precision_state & set(sa):
            assert sb[k].dtype == torch.bfloat16
            x, y = sa[k].float(), sb[k].float()
            gap = (torch.nextafter(x.bfloat16(), torch.tensor(float("inf"), dtype=torch.bfloat16)).float() - x).abs()
            assert ((x - y).abs() <= gap * 1.001).all()
            equal += int((x == y).sum())
            total += x.numel()
    assert equal >= 0.98 * total


def test_fused_tiger_skip_shrinks_like_the_per_tensor_path():
    """Tiger's on_nan="skip" on the fused path: the tensor with a NaN gradient keeps its momentum and
    shrinks toward its centre, the other steps, exactly as the per-tensor kernel does."""
    torch._dynamo.reset()
    out = []
    for fused in (False, True):
        a = torch.nn.Parameter(torch.linspace(-1, 1, 32).reshape(8, 4))
        b = torch.nn.Parameter(torch.linspace(0.5, 1.5, 6))
        opt = FUSABLE["Tiger-recipe"]([a, b], fused=fused)
        for step in range(3):
            ga, gb = torch.full((8, 4), 0.5), torch.full((6,), -0.25)
            if step == 1:
                ga[3, 2] = float("nan")
            a.grad, b.grad = ga, gb
            opt.step()
        out.append((a.detach().clone(), b.detach().clone(), opt.state[a]["exp_avg"].clone()))
    (la, lb, lm), (fa, fb, fm) = out
    assert torch.isfinite(fa).all() and torch.isfinite(fm).all()
    torch.testing.assert_close(fa, la, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fb, lb, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fm, lm, rtol=1e-6, atol=1e-7)
