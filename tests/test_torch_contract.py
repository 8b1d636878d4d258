"""danlu as a drop-in for torch.optim inside the tools users train with.

What ``torch.distributed.checkpoint``'s optimizer state-dict helpers (both flatten modes, no process
group) and ``ZeroRedundancyOptimizer`` keep, lr schedulers that add their own group keys, wrappers
that add per-parameter state (timm's Lookahead), hyperparameters switched on mid-run, load pre-hooks,
Python-number steps, tensor lrs, schedulers on Adafactor's default, optimizers built from param groups
alone, closure-driven wrappers under gradient accumulation, schedules that count updates, and state
dicts saved by danlu 0.1. Each test names the failure it guards against.
"""

from __future__ import annotations

import copy
import io
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

import danlu
from test_battery import mlp_closure as closure_for  # zero_grad, forward, MSE, backward

F64 = torch.float64


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).to(F64)


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 5, generator=g, dtype=F64), torch.randn(6, 1, generator=g, dtype=F64)) for _ in range(n)]


def train(model, opt, data, kind="grad"):
    for x, y in data:
        closure = closure_for(model, opt, x, y)
        if kind == "closure":
            opt.step(closure)
        elif kind == "mgs":
            opt.step(closure, lambda: float(F.mse_loss(model(x), y)))
        else:
            closure()
            opt.step()


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_bitwise(a, b, what=""):
    for x, y in zip(a, b):
        assert torch.equal(x, y), f"{what}: max |Δ| = {(x - y).abs().max().item():.3g}"


def round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# Optimizers (and wrappers) with state that a resume must carry; accum_steps > 1 resumes mid-window.
MAKERS = {
    "AdamW-accum3": (lambda ps: danlu.AdamW(ps, lr=1e-2, accum_steps=3), "grad"),
    "SGDM-accum2": (lambda ps: danlu.SGDM(ps, lr=0.1, accum_steps=2), "grad"),
    "Lion-accum2": (lambda ps: danlu.Lion(ps, lr=1e-3, accum_steps=2), "grad"),
    "AdaX": (lambda ps: danlu.AdaX(ps, lr=1e-2), "grad"),
    "Adafactor": (lambda ps: danlu.Adafactor(ps, min_dim_size_to_factor=2, beta1=0.9), "grad"),
    "Amos": (lambda ps: danlu.Amos(ps, lr=0.1, momentum=0.9), "grad"),
    "EGD": (lambda ps: danlu.EGD(ps, lr=0.1, signed=True), "grad"),
    "EGStepSize-paper-group": (lambda ps: danlu.EGStepSize(danlu.SGDM(ps, lr=0.1, accum_steps=2), meta_lr=0.1,
                                                           form="paper", granularity="group"), "grad"),
    "EGStepSize-torch-Adam": (lambda ps: danlu.EGStepSize(torch.optim.Adam(ps, lr=1e-2), meta_lr=0.1), "grad"),
    "GradientPenalty-SGDM-accum2": (lambda ps: danlu.GradientPenalty(danlu.SGDM(ps, lr=0.1, accum_steps=2),
                                                                     strength=1e-2), "closure"),
    "MGS": (lambda ps: danlu.MGS(None, danlu.SGDM(ps, lr=0.1), candidates=3, noise=0.1), "mgs"),
}


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
@pytest.mark.parametrize("name", list(MAKERS))
def test_dcp_state_dict_helpers_resume_bitwise(name, flatten):
    """get/set_optimizer_state_dict keep only state and param_groups: the accumulation window (was a
    top-level entry: resumed mid-window runs diverged by ~5e-3) and a wrapper's state (was nested
    under "wrapper": KeyError 'state') must live there. MGS's generator is a top-level entry: the
    resumed run continues from the generator of the optimizer it is loaded into, so MGS is compared
    with an uninterrupted run that has the same generator state."""
    make, kind = MAKERS[name]
    data = batches(8)
    model = mlp()
    opt = make(list(model.parameters()))
    train(model, opt, data[:5], kind)
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    osd = round_trip(get_optimizer_state_dict(model, opt, options=options))
    assert set(osd) == ({"state", "param_groups"} if not flatten else set(osd))

    model2 = copy.deepcopy(model)
    opt2 = make(list(model2.parameters()))
    if name == "MGS":
        opt2._generator.set_state(opt._generator.get_state())
    set_optimizer_state_dict(model2, opt2, osd, options=options)
    assert_bitwise(params(model), params(model2), "parameters after set_optimizer_state_dict")
    train(model, opt, data[5:], kind)
    train(model2, opt2, data[5:], kind)
    assert_bitwise(params(model), params(model2), f"{name} resumed through DCP's helpers")


