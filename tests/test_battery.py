"""The shared battery: every exported optimizer (tests/optim_db.py) against the torch.optim contract.

Parametrised over ``optim_db.configs()``: each spec's base kwargs ("default") and its variants. Skips
come from the db (``OptimSpec.skips``), always with a reason. Everything runs on CPU with tiny models.

Wrappers (EGStepSize, GradientPenalty) run crossed with several inner optimizers. Their own state is in
``opt.state``, the inner optimizer's in ``opt.optimizer.state``: state checks look at both
(:func:`state_maps`). Specs with ``requires_closure`` get every step as ``opt.step(closure)``, the
closure doing what the test would otherwise do before ``opt.step()`` (:func:`micro_step`).
"""

from __future__ import annotations

import copy
import inspect
import io
import math
import pickle
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import danlu
from danlu._core.optimizer import DanluOptimizer
from danlu._core.wrapper import OptimizerWrapper
from optim_db import OPTIM_DB, WRAPPER_INNERS, Config, OptimSpec, configs, spec_by_name

ALL = configs()
BASE = configs(variants=False)


def _ids(cfgs: list[Config]) -> list[str]:
    return [c.id for c in cfgs]


def over(cfgs: list[Config]):
    return pytest.mark.parametrize("cfg", cfgs, ids=_ids(cfgs))


over_all = over(ALL)
over_base = over(BASE)
over_specs = pytest.mark.parametrize("spec", OPTIM_DB, ids=[s.name for s in OPTIM_DB])



@pytest.fixture(autouse=True)
def _db_skips(request):
    """Apply ``OptimSpec.skips`` (data with a reason) to the running test."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None:
        return
    name = request.node.originalname
    cfg = callspec.params.get("cfg")
    spec = callspec.params.get("spec")
    # The test's other parameters, for "<test>@<value>" keys: strings (a layout) and specs (by name).
    values = [
        v if isinstance(v, str) else v.name
        for k, v in callspec.params.items()
        if k not in ("cfg", "spec") and isinstance(v, (str, OptimSpec))
    ]
    reason = None
    if isinstance(cfg, Config):
        reason = cfg.skip_reason(name, values)
    elif isinstance(spec, OptimSpec):
        reason = spec.skip_reason(name, "default", values)
    if reason:
        pytest.skip(reason)


# --- problems --------------------------------------------------------------------------------------


def mlp_problem(dtype: torch.dtype = torch.float32, seed: int = 0):
    """A tiny MLP regression on fixed random data: (model, X, y)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 8, generator=g)
    w = torch.randn(8, 1, generator=g)
    y = torch.tanh(X @ w) + 0.5 * torch.sin(2.0 * X[:, 1:2])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    return model.to(dtype), X.to(dtype), y.to(dtype)


def mlp_closure(model: nn.Module, opt: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor) -> Callable:
    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(X), y)
        loss.backward()
        return loss

    return closure


