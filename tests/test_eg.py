"""Exponentiated gradient (EGD) and EG-learned step sizes (EGStepSize): identities, claims, contracts."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from danlu.optim.egd import EGD
from danlu.optim.lion import Lion
from danlu.wrappers.eg_step_size import EGStepSize
from test_compile import eager_and_traced



def positive(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) + 0.1).to(dtype).requires_grad_()


def signed(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()


def set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)


def mlp(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 8, generator=g)
    y = torch.tanh(X @ torch.randn(8, 1, generator=g))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    return model.to(dtype), X.to(dtype), y.to(dtype)


def train(model, opt, X, y, n):
    losses = []
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(X), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def flat(model_or_params):
    ps = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    return [p.detach().clone() for p in ps]


def assert_bitwise(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y), f"max |Δ| = {(x.double() - y.double()).abs().max():.3g}"


def tree_equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(tree_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(tree_equal(x, y) for x, y in zip(a, b))
    return a == b


def reload(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ================================== EGD ===========================================================


def test_egd_log_update_identity():
    """log θ_{t+1} − log θ_t = −η g_t, to float64 rounding (one exp and one multiply)."""
    ps = [positive((5, 4)), positive((7,), seed=1)]
    opt = EGD(ps, lr=0.3)
    for t in range(10):
        set_grads(ps, seed=100 + t)
        before = [p.detach().clone() for p in ps]
        opt.step()
        for p, p0 in zip(ps, before):
            torch.testing.assert_close(p.detach().log() - p0.log(), -0.3 * p.grad, rtol=0, atol=1e-15)
    assert all(len(opt.state[p]) == 0 for p in ps), "EGU keeps no state"


def test_egd_exponent_is_clamped():
    p = torch.full((4,), 2.0, dtype=torch.float64, requires_grad=True)
    opt = EGD([p], lr=1.0, clamp=5.0)
    p.grad = torch.tensor([1e6, -1e6, 3.0, -3.0], dtype=torch.float64)
    opt.step()
    expected = 2.0 * torch.tensor([math.exp(-5.0), math.exp(5.0), math.exp(-3.0), math.exp(3.0)], dtype=torch.float64)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_egd_stays_positive_and_finite_under_huge_gradients(dtype):
    p = positive((50,), dtype=dtype)
    opt = EGD([p], lr=1.0)
    for _ in range(200):
        opt.zero_grad()
        (1e6 * ((p.float() - 1.0) ** 2).sum()).backward()
        opt.step()
        assert p.dtype == dtype
        assert torch.isfinite(p).all()
        assert (p > 0).all()


def test_egd_exact_zero_never_moves():
    p = positive((4,))
    opt = EGD([p], lr=0.5)
    with torch.no_grad():
        p[1] = 0.0  # set after construction (construction refuses it)
    for t in range(5):
        set_grads([p], seed=t)
        opt.step()
    assert p[1].item() == 0.0
    assert (p[[0, 2, 3]] > 0).all()


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_egd_simplex_sums_to_one_and_is_normalized_eg(dim):
    p = positive((4, 6))
    opt = EGD([p], lr=0.7, simplex_dim=dim)
    for t in range(20):
        set_grads([p], seed=t)
        before = p.detach().clone()
        opt.step()
        sums = p.detach().sum(dim)
        torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-12)
        assert (p > 0).all()
        if t > 0:  # normalized EG: θ_i e^{−ηg_i} / Σ_j θ_j e^{−ηg_j}
            w = before * torch.exp(-0.7 * p.grad)
            torch.testing.assert_close(p.detach(), w / w.sum(dim, keepdim=True), rtol=1e-14, atol=0)


def test_egd_simplex_linear_loss_converges_to_argmin_vertex():
    c = torch.tensor([[0.5, -0.2, 0.3, 0.1, -0.1], [1.0, 2.0, 0.5, 0.7, 3.0]], dtype=torch.float64)
    p = torch.full((2, 5), 0.2, dtype=torch.float64, requires_grad=True)
    opt = EGD([p], lr=0.5, simplex_dim=1)
    for _ in range(300):
        opt.zero_grad()
        (c * p).sum().backward()
        opt.step()
    vertex = F.one_hot(c.argmin(dim=1), 5).to(torch.float64)
    torch.testing.assert_close(p.detach(), vertex, rtol=0, atol=1e-6)


def test_egd_simplex_huge_exponents_do_not_overflow_and_keep_ranking():
    p = torch.full((3,), 1.0 / 3, dtype=torch.float64, requires_grad=True)
    opt = EGD([p], lr=1.0, simplex_dim=0, clamp=20.0)
    p.grad = torch.tensor([-1e4, -1e4 + 5.0, -1e4 + 10.0], dtype=torch.float64)  # all exponents ≫ c
    opt.step()
    w = torch.exp(torch.tensor([0.0, -5.0, -10.0], dtype=torch.float64))
    torch.testing.assert_close(p.detach(), w / w.sum(), rtol=1e-14, atol=0)


def test_eg_pm_keeps_the_parameter_exactly_at_init():
    """θ⁺ − θ⁻ is the parameter bitwise: a zero-lr step changes nothing; θ⁻ = max(−θ, 0) + δ."""
    p = signed((6, 3), dtype=torch.float32)
    p0 = p.detach().clone()
    opt = EGD([p], lr=0.0, signed=True, delta=0.25)
    set_grads([p], seed=3)
    opt.step()
    assert torch.equal(p.detach(), p0)
    assert torch.equal(opt.state[p]["theta_minus"], (-p0).clamp(min=0) + 0.25)


def test_eg_pm_matches_explicit_two_sided_eg_and_keeps_the_product():
    """θ⁺ ← θ⁺e^{−ηg}, θ⁻ ← θ⁻e^{ηg}, θ = θ⁺ − θ⁻ (reference with both halves stored); θ⁺θ⁻ invariant."""
    p = signed((10,))
    delta, lr = 0.1, 0.2
    plus, minus = p.detach().clamp(min=0) + delta, (-p.detach()).clamp(min=0) + delta
    product = plus * minus
    opt = EGD([p], lr=lr, signed=True, delta=delta)
    for t in range(30):
        set_grads([p], seed=t)
        opt.step()
        plus, minus = plus * torch.exp(-lr * p.grad), minus * torch.exp(lr * p.grad)
        torch.testing.assert_close(p.detach(), plus - minus, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(opt.state[p]["theta_minus"], minus, rtol=1e-13, atol=0)
    torch.testing.assert_close((p.detach() + opt.state[p]["theta_minus"]) * opt.state[p]["theta_minus"], product,
                               rtol=1e-12, atol=0)


def test_eg_pm_trains_a_signed_sparse_regression():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 20, generator=g, dtype=torch.float64)
    w_true = torch.zeros(20, dtype=torch.float64)
    w_true[[1, 7, 12]] = torch.tensor([2.0, -1.5, 0.8], dtype=torch.float64)
    y = X @ w_true
    w = torch.zeros(20, dtype=torch.float64, requires_grad=True)
    opt = EGD([w], lr=0.3, signed=True)
    for _ in range(300):
        opt.zero_grad()
        ((X @ w - y) ** 2).mean().backward()
        opt.step()
    torch.testing.assert_close(w.detach(), w_true, rtol=0, atol=1e-6)


def test_eg_pm_l1_budget():
    p = signed((8,))
    opt = EGD([p], lr=0.1, signed=True, l1_budget=5.0)
    for t in range(10):
        set_grads([p], seed=t)
        opt.step()
        tm = opt.state[p]["theta_minus"]
        assert (tm > 0).all() and (p.detach() + tm > 0).all()
        torch.testing.assert_close((p.detach() + 2 * tm).sum(), torch.tensor(5.0, dtype=torch.float64),
                                   rtol=1e-14, atol=0)


@pytest.mark.parametrize("bad", [-1.0, 0.0, float("nan")], ids=["negative", "zero", "nan"])
def test_egd_non_positive_param_raises_before_any_state_change(bad):
    good, p = positive((3, 4)), positive((5,), seed=1)
    with torch.no_grad():
        p[2] = bad
    with pytest.raises(ValueError, match=r"^Invalid params\[1\]: shape \(5,\), min .* \(expected every entry > 0"):
        EGD([good, p], lr=0.1)
    opt = EGD([good], lr=0.1)
    set_grads([good], seed=0)
    opt.step()
    before = (copy.deepcopy(opt.state_dict()), good.detach().clone())
    with pytest.raises(ValueError, match=r"use signed=True"):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1
    assert tree_equal(opt.state_dict(), before[0]) and torch.equal(good.detach(), before[1])
    opt.add_param_group({"params": [p], "signed": True})  # the same tensor is fine for EG±
    assert len(opt.param_groups) == 2


BAD_EGD = [
    (dict(lr=-0.1), ValueError, r"^Invalid lr: -0\.1 \(expected a number in \[0, inf\]\)$"),
    (dict(lr="0.1"), TypeError, r"^Invalid lr: '0\.1' \(expected a real number\)$"),
    (dict(clamp=0.0), ValueError, r"^Invalid clamp: 0\.0 \(expected a number in \(0, inf\]\)$"),
    (dict(clamp=float("inf")), ValueError, r"^Invalid clamp: inf \(expected a finite number"),
    (dict(signed=1), TypeError, r"^Invalid signed: 1 \(expected a bool\)$"),
    (dict(signed=True, delta=0.0), ValueError, r"^Invalid delta: 0\.0 \(expected a number in \(0, inf\]\)$"),
    (dict(signed=True, simplex_dim=0), ValueError, r"^Invalid simplex_dim: 0 \(expected None with signed=True"),
    (dict(simplex_dim=2), ValueError,
     r"^Invalid simplex_dim: 2 \(dim 2 does not exist in a parameter of shape \(3, 4\)\)$"),
    (dict(simplex_dim=1.0), TypeError, r"^Invalid simplex_dim: 1\.0 \(expected None or an int\)$"),
    (dict(l1_budget=1.0), ValueError, r"^Invalid l1_budget: 1\.0 \(expected None with signed=False"),
    (dict(signed=True, l1_budget=-1.0), ValueError, r"^Invalid l1_budget: -1\.0 \(expected a number in \(0, inf\]\)$"),
    (dict(weight_decay=0.1), TypeError, r"unexpected keyword argument 'weight_decay'"),
]


@pytest.mark.parametrize("kwargs,exc,regex", BAD_EGD, ids=[str(k) for k, _, _ in BAD_EGD])
def test_egd_bad_hyperparameters(kwargs, exc, regex):
    kwargs = {"lr": 0.1, **kwargs}
    with pytest.raises(exc, match=regex):
        EGD([positive((3, 4))], **kwargs)


EGD_CONFIGS = {
    "signed": lambda ps: EGD(ps, lr=0.3, signed=True),
    "signed-budget": lambda ps: EGD(ps, lr=0.1, signed=True, l1_budget=20.0),
}


@pytest.mark.parametrize("name", list(EGD_CONFIGS))
def test_egd_state_dict_round_trip_bitwise_lockstep(name):
    model, X, y = mlp()
    opt = EGD_CONFIGS[name](model.parameters())
    train(model, opt, X, y, 3)
    model2 = copy.deepcopy(model)
    opt2 = EGD_CONFIGS[name](model2.parameters())
    opt2.load_state_dict(reload(opt.state_dict()))
    assert tree_equal(opt.state_dict(), opt2.state_dict())
    for _ in range(5):
        train(model, opt, X, y, 1)
        train(model2, opt2, X, y, 1)
        assert_bitwise(flat(model), flat(model2))


def test_egd_simplex_state_dict_round_trip_and_pickle():
    p = positive((3, 5))
    opt = EGD([p], lr=0.5, simplex_dim=1)
    set_grads([p], 0)
    opt.step()
    p2 = p.detach().clone().requires_grad_()
    opt2 = EGD([p2], lr=0.1, simplex_dim=1)
    opt2.load_state_dict(reload(opt.state_dict()))
    assert opt2.param_groups[0]["lr"] == 0.5
    p3, opt3 = pickle.loads(pickle.dumps((p, opt)))
    for t in range(3):
        for q, o in ((p, opt), (p2, opt2), (p3, opt3)):
            set_grads([q], t + 1)
            o.step()
        assert torch.equal(p.detach(), p2.detach()) and torch.equal(p.detach(), p3.detach())


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_egd_deepcopy_and_pickle_continue_identically(how):
    model, X, y = mlp()
    opt = EGD(model.parameters(), lr=0.3, signed=True)
    train(model, opt, X, y, 3)
    model2, opt2 = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    for _ in range(4):
        train(model, opt, X, y, 1)
        train(model2, opt2, X, y, 1)
        assert_bitwise(flat(model), flat(model2))


@pytest.mark.parametrize("kw", [dict(), dict(simplex_dim=0), dict(signed=True)], ids=["egu", "simplex", "signed"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "+inf", "-inf"])
def test_egd_nonfinite_grad_shows_in_params(kw, bad):
    p = positive((5,), dtype=torch.float32)
    opt = EGD([p], lr=0.1, **kw)
    set_grads([p], 0)
    p.grad[2] = bad
    opt.step()
    assert not torch.isfinite(p[2])


def test_egd_signed_trains_the_mlp_in_bf16_and_keeps_dtypes():
    model, X, y = mlp(dtype=torch.bfloat16)
    opt = EGD(model.parameters(), lr=0.3, signed=True)
    losses = train(model, opt, X, y, 40)
    assert losses[-1] < 0.5 * losses[0]
    for p in model.parameters():
        assert p.dtype == torch.bfloat16 and opt.state[p]["theta_minus"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kw", [dict(), dict(simplex_dim=1), dict(signed=True), dict(signed=True, l1_budget=10.0)],
    ids=["egu", "simplex", "signed", "budget"],
)
def test_egd_kernel_traces_without_graph_breaks_and_equals_eager(kw):
    gen = torch.Generator().manual_seed(0)
    make = (lambda s: torch.randn(s, generator=gen, dtype=torch.float64)) if kw.get("signed") else (
        lambda s: torch.rand(s, generator=gen, dtype=torch.float64) + 0.1)
    params = [make(s) for s in [(6, 5), (5, 3), (3, 4, 5)]]
    eager, traced = eager_and_traced(lambda ps: EGD(ps, lr=0.1, **kw), params, gen)
    if kw.get("signed"):
        # Traced, the signed kernel computes 2sinh(x) as e^x − e^{−x} from one exp: equal to eager
        # torch.sinh to a few float64 roundings of θ⁺ + θ⁻, not bitwise.
        for x, y in zip(eager, traced):
            torch.testing.assert_close(x, y, rtol=0, atol=2e-15)
    else:
        assert_bitwise(eager, traced)


# ================================== EGStepSize ====================================================


def quadratic_grads(params, A, t):
    """A loss whose successive gradients both agree and disagree: ½θᵀAθ + sin(t)·Σθ."""
    for p, a in zip(params, A):
        p.grad = (a * p.detach()) + math.sin(0.7 * t)


@pytest.mark.parametrize("granularity", ["coordinate", "tensor", "group"])
def test_su_closed_form(granularity):
    """ν_{T+1} = exp(γ Σ_{k≤T} g_{k−1}⊙g_k) (summed over the tensor/group at coarser granularity)."""
    gamma = 0.05
    ps = [signed((4, 3)), signed((5,), seed=1)]
    A = [torch.rand(4, 3, dtype=torch.float64) + 0.5, torch.rand(5, dtype=torch.float64) + 0.5]
    opt = EGStepSize(torch.optim.SGD(ps, lr=0.05), meta_lr=gamma, granularity=granularity,
                     max_exponent=1e6, nu_min=1e-300, nu_max=1e300)
    acc = [torch.zeros_like(p) for p in ps]
    prev = [torch.zeros_like(p) for p in ps]
    for t in range(25):
        quadratic_grads(ps, A, t)
        for i, p in enumerate(ps):
            acc[i] += prev[i] * p.grad
            prev[i] = p.grad.clone()
        opt.step()
    if granularity == "coordinate":
        for p, s in zip(ps, acc):
            torch.testing.assert_close(opt.state[p]["egs_nu"], torch.exp(gamma * s), rtol=1e-13, atol=0)
    elif granularity == "tensor":
        for p, s in zip(ps, acc):
            torch.testing.assert_close(opt.state[p]["egs_nu"], torch.exp(gamma * s.sum()), rtol=1e-13, atol=0)
    else:
        total = sum(s.sum() for s in acc)
        torch.testing.assert_close(opt.param_groups[0]["egs_nu"], torch.exp(gamma * total), rtol=1e-13, atol=0)


def test_su_step_is_sgd_with_learned_rates():
    """With an SGD inner optimizer, θ_{t+1} = θ_t − η ν_{t+1}⊙g_t (to float64 rounding)."""
    p = signed((6,))
    A = [torch.linspace(0.5, 3.0, 6, dtype=torch.float64)]
    opt = EGStepSize(torch.optim.SGD([p], lr=0.1), meta_lr=0.2, max_exponent=0.3)
    for t in range(20):
        quadratic_grads([p], A, t)
        before = p.detach().clone()
        opt.step()
        torch.testing.assert_close(p.detach(), before - 0.1 * opt.state[p]["egs_nu"] * p.grad, rtol=1e-14, atol=1e-15)


def stiff_quadratic(wrap, steps=300, **kw):
    a = torch.tensor([100.0, 10.0, 1.0, 0.1], dtype=torch.float64)
    x = torch.ones(4, dtype=torch.float64, requires_grad=True)
    inner = torch.optim.SGD([x], lr=0.03)  # η·a_max = 3: plain gradient descent diverges
    opt = EGStepSize(inner, **kw) if wrap else inner
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (a * x * x).sum()).backward()
        opt.step()
    with torch.no_grad():
        return float(0.5 * (a * x * x).sum()), x, a, opt


def test_eg_step_size_tames_a_step_size_at_which_sgd_diverges():
    """Spec §1.1: f = ½Σa_i x_i², a = (100, 10, 1, 0.1), η·a_max = 3; Su's rule with the exponent clipped to ±1."""
    plain, _, _, _ = stiff_quadratic(wrap=False)
    assert not math.isfinite(plain) or plain > 1e100
    loss, x, a, opt = stiff_quadratic(wrap=True, meta_lr=1e-2, max_exponent=1.0)
    assert loss < 0.01 < 55.55  # initial loss ½Σa = 55.55
    assert abs(x[0]) < 1e-100 and abs(x[1]) < 1e-40
    rate = 0.03 * opt.state[x]["egs_nu"] * a
    assert 0.1 < rate[0] < 2.0 and 0.1 < rate[1] < 2.0, rate  # η ν_i a_i = O(1) on the stiff coordinates
    # The scale caveat: the a = 0.1 coordinate's hypergradient ~ a²x² barely moves its rate.
    assert 0.9 < float(opt.state[x]["egs_nu"][3]) < 1.5
    # The cosine normalisation makes γ scale-free: every coordinate adapts.
    loss_cos, _, _, _ = stiff_quadratic(wrap=True, meta_lr=0.3, normalize="cosine")
    assert loss_cos < 1e-30


