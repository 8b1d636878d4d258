"""A task of one's own for ``danlu compare --task my_task:make_task``: a small MLP on generated data."""

import torch
import torch.nn.functional as F
from torch import nn

from danlu.bench.user_task import UserTask

_gen = torch.Generator().manual_seed(0)
X = torch.randn(600, 8, generator=_gen)
Y = (X[:, 0] * X[:, 1] + X[:, 2] > 0).long()  # a non-linear rule for the MLP to learn
X_TRAIN, Y_TRAIN, X_VAL, Y_VAL = X[:500], Y[:500], X[500:], Y[500:]


def batches(seed):
    """Endless random minibatches of 32 training rows, in an order set by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, len(Y_TRAIN), (32,), generator=gen)
        yield X_TRAIN[idx], Y_TRAIN[idx]


def make_task():
    return UserTask(
        model=lambda seed: nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2)),
        batches=batches,
        loss_fn=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
        metric=lambda model: F.cross_entropy(model(X_VAL), Y_VAL).item(),  # lower is better
        steps=300,
        lrs={"adamw": 1e-2},
    )


def build_model():
    """For ``danlu speed --params-from my_task:build_model``."""
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
