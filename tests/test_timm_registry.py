"""danlu in timm's optimizer registry: ``danlu.integrations.register_timm`` against the installed timm.

``timm.optim.create_optimizer_v2(model, "danlu-lion", ...)`` must build danlu's class with timm's
weight-decay/no-decay param groups, every registered name must build and step, and the flags timm
reads (has_betas, has_eps, has_momentum) must match the constructors, since timm silently drops
``betas``/``eps`` where they say False. Skipped where timm is not installed.

timm imports torchvision at ``import timm`` (image transforms, datasets, FrozenBatchNorm2d), though its
optimizer code never uses it. PyPI's torchvision is built against CUDA torch and does not import beside
torch's CPU build (nor does transformers once it is installed), and no CPU build of it is on the index
here; so the test environment installs timm with ``--no-deps``, and where torchvision is absent
``_import_timm_optim`` imports the real timm with stand-in ``torchvision`` modules (names that resolve
to inert classes), then removes them from ``sys.modules``. Where torchvision is installed it is used.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import inspect
import logging
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import danlu
from danlu.integrations import register_timm
from danlu.registry import OPTIMIZERS, WRAPPERS


class _InertMeta(type):
    def __getattr__(cls, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _inert(f"{cls.__qualname__}.{attr}")


def _inert(name: str) -> type:
    """A class for any torchvision name timm reads at import: constructible, subclassable, hashable."""
    return _InertMeta(name, (), {"__init__": lambda self, *a, **k: None, "__module__": "torchvision-stand-in"})


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.util.spec_from_loader(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        def __getattr__(attr, _name=module.__name__):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _inert(f"{_name}.{attr}")

        module.__getattr__ = __getattr__


def _import_timm_optim():
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed")
    if "timm.optim" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        try:
            return importlib.import_module("timm.optim")
        except RuntimeError as e:  # PyPI's (CUDA) torchvision beside CPU torch: its C++ ops do not load
            pytest.skip(f"timm does not import: torchvision fails ({e}); install timm with --no-deps beside CPU torch")
    finder = _TorchvisionStandIn()
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module("timm.optim")
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def timm_optim():
    t = _import_timm_optim()
    register_timm()
    return t


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 1))


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=g)
    return x, x.sum(dim=1, keepdim=True).tanh()


EXPECTED = sorted("danlu-" + n for n in danlu.list_optimizers() if not n.startswith("torch-"))


def test_every_danlu_name_is_registered_and_listed(timm_optim):
    assert register_timm() == EXPECTED
    assert timm_optim.list_optimizers("danlu-*") == EXPECTED
    described = dict(timm_optim.list_optimizers("danlu-*", with_description=True))
    assert all(d.startswith("danlu ") for d in described.values())


def test_registering_again_changes_nothing(timm_optim, caplog):
    """timm's register() overwrites with a warning; a second call must not re-register (or warn)."""
    before = {n: timm_optim.get_optimizer_info(n) for n in EXPECTED}
    with caplog.at_level(logging.WARNING, logger="timm"):
        assert register_timm() == EXPECTED
        assert register_timm("DANLU-") == EXPECTED  # timm lowercases names
    assert not caplog.records
    assert all(timm_optim.get_optimizer_info(n) is info for n, info in before.items())


def test_lion_takes_timms_no_decay_groups_and_decays_the_rest(timm_optim):
    model = _model()
    opt = timm_optim.create_optimizer_v2(model, "danlu-lion", lr=1e-4, weight_decay=0.05)
    assert type(opt) is danlu.Lion
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():  # biases and the LayerNorm gain: 0; the Linear weights: 0.05
        assert wd[id(p)] == (0.05 if p.ndim == 2 else 0.0), name
    assert all(g["lr"] == 1e-4 and g["betas"] == (0.9, 0.99) for g in opt.param_groups)
    # a zero gradient leaves only the decoupled decay θ ← θ(1 − lr·λ), on the decayed group only
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p, b * (1 - 1e-4 * 0.05) if p.ndim == 2 else b, rtol=0, atol=0)

    flat = timm_optim.create_optimizer_v2(_model(), "danlu-lion", lr=1e-4, weight_decay=0.05,
                                          filter_bias_and_bn=False)
    assert [g["weight_decay"] for g in flat.param_groups] == [0.05]


