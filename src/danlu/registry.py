"""Optimizers by name: ``danlu.create_optimizer("lion", model.parameters(), lr=3e-4)``.

Every danlu optimizer has a lowercase name, and torch's AdamW and SGD are there as baselines
(``torch-adamw``, ``torch-sgd``). The wrappers (``chi-gated``, ``eg-step-size``, ``gradient-penalty``,
``mgs``, ``scale-aware-step``) build their inner optimizer from ``inner=<name>`` (default ``"adamw"``):
keywords the wrapper's constructor accepts go to the wrapper, all others (``lr``, ``betas``, …) to the
inner optimizer.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch

from .optim.adafactor import Adafactor
from .optim.adamw import AdamW
from .optim.adax import AdaX
from .optim.amos import Amos
from .optim.egd import EGD
from .optim.lion import Lion, Tiger
from .optim.sgdm import SGDM
from .wrappers.chi_gate import ChiGated
from .wrappers.eg_step_size import EGStepSize
from .wrappers.gradient_penalty import GradientPenalty
from .wrappers.scale_aware_step import ScaleAwareStep
from .zeroth.mgs import MGS
from .zeroth.zero_order import ZeroOrder

__all__ = ["create_optimizer", "list_optimizers", "hyperparameter_names", "OPTIMIZERS", "WRAPPERS"]

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adafactor": Adafactor,
    "adamw": AdamW,
    "adax": AdaX,
    "amos": Amos,
    "egd": EGD,
    "lion": Lion,
    "sgdm": SGDM,
    "tiger": Tiger,
    "torch-adamw": torch.optim.AdamW,
    "torch-sgd": torch.optim.SGD,
    "zero-order": ZeroOrder,
}

WRAPPERS: dict[str, type[torch.optim.Optimizer]] = {
    "chi-gated": ChiGated,
    "eg-step-size": EGStepSize,
    "gradient-penalty": GradientPenalty,
    "mgs": MGS,
    "scale-aware-step": ScaleAwareStep,
}


def list_optimizers() -> list[str]:
    """Every name :func:`create_optimizer` accepts, sorted."""
    return sorted({**OPTIMIZERS, **WRAPPERS})


@functools.lru_cache(maxsize=1)
def hyperparameter_names() -> frozenset[str]:
    """The constructor keywords of every optimizer here (torch's baselines included): the names a
    param group saved by one of them carries. ``load_state_dict`` refuses an untagged group that has
    one its optimizer lacks."""
    names: set[str] = set()
    for cls in OPTIMIZERS.values():
        names |= _accepted(cls)
    return frozenset(names - {"accum_steps", "differentiable"})


def _unknown(name: Any) -> ValueError:
    return ValueError(f"Unknown optimizer {name!r}; known: {', '.join(list_optimizers())}")


def _accepted(cls: Callable[..., Any]) -> set[str]:
    return set(inspect.signature(cls).parameters) - {"self", "params", "optimizer"}


def create_optimizer(name: str, params: Any, *, inner: str = "adamw", **kwargs: Any) -> torch.optim.Optimizer:
    """Build the optimizer called ``name`` over ``params`` with ``kwargs``.

    Args:
        name: one of :func:`list_optimizers` (case-insensitive).
        params: parameters or param groups.
        inner: for a wrapper, the name of the inner optimizer (not itself a wrapper).
        kwargs: hyperparameters; for a wrapper, those its constructor accepts go to it, the rest to the
            inner optimizer.

    Raises:
        ValueError: an unknown name (the message lists the known ones) or a wrapper as ``inner``.
    """
    key = name.lower() if isinstance(name, str) else name
    if key in OPTIMIZERS:
        return OPTIMIZERS[key](params, **kwargs)
    if key not in WRAPPERS:
        raise _unknown(name)
    inner_key = inner.lower() if isinstance(inner, str) else inner
    if inner_key not in OPTIMIZERS:
        raise ValueError(
            f"Unknown inner optimizer {inner!r} for {key!r}; known: {', '.join(sorted(OPTIMIZERS))}"
        )
    wrapper: Callable[..., torch.optim.Optimizer] = WRAPPERS[key]  # constructors unlike Optimizer's
    own = _accepted(wrapper)
    inner_opt = OPTIMIZERS[inner_key](params, **{k: v for k, v in kwargs.items() if k not in own})
    wrapper_kwargs = {k: v for k, v in kwargs.items() if k in own}
    if "params" in inspect.signature(wrapper).parameters:
        return wrapper(None, inner_opt, **wrapper_kwargs)
    return wrapper(inner_opt, **wrapper_kwargs)