INNERS = {
    "SGD-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "Lion": lambda ps: Lion(ps, lr=3e-3, weight_decay=0.1),
}
WRAP_CONFIGS = {
    "su-coordinate": dict(),
    "su-tensor": dict(granularity="tensor"),
    "paper-coordinate": dict(form="paper"),
    "paper-group-cosine": dict(form="paper", granularity="group", normalize="cosine"),
}

ENTRY = "danlu_eg_step_size"  # EGStepSize's top-level state-dict entry
PREFIX = "egs_"  # its keys in the shared per-parameter state and param groups


def inner_part(sd):
    """The inner optimizer's part of a wrapper state dict: without the wrapper's entry and egs_ keys."""
    out = {k: v for k, v in sd.items() if k not in (ENTRY, "state", "param_groups")}
    state = {pid: {k: v for k, v in s.items() if not k.startswith(PREFIX)} for pid, s in sd["state"].items()}
    out["state"] = {pid: s for pid, s in state.items() if s}
    out["param_groups"] = [{k: v for k, v in g.items() if not k.startswith(PREFIX)} for g in sd["param_groups"]]
    return out


def own_keys(form="su", granularity="coordinate", **_):
    """The egs_ keys EGStepSize keeps per stepped parameter and per param group."""
    per_param = {"egs_prev_grad"} if form == "su" else {"egs_exp_avg", "egs_prev_dir"}
    if granularity != "group":
        per_param.add("egs_nu")
    per_group = {"egs_nu"} if granularity == "group" else set()
    if form == "paper":
        per_group.add("egs_scale")
    return per_param, per_group


