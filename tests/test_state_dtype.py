"""``state_dtype``: optimizer state in another dtype than the parameters, bfloat16 with stochastic
rounding (danlu._core.rounding)."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import danlu
from danlu._core.rounding import param_seed, round_with_key, round_with_noise, rounding_key, stochastic_round_to_bf16

BF16 = torch.bfloat16


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bfloat16 values just below and above each float32 entry (by truncating and incrementing the bits)."""
    bits = x.view(torch.int32)
    down = (bits & -65536).view(torch.float32)
    up = ((bits & -65536) + 65536).view(torch.float32)
    return torch.minimum(down, up), torch.maximum(down, up)


def test_stochastic_rounding_is_unbiased_onto_the_two_neighbours():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g) * torch.logspace(-3, 3, 20000)
    lo, hi = _neighbours(x)
    rounds = torch.stack([stochastic_round_to_bf16(x, param_seed(0, 1), torch.tensor(s)).float() for s in range(200)])
    assert ((rounds == lo) | (rounds == hi)).all(), "every output is one of the two bfloat16 neighbours"
    # Unbiased: the mean of 200 roundings of each entry, in units of its ulp, is its position between
    # the neighbours; over 20000 entries the mean error is 0 within 5 standard errors.
    ulp = hi - lo
    err = (rounds.mean(0) - x) / ulp
    se = 0.5 / (200 * 20000) ** 0.5  # |error| ≤ ulp/2 per rounding, so its sd ≤ ulp/2
    assert abs(err.mean().item()) < 5 * se
    # Each entry's rounding frequency matches its position (200 draws: within 0.15 for all).
    frac = (x - lo) / ulp
    assert ((rounds == hi).float().mean(0) - frac).abs().max() < 0.15


def test_stochastic_rounding_is_exactly_unbiased_over_every_noise_value():
    # Every 16-bit noise value for each x: the mean of the 65536 roundings is x exactly (float64), at
    # binade edges (just below a power of two, where the ulp below is half the ulp above), ties,
    # subnormals, values below the smallest subnormal and near the largest bfloat16.
    tiny = 2.0**-133
    xs = [1.0 + 2**-10, 1.0 - 2**-20, 1.0 - 2**-9, 1.0 - 2**-9 - 2**-20, 1.0 + 2**-8, 1.0 + 3 * 2**-8,
          2.0**20 * (1 - 2**-24), 3.0 + 2**-7, 1.5 * tiny, 2.0**-126 * (1 - 2**-9), 0.3 * tiny, 0.7 * tiny,
          2.0**-126 + 2**-140, 3.0e38, 1e-3, 1e3 + 0.1]
    x = torch.tensor(xs + [-v for v in xs], dtype=torch.float32)
    u = torch.arange(65536, dtype=torch.float32) * 2.0**-16
    rounded = round_with_noise(x[:, None].expand(-1, 65536), u[None, :]).double()
    lo, hi = _neighbours(x)
    assert ((rounded == lo[:, None]) | (rounded == hi[:, None])).all()
    assert torch.equal(rounded.mean(1), x.double())


def test_compiled_rounding_has_the_eager_bits():
    x = torch.randn(4099) * torch.logspace(-30, 30, 4099)  # a tail of 3 after the 16-wide loop
    x[:4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-42])
    key = rounding_key(param_seed(1, 2), torch.tensor(9))
    # With the fused path's options: inductor otherwise elides the float32 → bfloat16 → float32 round trips.
    from danlu._core.fused import _ELEMENT_OPTIONS

    compiled = torch.compile(round_with_key, backend="inductor", fullgraph=True, options=_ELEMENT_OPTIONS)
    assert torch.equal(compiled(x, key).view(torch.int16), round_with_key(x, key).view(torch.int16))


def test_stochastic_rounding_keeps_representable_values_and_specials():
    v = torch.tensor([1.0, -1.5, 0.0, -0.0, 2.0**-130, float("inf"), float("-inf"), float("nan"), 3.0e38])
    out = stochastic_round_to_bf16(v, param_seed(2, 3), torch.tensor(5))
    assert out.dtype == BF16
    assert torch.equal(out[:7].float(), v[:7]) and torch.signbit(out[3])
    assert torch.isnan(out[7])
    assert out[8].float() in _neighbours(v[8:9])[0].tolist() + _neighbours(v[8:9])[1].tolist()


def test_noise_is_reproducible_and_keyed():
    x = torch.full((1000,), 1.0 + 2**-10)
    a = stochastic_round_to_bf16(x, param_seed(0, 0), torch.tensor(3))
    assert torch.equal(a, stochastic_round_to_bf16(x.clone(), param_seed(0, 0), torch.tensor(3)))
    assert not torch.equal(a, stochastic_round_to_bf16(x, param_seed(0, 0), torch.tensor(4)))
    assert not torch.equal(a, stochastic_round_to_bf16(x, param_seed(0, 1), torch.tensor(3)))


def _run(state_dtype, param_dtype, steps=2000):
    """SGDM with β = 0.999 on a constant gradient 1, lr 0: m_t = 1 − 0.999^t exactly in real arithmetic.
    Each step adds 0.001·(1 − m), below half a bfloat16 ulp of m once m > 0.25."""
    p = torch.nn.Parameter(torch.zeros(2000, dtype=param_dtype))
    opt = danlu.SGDM([p], lr=0.0, momentum=0.999, state_dtype=state_dtype)
    for _ in range(steps):
        p.grad = torch.ones_like(p)
        opt.step()
    return opt.state[p]["momentum_buffer"]


