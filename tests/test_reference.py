"""danlu vs an independent float64 reference (tests/reference_impls.py) and vs public packages.

Part 1 (float64): every optimizer, several hyperparameter settings, many tensor shapes, 20+ steps of
seeded random gradients. After EVERY step the danlu parameter must match the reference:

* ``max |θ_danlu − θ_ref| ≤ 1e-10``  (absolute; all parameters are O(1)), and
* ``max |θ_danlu − θ_ref| ≤ 1e-10 · max |θ_ref − θ_0|``  (relative to the total displacement
  so far, sup-norm). This is the strict one: the updates are small, so a param-level absolute
  tolerance alone would hide an update that is off by 1e-6 relatively.

State is compared where the spec pins it (Lion/Tiger m; AdaX m and normalised v̂; Adafactor: the
number of second-moment floats, n + m per factored slice, the full V̂ when unfactored, the momentum;
Amos v, b of the reduced shape S, momentum buffer).

Part 2 (float32): parity with ``lion_pytorch.Lion`` and ``torch.optim.Adafactor`` where the
conventions coincide.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import danlu
from reference_impls import (
    AdafactorRef,
    AdaXRef,
    AmosRef,
    LionRef,
    TigerRef,
    adafactor_factored_dims,
    amos_default_eta_and_dims,
)

STEPS = 20
ABS_TOL = 1e-10
REL_TOL = 1e-10  # relative to max|θ_ref − θ_0|
STATE_RTOL = 1e-10

SHAPES = {
    "scalar": (),
    "vec7": (7,),
    "vec300": (300,),
    "mat64x1000": (64, 1000),  # largest two dims 1000, 64: NOT factored (64 < 128)
    "mat130x200": (130, 200),  # factored
    "mat256x128": (256, 128),  # factored, largest dim first
    "t3x130x140": (3, 130, 140),  # factored over the last two
    "t140x3x130": (140, 3, 130),  # factored over dims 0 and 2
    "t4x5x6": (4, 5, 6),  # small 3-D, not factored
}


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _theta0(shape, rng, zero=False):
    if zero:
        return np.zeros(shape)
    return 0.5 * rng.standard_normal(shape)


def _grad_stream(shape, rng, steps=STEPS, zero_rows=False):
    """Seeded gradients, heterogeneous in scale (per dim-0 index, per last-dim index, per step) so
    that factoring / per-row statistics / clipping are actually exercised."""
    shape = tuple(shape)
    pattern = np.ones(shape)
    if len(shape) >= 1:
        per_row = np.exp(0.7 * rng.standard_normal(shape[0]))
        pattern = pattern * per_row.reshape((-1,) + (1,) * (len(shape) - 1))
    if len(shape) >= 2:
        pattern = pattern * np.exp(0.7 * rng.standard_normal(shape[-1]))
    grads = []
    for _ in range(steps):
        g = rng.standard_normal(shape) * pattern * math.exp(0.5 * rng.standard_normal())
        if zero_rows and len(shape) >= 1:
            g = np.array(g)
            g[: max(1, shape[0] // 4)] = 0.0  # a block of rows whose gradient is always exactly 0
        grads.append(np.asarray(g, dtype=np.float64))
    return grads


def _check_param(name, step, got, ref, theta0):
    err = float(np.max(np.abs(got - ref))) if got.size else 0.0
    disp = float(np.max(np.abs(ref - theta0))) if got.size else 0.0
    assert err <= ABS_TOL, f"{name} step {step}: max abs err {err:.3e} > {ABS_TOL:g}"
    assert err <= REL_TOL * disp or err == 0.0, (
        f"{name} step {step}: max abs err {err:.3e} > {REL_TOL:g} × displacement {disp:.3e}"
    )


def _check_state(name, step, key, got, ref):
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.size == ref.size, f"{name} step {step}: state {key} has {got.size} numbers, not {ref.size}"
    got = got.reshape(ref.shape)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    assert err <= STATE_RTOL * scale or err == 0.0, (
        f"{name} step {step}: state {key} max err {err:.3e} vs scale {scale:.3e}"
    )


def _run_against_reference(make_opt, make_ref, shapes, seed, state_check=None, zero_init=False,
                           zero_rows=False, lr_schedule=None):
    """Drive one danlu optimizer over ``shapes`` (one param each) and one reference per tensor."""
    rng = np.random.default_rng(seed)
    theta0 = [_theta0(s, rng, zero=zero_init) for s in shapes]
    grads = [_grad_stream(s, rng, zero_rows=zero_rows) for s in shapes]
    params = [torch.nn.Parameter(torch.tensor(t, dtype=torch.float64)) for t in theta0]
    opt = make_opt(params)
    refs = [make_ref(i, s) for i, s in enumerate(shapes)]
    ref_theta = [t.copy() for t in theta0]
    for step in range(1, STEPS + 1):
        if lr_schedule is not None:
            lr_schedule(step, opt, refs)
        for i, p in enumerate(params):
            p.grad = torch.tensor(grads[i][step - 1], dtype=torch.float64)
        opt.step()
        for i, p in enumerate(params):
            ref_theta[i] = refs[i].step(ref_theta[i], grads[i][step - 1])
            name = f"param {i} shape {shapes[i]}"
            got = p.detach().numpy()
            assert got.shape == tuple(shapes[i])
            _check_param(name, step, got, ref_theta[i], theta0[i])
            if state_check is not None:
                state_check(name, step, opt.state[p], refs[i], p)
    return opt, refs


# --- per-optimizer state checks -------------------------------------------------------------------
def _lion_state(name, step, st, ref, p):
    _check_state(name, step, "exp_avg", st["exp_avg"], ref.m)


def _adax_state(name, step, st, ref, p):
    assert float(st["step"]) == ref.t
    _check_state(name, step, "exp_avg", st["exp_avg"], ref.m)
    _check_state(name, step, "exp_avg_sq", st["exp_avg_sq"], ref.v_hat())  # spec: store normalised v̂


def _adafactor_state(name, step, st, ref, p):
    assert float(st["step"]) == ref.t
    if ref.factored:
        assert "exp_avg_sq" not in st, f"{name}: factored tensor keeps a full exp_avg_sq"
        n_row, n_col = st["exp_avg_sq_row"].numel(), st["exp_avg_sq_col"].numel()
        assert n_row + n_col == ref.state_numel(), (
            f"{name}: {n_row}+{n_col} second-moment floats, spec says {ref.state_numel()} (n+m per slice)"
        )
        row = st["exp_avg_sq_row"].detach().numpy()
        col = st["exp_avg_sq_col"].detach().numpy()
        shape = tuple(p.shape)
        a, b = ref.dims
        # Documented layout (keepdim means): R has a 1 at the largest dim a, C at the 2nd-largest b,
        # and V̂ = R·C / mean_b(R). Reconstruct V̂ from danlu's own state and compare with ours.
        if row.ndim == len(shape) and row.shape[a] == 1 and col.shape[b] == 1:
            v_hat = row * col / np.mean(row, axis=b, keepdims=True)
            _check_state(name, step, "V̂ from (row, col)", v_hat, ref.v_hat())
    else:
        assert "exp_avg_sq_row" not in st and "exp_avg_sq_col" not in st
        assert tuple(st["exp_avg_sq"].shape) == tuple(p.shape)
        _check_state(name, step, "exp_avg_sq", st["exp_avg_sq"], ref.v)
    if ref.beta1 is not None:
        _check_state(name, step, "exp_avg", st["exp_avg"], ref.m)
    else:
        assert "exp_avg" not in st, f"{name}: beta1=None must keep no first moment"


def _amos_state(name, step, st, ref, p):
    assert float(st["step"]) == ref.t
    for key, val in (("v", ref.v), ("b", ref.b)):
        got = st[key].detach().numpy()
        assert got.size == val.size, f"{name}: {key} has {got.size} numbers, S={ref.S} has {val.size}"
        # S must broadcast to the parameter shape (keepdims semantics)
        np.broadcast_shapes(got.shape, tuple(p.shape))
        _check_state(name, step, key, got, val)
    if ref.m is not None:
        _check_state(name, step, "exp_avg", st["exp_avg"], ref.m)
    else:
        assert "exp_avg" not in st


# --------------------------------------------------------------------------------------------------
# 1. float64 reference parity
# --------------------------------------------------------------------------------------------------
LION_SETTINGS = {
    "default": dict(),
    "lr1e-3_wd0.1": dict(lr=1e-3, weight_decay=0.1),
    "betas.95-.98_wd1": dict(lr=3e-4, betas=(0.95, 0.98), weight_decay=1.0),
    "beta1_0_signsgd": dict(lr=1e-3, betas=(0.0, 0.99), weight_decay=0.01),
}
TIGER_SETTINGS = {
    "lr1e-3": dict(lr=1e-3),
    "beta.9_wd.05": dict(lr=2e-3, beta=0.9, weight_decay=0.05),
    "beta.5_wd1": dict(lr=1e-3, beta=0.5, weight_decay=1.0),
}
ADAX_SETTINGS = {
    "default": dict(),
    "lr5e-3_wd5e-2": dict(lr=5e-3, weight_decay=5e-2),
    "betas.8-1e-2_eps1e-8_wd": dict(lr=1e-2, betas=(0.8, 1e-2), eps=1e-8, weight_decay=0.01),
    "beta2_.5_eps0": dict(lr=1e-3, betas=(0.9, 0.5), eps=0.0),
}
ADAFACTOR_SETTINGS = {
    "default": dict(),
    "beta1_.9": dict(beta1=0.9),
    "lr_float_3e-3": dict(lr=3e-3),
    "noscale_lr1e-2": dict(lr=1e-2, scale_parameter=False),
    "noscale_relative": dict(scale_parameter=False),
    "wd.1_beta1_.8": dict(weight_decay=0.1, beta1=0.8),
    "lr1e-2_wd.5": dict(lr=1e-2, weight_decay=0.5),
    "clip.7_decay.5": dict(clip_threshold=0.7, decay_rate=0.5),
    "eps2_1": dict(eps=(1e-30, 1.0)),  # ε2 > RMS(θ): the parameter-scale floor is active
    "mindim4": dict(min_dim_size_to_factor=4, beta1=0.5, weight_decay=0.2),  # small tensors factored
}
# Amos: (ctor kwargs, group-extras function shape -> dict or None for inference)
AMOS_SETTINGS = {
    "infer_default": (dict(lr=0.1), None),
    "infer_beta.98_mom.9": (dict(lr=0.1, beta=0.98, momentum=0.9), None),
    "infer_clip.5": (dict(lr=0.2, clip_value=0.5), None),
    "infer_l2_c.5_d.1": (dict(lr=0.1, extra_l2=0.01, c_coef=0.5, d_coef=0.1), None),
    "infer_xi.5_all": (dict(lr=0.5, beta=0.9, momentum=0.5, clip_value=1.0, extra_l2=1e-3), None),
    "eta.3_elementwise": (dict(lr=0.1, momentum=0.9), lambda s: dict(eta=0.3, reduce_dims=())),
    "eta.2_all_dims": (dict(lr=0.3, beta=0.95), lambda s: dict(eta=0.2, reduce_dims=tuple(range(len(s))))),
    "eta.7_even_dims": (
        dict(lr=0.2, clip_value=0.8, extra_l2=0.02),
        lambda s: dict(eta=0.7, reduce_dims=tuple(range(0, len(s), 2))),  # 2-D: (0,), 3-D: (0, 2)
    ),
}


def _cases(settings, skip=lambda sid, shp: False):
    out = []
    for sid, kw in settings.items():
        for shid, shape in SHAPES.items():
            if skip(sid, shape):
                continue
            out.append(pytest.param(kw, shape, id=f"{sid}-{shid}"))
    return out


@pytest.mark.parametrize("kwargs,shape", _cases(LION_SETTINGS))
def test_lion_matches_reference(kwargs, shape):
    _run_against_reference(
        lambda ps: danlu.Lion(ps, **kwargs),
        lambda i, s: LionRef(s, **kwargs),
        [shape], seed=1, state_check=_lion_state,
    )


@pytest.mark.parametrize("kwargs,shape", _cases(TIGER_SETTINGS))
def test_tiger_matches_reference(kwargs, shape):
    _run_against_reference(
        lambda ps: danlu.Tiger(ps, **kwargs),
        lambda i, s: TigerRef(s, **kwargs),
        [shape], seed=2, state_check=_lion_state,
    )


@pytest.mark.parametrize("kwargs,shape", _cases(ADAX_SETTINGS))
def test_adax_matches_reference(kwargs, shape):
    _run_against_reference(
        lambda ps: danlu.AdaX(ps, **kwargs),
        lambda i, s: AdaXRef(s, **kwargs),
        [shape], seed=3, state_check=_adax_state,
    )


@pytest.mark.parametrize("kwargs,shape", _cases(ADAFACTOR_SETTINGS))
def test_adafactor_matches_reference(kwargs, shape):
    _run_against_reference(
        lambda ps: danlu.Adafactor(ps, **kwargs),
        lambda i, s: AdafactorRef(s, **kwargs),
        [shape], seed=4, state_check=_adafactor_state,
    )


def _amos_skip(sid, shape):
    # 0-d tensors: the spec documents the inference only for 1-D and ≥2-D tensors; test them only
    # with an explicit group.
    return AMOS_SETTINGS[sid][1] is None and len(shape) == 0


@pytest.mark.parametrize("setting,shape", _cases(AMOS_SETTINGS, skip=_amos_skip))
def test_amos_matches_reference(setting, shape):
    kwargs, group_fn = setting

    def make_opt(ps):
        if group_fn is None:
            return danlu.Amos(ps, **kwargs)
        return danlu.Amos([dict(params=ps, **group_fn(shape))], **kwargs)

    def make_ref(i, s):
        if group_fn is None:
            eta, dims = amos_default_eta_and_dims(s)
        else:
            g = group_fn(s)
            eta, dims = g["eta"], g["reduce_dims"]
        return AmosRef(s, eta=eta, reduce_dims=dims, **kwargs)

    _run_against_reference(make_opt, make_ref, [shape], seed=5, state_check=_amos_state)


# --- factoring decisions (spec §0 Adafactor; §4 test 1) -------------------------------------------
@pytest.mark.parametrize(
    "shape,min_dim,expected_dims",
    [
        pytest.param((64, 1000), 128, None, id="64x1000-not-factored"),
        pytest.param((127, 300), 128, None, id="127x300-just-under"),
        pytest.param((128, 300), 128, (1, 0), id="128x300-just-at"),
        pytest.param((130, 130), 128, (1, 0), id="130x130-tie"),
        pytest.param((6, 5, 5), 4, (0, 2), id="6x5x5-tie-later-index-larger"),
        pytest.param((5, 5, 5), 4, (2, 1), id="5x5x5-all-tied"),
        pytest.param((5, 7, 5, 3), 4, (1, 2), id="5x7x5x3-4d"),
        pytest.param((3, 2, 200), 128, None, id="3x2x200-second-too-small"),
    ],
)
def test_adafactor_factoring_rule(shape, min_dim, expected_dims):
    assert adafactor_factored_dims(shape, min_dim) == expected_dims  # the reference follows the pin
    kwargs = dict(min_dim_size_to_factor=min_dim, beta1=0.9, weight_decay=0.1)
    _run_against_reference(
        lambda ps: danlu.Adafactor(ps, **kwargs),
        lambda i, s: AdafactorRef(s, **kwargs),
        [shape], seed=6, state_check=_adafactor_state,
    )


def test_adafactor_state_numel_is_n_plus_m():
    """Spec §4 test 1: an n×m matrix keeps n+m second-moment floats; 64×1000 is not factored."""
    cases = {
        (130, 200): 130 + 200,
        (256, 128): 256 + 128,
        (3, 130, 140): 3 * (130 + 140),
        (140, 3, 130): 3 * (140 + 130),
        (64, 1000): 64 * 1000,  # under the threshold: full v
    }
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in cases]
    opt = danlu.Adafactor(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p, n in zip(params, cases.values()):
        st = opt.state[p]
        got = sum(st[k].numel() for k in ("exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col") if k in st)
        assert got == n, (tuple(p.shape), got, n)


# --- edge cases: zero-initialised tensors, rows whose gradient is exactly 0 ----------------------
def _edge(cls, ref_cls, state_check, **kw):
    return (lambda ps: cls(ps, **kw), lambda i, s: ref_cls(s, **kw), state_check)


EDGE_OPTS = {
    "lion": _edge(danlu.Lion, LionRef, _lion_state, lr=1e-3, weight_decay=0.1),
    "tiger": _edge(danlu.Tiger, TigerRef, _lion_state, lr=1e-3, weight_decay=0.1),
    "adax": _edge(danlu.AdaX, AdaXRef, _adax_state, lr=1e-3, weight_decay=0.1),
    "adafactor": _edge(danlu.Adafactor, AdafactorRef, _adafactor_state, beta1=0.9, weight_decay=0.1),
    "amos": (
        lambda ps: danlu.Amos(ps, lr=0.1, momentum=0.9),
        lambda i, s: AmosRef(s, 0.1, *amos_default_eta_and_dims(s), momentum=0.9),
        _amos_state,
    ),
}
EDGE_SHAPES = [(300,), (130, 200), (64, 1000), (140, 3, 130)]


@pytest.mark.parametrize("mode", ["zero_rows", "zero_init"])
@pytest.mark.parametrize("opt_name", list(EDGE_OPTS))
def test_edge_cases_match_reference(opt_name, mode):
    make_opt, make_ref, state_check = EDGE_OPTS[opt_name]
    _run_against_reference(
        make_opt, make_ref, EDGE_SHAPES, seed=7, state_check=state_check,
        zero_rows=(mode == "zero_rows"), zero_init=(mode == "zero_init"),
    )


# --- several params and groups in one optimizer, with an lr schedule --------------------------------
MULTI_SHAPES = [(7,), (130, 200), (4, 5, 6), (140, 3, 130), (64, 1000)]


def _two_groups(ps, extra_a, extra_b):
    return [dict(params=ps[::2], **extra_a), dict(params=ps[1::2], **extra_b)]


def _lr_schedule(attr):
    """Multiply every group's lr by 0.9 each step, mirroring it into the references' ``attr``."""

    def sched(step, opt, refs):
        if step == 1:
            return
        for g in opt.param_groups:
            g["lr"] *= 0.9
        for r in refs:
            setattr(r, attr, getattr(r, attr) * 0.9)

    return sched


def _multi(cls, ref_cls, state_check, defaults, group_a, group_b):
    """Params 0, 2, 4 in group A, params 1, 3 in group B; groups override the ctor defaults."""
    return (
        lambda ps: cls(_two_groups(ps, group_a, group_b), **defaults),
        lambda i, s: ref_cls(s, **{**defaults, **(group_a if i % 2 == 0 else group_b)}),
        state_check,
        "lr",
    )


MULTI = {
    "lion": _multi(danlu.Lion, LionRef, _lion_state, dict(lr=3e-4),
                   dict(lr=1e-3, weight_decay=0.2), dict(betas=(0.8, 0.95))),
    "tiger": _multi(danlu.Tiger, TigerRef, _lion_state, dict(lr=3e-4),
                    dict(lr=1e-3, weight_decay=0.2), dict(beta=0.9)),
    "adax": _multi(danlu.AdaX, AdaXRef, _adax_state, dict(lr=1e-3),
                   dict(lr=5e-3, weight_decay=0.05), dict(betas=(0.8, 1e-3))),
    "adafactor": _multi(danlu.Adafactor, AdafactorRef, _adafactor_state, dict(lr=3e-3),
                        dict(lr=1e-2, weight_decay=0.1), dict(beta1=0.9)),
    "amos": (
        lambda ps: danlu.Amos(
            [dict(params=ps[::2]), dict(params=ps[1::2], eta=0.3, reduce_dims=(), lr=0.05)],
            lr=0.2,
            momentum=0.9,
        ),
        lambda i, s: (
            AmosRef(s, 0.2, *amos_default_eta_and_dims(s), momentum=0.9)
            if i % 2 == 0
            else AmosRef(s, 0.05, 0.3, (), momentum=0.9)
        ),
        _amos_state,
        "xi",
    ),
}


@pytest.mark.parametrize("scheduled", [False, True], ids=["const_lr", "sched_lr"])
@pytest.mark.parametrize("opt_name", list(MULTI))
def test_multi_param_groups_match_reference(opt_name, scheduled):
    make_opt, make_ref, state_check, lr_attr = MULTI[opt_name]
    _run_against_reference(
        make_opt, make_ref, MULTI_SHAPES, seed=8, state_check=state_check,
        lr_schedule=_lr_schedule(lr_attr) if scheduled else None,
    )


# --------------------------------------------------------------------------------------------------
# 2. float32 parity with public packages
# --------------------------------------------------------------------------------------------------
def _lion_grads_with_margin(shape, steps, beta1, beta2, margin, rng):
    """float32 gradients such that |c_t| = |β1·m + (1−β1)·g| ≥ margin everywhere (computed in
    float64), so rounding differences between two fp32 implementations cannot flip a sign."""
    m = np.zeros(shape)
    out = []
    for _ in range(steps):
        g = rng.standard_normal(shape).astype(np.float32).astype(np.float64)
        for _ in range(100):
            bad = np.abs(beta1 * m + (1 - beta1) * g) < margin
            if not bad.any():
                break
            g[bad] = rng.standard_normal(int(bad.sum())).astype(np.float32)
        assert not (np.abs(beta1 * m + (1 - beta1) * g) < margin).any()
        out.append(g.astype(np.float32))
        m = beta2 * m + (1 - beta2) * g
    return out


@pytest.mark.parametrize("wd", [0.0, 0.1, 1.0], ids=["wd0", "wd0.1", "wd1"])
@pytest.mark.parametrize("betas", [(0.9, 0.99), (0.95, 0.98)], ids=["betas.9-.99", "betas.95-.98"])
def test_lion_matches_lion_pytorch_fp32(betas, wd):
    """lion-pytorch (lucidrains) has the automl order: θ·(1−ηλ), θ −= η·sign(c), then m update.

    Tolerance atol=1e-6 on O(1) float32 parameters: the two implementations may round the decay or
    the interpolation differently (a few ulp ≈ 6e-8 per step), but the sign itself cannot differ
    because the gradients keep |c| ≥ 1e-3 (a flipped sign would show as a 2η = 2e-3 error).
    """
    lion_pytorch = pytest.importorskip("lion_pytorch")
    rng = np.random.default_rng(10)
    shapes = [(64,), (32, 48), (3, 8, 10)]
    lr, steps = 1e-3, 25
    theta0 = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [_lion_grads_with_margin(s, steps, *betas, margin=1e-3, rng=rng) for s in shapes]
    p_ours = [torch.nn.Parameter(torch.tensor(t)) for t in theta0]
    p_ref = [torch.nn.Parameter(torch.tensor(t)) for t in theta0]
    ours = danlu.Lion(p_ours, lr=lr, betas=betas, weight_decay=wd)
    ref = lion_pytorch.Lion(p_ref, lr=lr, betas=betas, weight_decay=wd)
    for k in range(steps):
        for i in range(len(shapes)):
            p_ours[i].grad = torch.tensor(grads[i][k])
            p_ref[i].grad = torch.tensor(grads[i][k])
        ours.step()
        ref.step()
        for a, b in zip(p_ours, p_ref):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m: f"step {k + 1}: {m}")
    for a, b in zip(p_ours, p_ref):
        torch.testing.assert_close(ours.state[a]["exp_avg"], ref.state[b]["exp_avg"], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "shapes",
    [
        pytest.param([(128, 256)], id="128x256"),
        pytest.param([(200, 130)], id="200x130"),
        pytest.param([(3, 130, 140)], id="3x130x140"),
        pytest.param([(300,), (7,)], id="vectors"),
        pytest.param([(128, 256), (200, 130), (300,)], id="mixed"),
    ],
)
def test_adafactor_matches_torch_adafactor_fp32(shapes):
    """torch.optim.Adafactor(lr=1e-2) == danlu.Adafactor(lr=None) where the conventions coincide:
    ρ_t = min(1e-2, 1/√t) both ways, α_t = ρ_t·max(ε2, RMS θ), V̂ factored over the last two dims =
    the two largest dims here (both ≥ 128), vectors unfactored, no momentum, no weight decay.

    torch does not add ε1 to G² (it clamps V̂ at finfo.eps² and the row mean at finfo.eps, its
    default ε1); with O(1) gradients neither matters, so the gap is float32 rounding: rtol 1e-5
    on the parameters, and on the displacement θ_t − θ_0 relative to its sup-norm plus 4 float32 ulps
    of max|θ| (both sides round θ to float32 every step; the observed gap is ≤ 1 ulp).
    """
    rng = np.random.default_rng(11)
    steps = 25
    theta0 = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[g.astype(np.float32) for g in _grad_stream(s, rng, steps=steps)] for s in shapes]
    p_ours = [torch.nn.Parameter(torch.tensor(t)) for t in theta0]
    p_ref = [torch.nn.Parameter(torch.tensor(t)) for t in theta0]
    ours = danlu.Adafactor(p_ours, lr=None)
    ref = torch.optim.Adafactor(p_ref, lr=1e-2)
    for k in range(steps):
        for i in range(len(shapes)):
            p_ours[i].grad = torch.tensor(grads[i][k])
            p_ref[i].grad = torch.tensor(grads[i][k])
        ours.step()
        ref.step()
        for i, (a, b) in enumerate(zip(p_ours, p_ref)):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {k + 1}: {m}")
            d_ours = a.detach().double().numpy() - theta0[i]
            d_ref = b.detach().double().numpy() - theta0[i]
            err = np.max(np.abs(d_ours - d_ref))
            ulp = float(np.spacing(np.float32(b.detach().abs().max().item())))
            bound = 1e-5 * np.max(np.abs(d_ref)) + 4 * ulp
            assert err <= bound, f"step {k + 1} param {i}: displacement err {err:.3e} > {bound:.3e}"
