"""Su's hyperparameter recipes: AdamW → Lion conversion and scale-aware lr / weight decay.

Both rest on the same observation (Su, kexue.fm/archives/9344 and /9473): for an optimizer whose
update has unit RMS per coordinate (Lion, Tiger, sign-like methods, Adam early in training), the lr is
a per-coordinate step size, so it should be proportional to the scale of the parameter it moves, and
the weight decay should be one order higher in the step size than the update.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from ._core.modules import classify_parameters
from ._core.numerics import acc_dtype
from ._core.validate import check_number, check_optional

__all__ = ["lion_from_adamw", "scale_aware_groups", "tiger_groups", "lion_preset", "LION_PRESETS", "LionPreset",
           "ScaleAwareSchedule", "scale_aware_lr_lambda"]


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


class LionPreset(NamedTuple):
    """One of the Lion paper's settings: Lion's ``lr``, ``betas`` and ``weight_decay``, the baseline it
    was compared with (``baseline``: "AdamW lr 1e-3, λ 1.0"), and where the numbers are stated."""

    lr: float
    betas: tuple[float, float]
    weight_decay: float
    baseline: str
    source: str


_PAPER = "Chen et al., arXiv:2302.06675 §5; google/automl lion/README.md"
LION_PRESETS: dict[str, LionPreset] = {
    "vit-imagenet": LionPreset(1e-4, (0.9, 0.99), 10.0, "AdamW lr 1e-3, weight decay 1.0",
                               f"ViT-B/16 on ImageNet with strong augmentation; {_PAPER}"),
    "diffusion": LionPreset(3e-5, (0.9, 0.99), 0.1, "AdamW lr 3e-4, weight decay 0.01",
                            f"diffusion models; {_PAPER}"),
    "lm-7.5b": LionPreset(1e-4, (0.95, 0.98), 0.01, "Adafactor lr 1e-3, weight decay 0.001",
                          f"7.5B-parameter language model; {_PAPER} (β for language tasks: §5)"),
    "lm-base": LionPreset(3e-4, (0.95, 0.98), 0.01, "(as read by Su)",
                          "base-size language models: Su's reading of the paper's Table 12, kexue.fm/archives/9473; "
                          "β for language tasks: arXiv:2302.06675 §5"),
    "lm-large": LionPreset(2e-4, (0.95, 0.98), 0.01, "(as read by Su)",
                           "language models above 1B parameters: Su's reading of Table 12 (lr lowered to 2e-4, "
                           "down to 1e-4), kexue.fm/archives/9473; β: arXiv:2302.06675 §5"),
}


def lion_preset(name: str) -> dict[str, Any]:
    """The Lion paper's ``lr``, ``betas`` and ``weight_decay`` for a setting, as keywords for :class:`danlu.Lion`::

        opt = danlu.Lion(model.parameters(), **danlu.lion_preset("vit-imagenet"))  # lr 1e-4, λ 10

    Names (see :data:`LION_PRESETS` for each one's baseline and source): ``"vit-imagenet"``,
    ``"diffusion"``, ``"lm-7.5b"`` (the three worked examples of the paper's §5), ``"lm-base"`` and
    ``"lm-large"`` (Su's reading of its hyperparameter table, kexue.fm/archives/9473). They are where
    the paper's tuning ended for its models and batch sizes (thousands), not defaults for small
    runs: the paper's rule, lr 3–10× below and λ 3–10× above a tuned AdamW, is :func:`lion_from_adamw`.
    Tiger's β for vision and for language are :attr:`danlu.Tiger.BETA_CV` and :attr:`danlu.Tiger.BETA_NLP`.
    """
    if not isinstance(name, str):
        raise TypeError(f"Invalid preset name: {name!r} (expected a str)")
    preset = LION_PRESETS.get(name.strip().lower())
    if preset is None:
        raise ValueError(f"Unknown Lion preset {name!r}; known: {', '.join(LION_PRESETS)}")
    return {"lr": preset.lr, "betas": preset.betas, "weight_decay": preset.weight_decay}


def _init_scale(name: str, p: torch.Tensor, kind: str, bias_sigma: float, norm_sigma: float) -> float:
    if kind == "bias":
        return bias_sigma
    if kind == "norm_gain":
        return norm_sigma
    if p.numel() > 1:
        std = float(p.detach().to(acc_dtype(p)).std())
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


def tiger_groups(
    model: nn.Module,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    *,
    elementwise_factor: float = 0.5,
    **group_options: Any,
) -> list[dict[str, Any]]:
    r"""Param groups for :class:`danlu.Tiger` with Su's per-tensor recipe (kexue.fm/archives/9512, bojone/tiger).

    With α = ``lr`` the global relative lr (Su: max 1e-3–2e-3; schedule it with ``torch.optim.lr_scheduler``)::

        matrices and other tensors   η_t = α·RMS(θ_{t−1})            λ = weight_decay   (lr_scale="rms")
        embeddings                   η_t = α·RMS(row of θ_{t−1})     λ = weight_decay   (lr_scale="row_rms")
        biases, norm β and γ         η_t = α·0.5                     λ = 0

    and, for ``on_nan="skip"``, each group's neutral value: c = 1 for norm gains, 0 otherwise. Roles are
    read off the modules (``nn.Embedding``/``EmbeddingBag`` weights, the parameters of normalisation
    layers, parameters named ``bias``), where the reference matches variable names. ``group_options``
    (e.g. ``on_nan="skip"``) are added to every group. Frozen parameters are left out, shared ones
    appear once; empty groups are dropped. Use with ``danlu.Tiger(danlu.tiger_groups(model), beta=...)``.
    """
    lr = check_number("lr", lr, low=0.0)
    weight_decay = check_number("weight_decay", weight_decay, low=0.0)
    elementwise_factor = check_number("elementwise_factor", elementwise_factor, low=0.0)
    roles: dict[str, list[torch.Tensor]] = {"matrix": [], "embedding": [], "bias": [], "norm_gain": []}
    for _, p, kind in classify_parameters(model):
        role = kind if kind in ("embedding", "bias", "norm_gain") else "matrix"
        roles[role].append(p)
    settings: dict[str, dict[str, Any]] = {
        "matrix": dict(lr=lr, lr_scale="rms", weight_decay=weight_decay, shrink_center=0.0),
        "embedding": dict(lr=lr, lr_scale="row_rms", weight_decay=weight_decay, shrink_center=0.0),
        "bias": dict(lr=lr * elementwise_factor, lr_scale=None, weight_decay=0.0, shrink_center=0.0),
        "norm_gain": dict(lr=lr * elementwise_factor, lr_scale=None, weight_decay=0.0, shrink_center=1.0),
    }
    return [dict(params=ps, **settings[role], **group_options) for role, ps in roles.items() if ps]


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