def to_old_format(sd):
    """The same state in danlu ≤ 0.1's layout: {"wrapper": {type, state, hyper, groups}, "inner": ...}."""
    ids = [pid for g in sd["param_groups"] for pid in g["params"]]
    strip = lambda d: {k[len(PREFIX):]: v for k, v in d.items() if k.startswith(PREFIX)}  # noqa: E731
    wrapper = {
        "type": sd[ENTRY]["type"],
        "state": {ids.index(pid): strip(s) for pid, s in sd["state"].items() if strip(s)},
        "hyper": dict(sd[ENTRY]["hyper"]),
        "groups": {gi: strip(g) for gi, g in enumerate(sd["param_groups"]) if strip(g)},
    }
    return {"wrapper": wrapper, "inner": inner_part(sd)}


@pytest.mark.parametrize("config", list(WRAP_CONFIGS))
@pytest.mark.parametrize("inner", list(INNERS))
def test_meta_lr_zero_is_bitwise_the_inner_optimizer(inner, config):
    model, X, y = mlp()
    model2 = copy.deepcopy(model)
    plain = INNERS[inner](model.parameters())
    wrapped = EGStepSize(INNERS[inner](model2.parameters()), meta_lr=0.0, **WRAP_CONFIGS[config])
    for _ in range(30):
        train(model, plain, X, y, 1)
        train(model2, wrapped, X, y, 1)
        assert_bitwise(flat(model), flat(model2))
    assert tree_equal(plain.state_dict(), inner_part(wrapped.state_dict()))


