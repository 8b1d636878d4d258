"""Su's hyperparameter recipes: AdamW → Lion conversion and scale-aware lr / weight decay.

Both rest on the same observation (Su, kexue.fm/archives/9344 and /9473): for an optimizer whose
update has unit RMS per coordinate (Lion, Tiger, sign-like methods, Adam early in training), the lr is
a per-coordinate step size, so it should be proportional to the scale of the parameter it moves, and
the weight decay should be one order higher in the step size than the update.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from ._core.modules import classify_parameters
from ._core.validate import check_number, check_optional

__all__ = ["lion_from_adamw", "scale_aware_groups", "ScaleAwareSchedule", "scale_aware_lr_lambda"]


def lion_from_adamw(lr: float, weight_decay: float, factor: float = 10.0) -> dict[str, float]:
    """Convert AdamW's ``lr`` and ``weight_decay`` into Lion's: lr ÷ k, weight decay × k.

    The product lr·λ, i.e. the decay per step θ ← θ(1 − lr·λ), is unchanged. Lion's sign update has
    unit RMS per coordinate, larger than AdamW's, hence the smaller lr. The Lion paper says k = 3–10;
    Su's reading of its experiments says at least 10, the default here. Returns a dict to unpack::

        opt = danlu.Lion(model.parameters(), **danlu.lion_from_adamw(3e-4, 0.1))  # lr 3e-5, wd 1.0

    References: Chen et al., arXiv:2302.06675 §5 and google/automl's Lion README; Su Jianlin,
    kexue.fm/archives/9473.
    """
    lr = check_number("lr", lr, low=0.0)
    weight_decay = check_number("weight_decay", weight_decay, low=0.0)
    factor = check_number("factor", factor, low=0.0, low_open=True)
    return {"lr": lr / factor, "weight_decay": weight_decay * factor}


def _init_scale(name: str, p: torch.Tensor, kind: str, bias_sigma: float, norm_sigma: float) -> float:
    if kind == "bias":
        return bias_sigma
    if kind == "norm_gain":
        return norm_sigma
    if p.numel() > 1:
        std = float(p.detach().float().std())
        if std > 0.0 and math.isfinite(std):
            return std
    if p.dim() >= 2 and p.numel() > 0:
        return math.sqrt(p.shape[0] / p.numel())  # zero-initialised matrix: √(1/fan_in)
    return bias_sigma


def scale_aware_groups(
    model: nn.Module,
    alpha0: float = 1e-3,
    *,
    q: float = 1.0,
    bias_sigma: float = 0.5,
    norm_sigma: float = 0.5,
    sigma_fn: Callable[[str, torch.Tensor], float | None] | None = None,
    **group_options: Any,
) -> list[dict[str, Any]]:
    r"""Param groups with Su's scale-aware lr and weight decay, read off the model at its init.

    For every tensor with init scale σ (Su, "炼丹策略" kexue.fm/archives/9344; Lion essay /9473)::

        lr           η = α0·σ                 # per-coordinate step ∝ the parameter's scale
        weight decay λ = α0 / (2·q·σ)         # decay ×lr: per-step decay η·λ = α0²/(2q)

    σ: for ≥2-D weights and embeddings, the tensor's current standard deviation (call this before
    training; a zero-initialised matrix gets √(1/fan_in)); for biases and norm shifts ``bias_sigma``
    (0.5); for norm gains ``norm_sigma`` (0.5, their spread around 1); other 1-D tensors their std, or
    ``bias_sigma`` when constant. ``sigma_fn(name, param)`` overrides σ where it returns a number.
    α0 ≈ 1e-3 (up to 1e-2 on easy tasks) is the relative change per step; q ≈ 1.

    For BERT-base (σ = √(1/768) ≈ 0.036) and α0 = 1.11e-3 this gives η ≈ 4e-5 and λ ≈ 0.015, the
    values Su found best for Lion in his MLM runs. With i.i.d. sign updates the weights then settle at
    RMS(θ) = √(η/(2λ)) = σ, their init scale. The groups suit Lion, Tiger and any optimizer whose update
    has unit RMS per coordinate; decay the lr over time with :func:`scale_aware_lr_lambda` in
    ``torch.optim.lr_scheduler.LambdaLR`` (the decay scales with it and λ stays α0/(2qσ)).

    Tensors with equal (η, λ) share a group; ``group_options`` are added to every group. Frozen
    parameters are left out and shared ones appear once.
    """
    alpha0 = check_number("alpha0", alpha0, low=0.0, low_open=True)
    q = check_number("q", q, low=0.0, low_open=True)
    check_number("bias_sigma", bias_sigma, low=0.0, low_open=True)
    check_number("norm_sigma", norm_sigma, low=0.0, low_open=True)
    groups: dict[tuple[float, float], list[torch.Tensor]] = {}
    for name, p, kind in classify_parameters(model):
        sigma = sigma_fn(name, p) if sigma_fn is not None else None
        if sigma is None:
            sigma = _init_scale(name, p, kind, bias_sigma, norm_sigma)
        sigma = check_number(f"sigma of {name}", sigma, low=0.0, low_open=True)
        groups.setdefault((alpha0 * sigma, alpha0 / (2.0 * q * sigma)), []).append(p)
    return [dict(params=ps, lr=lr, weight_decay=wd, **group_options) for (lr, wd), ps in groups.items()]


class ScaleAwareSchedule:
    """f(t) = 1/(κ·t + 1)^power, a picklable ``lr_lambda`` for ``torch.optim.lr_scheduler.LambdaLR``."""

    def __init__(self, kappa: float, power: int = 1) -> None:
        self.kappa = kappa
        self.power = power

    def __call__(self, step: int) -> float:
        return 1.0 / (self.kappa * step + 1.0) ** self.power

    def __repr__(self) -> str:
        return f"ScaleAwareSchedule(kappa={self.kappa!r}, power={self.power!r})"


def scale_aware_lr_lambda(
    kappa: float | None = None, *, halve_at: float | None = None, power: int = 1
) -> ScaleAwareSchedule:
    r"""Su's derived lr schedule f(t) = 1/(κt + 1)^power, to use with ``LambdaLR``.

    ``power=1`` (default) is the inverse-time decay Su derives when the cosine between update and error
    shrinks with the error (p_t ∝ ‖ε_t‖), the case he finds more plausible; ``power=2`` is the constant-p
    case, 1/(α0·p·t + 1)², which is also how Amos's own decay behaves under noise. Give ``kappa``
    directly, or ``halve_at=T`` to pick κ so that f(T) = 1/2 (κ = 1/T for power 1, (√2 − 1)/T for 2).
    """
    if (kappa is None) == (halve_at is None):
        raise TypeError("scale_aware_lr_lambda needs exactly one of kappa= or halve_at=")
    if power not in (1, 2):
        raise ValueError(f"Invalid power: {power!r} (expected 1 or 2)")
    check_optional("kappa", kappa, low=0.0)
    if halve_at is not None:
        halve_at = check_number("halve_at", halve_at, low=0.0, low_open=True)
        kappa = (2.0 ** (1.0 / power) - 1.0) / halve_at
    return ScaleAwareSchedule(float(kappa), power)  # type: ignore[arg-type]