# name -> (create_optimizer_v2 keywords, the class built, how its step is called)
CASES = {
    "danlu-adafactor": ({}, danlu.Adafactor, "backward"),
    "danlu-adamw": ({"lr": 1e-3}, danlu.AdamW, "backward"),
    "danlu-adax": ({"lr": 1e-3}, danlu.AdaX, "backward"),
    "danlu-amos": ({"weight_decay": 0.0}, danlu.Amos, "backward"),
    "danlu-egd": ({"signed": True, "weight_decay": 0.0}, danlu.EGD, "backward"),
    "danlu-lion": ({"lr": 1e-4}, danlu.Lion, "backward"),
    "danlu-sgdm": ({"lr": 1e-2}, danlu.SGDM, "backward"),
    "danlu-tiger": ({"lr": 1e-4}, danlu.Tiger, "backward"),
    "danlu-zero-order": ({"lr": 1e-2}, danlu.ZeroOrder, "closure"),
    "danlu-chi-gated": ({"lr": 1e-3, "k": 1}, danlu.ChiGated, "backward"),
    "danlu-eg-step-size": ({"lr": 1e-3, "meta_lr": 1e-2}, danlu.EGStepSize, "backward"),
    "danlu-gradient-penalty": ({"lr": 1e-3, "strength": 1e-2}, danlu.GradientPenalty, "closure"),
    "danlu-mgs": ({"lr": 1e-3}, danlu.MGS, "mgs"),
    "danlu-scale-aware-step": ({"lr": 1e-3, "weight_decay": 0.0}, danlu.ScaleAwareStep, "backward"),
}


def test_cases_cover_every_registered_name():
    assert sorted(CASES) == EXPECTED


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_registered_name_builds_and_steps(timm_optim, name):
    kwargs, cls, how = CASES[name]
    model = _model()
    x, y = _data()
    opt = timm_optim.create_optimizer_v2(model, name, **{"weight_decay": 0.05, **kwargs})
    assert type(opt) is cls
    if cls in WRAPPERS.values():
        assert type(opt.optimizer) is danlu.AdamW  # the default inner optimizer
    before = [p.detach().clone() for p in model.parameters()]

    def loss():
        return F.mse_loss(model(x), y)

    def backward_closure():
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    if how == "backward":
        backward_closure()
        opt.step()
    elif how == "closure":
        opt.step(loss)
    else:
        with torch.no_grad():
            opt.step(backward_closure, lambda: loss().item())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), name


@pytest.mark.parametrize("name", sorted(set(CASES) - {"danlu-" + w for w in WRAPPERS}))
def test_timm_flags_match_the_constructor(timm_optim, name):
    """timm pops ``betas``/``eps`` where has_betas/has_eps are False and adds momentum=0.9 where
    has_momentum is True: a wrong flag drops a user's argument silently or breaks the build."""
    info = timm_optim.get_optimizer_info(name)
    accepted = inspect.signature(OPTIMIZERS[name.removeprefix("danlu-")]).parameters
    assert info.has_betas == ("betas" in accepted)
    assert info.has_eps == ("eps" in accepted)
    assert info.has_momentum == (name == "danlu-sgdm")  # Amos's momentum defaults to None, not timm's 0.9
    assert info.defaults is None