@pytest.mark.parametrize("config", list(WRAP_CONFIGS))
@pytest.mark.parametrize("inner", ["AdamW", "Lion"])
def test_wrapper_state_dict_round_trip_bitwise_lockstep(inner, config):
    model, X, y = mlp()
    make = lambda m: EGStepSize(INNERS[inner](m.parameters()), meta_lr=1e-2, **WRAP_CONFIGS[config])  # noqa: E731
    opt = make(model)
    train(model, opt, X, y, 4)
    model2 = copy.deepcopy(model)
    opt2 = EGStepSize(INNERS[inner](model2.parameters()), meta_lr=0.5)  # saved hyperparameters replace these
    sd = reload(opt.state_dict())
    # torch's layout: the inner optimizer's dict, the wrapper's entries prefixed in it, one top-level entry
    assert {"state", "param_groups", ENTRY} <= set(sd) and not {"wrapper", "inner"} & set(sd)
    assert sd[ENTRY]["type"] == "EGStepSize" and sd[ENTRY]["hyper"]["meta_lr"] == 1e-2
    per_param, per_group = own_keys(**WRAP_CONFIGS[config])
    assert len(sd["state"]) == len(list(model.parameters()))
    assert all({k for k in s if k.startswith(PREFIX)} == per_param for s in sd["state"].values())
    assert all({k for k in g if k.startswith(PREFIX)} == per_group for g in sd["param_groups"])
    assert set(inner_part(sd)) == set(opt.optimizer.state_dict())
    opt2.load_state_dict(sd)
    assert_lockstep(model, opt, model2, opt2, X, y)


