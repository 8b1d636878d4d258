"""Entry points for tests/test_user_task.py: a dict-form task and broken ones, one fault each."""

import math

import torch
import torch.nn.functional as F
from torch import nn

_gen = torch.Generator().manual_seed(1)
X = torch.randn(80, 4, generator=_gen)
Y = (X.sum(1) > 0).long()
BATCHES = [(X[i:i + 16], Y[i:i + 16]) for i in range(0, 64, 16)]  # 4 batches: a list, re-iterated per epoch


def _model(seed):
    return nn.Linear(4, 2)


def _loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _metrics(model):
    logits = model(X[64:])
    return {"val_loss": F.cross_entropy(logits, Y[64:]), "val_acc": (logits.argmax(1) == Y[64:]).float().mean()}


def _task(**changes):
    task = dict(model=_model, batches=lambda seed: BATCHES, loss_fn=_loss, metric=_metrics, steps=10,
                name="dict-task", options={"adamw": {"weight_decay": 0.0}})
    task.update(changes)
    return task


def make_dict_task():
    return _task()


def needs_args(size):
    return _task()


NOT_A_TASK = 3


def returns_int():
    return 3


def raises():
    raise RuntimeError("no data\non this machine")


def missing_key():
    task = _task()
    del task["metric"]
    return task


def unknown_key():
    return _task(metrics=_metrics)


def bad_loss_signature():
    return _task(loss_fn=lambda batch: batch[0].sum())


def bad_steps():
    return _task(steps=0)


def bad_lr_name():
    return _task(lrs={"lamb": 1e-3})


def not_a_module():
    return _task(model=lambda seed: [nn.Linear(4, 2)])


def not_iterable():
    return _task(batches=lambda seed: 5)


def float_loss():
    return _task(loss_fn=lambda model, batch: 1.0)


def vector_loss():
    return _task(loss_fn=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1], reduction="none"))


def detached_loss():
    return _task(loss_fn=lambda model, batch: _loss(model, batch).detach())


def loss_raises():
    return _task(loss_fn=lambda model, batch: model(batch[0][:, :3]).sum())  # wrong input width


def nan_metric():
    return _task(metric=lambda model: math.nan)


def nan_loss():
    return _task(loss_fn=lambda model, batch: _loss(model, batch) * math.nan)


def metric_without_val_loss():
    return _task(metric=lambda model: {"acc": 1.0})


def metric_is_a_string():
    return _task(metric=lambda model: "low")


def bad_options():
    return _task(options={"adamw": {"no_such_keyword": 1}})


def runs_out():
    """Three batches from a one-shot generator: fine for the check, fails at step 3 of a run."""
    return _task(batches=lambda seed: (b for b in BATCHES[:3]))


def empty_batches():
    return _task(batches=lambda seed: [])


_SHARED = nn.Linear(4, 2)


def same_model():
    """Hands out one module to every run: the check passes, the first run is refused."""
    return _task(model=lambda seed: _SHARED)


def frozen_model():
    return _task(model=lambda seed: nn.Linear(4, 2).requires_grad_(False))


def param_groups():
    """For danlu speed: param groups of plain tensors."""
    return [{"params": [torch.zeros(3, 4), torch.zeros(5)]}, {"params": torch.zeros(2, 2)}]


def no_params():
    return nn.ReLU()