def test_hyperparameters_reach_the_optimizer(timm_optim):
    c = timm_optim.create_optimizer_v2
    assert timm_optim.get_optimizer_class("danlu-lion") is danlu.Lion
    assert c(_model(), "danlu-lion", lr=1e-4, betas=(0.95, 0.98)).param_groups[0]["betas"] == (0.95, 0.98)
    assert c(_model(), "danlu-tiger", lr=1e-4, beta=0.9).param_groups[0]["beta"] == 0.9
    assert c(_model(), "danlu-sgdm", lr=0.1, momentum=0.8).param_groups[0]["momentum"] == 0.8
    assert c(_model(), "danlu-sgdm", lr=0.1).param_groups[0]["momentum"] == 0.9
    assert c(_model(), "danlu-adax", lr=1e-3).param_groups[0]["betas"] == (0.9, 1e-4)
    ada = c(_model(), "danlu-adafactor")  # timm's lr=None: Adafactor's relative step
    assert ada.param_groups[0]["relative_step"] is True
    assert c(_model(), "danlu-amos", lr=0.01).param_groups[0]["momentum"] is None


def test_lookahead_prefix_wraps_danlu(timm_optim):
    model = _model()
    opt = timm_optim.create_optimizer_v2(model, "lookahead_danlu-lion", lr=1e-4, weight_decay=0.05)
    assert isinstance(opt, timm_optim.Lookahead)
    assert type(opt._base_optimizer) is danlu.Lion  # where timm's Lookahead keeps it (no public name)
    x, y = _data()
    F.mse_loss(model(x), y).backward()
    opt.step()


def test_amos_and_egd_refuse_a_weight_decay_they_would_ignore(timm_optim):
    """Amos accepts any extra group key, so timm's weight_decay groups were silently a no-op."""
    c = timm_optim.create_optimizer_v2
    with pytest.raises(ValueError, match="Amos decays every tensor toward its target scale"):
        c(_model(), "danlu-amos", weight_decay=0.05)
    with pytest.raises(ValueError, match="EGD .* has no weight-decay term"):
        c(_model(), "danlu-egd", signed=True, weight_decay=0.05)
    with pytest.raises(ValueError, match="Amos decays"):
        c(_model(), "danlu-chi-gated", inner="amos", k=2, weight_decay=0.05)
    amos = c(_model(), "danlu-amos")
    assert all("weight_decay" not in g for g in amos.param_groups)
    grouped = c(_model(), "danlu-amos", param_group_fn=lambda m: danlu.amos_groups(m, momentum=0.9))
    # amos_groups' η̃: √(1/fan_in) for the Linear weights (fan_in 4, 8), 1 for the LayerNorm gain, 0.5 for biases
    assert sorted({g["eta"] for g in grouped.param_groups}) == pytest.approx([8**-0.5, 0.5, 1.0])
    assert all(g["momentum"] == 0.9 for g in grouped.param_groups)


def test_wrapper_builds_its_inner_optimizer_by_name(timm_optim):
    model = _model()
    opt = timm_optim.create_optimizer_v2(model, "danlu-chi-gated", inner="lion", k=2, lr=1e-4, weight_decay=0.05)
    assert type(opt) is danlu.ChiGated and type(opt.optimizer) is danlu.Lion
    assert sorted(g["weight_decay"] for g in opt.optimizer.param_groups) == [0.0, 0.05]


def test_underscore_prefix_is_refused_because_timm_reads_it_as_a_modifier(timm_optim):
    with pytest.raises(ValueError, match="would build timm's own Lion"):
        register_timm("danlu_")
    # why: timm looks up only the part after the last '_'
    assert type(timm_optim.create_optimizer_v2(_model(), "danlu_lion", lr=1e-4)) is timm_optim.Lion


def test_a_prefix_that_shadows_timm_registers_nothing(timm_optim):
    with pytest.raises(ValueError, match="'adafactor', 'adamw', 'lion'"):
        register_timm("")
    assert "amos" not in timm_optim.list_optimizers() and "tiger" not in timm_optim.list_optimizers()
    assert timm_optim.get_optimizer_class("lion", bind_defaults=False) is timm_optim.Lion
    with pytest.raises(TypeError, match="expected a str"):
        register_timm(None)


def test_missing_or_old_timm_raises_import_error_with_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"pip install timm"):
        register_timm()
    monkeypatch.undo()
    t = _import_timm_optim()
    monkeypatch.delattr(t, "OptimInfo")
    with pytest.raises(ImportError, match=r"added in timm 1\.0\.12"):
        register_timm()