ZERO_MAKERS = {
    "SGDM-accum2": (danlu.SGDM, dict(lr=0.1, accum_steps=2)),
    "AdamW-accum3": (danlu.AdamW, dict(lr=1e-2, accum_steps=3)),
    "Adafactor": (danlu.Adafactor, dict(min_dim_size_to_factor=2)),
    "Amos": (danlu.Amos, dict(lr=0.1)),
}


@pytest.fixture(scope="module")
def process_group():
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("name", list(ZERO_MAKERS))
def test_zero_redundancy_optimizer_resumes_bitwise(name, process_group):
    """ZeroRedundancyOptimizer rebuilds the inner optimizer from its param groups and per-parameter
    state only (the old top-level accumulation entry was dropped: resumed mid-window runs diverged)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    cls, kwargs = ZERO_MAKERS[name]
    data = batches(8)
    model = mlp()
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **kwargs)
    train(model, opt, data[:5])
    opt.consolidate_state_dict(to=0)
    sd = round_trip(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = ZeroRedundancyOptimizer(model2.parameters(), optimizer_class=cls, **kwargs)
    opt2.load_state_dict(sd)
    train(model, opt, data[5:])
    train(model2, opt2, data[5:])
    assert_bitwise(params(model), params(model2), f"{name} resumed through ZeroRedundancyOptimizer")


def test_scheduler_group_keys_survive_an_untagged_load():
    """OneCycleLR adds max_lr/min_lr/... to every group; a dict without danlu's tag (DCP's) used to be
    refused (ValueError: ... has hyperparameters ['max_lr', 'min_lr'] that Lion does not have)."""
    data = batches(6)
    model = mlp()
    opt = danlu.Lion(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=10)
    for x, y in data[:3]:
        closure_for(model, opt, x, y)()
        opt.step()
        sched.step()
    osd = get_optimizer_state_dict(model, opt)
    assert "max_lr" in osd["param_groups"][0]
    model2 = copy.deepcopy(model)
    opt2 = danlu.Lion(model2.parameters(), lr=1e-3)
    set_optimizer_state_dict(model2, opt2, round_trip(osd))
    assert opt2.param_groups[0]["max_lr"] == 1e-3
    train(model, opt, data[3:])
    train(model2, opt2, data[3:])
    assert_bitwise(params(model), params(model2))


def test_a_group_key_of_another_optimizer_is_still_refused():
    """Accepting scheduler keys must not accept torch.optim.SGD's dict (dampening, nesterov, ...)."""
    model = mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, sgd, batches(1))
    opt = danlu.SGDM(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"hyperparameters \['dampening', .*of another optimizer"):
        opt.load_state_dict(sgd.state_dict())


def test_extra_per_parameter_state_and_group_keys_are_kept():
    """timm's Lookahead stores ``lookahead_slow_buff`` in the base optimizer's state and
    ``lookahead_alpha/k/step`` in its groups, then reloads the base optimizer's dict: danlu refused it
    (``... has state ['exp_avg', 'lookahead_slow_buff'], expected ['exp_avg']``)."""
    model = mlp()
    opt = danlu.Lion(model.parameters(), lr=1e-3)
    train(model, opt, batches(2))
    for group in opt.param_groups:
        group.update(lookahead_alpha=0.5, lookahead_k=6, lookahead_step=2)
        for p in group["params"]:
            opt.state[p]["lookahead_slow_buff"] = p.detach().clone()
    sd = round_trip(opt.state_dict())
    opt2 = danlu.Lion(mlp().parameters(), lr=1e-3)
    opt2.load_state_dict(sd)
    p0 = opt2.param_groups[0]["params"][0]
    assert torch.equal(opt2.state[p0]["lookahead_slow_buff"], sd["state"][0]["lookahead_slow_buff"])
    assert opt2.param_groups[0]["lookahead_k"] == 6
    # A missing entry of the optimizer's own is still refused.
    del sd["state"][0]["exp_avg"]
    with pytest.raises(ValueError, match=r"lacks \['exp_avg'\]"):
        danlu.Lion(mlp().parameters(), lr=1e-3).load_state_dict(sd)