def test_bf16_state_with_stochastic_rounding_tracks_fp32_where_round_to_nearest_stalls():
    exact = 1 - 0.999**2000  # 0.8648
    fp32 = _run(None, torch.float32).float().mean().item()
    sr = _run(BF16, torch.float32)
    rn = _run(None, BF16).float().mean().item()  # bfloat16 state updated in place, round to nearest
    assert sr.dtype == BF16
    assert abs(fp32 - exact) < 1e-4
    assert abs(sr.float().mean().item() - exact) < 0.01  # 2000 entries, each unbiased
    assert exact - rn > 0.2, f"round to nearest should stall far below {exact:.3f}, got {rn:.3f}"


@pytest.mark.parametrize("cls,kw,keys", [
    (danlu.Lion, {}, ["exp_avg"]),
    (danlu.Tiger, {}, ["exp_avg"]),
    (danlu.SGDM, {}, ["momentum_buffer"]),
    (danlu.AdamW, {}, ["exp_avg", "exp_avg_sq"]),
    (danlu.AdaX, {}, ["exp_avg", "exp_avg_sq"]),
    (danlu.Adafactor, {"beta1": 0.9}, ["exp_avg"]),
])
@pytest.mark.parametrize("param_dtype,state_dtype", [(torch.float32, BF16), (BF16, torch.float32)],
                         ids=["bf16-state-on-fp32", "fp32-state-on-bf16"])
def test_state_dtype_is_kept_and_survives_state_dict(cls, kw, keys, param_dtype, state_dtype):
    """torch's load casts floating state to the parameter's dtype; the saved dtype must survive, and the
    reloaded optimizer continues bit for bit (the rounding noise is keyed, not drawn)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 4).to(param_dtype)), torch.nn.Parameter(torch.randn(4).to(param_dtype))]
    opt = cls(params, lr=1e-2, state_dtype=state_dtype, **kw)

    def step(o, ps, seed):
        g = torch.Generator().manual_seed(seed)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(param_dtype)
        o.step()

    for s in range(3):
        step(opt, params, s)
    for p in params:
        for k in keys:
            assert opt.state[p][k].dtype == state_dtype
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = cls(params2, lr=1e-2, state_dtype=state_dtype, **kw)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for p, q in zip(params, params2):
        for k in keys:
            assert opt2.state[q][k].dtype == state_dtype and torch.equal(opt2.state[q][k], opt.state[p][k])
    for s in range(3, 6):
        step(opt, params, s)
        step(opt2, params2, s)
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
    clone = copy.deepcopy(opt)
    assert all(clone.state[q][k].dtype == state_dtype for q in clone.param_groups[0]["params"] for k in keys)


def test_state_dtype_switched_on_mid_run():
    p = torch.nn.Parameter(torch.randn(8))
    opt = danlu.AdamW([p])
    for i in range(4):
        if i == 2:
            opt.param_groups[0]["state_dtype"] = BF16
        p.grad = torch.randn(8)
        opt.step()
    st = opt.state[p]
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == BF16 and int(st["sr_step"]) == 2


def test_bf16_state_halves_the_bytes():
    from danlu.bench.speed import _state_bytes

    sizes = {}
    for dtype in (None, BF16):
        p = torch.nn.Parameter(torch.randn(1000))
        opt = danlu.Lion([p], state_dtype=dtype)
        p.grad = torch.randn(1000)
        opt.step()
        sizes[dtype] = _state_bytes(opt)
    assert sizes[BF16] <= sizes[None] / 2 + 16  # + the 0-d rounding key


@pytest.mark.parametrize("value,exc,regex", [
    ("bfloat16", TypeError, r"^Invalid state_dtype: 'bfloat16' \(expected None or a floating torch\.dtype\)$"),
    (torch.int8, TypeError, r"^Invalid state_dtype: torch\.int8 "),
    (torch.float16, ValueError, r"^Invalid state_dtype: torch\.float16 \(expected None, torch\.bfloat16"),
])
def test_bad_state_dtype_is_refused(value, exc, regex):
    with pytest.raises(exc, match=regex):
        danlu.AdamW([torch.nn.Parameter(torch.randn(3))], state_dtype=value)


def test_bf16_state_with_accumulation_is_refused():
    with pytest.raises(ValueError, match=r"^Invalid state_dtype: torch\.bfloat16 \(expected None, torch\.float32"):
        danlu.SGDM([torch.nn.Parameter(torch.randn(3))], accum_steps=2, state_dtype=BF16)


@pytest.mark.parametrize("name", ["SGDM", "Tiger", "Lion", "AdamW"])
def test_accumulation_keeps_state_dtype(name):
    """accum_steps > 1 folds micro-gradients into state created in ``state_dtype`` (float32 state for
    bfloat16 parameters), not in the parameter's dtype; SGDM's folded momentum equals the float32 fold."""
    cls = getattr(danlu, name)
    p = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).requires_grad_()
    opt = cls([p], lr=1e-2, accum_steps=2, state_dtype=torch.float32)
    grads = [torch.randn(4, 3, generator=torch.Generator().manual_seed(1 + i)).to(torch.bfloat16) for i in range(2)]
    for g in grads:
        p.grad = g.clone()
        opt.step()
    for k, v in opt.state[p].items():
        if torch.is_tensor(v) and v.dim():
            assert v.dtype == torch.float32, f"{name} state {k!r} is {v.dtype}"
    if name == "SGDM":
        beta = opt.param_groups[0]["momentum"]
        want = (1 - beta) / 2 * (grads[0].float() + grads[1].float())
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], want, rtol=0, atol=1e-7)