def raw_params(shapes, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def raw_closure(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> Callable:
    """A smooth non-quadratic loss whose gradient is non-zero almost everywhere."""

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = sum(((p - 0.3) ** 2).sum() + 0.1 * (p**4).sum() for p in params)
        loss.backward()
        return loss

    return closure


def innermost(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that owns the param groups: a wrapper's inner optimizer, else ``opt``."""
    return innermost(opt.optimizer) if isinstance(opt, OptimizerWrapper) else opt


def state_maps(opt: torch.optim.Optimizer) -> list[dict]:
    """Every per-parameter state map there is: ``opt.state`` (a wrapper's is its inner optimizer's, the
    wrapper's own entries in it under its prefix)."""
    return [opt.state]


def states_of(opt: torch.optim.Optimizer, p: torch.Tensor) -> list[dict]:
    """``p``'s state at each level of :func:`state_maps` (``{}`` where it has none; creates nothing)."""
    return [m.get(p, {}) for m in state_maps(opt)]


def micro_steps(opt: torch.optim.Optimizer) -> int:
    """Calls of ``step()`` per parameter update: ``accum_steps`` for accumulating optimizers (also as
    a wrapper's inner optimizer), else 1."""
    return getattr(innermost(opt), "accum_steps", 1)


def _spec(cfg: Config | OptimSpec) -> OptimSpec:
    return cfg.spec if isinstance(cfg, Config) else cfg


def micro_step(cfg: Config | OptimSpec, opt: torch.optim.Optimizer, closure: Callable) -> Any:
    """One call of ``step``: ``closure(); opt.step()``, or ``opt.step(closure)`` where the spec
    requires a closure. Returns the closure's loss."""
    if _spec(cfg).requires_closure:
        return _spec(cfg).step(opt, closure)
    loss = closure()
    opt.step()
    return loss


def do_step(cfg: Config | OptimSpec, opt: torch.optim.Optimizer, closure: Callable) -> Any:
    """One parameter update: ``micro_steps(opt)`` calls of ``step`` (the last one moves θ)."""
    for _ in range(micro_steps(opt)):
        loss = micro_step(cfg, opt, closure)
    assert getattr(innermost(opt), "is_update_step", True), "the last micro-step of a window did not update"
    return loss


def train(cfg: Config, model, opt, X, y, n: int, sched=None) -> list[float]:
    closure = mlp_closure(model, opt, X, y)
    losses = []
    for _ in range(n):
        losses.append(float(do_step(cfg, opt, closure).detach()))
        if sched is not None:
            sched.step()
    return losses


def params_of(model_or_list) -> list[torch.Tensor]:
    if isinstance(model_or_list, nn.Module):
        return [p.detach().clone() for p in model_or_list.parameters()]
    return [p.detach().clone() for p in model_or_list]


def assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor], what: str = "params") -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and x.shape == y.shape, (
            f"{what}[{i}]: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
        assert torch.equal(x, y), f"{what}[{i}] differ (max |Δ| = {(x.double() - y.double()).abs().max().item():.3g})"


def assert_same_tree(a: Any, b: Any, path: str = "") -> None:
    """Recursive equality of state dicts: tensors bitwise with the same dtype, other leaves by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), f"{path}: {a!r} vs {b!r}"


def snapshot(opt: torch.optim.Optimizer):
    """Everything load_state_dict / add_param_group could change, deep-copied."""
    return (
        copy.deepcopy(opt.state_dict()),
        [sorted(g) for g in opt.param_groups],
        [[id(p) for p in g["params"]] for g in opt.param_groups],
        {id(p): sorted(s) for p, s in opt.state.items()},
    )


def assert_unchanged(opt: torch.optim.Optimizer, before) -> None:
    after = snapshot(opt)
    assert after[1] == before[1], f"param group keys changed: {before[1]} -> {after[1]}"
    assert after[2] == before[2], "param group membership changed"
    assert after[3] == before[3], "optimizer state keys changed"
    assert_same_tree(before[0], after[0], "state_dict")


# --- enrollment ------------------------------------------------------------------------------------


def test_every_exported_optimizer_is_enrolled():
    exported = {
        name
        for name in danlu.__all__
        if isinstance(getattr(danlu, name), type) and issubclass(getattr(danlu, name), torch.optim.Optimizer)
    }
    enrolled = {spec.cls.__name__ for spec in OPTIM_DB}
    missing = sorted(exported - enrolled)
    assert not missing, f"exported optimizers without an entry in tests/optim_db.py: {missing}"
    for spec in OPTIM_DB:
        base = spec.cls.__name__
        assert base in danlu.__all__, f"{spec.name} is in optim_db but not exported"
        assert getattr(danlu, base) is spec.cls
        if issubclass(spec.cls, OptimizerWrapper):
            assert spec.inner is not None and spec.factory is not None, (
                f"{spec.name}: a wrapper needs inner and factory")
            label = spec.name.removeprefix(f"{base}[").removesuffix("]")
            assert spec.name == f"{base}[{label}]" and WRAPPER_INNERS.get(label, spec.inner) is spec.inner, spec.name
        else:
            assert spec.name == base and spec.inner is None, spec.name
    # Wrappers: crossed with (at least) SGDM, AdamW, Lion and torch.optim.SGD as inner optimizers.
    required = set(WRAPPER_INNERS.values())
    assert {danlu.SGDM, danlu.AdamW, danlu.Lion, torch.optim.SGD} <= required
    for name in sorted(exported):
        cls = getattr(danlu, name)
        if issubclass(cls, OptimizerWrapper):
            inners = {spec.inner for spec in OPTIM_DB if spec.cls is cls}
            lacking = sorted(c.__module__ + "." + c.__name__ for c in required - inners)
            assert not lacking, f"{name} is not enrolled with inner optimizers {lacking}"
    assert len({spec.name for spec in OPTIM_DB}) == len(OPTIM_DB), "duplicate names in optim_db"


def _param_values(test: Callable) -> set[str]:
    """The values of a test's parametrize marks that a skip key may name after "@"."""
    out = set()
    for mark in getattr(test, "pytestmark", []):
        if mark.name == "parametrize":
            for v in mark.args[1]:
                for x in v if isinstance(v, tuple) else (v,):
                    if isinstance(x, str):
                        out.add(x)
                    elif isinstance(x, OptimSpec):
                        out.add(x.name)
    return out


def test_skip_keys_name_real_tests():
    tests = {name: obj for name, obj in globals().items() if name.startswith("test_") and callable(obj)}
    for spec in OPTIM_DB:
        for key, reason in spec.skips.items():
            key_, _, value = key.partition("@")
            name, _, variant = key_.partition("/")
            assert name in tests, f"{spec.name}: skip key {key!r} names no battery test"
            assert not variant or variant == "default" or variant in spec.variants, f"{spec.name}: {key!r}"
            assert "@" not in key or value in _param_values(tests[name]), f"{spec.name}: {key!r} names no parameter"
            assert isinstance(reason, str) and len(reason) > 10, f"{spec.name}: skip {key!r} needs a reason"


def test_db_entries_cover_the_required_errors():
    """Every entry checks at least: a bad lr, a wrong type and an unknown keyword."""
    for spec in OPTIM_DB:
        kinds = [(set(b.kwargs) | set(b.group or {}), b.exc, b.regex) for b in spec.bad]
        assert any("lr" in k and e is ValueError for k, e, _ in kinds), f"{spec.name}: no bad-lr case"
        assert any(e is TypeError and "unexpected keyword" not in r for _, e, r in kinds), (
            f"{spec.name}: no wrong-type case")
        assert any(e is TypeError and "unexpected keyword" in r for _, e, r in kinds), (
            f"{spec.name}: no unknown-keyword case")
        for desc in spec.variants:
            assert desc != "default", f"{spec.name}: 'default' is the name of the base config"


# --- hyperparameter validation ---------------------------------------------------------------------

BAD_CASES = [(spec, bad) for spec in OPTIM_DB for bad in spec.bad]


def _bad_id(spec: OptimSpec, bad) -> str:
    def show(v):
        return v.__name__ if isinstance(v, type) else repr(v)

    parts = ([f"{k}={show(v)}" for k, v in bad.kwargs.items()]
             + [f"group.{k}={show(v)}" for k, v in (bad.group or {}).items()])
    return f"{spec.name}-{','.join(parts)}"


over_bad = pytest.mark.parametrize("spec,bad", BAD_CASES, ids=[_bad_id(s, b) for s, b in BAD_CASES])
# Constructor-only errors (an unknown keyword) do not apply to groups, which may carry extra keys.
BAD_GROUP_CASES = [(s, b) for s, b in BAD_CASES if b.in_group]
over_bad_group = pytest.mark.parametrize(
    "spec,bad", BAD_GROUP_CASES, ids=[_bad_id(s, b) for s, b in BAD_GROUP_CASES]
)


def _bad_params():
    return [torch.zeros(3, 4, requires_grad=True)]


@over_bad
def test_bad_hyperparameter_raises(spec: OptimSpec, bad):
    params = _bad_params()
    arg = params if bad.group is None else [{"params": params, **bad.group}]
    with pytest.raises(bad.exc, match=bad.regex):
        spec.build(arg, **{**spec.kwargs, **bad.kwargs})


@over_bad_group
def test_bad_param_group_is_refused_and_not_added(spec: OptimSpec, bad):
    model, X, y = mlp_problem()
    opt = spec.build(list(model[0].parameters()), **spec.kwargs)
    train(Config(spec, "default", spec.kwargs), model, opt, X, y, 2)
    groups_before = list(opt.param_groups)
    before = snapshot(opt)
    with pytest.raises(bad.exc, match=bad.regex):
        opt.add_param_group({"params": [torch.zeros(3, 4, requires_grad=True)], **bad.kwargs, **(bad.group or {})})
    assert len(opt.param_groups) == len(groups_before)
    assert all(a is b for a, b in zip(opt.param_groups, groups_before))
    assert_unchanged(opt, before)
    # The optimizer still works afterwards.
    train(Config(spec, "default", spec.kwargs), model, opt, X, y, 1)


@over_specs
def test_good_param_group_can_be_added(spec: OptimSpec):
    model, X, y = mlp_problem()
    opt = spec.build(list(model[0].parameters()), **spec.kwargs)
    opt.add_param_group({"params": list(model[2].parameters())})
    assert len(opt.param_groups) == 2
    before = params_of(model[2])
    train(Config(spec, "default", spec.kwargs), model, opt, X, y, 2)
    assert not all(torch.equal(a, b) for a, b in zip(before, params_of(model[2])))


@over_specs
def test_complex_params_raise_type_error(spec: OptimSpec):
    """Refused at construction; a wrapper whose inner optimizer takes complex params (torch's) refuses
    them at the first step instead, before anything moves."""
    for params in ([torch.zeros(3, dtype=torch.complex64, requires_grad=True)],
                   [torch.zeros(3, requires_grad=True), torch.zeros(3, dtype=torch.complex64, requires_grad=True)]):
        if spec.inner is None or issubclass(spec.inner, DanluOptimizer):
            with pytest.raises(TypeError, match="complex"):
                spec.build(params, **spec.kwargs)
            continue
        opt = spec.build(params, **spec.kwargs)

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = sum(((p - 0.3).abs() ** 2).sum() for p in params)
            loss.backward()
            return loss

        before = params_of(params)
        with pytest.raises(TypeError, match="complex"):
            micro_step(spec, opt, closure)
        assert_bitwise(before, params_of(params), "params after a refused complex step")
        assert all(len(s) == 0 for p in params for s in states_of(opt, p)), "a refused step created state"


# --- training --------------------------------------------------------------------------------------


@over_all
def test_loss_goes_down(cfg: Config):
    model, X, y = mlp_problem()
    opt = cfg.make(model.parameters())
    losses = train(cfg, model, opt, X, y, 80)
    with torch.no_grad():
        final = float(F.mse_loss(model(X), y))
    assert all(math.isfinite(v) for v in losses)
    assert final < cfg.spec.loss_ratio * losses[0], f"loss {losses[0]:.4g} -> {final:.4g}"


# --- state_dict ------------------------------------------------------------------------------------


@over_all
def test_state_dict_round_trip_bitwise_lockstep(cfg: Config):
    model, X, y = mlp_problem()
    opt = cfg.make(model.parameters())
    train(cfg, model, opt, X, y, 3)

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    model2 = copy.deepcopy(model)
    opt2 = cfg.make(model2.parameters())
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert_same_tree(opt.state_dict(), opt2.state_dict(), "state_dict after load")
    # The loaded state does not alias the original's (a wrapper's nor its inner optimizer's).
    for p, p2 in zip(model.parameters(), model2.parameters()):
        for s, s2 in zip(states_of(opt, p), states_of(opt2, p2)):
            for k, v in s2.items():
                if isinstance(v, torch.Tensor) and v.numel():
                    assert v.data_ptr() != s[k].data_ptr()

    for _ in range(5):
        train(cfg, model, opt, X, y, 1)
        train(cfg, model2, opt2, X, y, 1)
        assert_bitwise(params_of(model), params_of(model2))
    assert_same_tree(opt.state_dict(), opt2.state_dict(), "state_dict after lockstep")


def _stepped(make: Callable[[list[torch.Tensor]], torch.optim.Optimizer], params, n: int = 2,
             spec: OptimSpec | None = None):
    """``make(params)`` after ``n`` steps on :func:`raw_closure` (through ``opt.step(closure)`` where
    ``spec`` requires a closure)."""
    opt = make(params)
    closure = raw_closure(opt, params)
    for _ in range(n):
        if spec is not None and spec.requires_closure:
            spec.step(opt, closure)
        else:
            closure()
            opt.step()
    return opt


def _untagged(sd: dict) -> dict:
    """What a tool that keeps only torch's two keys returns (torch.distributed.checkpoint's state-dict
    helpers, a hand-converted checkpoint): no danlu class tag, no wrapper entry."""
    return {"state": sd["state"], "param_groups": sd["param_groups"]}


def _layout():
    return [(3, 4), (3,)]


OTHER_PAIRS = [(t, s) for t in OPTIM_DB for s in OPTIM_DB if s is not t]
# AdaX and AdamW have the same hyperparameter keys (lr, betas, eps, weight_decay) and the same state
# (step, exp_avg, exp_avg_sq, all param-shaped): without the class tag nothing tells their state dicts
# apart, so only the tagged case can be refused (documented in DanluOptimizer.load_state_dict).
_SAME_SCHEMA = {frozenset({"AdaX", "AdamW"})}


def _innermost(spec: OptimSpec) -> type:
    return spec.inner or spec.cls


# Wrappers that keep no per-parameter state of their own: without the tags their dict is the inner's.
_TRANSPARENT = (danlu.GradientPenalty, danlu.MGS, danlu.ChiGated)


def _untagged_indistinguishable(spec: OptimSpec, source: OptimSpec) -> str | None:
    """Why an untagged dict of ``source`` cannot be told from one ``spec`` accepts, or None."""
    inner = frozenset({_innermost(spec).__name__, _innermost(source).__name__})
    if inner in _SAME_SCHEMA or len(inner) == 1:
        if spec.inner is None or spec.cls in _TRANSPARENT:
            return ("without the tags a wrapper's dict is its inner optimizer's with prefixed extra entries, "
                    "which an optimizer keeps as extra state (as it keeps timm Lookahead's): indistinguishable "
                    "from a dict of the same inner class (or of the same schema: AdaX/AdamW)")
    if spec.inner is torch.optim.SGD and (spec.cls in _TRANSPARENT or source.stateless):
        return _TORCH_SGD_NO_LOAD_CHECKS_UNTAGGED
    return None


_TORCH_SGD_NO_LOAD_CHECKS_UNTAGGED = (
    "torch.optim.SGD.load_state_dict checks only the number of param groups and of params per group, and "
    "this wrapper adds no per-parameter entries that would be missing: an untagged dict passes to it as is")


@pytest.mark.parametrize(
    "spec,source", OTHER_PAIRS, ids=[f"{s.name}-into-{t.name}" for t, s in OTHER_PAIRS]
)
@pytest.mark.parametrize("tagged", [True, False], ids=["as-saved", "untagged"])
def test_state_dict_from_other_danlu_optimizer_is_refused(spec: OptimSpec, source: OptimSpec, tagged: bool):
    cfg = Config(spec, "default", spec.kwargs)
    opt = _stepped(cfg.make, raw_params(_layout()), spec=spec)
    foreign = _stepped(lambda ps: source.build(ps, **source.kwargs), raw_params(_layout(), seed=1), spec=source)
    foreign = foreign.state_dict()
    if not tagged:
        reason = _untagged_indistinguishable(spec, source)
        if reason:
            pytest.skip(reason)
    if not tagged:
        foreign = _untagged(foreign)
    before = snapshot(opt)
    with pytest.raises(ValueError):
        opt.load_state_dict(foreign)
    assert_unchanged(opt, before)


TORCH_OPTIMS = {
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    "SGD-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9),
    "torch-Adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
}


@over_specs
@pytest.mark.parametrize("source", list(TORCH_OPTIMS), ids=list(TORCH_OPTIMS))
def test_state_dict_from_torch_optimizer_is_refused(spec: OptimSpec, source: str):
    cfg = Config(spec, "default", spec.kwargs)
    opt = _stepped(cfg.make, raw_params(_layout()), spec=spec)
    foreign = _stepped(TORCH_OPTIMS[source], raw_params(_layout(), seed=1)).state_dict()
    before = snapshot(opt)
    with pytest.raises(ValueError):
        opt.load_state_dict(foreign)
    assert_unchanged(opt, before)


def _groups_one(ps):
    return [{"params": ps}]


LAYOUTS = {
    # same number of params and groups, transposed shapes
    "other_shapes": ([(3, 4), (3,)], _groups_one, [(4, 3), (4,)], _groups_one),
    "fewer_params": ([(3, 4), (3,)], _groups_one, [(3, 4)], _groups_one),
    "more_params": ([(3, 4), (3,)], _groups_one, [(3, 4), (3,), (5,)], _groups_one),
    "more_groups": ([(3, 4), (3,)], _groups_one, [(3, 4), (3,)], lambda ps: [{"params": [ps[0]]}, {"params": [ps[1]]}]),
}


@over_all
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_state_dict_from_other_layout_is_refused(cfg: Config, layout: str):
    mine, my_groups, theirs, their_groups = LAYOUTS[layout]
    opt = _stepped(lambda ps: cfg.make(my_groups(ps)), raw_params(mine), spec=cfg.spec)
    foreign = _stepped(lambda ps: cfg.make(their_groups(ps)), raw_params(theirs, seed=1), spec=cfg.spec).state_dict()
    before = snapshot(opt)
    with pytest.raises(ValueError):
        opt.load_state_dict(foreign)
    assert_unchanged(opt, before)


# --- param groups and lr schedulers ---------------------------------------------------------------


@over_all
def test_tiny_lr_group_does_not_move(cfg: Config):
    model, X, y = mlp_problem()
    opt = cfg.make([{"params": list(model[0].parameters()), "lr": 1e-28}, {"params": list(model[2].parameters())}])
    frozen, moving = params_of(model[0]), params_of(model[2])
    train(cfg, model, opt, X, y, 5)
    assert_bitwise(frozen, params_of(model[0]), "params of the lr=1e-28 group")
    for a, b in zip(moving, params_of(model[2])):
        assert not torch.equal(a, b), "the other group did not move"


@over_all
def test_scheduler_zero_lr_stops_movement(cfg: Config):
    model, X, y = mlp_problem()
    opt = cfg.make(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch < 3 else 0.0)
    start = params_of(model)
    train(cfg, model, opt, X, y, 3, sched)
    assert opt.param_groups[0]["lr"] == 0.0
    moved = params_of(model)
    assert not all(torch.equal(a, b) for a, b in zip(start, moved))
    train(cfg, model, opt, X, y, 4, sched)
    assert_bitwise(moved, params_of(model), "params after the scheduler set lr to 0")


@over_all
def test_scheduler_change_takes_effect(cfg: Config):
    model, X, y = mlp_problem()
    model2 = copy.deepcopy(model)
    opt, opt2 = cfg.make(model.parameters()), cfg.make(model2.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    lr0 = opt2.param_groups[0]["lr"]
    for _ in range(2):
        train(cfg, model, opt, X, y, 1)
        train(cfg, model2, opt2, X, y, 1, sched)
        assert_bitwise(params_of(model), params_of(model2))
    assert opt2.param_groups[0]["lr"] == 0.5 * lr0
    train(cfg, model, opt, X, y, 1)
    train(cfg, model2, opt2, X, y, 1, sched)
    assert not all(torch.equal(a, b) for a, b in zip(params_of(model), params_of(model2))), "halving lr changed nothing"


def test_adafactor_relative_step_equals_lr_1e_2_early():
    """The default is ρ_t = min(lr, 1/√t) with lr = 1e-2, a number a scheduler can scale: for t ≤ 10⁴ it
    is exactly the absolute lr 1e-2."""
    model, X, y = mlp_problem()
    model2 = copy.deepcopy(model)
    spec = spec_by_name("Adafactor")
    cfg = Config(spec, "default", spec.kwargs)
    opt = danlu.Adafactor(model.parameters())
    opt2 = danlu.Adafactor(model2.parameters(), lr=1e-2)
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["relative_step"] is True
    assert opt2.param_groups[0]["relative_step"] is False  # a given lr is the absolute ρ, as before
    for _ in range(5):
        train(cfg, model, opt, X, y, 1)
        train(cfg, model2, opt2, X, y, 1)
        assert_bitwise(params_of(model), params_of(model2))


def test_adafactor_relative_step_decays_as_inverse_sqrt_t():
    """At t = 40000 the relative step is 1/√t = 5e-3 (below the 1e-2 cap), i.e. the absolute lr 5e-3;
    a cap a scheduler has decayed to 1e-3 binds instead."""

    def run(second_lr, relative_step):
        ps = raw_params([(5,), (3, 4)])
        opt = danlu.Adafactor(ps, relative_step=relative_step)
        closure = raw_closure(opt, ps)
        closure()
        opt.step()
        for p in ps:
            opt.state[p]["step"].fill_(39_999)
        opt.param_groups[0]["lr"] = second_lr
        closure()
        opt.step()
        return [p.detach() for p in ps]

    relative, absolute = run(1e-2, True), run(5e-3, False)
    for a, b in zip(relative, absolute):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    capped, absolute_cap = run(1e-3, True), run(1e-3, False)
    for a, b in zip(capped, absolute_cap):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert not torch.allclose(relative[0], capped[0], rtol=0, atol=1e-7)


# --- params without gradients, odd shapes, dtypes ----------------------------------------------------


@over_all
def test_params_without_grad_untouched_and_stateless(cfg: Config):
    used, never, later_none = raw_params([(3, 4), (5,), (4,)])
    opt = cfg.make([used, never, later_none])
    never0 = never.detach().clone()

    def closure(with_later: bool):
        opt.zero_grad(set_to_none=True)
        loss = ((used - 0.3) ** 2).sum() + 0.1 * (used**4).sum()
        if with_later:
            loss = loss + ((later_none - 0.3) ** 2).sum()
        loss.backward()
        return loss

    for _ in range(micro_steps(opt)):
        micro_step(cfg, opt, lambda: closure(True))
    assert never.grad is None
    after_first = later_none.detach().clone()
    state_first = copy.deepcopy([dict(s) for s in states_of(opt, later_none)])
    for _ in range(3 * micro_steps(opt)):
        micro_step(cfg, opt, lambda: closure(False))
        assert later_none.grad is None
    assert torch.equal(never.detach(), never0), "a param that never had a grad moved"
    assert all(len(s) == 0 for s in states_of(opt, never)), "a param that never had a grad got state"
    assert torch.equal(later_none.detach(), after_first), "a param whose grad is None moved"
    assert_same_tree(state_first, [dict(s) for s in states_of(opt, later_none)], "state of a param whose grad is None")


@over_all
def test_zero_size_and_scalar_params(cfg: Config):
    w, empty_rows, empty_cols, empty1d, scalar = params = raw_params([(4, 3), (0, 3), (3, 0), (0,), ()])
    opt = cfg.make(params)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = (((w - 0.3) ** 2).sum() + (scalar - 0.3) ** 2
                + sum((p**2).sum() for p in (empty_rows, empty_cols, empty1d)))
        loss.backward()
        return loss

    for _ in range(3):
        do_step(cfg, opt, closure)
    for p in params:
        assert torch.isfinite(p).all()
        for state in states_of(opt, p):
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    assert torch.isfinite(v).all(), f"state {k!r} of a {tuple(p.shape)} param is not finite"
    if not _spec(cfg).stateless:
        assert any(len(s) > 0 for s in states_of(opt, empty_rows)), (
            "a zero-size param with a gradient gets state like any other")


@over_all
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_dtypes_kept_and_finite(cfg: Config, dtype: torch.dtype):
    params = raw_params([(6, 5), (5,)], dtype=dtype)
    opt = cfg.make(params)
    closure = raw_closure(opt, params)
    start = [p.detach().clone() for p in params]
    for _ in range(5):
        do_step(cfg, opt, closure)
    acc = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    for p, p0 in zip(params, start):
        assert p.dtype == dtype
        assert torch.isfinite(p).all()
        assert not torch.equal(p, p0), "param did not move"
        states = states_of(opt, p)
        assert cfg.spec.stateless or any(len(s) > 0 for s in states)
        for _level, state in enumerate(states):
            for k, v in state.items():
                if k == "step" or not isinstance(v, torch.Tensor):
                    continue
                # ``acc_state`` names the spec's own entries kept in float32 (a wrapper's are prefixed).
                want = acc if k in cfg.spec.acc_state else dtype
                assert v.dtype == want, f"state {k!r} is {v.dtype}, param is {dtype}"
                assert torch.isfinite(v).all(), f"state {k!r} is not finite"


# --- determinism, copies ---------------------------------------------------------------------------


@over_all
def test_determinism(cfg: Config):
    results = []
    for _ in range(2):
        model, X, y = mlp_problem()
        opt = cfg.make(model.parameters())
        train(cfg, model, opt, X, y, 10)
        results.append(params_of(model))
    assert_bitwise(results[0], results[1])


@over_all
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle_continue_identically(cfg: Config, how: str):
    model, X, y = mlp_problem()
    opt = cfg.make(model.parameters())
    train(cfg, model, opt, X, y, 3)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert type(opt2) is type(opt)
    # The copy's state (a wrapper's and its inner optimizer's) is keyed by the copy's params.
    assert cfg.spec.stateless or all(any(p in m for m in state_maps(opt2)) for p in model2.parameters())
    copies = {id(p) for p in model2.parameters()}
    assert all(id(k) in copies for m in state_maps(opt2) for k in m)
    if isinstance(opt, OptimizerWrapper):
        assert opt2.param_groups is opt2.optimizer.param_groups, "the copy shares its inner optimizer's groups"
    assert_same_tree(opt.state_dict(), opt2.state_dict())
    for _ in range(4):
        train(cfg, model, opt, X, y, 1)
        train(cfg, model2, opt2, X, y, 1)
        assert_bitwise(params_of(model), params_of(model2))


# --- failure modes ---------------------------------------------------------------------------------


@over_all
@pytest.mark.parametrize("warmup", [0, 3], ids=["first-step", "after-3-steps"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "+inf", "-inf"])
def test_nonfinite_grad_shows_in_params(cfg: Config, warmup: int, bad: float):
    """Contract: a non-finite gradient entry makes (at least) that parameter entry non-finite.

    The bad entries are written into ``.grad`` after backward, by the closure itself where the spec
    requires one (a closure-driven wrapper sees them on every pass of its step)."""
    w, b = params = raw_params([(4, 5), (5,)])
    opt = cfg.make(params)
    closure = raw_closure(opt, params)

    def bad_closure():
        loss = closure()
        w.grad[1, 2] = bad
        b.grad[3] = bad
        return loss

    for _ in range(warmup * micro_steps(opt)):
        micro_step(cfg, opt, closure)
    # The bad entry arrives on the first micro-step of a window (the only one when not accumulating).
    micro_step(cfg, opt, bad_closure)
    for _ in range(micro_steps(opt) - 1):
        micro_step(cfg, opt, closure)
    assert not torch.isfinite(w[1, 2]), f"w[1, 2] = {w[1, 2].item()} after a {bad} gradient entry"
    assert not torch.isfinite(b[3]), f"b[3] = {b[3].item()} after a {bad} gradient entry"


@over_specs
def test_sparse_grad_raises_and_changes_nothing(spec: OptimSpec):
    torch.manual_seed(0)
    dense = nn.Linear(4, 4)
    emb = nn.Embedding(10, 4, sparse=True)
    params = list(dense.parameters()) + list(emb.parameters())
    opt = spec.build(params, **spec.kwargs)
    before = params_of(params)

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = dense(emb(torch.tensor([1, 2, 5]))).pow(2).sum()
        loss.backward()
        return loss

    closure()
    assert emb.weight.grad.is_sparse
    opt.zero_grad(set_to_none=True)  # the step's own closure makes the sparse gradient again
    with pytest.raises(RuntimeError, match=r"(?i)sparse"):
        micro_step(spec, opt, closure)
    assert_bitwise(before, params_of(params), "params after a refused sparse step")
    assert all(len(s) == 0 for p in params for s in states_of(opt, p)), "a refused step created state"


# --- closure, schedulers, zero_grad ----------------------------------------------------------------


@over_base
def test_step_with_closure_returns_loss_with_grad_enabled(cfg: Config):
    model, X, y = mlp_problem()
    opt = cfg.make(model.parameters())
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(X), y)
        loss.backward()
        return loss

    with torch.no_grad():
        out = cfg.spec.step(opt, closure)
    assert seen and all(seen), "the closure must run with grad enabled"
    assert isinstance(out, torch.Tensor) and out.requires_grad, "step must return the closure's loss"
    initial_model = mlp_problem()[0]
    assert torch.equal(out.detach(), F.mse_loss(initial_model(X), y).detach())
    sentinel = torch.tensor(123.0)
    assert cfg.spec.step(opt, lambda: sentinel) is sentinel
    if not cfg.spec.requires_closure:
        assert opt.step() is None
    else:
        before = (params_of(model), copy.deepcopy(opt.state_dict()))
        with pytest.raises(TypeError, match="closure"):
            opt.step()
        assert_bitwise(before[0], params_of(model), "params after step() without the required closure")
        assert_same_tree(before[1], opt.state_dict(), "state_dict after step() without the required closure")


@over_base
def test_with_lr_scheduler_and_zero_grad_set_to_none(cfg: Config):
    model, X, y = mlp_problem()
    opt = cfg.make(model.parameters())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    lrs = []
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in model.parameters())
        if cfg.spec.requires_closure:
            cfg.spec.step(opt, mlp_closure(model, opt, X, y))
        else:
            F.mse_loss(model(X), y).backward()
            opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[-1] < lrs[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def set_grad_step(cfg: Config, opt: torch.optim.Optimizer, p: torch.Tensor, grad: torch.Tensor) -> None:
    """One micro-step with ``p.grad = grad`` (set by the closure where the spec requires one: to a
    closure-driven wrapper the loss looks linear, every pass gives the same gradient)."""

    def closure():
        p.grad = grad.clone()
        return torch.zeros(())

    if _spec(cfg).zeroth_order:
        # The loss whose gradient is ``grad``; a zeroth-order closure returns it and touches no .grad.
        return opt.step(lambda: (grad * p).sum())
    micro_step(cfg, opt, closure)


@pytest.mark.parametrize("cfg", [c for c in configs() if c.variant == "default"], ids=lambda c: c.id)
def test_state_dict_with_invalid_hyperparameter_is_refused(cfg):
    """A saved group whose hyperparameters fail validation is refused before anything changes."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = cfg.make([p])
    set_grad_step(cfg, opt, p, torch.randn(4, 3))
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = -1.0  # a wrapper's groups are its inner optimizer's
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"param group 0 is invalid: Invalid lr: -1\.0"):
        opt.load_state_dict(sd)
    assert_same_tree(before, opt.state_dict(), "state_dict after a refused load")


WRAPPER_BASE = [c for c in BASE if isinstance(c.spec.cls, type) and issubclass(c.spec.cls, OptimizerWrapper)]


@over(WRAPPER_BASE)
def test_state_dict_with_invalid_wrapper_hyperparameter_is_refused(cfg):
    """A saved wrapper hyperparameter (its first one: meta_lr, strength) that fails validation is
    refused before anything changes, whatever the inner optimizer."""
    key = next(n for n in inspect.signature(cfg.spec.cls).parameters if n not in ("optimizer", "params"))
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = cfg.make([p])
    set_grad_step(cfg, opt, p, torch.randn(4, 3))
    sd = copy.deepcopy(opt.state_dict())
    entry = sd[cfg.spec.cls._entry]
    assert key in entry["hyper"]
    entry["hyper"][key] = -1.0
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=rf"Invalid {key}: -1\.0"):
        opt.load_state_dict(sd)
    assert_same_tree(before, opt.state_dict(), "state_dict after a refused load")
    assert getattr(opt, key) == cfg.kwargs[key]


@pytest.mark.parametrize("cfg", [c for c in configs() if c.variant == "default"], ids=lambda c: c.id)
def test_deepcopied_optimizer_loads_a_saved_state_dict(cfg):
    """torch's __setstate__ adds ``differentiable`` to ``defaults``; that must not make a copy refuse
    state dicts saved by an optimizer that was never copied."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = cfg.make([p])
    for _ in range(micro_steps(opt)):
        set_grad_step(cfg, opt, p, torch.randn(4, 3))
    saved = opt.state_dict()
    clone = copy.deepcopy(opt)
    clone.load_state_dict(saved)

    assert_same_tree(clone.state_dict()["state"], saved["state"])