@pytest.mark.parametrize("cls,key,value", [(danlu.Amos, "momentum", 0.9), (danlu.Adafactor, "beta1", 0.9)])
def test_switching_on_a_none_hyperparameter_mid_run(cls, key, value):
    """Amos ``momentum`` / Adafactor ``beta1`` set on a group between steps crashed with
    KeyError: 'exp_avg'. The EMA starts at 0, so the first step with it is (1 − μ)·(the step without)."""
    model = mlp()
    opt = cls(model.parameters(), lr=0.05)
    data = batches(4)
    train(model, opt, data[:3])
    without = copy.deepcopy((model, opt))
    train(without[0], without[1], data[3:])
    before = params(model)
    opt.param_groups[0][key] = value
    train(model, opt, data[3:])
    for a, b, c in zip(before, params(model), params(without[0])):
        torch.testing.assert_close(b - a, (1 - value) * (c - a), rtol=1e-10, atol=1e-14)
    sd = round_trip(opt.state_dict())  # saved with the new entry, and before it existed
    cls(mlp().parameters(), lr=0.05).load_state_dict(sd)
    early = copy.deepcopy(opt.state_dict())
    for st in early["state"].values():
        st.pop("exp_avg", None)
    cls(mlp().parameters(), lr=0.05).load_state_dict(early)


