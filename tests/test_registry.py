"""The registry: every exported optimizer by a lowercase name, wrappers built around a named inner."""

import pytest
import torch

import danlu
from danlu.registry import OPTIMIZERS, WRAPPERS


def _params():
    return [torch.nn.Parameter(torch.rand(3, 4) + 0.1), torch.nn.Parameter(torch.rand(4) + 0.1)]


def test_every_exported_optimizer_has_a_name():
    exported = {
        getattr(danlu, n)
        for n in danlu.__all__
        if isinstance(getattr(danlu, n), type) and issubclass(getattr(danlu, n), torch.optim.Optimizer)
    }
    registered = set(OPTIMIZERS.values()) | set(WRAPPERS.values())
    assert exported <= registered, exported - registered
    assert {"torch-adamw", "torch-sgd"} <= set(danlu.list_optimizers())
    assert danlu.list_optimizers() == sorted(danlu.list_optimizers())
    assert all(n == n.lower() for n in danlu.list_optimizers())


REQUIRED = {"tiger": dict(lr=1e-3), "amos": dict(lr=0.1), "sgdm": dict(lr=0.1), "egd": dict(lr=0.1),
            "torch-sgd": dict(lr=0.1), "zero-order": dict(lr=0.1),
            "eg-step-size": dict(meta_lr=0.01), "gradient-penalty": dict(strength=1e-3), "mgs": {},
            "chi-gated": dict(k=4), "scale-aware-step": dict(weight_decay=0.0)}


@pytest.mark.parametrize("name", danlu.list_optimizers())
def test_create_each_by_name(name):
    opt = danlu.create_optimizer(name.upper() if name == "lion" else name, _params(), **REQUIRED.get(name, {}))
    cls = OPTIMIZERS.get(name) or WRAPPERS[name]
    assert isinstance(opt, cls)


def test_wrapper_kwargs_are_split_between_wrapper_and_inner():
    opt = danlu.create_optimizer("eg-step-size", _params(), inner="lion", lr=3e-4, betas=(0.9, 0.98), meta_lr=0.05)
    assert isinstance(opt.optimizer, danlu.Lion)
    assert opt.meta_lr == 0.05
    assert opt.param_groups[0]["lr"] == 3e-4 and opt.param_groups[0]["betas"] == (0.9, 0.98)
    mgs = danlu.create_optimizer("mgs", _params(), inner="torch-sgd", lr=0.1, candidates=2)
    assert isinstance(mgs.optimizer, torch.optim.SGD) and mgs.candidates == 2


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown optimizer 'lamb'; known: adafactor, adamw, .*zero-order"):
        danlu.create_optimizer("lamb", _params())
    with pytest.raises(ValueError, match=r"Unknown inner optimizer 'mgs' for 'eg-step-size'"):
        danlu.create_optimizer("eg-step-size", _params(), inner="mgs", meta_lr=0.1)