def assert_lockstep(model, opt, model2, opt2, X, y, steps=5):
    """Equal state dicts now, bitwise equal parameters for ``steps`` steps, equal state dicts after."""
    assert tree_equal(opt.state_dict(), opt2.state_dict())
    for _ in range(steps):
        train(model, opt, X, y, 1)
        train(model2, opt2, X, y, 1)
        assert_bitwise(flat(model), flat(model2))
    assert tree_equal(opt.state_dict(), opt2.state_dict())


@pytest.mark.parametrize("config", list(WRAP_CONFIGS))
@pytest.mark.parametrize("inner", ["AdamW", "Lion"])
def test_wrapper_loads_an_old_format_state_dict_and_continues_bitwise(inner, config):
    """A dict in danlu ≤ 0.1's layout ({"wrapper", "inner"}, the wrapper's entries unprefixed) loads into
    a fresh wrapper, which then steps bitwise like the original."""
    model, X, y = mlp()
    opt = EGStepSize(INNERS[inner](model.parameters()), meta_lr=1e-2, **WRAP_CONFIGS[config])
    train(model, opt, X, y, 4)
    model2 = copy.deepcopy(model)
    opt2 = EGStepSize(INNERS[inner](model2.parameters()), meta_lr=0.5)  # saved hyperparameters replace these
    old = reload(to_old_format(opt.state_dict()))
    assert set(old) == {"wrapper", "inner"} and old["wrapper"]["type"] == "EGStepSize"
    assert not any(k.startswith(PREFIX) for s in old["inner"]["state"].values() for k in s)
    assert old["wrapper"]["state"], "the old dict carries the wrapper's per-parameter state"
    opt2.load_state_dict(old)
    assert opt2.meta_lr == 1e-2 and all(getattr(opt2, k) == getattr(opt, k) for k in EGStepSize._hyper_keys)
    assert_lockstep(model, opt, model2, opt2, X, y)