def test_one_cycle_lr_attached_to_amos_after_some_steps():
    """OneCycleLR cycles ``momentum`` (Amos has the key, default None); attached after 3 steps it
    crashed. Now it turns momentum on as it does for torch.optim.SGD(momentum=0)."""
    model = mlp()
    opt = danlu.Amos(model.parameters(), lr=0.05)
    data = batches(6)
    train(model, opt, data[:3])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10)
    for x, y in data[3:]:
        closure_for(model, opt, x, y)()
        opt.step()
        sched.step()
    assert 0.85 <= opt.param_groups[0]["momentum"] <= 0.95
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_load_pre_hooks_run_before_the_checks():
    """A migration hook must see the dict first: danlu validated before torch's pre-hooks ran."""
    model = mlp()
    opt = danlu.Lion(model.parameters(), lr=1e-3)
    train(model, opt, batches(2))
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        st["momentum"] = st.pop("exp_avg")  # an old name that a hook converts

    def migrate(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        for st in state_dict["state"].values():
            st["exp_avg"] = st.pop("momentum")
        return state_dict

    opt2 = danlu.Lion(mlp().parameters(), lr=1e-3)
    seen = []
    opt2.register_load_state_dict_pre_hook(migrate)
    opt2.register_load_state_dict_post_hook(lambda o: seen.append(o))
    opt2.load_state_dict(sd)
    assert seen == [opt2]
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


@pytest.mark.parametrize("cls", [danlu.AdaX, danlu.Adafactor, danlu.Amos, danlu.AdamW])
def test_python_number_step_loads(cls):
    """torch's optimizers accept a Python-number ``step`` (its older state dicts); danlu refused it."""
    model = mlp()
    opt = cls(model.parameters(), lr=1e-2)
    train(model, opt, batches(3))
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        st["step"] = float(st["step"])
    model2 = copy.deepcopy(model)
    opt2 = cls(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(sd)
    step = opt2.state[next(model2.parameters())]["step"]
    assert isinstance(step, torch.Tensor) and step.dtype == torch.float32 and float(step) == 3
    train(model, opt, batches(2, seed=5))
    train(model2, opt2, batches(2, seed=5))
    assert_bitwise(params(model), params(model2))


TENSOR_LR = {
    "Lion": lambda ps, lr: danlu.Lion(ps, lr=lr, weight_decay=0.1),
    "Tiger": lambda ps, lr: danlu.Tiger(ps, lr=lr),
    "SGDM": lambda ps, lr: danlu.SGDM(ps, lr=lr, weight_decay=0.1),
    "AdamW": lambda ps, lr: danlu.AdamW(ps, lr=lr),
    "AdaX": lambda ps, lr: danlu.AdaX(ps, lr=lr, weight_decay=0.1),
    "Adafactor": lambda ps, lr: danlu.Adafactor(ps, lr=lr, relative_step=True, weight_decay=0.1),
    "Amos": lambda ps, lr: danlu.Amos(ps, lr=lr),
    "EGD": lambda ps, lr: danlu.EGD(ps, lr=lr, signed=True),
    "ZeroOrder": lambda ps, lr: danlu.ZeroOrder(ps, lr=lr, samples=2),
}


@pytest.mark.parametrize("name", list(TENSOR_LR))
def test_tensor_lr_matches_float_lr_under_a_scheduler(name):
    """A 0-d tensor lr (torch's recipe for compiling a scheduled step) was refused with TypeError.
    It must give the float lr's steps, with a scheduler that ``fill_``s it."""
    make = TENSOR_LR[name]
    runs = []
    for lr in (0.01, torch.tensor(0.01, dtype=F64)):
        model = mlp()
        opt = make(list(model.parameters()), lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for x, y in batches(5):
            closure = closure_for(model, opt, x, y)
            if name == "ZeroOrder":
                opt.step(lambda: float(F.mse_loss(model(x), y)))
            else:
                closure()
                opt.step()
            sched.step()
        runs.append((params(model), opt.param_groups[0]["lr"]))
    assert isinstance(runs[1][1], torch.Tensor) and float(runs[1][1]) == runs[0][1] == 0.01 * 0.5**2
    for a, b in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_multi_element_tensor_lr_gets_torchs_value_error():
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        danlu.Lion(mlp().parameters(), lr=torch.tensor([1e-3, 1e-3]))


def test_adafactor_default_lr_is_schedulable():
    """HF Trainer always builds a scheduler; Adafactor's lr=None made every one fail (TypeError:
    unsupported operand type(s) for *: 'NoneType' and 'float'). The default is still the paper's
    relative step, with lr = 1e-2 its cap."""
    model = mlp()
    opt = danlu.Adafactor(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / 10)  # HF's linear decay
    for x, y in batches(4):
        closure_for(model, opt, x, y)()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.6)
    assert opt.param_groups[0]["relative_step"] is True


@pytest.mark.parametrize("cls", [danlu.Tiger, danlu.SGDM, danlu.Amos, danlu.EGD, danlu.Lion, danlu.AdamW])
def test_param_groups_alone_need_no_lr_keyword(cls):
    """Tiger, SGDM, Amos (and EGD) required ``lr=`` even when every group sets its own."""
    model = mlp()
    kw = dict(signed=True) if cls is danlu.EGD else {}
    opt = cls([{"params": [model[0].weight], "lr": 1e-3}, {"params": [model[0].bias, *model[2].parameters()],
                                                          "lr": 2e-3}], **kw)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 2e-3]
    train(model, opt, batches(1))
    assert isinstance(cls(model.parameters(), **kw).defaults["lr"], float)


@pytest.mark.parametrize("method", ["finite_difference", "double_backward"])
def test_gradient_penalty_refuses_gradients_accumulated_outside_its_closure(method):
    """Under Lightning's accumulate_grad_batches=2 the first micro-batch's gradient sits in .grad when
    step(closure) runs for the second; GradientPenalty dropped it silently (|Δθ| 0.07 vs plain SGD)."""
    model = mlp()
    opt = danlu.GradientPenalty(torch.optim.SGD(model.parameters(), lr=0.1), strength=1e-2, method=method)
    (x1, y1), (x2, y2) = batches(2)
    F.mse_loss(model(x1), y1).backward()  # micro-batch 1, accumulated outside the closure
    before = params(model)

    def closure():  # Lightning's closure on the last micro-batch: no zero_grad, forward, backward
        loss = F.mse_loss(model(x2), y2)
        if method == "finite_difference":
            loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="already hold gradients that did not come from its closure"):
        opt.step(closure)
    assert_bitwise(before, params(model), "parameters after the refused step")
    # The usual loop (gradients from the last step left in place, zero_grad inside the closure) runs.
    opt.zero_grad()
    for x, y in batches(3):
        opt.step(lambda x=x, y=y: F.mse_loss(model(x), y))


