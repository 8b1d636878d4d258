"""HF Trainer's ``optimizer_cls_and_kwargs`` with ``danlu.integrations.hf_optimizer``, on the installed transformers.

Trainer calls ``cls(groups, **kwargs)`` with its own decay/no-decay groups and without
``args.learning_rate``; the first test pins that behaviour (it is why the helper exists), the others
train a tiny model for a few CPU steps through the helper. The helper's refusals need no transformers.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import danlu
from danlu.integrations import hf_optimizer


class Regressor(nn.Module):
    """forward(x, labels) -> {"loss": ...}, as Trainer wants; a LayerNorm so that the no-decay group
    holds a norm weight besides the biases."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 1)

    def forward(self, x, labels=None):
        out = self.head(torch.tanh(self.norm(self.proj(x))))
        return {"loss": F.mse_loss(out, labels), "logits": out}


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(dim=1, keepdim=True).tanh()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


DECAYED = {"proj.weight", "head.weight"}  # Trainer's rule: not a bias, not a norm layer's parameter


def hf_args(tmp_path, **kw):
    transformers = pytest.importorskip("transformers")
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=3, learning_rate=1e-3,
                report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
                remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _trainer(tmp_path, model, optimizer_cls_and_kwargs, **kw):
    transformers = pytest.importorskip("transformers")
    return transformers.Trainer(model=model, args=hf_args(tmp_path, **kw), train_dataset=Data(),
                                optimizer_cls_and_kwargs=optimizer_cls_and_kwargs)


def _optimizer(trainer):
    opt = trainer.optimizer
    return getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer around ours


def _weight_decay_by_name(model, opt):
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    return {n: wd[id(p)] for n, p in model.named_parameters()}


def test_plain_tuple_ignores_kwargs_weight_decay_and_args_learning_rate(tmp_path):
    """What the helper guards against, as the installed Trainer does it: the tuple's weight_decay is
    overridden by Trainer's groups and args.learning_rate never reaches the optimizer."""
    model = Regressor()
    trainer = _trainer(tmp_path, model, (danlu.Lion, {"weight_decay": 0.3}), weight_decay=0.0)
    trainer.create_optimizer()
    opt = _optimizer(trainer)
    assert set(_weight_decay_by_name(model, opt).values()) == {0.0}
    assert {g["lr"] for g in opt.param_groups} == {1e-4}  # Lion's default, not learning_rate=1e-3


def test_lion_from_adamw_recipe_trains_with_trainers_groups(tmp_path):
    lion = danlu.lion_from_adamw(3e-4, 0.1)
    args = hf_args(tmp_path, learning_rate=lion["lr"], weight_decay=lion["weight_decay"])
    cls_kwargs = hf_optimizer("lion", args, betas=(0.95, 0.98))
    assert cls_kwargs == (danlu.Lion, {"lr": lion["lr"], "betas": (0.95, 0.98)})
    model = Regressor()
    before = [p.detach().clone() for p in model.parameters()]
    transformers = pytest.importorskip("transformers")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(), optimizer_cls_and_kwargs=cls_kwargs)
    trainer.train()
    opt = _optimizer(trainer)
    assert type(opt) is danlu.Lion
    assert _weight_decay_by_name(model, opt) == {n: (1.0 if n in DECAYED else 0.0) for n, _ in model.named_parameters()}
    assert trainer.lr_scheduler.base_lrs == [pytest.approx(3e-5)] * len(opt.param_groups)
    assert trainer.lr_scheduler.get_last_lr()[0] < 3e-5  # Trainer's linear decay ran on our lr
    assert all(g["betas"] == (0.95, 0.98) for g in opt.param_groups)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name,kwargs,check", [
    ("tiger", {"beta": 0.9}, lambda g: g["beta"] == 0.9 and g["initial_lr"] == 1e-3),
    ("adafactor", {"lr": None}, lambda g: g["relative_step"] is True),  # keep the relative step
    ("adafactor", {}, lambda g: g["relative_step"] is False and g["initial_lr"] == 1e-3),
    ("amos", {}, lambda g: g["initial_lr"] == 1e-3),
    ("sgdm", {"momentum": 0.8}, lambda g: g["momentum"] == 0.8),
    ("egd", {"signed": True}, lambda g: g["signed"] is True),
])
def test_helper_builds_and_trains(tmp_path, name, kwargs, check):
    weight_decay = 0.0 if name in ("amos", "egd") else 0.01
    args = hf_args(tmp_path, weight_decay=weight_decay)
    cls, opt_kwargs = hf_optimizer(name, args, **kwargs)
    assert cls is danlu.registry.OPTIMIZERS[name]
    model = Regressor()
    before = [p.detach().clone() for p in model.parameters()]
    transformers = pytest.importorskip("transformers")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(),
                                   optimizer_cls_and_kwargs=(cls, opt_kwargs))
    trainer.train()
    opt = _optimizer(trainer)
    assert type(opt) is cls and all(check(g) for g in opt.param_groups)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_params_in_kwargs_replace_trainers_groups(tmp_path):
    """Trainer takes ``params`` from the kwargs instead of its own groups: Su's Tiger recipe."""
    model = Regressor()
    groups = danlu.tiger_groups(model, lr=1e-3, weight_decay=0.01)
    trainer = _trainer(tmp_path, model, hf_optimizer("tiger", None, params=groups))
    trainer.create_optimizer()
    opt = _optimizer(trainer)
    assert type(opt) is danlu.Tiger and len(opt.param_groups) == len(groups)
    assert {g["lr_scale"] for g in opt.param_groups} == {g["lr_scale"] for g in groups}


def test_helper_refuses_what_trainer_would_get_wrong():
    args = types.SimpleNamespace(learning_rate=1e-3, weight_decay=0.1)
    with pytest.raises(ValueError, match=r"set TrainingArguments\(weight_decay=...\)"):
        hf_optimizer("lion", args, weight_decay=0.1)
    with pytest.raises(ValueError, match="Amos decays every tensor"):
        hf_optimizer("amos", args)
    with pytest.raises(ValueError, match="EGD .* has no weight-decay term"):
        hf_optimizer("egd", args, signed=True)
    for name in ("zero-order", "gradient-penalty", "mgs"):
        with pytest.raises(ValueError, match="never passes a closure"):
            hf_optimizer(name, args)
    with pytest.raises(ValueError, match=r"Trainer\(optimizers=\(opt, scheduler\)\)"):
        hf_optimizer("chi-gated", args)
    with pytest.raises(ValueError, match="Unknown optimizer 'lamb'"):
        hf_optimizer("lamb", args)
    with pytest.raises(TypeError, match="Lion does not take these keywords.*betas"):
        hf_optimizer("lion", args, eps=1e-8)  # at the call, not at trainer.train()
    with pytest.raises(TypeError, match="Tiger does not take"):
        hf_optimizer("tiger", args, betas=(0.9, 0.99))
    with pytest.raises(TypeError, match="expected transformers.TrainingArguments"):
        hf_optimizer("lion", object())
    assert hf_optimizer("Lion") == (danlu.Lion, {})  # without args: the kwargs as given
    assert hf_optimizer("lion", args, lr=3e-5) == (danlu.Lion, {"lr": 3e-5})