def test_wrapper_refuses_a_bad_state_dict_unchanged():
    model, X, y = mlp()
    opt = EGStepSize(torch.optim.AdamW(model.parameters(), lr=1e-2), meta_lr=1e-2, form="paper")
    train(model, opt, X, y, 2)
    before = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(before)
    bad[ENTRY]["hyper"]["nu_max"] = 0.5
    with pytest.raises(ValueError, match=r"load_state_dict: Invalid nu_max: 0\.5"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(before)
    bad[ENTRY]["hyper"]["granularity"] = "tensor"  # the saved ν are per coordinate
    with pytest.raises(ValueError, match=r"state 'nu' of parameter 0 is not a tensor of shape \(\)"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(before)
    del bad["param_groups"][0]["egs_scale"]
    with pytest.raises(ValueError, match=r"param group 0 lacks its 0-d \['scale'\]"):
        opt.load_state_dict(bad)
    # The inner optimizer's own state dict (it has per-parameter state but no egs_ entries).
    model3 = copy.deepcopy(model)
    alone = torch.optim.AdamW(model3.parameters(), lr=1e-2)
    train(model3, alone, X, y, 1)
    with pytest.raises(ValueError, match=r"saved by another optimizer"):
        opt.load_state_dict(alone.state_dict())
    assert tree_equal(opt.state_dict(), before)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_wrapper_deepcopy_and_pickle_continue_identically(how):
    model, X, y = mlp()
    opt = EGStepSize(Lion(model.parameters(), lr=3e-3), meta_lr=1e-2, form="paper", granularity="tensor")
    train(model, opt, X, y, 3)
    model2, opt2 = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    assert type(opt2) is EGStepSize and opt2.optimizer.param_groups is opt2.param_groups
    assert all(p in opt2.state and any(k.startswith("egs_") for k in opt2.state[p]) for p in model2.parameters())
    for _ in range(4):
        train(model, opt, X, y, 1)
        train(model2, opt2, X, y, 1)
        assert_bitwise(flat(model), flat(model2))


def test_lr_scheduler_on_the_wrapper_changes_the_inner_lr():
    model, X, y = mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = EGStepSize(inner, meta_lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(4):
        train(model, opt, X, y, 1)
        sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.025)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.0)
    frozen = flat(model)
    train(model, opt, X, y, 2)
    assert_bitwise(frozen, flat(model))


@pytest.mark.parametrize("thing", [None, "sgd", [torch.zeros(2)], torch.optim.SGD, "params"])
def test_wrapper_refuses_something_that_is_not_an_optimizer(thing):
    model = nn.Linear(2, 2)
    arg = model.parameters() if thing == "params" else thing
    with pytest.raises(TypeError, match=r"wraps a torch\.optim\.Optimizer"):
        EGStepSize(arg, meta_lr=1e-2)


BAD_WRAPPER = [
    (dict(meta_lr=-1e-2), ValueError, r"^Invalid meta_lr: -0\.01 \(expected a number in \[0, inf\]\)$"),
    (dict(meta_lr="0.01"), TypeError, r"^Invalid meta_lr: '0\.01' \(expected a real number\)$"),
    (dict(granularity="global"), ValueError,
     r"^Invalid granularity: 'global' \(expected one of 'coordinate', 'tensor', 'group'\)$"),
    (dict(granularity=1), TypeError, r"^Invalid granularity: 1 "),
    (dict(form="adam"), ValueError, r"^Invalid form: 'adam' \(expected one of 'su', 'paper'\)$"),
    (dict(normalize="rms"), ValueError, r"^Invalid normalize: 'rms' \(expected one of None, 'cosine'\)$"),
    (dict(max_exponent=0.0), ValueError, r"^Invalid max_exponent: 0\.0 \(expected a number in \(0, inf\]\)$"),
    (dict(nu_min=0.0), ValueError, r"^Invalid nu_min: 0\.0 \(expected a number in \(0, 1\]\)$"),
    (dict(nu_min=2.0), ValueError, r"^Invalid nu_min: 2\.0 \(expected a number in \(0, 1\]\)$"),
    (dict(nu_max=0.5), ValueError, r"^Invalid nu_max: 0\.5 \(expected a number in \[1, inf\]\)$"),
    (dict(scale_max=float("inf")), ValueError, r"^Invalid scale_max: inf \(expected a finite number"),
    (dict(form="paper", beta=1.0), ValueError, r"^Invalid beta: 1\.0 \(expected a number in \[0, 1\)\)$"),
    (dict(beta=0.9), ValueError, r"^Invalid beta: 0\.9 \(expected None with form='su'"),
    (dict(scale_meta_lr=0.1), ValueError, r"^Invalid scale_meta_lr: 0\.1 \(expected None with form='su'"),
    (dict(lr=0.1), TypeError, r"unexpected keyword argument 'lr'"),
]


@pytest.mark.parametrize("kwargs,exc,regex", BAD_WRAPPER, ids=[str(k) for k, _, _ in BAD_WRAPPER])
def test_wrapper_bad_hyperparameters(kwargs, exc, regex):
    inner = torch.optim.SGD([torch.zeros(3, requires_grad=True)], lr=0.1)
    kwargs = {"meta_lr": 1e-2, **kwargs}
    with pytest.raises(exc, match=regex):
        EGStepSize(inner, **kwargs)


@pytest.mark.parametrize("config", list(WRAP_CONFIGS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_wrapper_nonfinite_grad_shows_in_params(config, bad):
    model, X, y = mlp()
    opt = EGStepSize(Lion(model.parameters(), lr=3e-3), meta_lr=1e-2, **WRAP_CONFIGS[config])
    train(model, opt, X, y, 2)
    opt.zero_grad()
    F.mse_loss(model(X), y).backward()
    w = model[0].weight
    w.grad[1, 2] = bad
    opt.step()
    assert not torch.isfinite(w[1, 2])
    state = opt.state[w]
    for key in ("egs_nu",):
        if key in state and state[key].dim():
            assert not torch.isfinite(state[key][1, 2]), "the factor hid a non-finite gradient"


def test_wrapper_closure_sparse_and_params_without_grad():
    model, X, y = mlp()
    unused = nn.Parameter(torch.randn(3))
    opt = EGStepSize(torch.optim.SGD(list(model.parameters()) + [unused], lr=0.1), meta_lr=1e-2)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(X), y)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert unused not in opt.state or not opt.state[unused]
    emb = nn.Embedding(5, 2, sparse=True)
    opt2 = EGStepSize(torch.optim.SGD(emb.parameters(), lr=0.1), meta_lr=1e-2)
    emb(torch.tensor([1, 3])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt2.step()
    assert torch.equal(before, emb.weight.detach()) and not opt2.state


def test_paper_form_scale_grows_when_steps_agree_and_shrinks_when_they_oscillate():
    def run(lr):
        x = torch.ones(3, dtype=torch.float64, requires_grad=True)
        opt = EGStepSize(torch.optim.SGD([x], lr=lr), meta_lr=0.5, form="paper", granularity="group")
        for _ in range(10):
            opt.zero_grad()
            (0.5 * (x * x).sum()).backward()
            opt.step()
        return float(opt.param_groups[0]["egs_scale"])

    assert run(0.01) > 1.0  # slow descent: successive steps agree
    assert run(1.9) < 1.0  # overshooting: successive steps oppose


def paper_sgdm_reference(theta0, A, steps, lr, mu, beta, gamma_p, gamma_s, gains_in_momentum=True):
    """float64 reference of the paper's SGDM form (Amid et al., arXiv:2202.00145, as summarised in the
    EGStepSize docstring), on the gradients of ``quadratic_grads``: p_t = p_{t−1}⊙exp(γ_p m_{t−1}⊙g_t),
    s_t = s_{t−1}·exp(γ_s⟨h_{t−1}, g_t⟩), m_t = βm_{t−1} + (1−β)g_t, h_t = μh_{t−1} + η p_t⊙g_t,
    θ_t = θ_{t−1} − s_t h_t. ``gains_in_momentum=False`` is the wrapper's documented variant: h_t =
    μh_{t−1} + η g_t, θ_t = θ_{t−1} − s_t p_t⊙h_t, and s aligns g_t with p_{t−1}⊙h_{t−1}."""
    theta = theta0.clone()
    p = torch.ones_like(theta)
    s = 1.0
    m = torch.zeros_like(theta)
    h = torch.zeros_like(theta)
    step_dir = torch.zeros_like(theta)  # the scale-free direction of the last step: h, or p⊙h
    for t in range(steps):
        g = A * theta + math.sin(0.7 * t)
        p = p * torch.exp(gamma_p * m * g)
        s = s * math.exp(gamma_s * float((step_dir * g).sum()))
        m = beta * m + (1 - beta) * g
        h = mu * h + lr * (p * g if gains_in_momentum else g)
        step_dir = h if gains_in_momentum else p * h
        theta = theta - s * step_dir
    return theta, p, s


@pytest.mark.parametrize("mu,gamma_p", [(0.0, 0.3), (0.9, 0.0), (0.9, 0.3)])
def test_paper_form_is_the_papers_sgdm_in_float64(mu, gamma_p):
    """form="paper" around torch SGD(momentum=μ) against the paper's equations: equal when μ = 0 or the gains
    are frozen; with both on it is the documented variant (gains outside the momentum), which differs."""
    gamma_s, lr, beta, steps = 0.2, 0.05, 0.9, 30
    g = torch.Generator().manual_seed(0)
    theta0 = torch.randn(7, generator=g, dtype=torch.float64)
    A = torch.rand(7, generator=g, dtype=torch.float64) + 0.5
    x = theta0.clone().requires_grad_()
    opt = EGStepSize(torch.optim.SGD([x], lr=lr, momentum=mu), meta_lr=gamma_p, form="paper", beta=beta,
                     scale_meta_lr=gamma_s, max_exponent=1e6, nu_min=1e-300, nu_max=1e300,
                     scale_min=1e-300, scale_max=1e300)
    for t in range(steps):
        quadratic_grads([x], [A], t)
        opt.step()
    got = (x.detach(), opt.state[x]["egs_nu"], float(opt.param_groups[0]["egs_scale"]))
    assert got[2] != 1.0 and (gamma_p == 0.0) == bool((got[1] == 1.0).all())  # both factors moved (or ν is frozen)
    exact = mu == 0.0 or gamma_p == 0.0
    want = paper_sgdm_reference(theta0, A, steps, lr, mu, beta, gamma_p, gamma_s, gains_in_momentum=exact)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=0)
    assert got[2] == pytest.approx(want[2], rel=1e-12)
    if not exact:
        paper = paper_sgdm_reference(theta0, A, steps, lr, mu, beta, gamma_p, gamma_s)
        assert float((got[0] - paper[0]).abs().max()) > 1e-2  # the deviation is real, not rounding


def test_wrapper_learns_on_the_mlp_and_added_groups_get_state():
    model, X, y = mlp()
    opt = EGStepSize(torch.optim.SGD(model[0].parameters(), lr=0.1), meta_lr=1e-2, form="paper", granularity="group")
    opt.add_param_group({"params": list(model[2].parameters())})
    losses = train(model, opt, X, y, 60)
    assert losses[-1] < 0.5 * losses[0]
    assert len(opt.param_groups) == 2 and all("egs_scale" in g for g in opt.param_groups)
    assert "EGStepSize(meta_lr=0.01" in repr(opt)


@pytest.mark.parametrize("config", list(WRAP_CONFIGS))
def test_wrapper_keeps_16_bit_dtypes(config):
    model, X, y = mlp(dtype=torch.bfloat16)
    opt = EGStepSize(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), meta_lr=1e-2, **WRAP_CONFIGS[config])
    losses = train(model, opt, X, y, 30)
    assert losses[-1] < losses[0]
    for p in model.parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
        for k, v in opt.state[p].items():
            assert v.dtype == (torch.float32 if k == "egs_nu" else torch.bfloat16), k