def test_closure_driven_optimizers_survive_dcps_state_initialisation():
    """set_optimizer_state_dict on a fresh optimizer calls step(closure=None) on zero grads at lr 0;
    GradientPenalty, MGS and ZeroOrder raised TypeError there."""
    for make in (lambda ps: danlu.GradientPenalty(torch.optim.SGD(ps, lr=0.1), strength=1e-2),
                 lambda ps: danlu.MGS(None, danlu.SGDM(ps, lr=0.1)),
                 lambda ps: danlu.ZeroOrder(ps, lr=0.1)):
        model = mlp()
        opt = make(list(model.parameters()))
        osd = get_optimizer_state_dict(model, opt)
        before = params(model)
        set_optimizer_state_dict(model, make(list(model.parameters())), osd)
        assert_bitwise(before, params(model))
        with pytest.raises(TypeError):
            opt.step()  # a real step without a closure is still refused


@pytest.mark.parametrize("name", [*MAKERS, "Amos-extra_l2", "Lion-decay"])
def test_dcps_state_initialisation_moves_nothing_and_counts_nothing(name):
    """get_optimizer_state_dict on a fresh optimizer calls step() on all-zero gradients at lr 0 to create
    the state it then describes. That step must create the state only: no parameter moves (Amos's
    extra_l2 pulled θ at lr 0), no update counter or accumulation window advances (they counted 1)."""
    extra = {"Amos-extra_l2": (lambda ps: danlu.Amos(ps, lr=0.1, extra_l2=0.5), "grad"),
             "Lion-decay": (lambda ps: danlu.Lion(ps, lr=1e-3, weight_decay=0.5), "grad")}
    make, _ = {**MAKERS, **extra}[name]
    model = mlp()
    opt = make(list(model.parameters()))
    before = params(model)
    osd = get_optimizer_state_dict(model, opt)
    assert_bitwise(before, params(model), "parameters after the state initialisation")
    steps = [float(v) for st in osd["state"].values() for k, v in st.items() if k == "step"]
    if name != "EGStepSize-torch-Adam":  # torch.optim.Adam's own counter counts that step, as without danlu
        assert all(s == 0.0 for s in steps), steps
    assert all(g.get("accum_micro_step", 0) == 0 for g in osd["param_groups"])
    if not isinstance(opt, danlu.MGS):  # MGS keeps no per-parameter state of its own
        assert osd["state"], "no state was created"


def test_wrapper_state_dict_hooks_run():
    """Hooks registered on a wrapper never ran (its state_dict bypassed torch's machinery)."""
    model = mlp()
    opt = danlu.EGStepSize(danlu.AdamW(model.parameters(), lr=1e-2), meta_lr=0.1)
    train(model, opt, batches(2))
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load-pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    sd = opt.state_dict()
    assert sd["extra"] == 1 and {"state", "param_groups"} <= set(sd)
    opt.load_state_dict(sd)
    assert calls == ["pre", "load-pre", "load-post"]


