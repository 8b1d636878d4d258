"""One validation helper and one message format for every danlu hyperparameter.

Every bad value raises ``ValueError("Invalid <name>: <value!r> (expected <what>)")``; a value of the
wrong type raises ``TypeError`` with the same shape of message. Checks run before an optimizer or a
param group is created, so a failed check leaves nothing half-built.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch

__all__ = ["check_number", "check_lr", "check_betas", "check_bool", "check_optional", "check_choice"]


def _fail(name: str, value: Any, expected: str, exc: type[Exception] = ValueError) -> None:
    raise exc(f"Invalid {name}: {value!r} (expected {expected})")


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        _fail(name, value, "a Python number; tensor hyperparameters are not supported", TypeError)
    if isinstance(value, bool) or not isinstance(value, Real):
        _fail(name, value, "a real number", TypeError)
    return float(value)


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> float:
    """Check that ``value`` is a finite real number in the stated interval and return it as float.

    ``low``/``high`` are inclusive unless ``low_open``/``high_open`` is set.
    """
    x = _as_float(name, value)
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        _fail(name, value, "an int", TypeError)
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    lo_txt = "-inf" if low is None else f"{low:g}"
    hi_txt = "inf" if high is None else f"{high:g}"
    interval = f"{lo}{lo_txt}, {hi_txt}{hi}"
    if math.isnan(x) or math.isinf(x):
        _fail(name, value, f"a finite number in {interval}")
    if low is not None and (x < low or (low_open and x == low)):
        _fail(name, value, f"a number in {interval}")
    if high is not None and (x > high or (high_open and x == high)):
        _fail(name, value, f"a number in {interval}")
    return x


def check_lr(value: Any, name: str = "lr") -> Any:
    """Check a learning rate: a finite real number ≥ 0, or a 1-element floating-point tensor holding one.

    A tensor lr is torch's recipe for stepping under ``torch.compile`` without a recompile when a
    scheduler changes it (schedulers ``fill_`` it in place): it is returned as is (a 1-element tensor
    of shape ``(1,)`` as a 0-d view of it, so it broadcasts against 0-d parameters). Anything else
    raises like :func:`check_number`; a tensor with more than one element raises ``ValueError``
    ("Tensor lr must be 1-element", torch's words).
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            _fail(name, value, f"a number or a 1-element tensor: Tensor {name} must be 1-element")
        if not value.is_floating_point() or value.requires_grad:
            _fail(name, value, "a floating-point tensor that does not require grad", TypeError)
        check_number(name, float(value.detach()), low=0.0)
        return value if value.dim() == 0 else value.view(())
    check_number(name, value, low=0.0)
    return value


def check_optional(name: str, value: Any, **kwargs: Any) -> float | None:
    """Like :func:`check_number`, but ``None`` passes through."""
    return None if value is None else check_number(name, value, **kwargs)


def check_betas(name: str, betas: Any, *, low: float = 0.0, high: float = 1.0) -> tuple[float, float]:
    """Check a pair of decay rates, each in ``[low, high)``."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        _fail(name, betas, "a pair of floats", TypeError)
    return tuple(  # type: ignore[return-value]
        check_number(f"{name}[{i}]", b, low=low, high=high, high_open=True) for i, b in enumerate(betas)
    )


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(name, value, "a bool", TypeError)
    return value


def check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> Any:
    """Check that ``value`` is one of ``allowed`` (strings, or ``None`` where allowed lists it)."""
    expected = "one of " + ", ".join(repr(a) for a in allowed)
    if not isinstance(value, str) and not any(value is a for a in allowed):
        _fail(name, value, expected, TypeError)
    if value not in allowed:
        _fail(name, value, expected)
    return value