@pytest.mark.parametrize("kind", ["accum-StepOnUpdate", "plain"])
def test_step_on_update_counts_updates(kind):
    """HF Trainer and Lightning step the scheduler after every optimizer.step(); with accum_steps=k
    the schedule ran k× too fast. StepOnUpdate makes k micro-batches equal one big-batch step,
    schedule included."""
    data = batches(8)
    big = mlp()
    ref = danlu.SGDM(big.parameters(), lr=0.1)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=1, gamma=0.5)
    for i in range(0, 8, 2):
        x = torch.cat([data[i][0], data[i + 1][0]])
        y = torch.cat([data[i][1], data[i + 1][1]])
        closure_for(big, ref, x, y)()
        ref.step()
        ref_sched.step()
    small = mlp()
    opt = danlu.SGDM(small.parameters(), lr=0.1, accum_steps=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    if kind == "accum-StepOnUpdate":
        sched = danlu.StepOnUpdate(sched)
        assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    for x, y in data:
        closure_for(small, opt, x, y)()
        opt.step()
        sched.step()
    if kind == "plain":  # the failure: a schedule in updates advanced on every micro-batch
        assert sched.get_last_lr()[0] == 0.1 * 0.5**8 != ref_sched.get_last_lr()[0]
        return
    assert sched.get_last_lr() == ref_sched.get_last_lr() and sched.last_epoch == 4
    for a, b in zip(params(big), params(small)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert danlu.StepOnUpdate(torch.optim.lr_scheduler.StepLR(opt, 1)).state_dict()["last_epoch"] == 0


LEGACY = Path(__file__).parent / "data" / "danlu-0.1-state-dicts.pt"
LEGACY_MAKERS = {
    "AdamW-accum3": (lambda ps: danlu.AdamW(ps, lr=1e-2, accum_steps=3), "grad"),
    "Tiger-accum2": (lambda ps: danlu.Tiger(ps, lr=1e-2, accum_steps=2, weight_decay=0.1), "grad"),
    "AdaX": (lambda ps: danlu.AdaX(ps, lr=1e-2), "grad"),
    "Adafactor-relative": (lambda ps: danlu.Adafactor(ps, min_dim_size_to_factor=2, beta1=0.9), "grad"),
    "Adafactor-absolute": (lambda ps: danlu.Adafactor(ps, lr=2e-2), "grad"),
    "Amos": (lambda ps: danlu.Amos(ps, lr=0.1, momentum=0.9), "grad"),
    "EGStepSize-paper-group": (lambda ps: danlu.EGStepSize(danlu.SGDM(ps, lr=0.1), meta_lr=0.1, form="paper",
                                                           granularity="group"), "grad"),
    "EGStepSize-su": (lambda ps: danlu.EGStepSize(danlu.AdamW(ps, lr=1e-2, accum_steps=2), meta_lr=0.1), "grad"),
    "GradientPenalty": (lambda ps: danlu.GradientPenalty(danlu.AdamW(ps, lr=1e-2), strength=1e-2), "closure"),
    "MGS": (lambda ps: danlu.MGS(None, danlu.SGDM(ps, lr=0.1), candidates=3, noise=0.1, seed=3), "mgs"),
}


@pytest.mark.parametrize("name", list(LEGACY_MAKERS))
def test_danlu_0_1_state_dicts_load_and_continue(name):
    """State dicts saved by danlu 0.1 (float64 step, the top-level accumulation entry, Adafactor's
    lr=None, the {"wrapper", "inner"} wrapper format; written by tests/make_legacy_state_dicts.py)
    load and continue exactly as danlu 0.1 continued."""
    saved = torch.load(LEGACY, weights_only=True)[name]
    make, kind = LEGACY_MAKERS[name]
    ps = [p.clone().requires_grad_() for p in saved["params"]]
    opt = make(ps)
    opt.load_state_dict(saved["state_dict"])

    def loss():
        return sum(((p - 0.3) ** 2).sum() + 0.1 * (p**4).sum() for p in ps)

    def closure():
        opt.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        return value

    for _ in range(4):
        if kind == "mgs":
            opt.step(closure, lambda: float(loss()))
        elif kind == "closure":
            opt.step(closure)
        else:
            closure()
            opt.step()
    assert_bitwise(saved["final"], [p.detach() for p in ps], f"{name} after 4 steps from a danlu 0.1 state dict")
