"""One spec per exported danlu optimizer: what the shared battery (tests/test_battery.py) runs.

Each :class:`OptimSpec` says how to build the optimizer so that it trains a small problem well
(``kwargs``), which constructions must fail and how (``bad``), which extra settings to run the battery
on as well (``variants``) and which battery tests do not apply (``skips``, always with a reason).

Adding an optimizer to ``danlu.__all__`` without an entry here fails
``test_battery.py::test_every_exported_optimizer_is_enrolled``.

Skip keys are a battery test's function name (skips it for every variant of the spec) or
``"<test name>/<variant>"`` (skips it for that variant only; the base settings are variant ``"default"``).
``test_battery.py::test_skip_keys_name_real_tests`` checks that every key names a real test and variant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

import danlu

__all__ = ["Bad", "OptimSpec", "Config", "OPTIM_DB", "configs", "spec_by_name"]


class Bad(NamedTuple):
    """A construction that must fail: ``cls(params, **{**spec.kwargs, **kwargs})`` raises ``exc``
    with a message matching ``regex`` (``re.search``).

    ``group``: extra keys put into a single param group ``[{"params": params, **group}]`` instead of
    passing a plain list. ``in_group``: the same keys must also be refused by ``add_param_group``
    (False for constructor-only errors such as an unknown keyword).
    """

    kwargs: dict[str, Any]
    exc: type[Exception]
    regex: str
    group: dict[str, Any] | None = None
    in_group: bool = True


@dataclass(frozen=True)
class OptimSpec:
    name: str
    cls: type
    kwargs: dict[str, Any]
    bad: list[Bad]
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    skips: dict[str, str] = field(default_factory=dict)
    requires_closure: bool = False
    # Final loss must be below this fraction of the initial loss on the battery's MLP regression.
    loss_ratio: float = 0.3


@dataclass(frozen=True)
class Config:
    """One runnable setting: a spec with a variant's kwargs merged over the base kwargs."""

    spec: OptimSpec
    variant: str
    kwargs: dict[str, Any]

    @property
    def id(self) -> str:
        return self.spec.name if self.variant == "default" else f"{self.spec.name}-{self.variant}"

    def skip_reason(self, test_name: str) -> str | None:
        skips = self.spec.skips
        return skips.get(f"{test_name}/{self.variant}") or skips.get(test_name)

    def make(self, params: Any, **overrides: Any):
        return self.spec.cls(params, **{**self.kwargs, **overrides})


def _lr_weight_decay_cases(wd_name: str = "weight_decay") -> list[Bad]:
    return [
        Bad({"lr": -1e-3}, ValueError, r"^Invalid lr: -0\.001 \(expected a number in \[0, inf\]\)$"),
        Bad({"lr": float("nan")}, ValueError, r"^Invalid lr: nan \(expected a finite number"),
        Bad({"lr": "1e-3"}, TypeError, r"^Invalid lr: '1e-3' \(expected a real number\)$"),
        Bad({"lr": torch.tensor(1e-3)}, TypeError, r"^Invalid lr: tensor\(0\.0010\) \(expected a Python number; tensor"),
        Bad({wd_name: -0.1}, ValueError, rf"^Invalid {wd_name}: -0\.1 \(expected a number in \[0, inf\]\)$"),
        Bad({"foo": 1}, TypeError, r"unexpected keyword argument 'foo'", in_group=False),
    ]


def _betas_cases() -> list[Bad]:
    return [
        Bad({"betas": (1.0, 0.99)}, ValueError, r"^Invalid betas\[0\]: 1\.0 \(expected a number in \[0, 1\)\)$"),
        Bad({"betas": (-0.1, 0.99)}, ValueError, r"^Invalid betas\[0\]: -0\.1 \(expected a number in \[0, 1\)\)$"),
        Bad({"betas": (0.9, 1.0)}, ValueError, r"^Invalid betas\[1\]: 1\.0 \(expected a number in \[0, 1\)\)$"),
        Bad({"betas": (0.9, 1.5)}, ValueError, r"^Invalid betas\[1\]: 1\.5 "),
        Bad({"betas": 0.9}, TypeError, r"^Invalid betas: 0\.9 \(expected a pair of floats\)$"),
        Bad({"betas": (0.9, 0.99, 0.999)}, TypeError, r"^Invalid betas: \(0\.9, 0\.99, 0\.999\) "),
    ]


def _beta_cases() -> list[Bad]:
    return [
        Bad({"beta": 1.0}, ValueError, r"^Invalid beta: 1\.0 \(expected a number in \[0, 1\)\)$"),
        Bad({"beta": -0.5}, ValueError, r"^Invalid beta: -0\.5 \(expected a number in \[0, 1\)\)$"),
        Bad({"beta": "0.9"}, TypeError, r"^Invalid beta: '0\.9' \(expected a real number\)$"),
    ]


def _accum_cases() -> list[Bad]:
    return [
        Bad({"accum_steps": 0}, ValueError, r"^Invalid accum_steps: 0 \(expected a number in \[1, inf\]\)$",
            in_group=False),
        Bad({"accum_steps": 2.0}, TypeError, r"^Invalid accum_steps: 2\.0 \(expected an int\)$", in_group=False),
        Bad({"accum_steps": True}, TypeError, r"^Invalid accum_steps: True ", in_group=False),
    ]


LION = OptimSpec(
    name="Lion",
    cls=danlu.Lion,
    kwargs=dict(lr=3e-3, betas=(0.9, 0.99)),
    bad=_lr_weight_decay_cases()
    + _betas_cases()
    + _accum_cases()
    + [Bad({"betas": (0.9, 0.0), "accum_steps": 2}, ValueError, r"^Invalid betas: \(0\.9, 0\.0\) \(expected betas\[1\] > 0",
           in_group=False)],
    variants={"weight_decay": dict(weight_decay=0.1), "accum": dict(accum_steps=2)},
)

TIGER = OptimSpec(
    name="Tiger",
    cls=danlu.Tiger,
    kwargs=dict(lr=3e-3, beta=0.9),
    bad=_lr_weight_decay_cases() + _beta_cases() + _accum_cases(),
    variants={"weight_decay": dict(weight_decay=0.1), "accum": dict(accum_steps=2, weight_decay=0.1)},
)

ADAX = OptimSpec(
    name="AdaX",
    cls=danlu.AdaX,
    kwargs=dict(lr=1e-2),
    bad=_lr_weight_decay_cases()
    + _betas_cases()
    + [
        # AdaX's β2 enters as (1+β2)^t − 1 in a denominator: 0 is refused.
        Bad({"betas": (0.9, 0.0)}, ValueError, r"^Invalid betas\[1\]: 0\.0 \(expected a number in \(0, 1\)\)$"),
        Bad({"eps": -1e-6}, ValueError, r"^Invalid eps: -1e-06 \(expected a number in \[0, inf\]\)$"),
    ],
    variants={"weight_decay": dict(weight_decay=0.05, betas=(0.8, 1e-3))},
)

ADAFACTOR = OptimSpec(
    name="Adafactor",
    cls=danlu.Adafactor,
    # A float lr is the absolute ρ; the battery's lr and scheduler tests need a float lr.
    kwargs=dict(lr=2e-2),
    bad=_lr_weight_decay_cases()
    + [
        Bad({"decay_rate": 0.0}, ValueError, r"^Invalid decay_rate: 0\.0 \(expected a number in \(0, inf\]\)$"),
        Bad({"decay_rate": -0.8}, ValueError, r"^Invalid decay_rate: -0\.8 "),
        Bad({"eps": (-1e-30, 1e-3)}, ValueError, r"^Invalid eps\[0\]: -1e-30 \(expected a number in \[0, inf\]\)$"),
        Bad({"eps": (1e-30, -1e-3)}, ValueError, r"^Invalid eps\[1\]: -0\.001 \(expected a number in \[0, inf\]\)$"),
        Bad({"eps": 1e-30}, TypeError, r"^Invalid eps: 1e-30 \(expected a pair"),
        Bad({"beta1": 1.0}, ValueError, r"^Invalid beta1: 1\.0 \(expected a number in \[0, 1\)\)$"),
        Bad({"clip_threshold": 0.0}, ValueError, r"^Invalid clip_threshold: 0\.0 "),
        Bad({"scale_parameter": 1}, TypeError, r"^Invalid scale_parameter: 1 \(expected a bool\)$"),
        Bad({"min_dim_size_to_factor": 128.0}, TypeError, r"^Invalid min_dim_size_to_factor: 128\.0 \(expected an int\)$"),
        Bad({"min_dim_size_to_factor": 0}, ValueError, r"^Invalid min_dim_size_to_factor: 0 "),
    ],
    variants={
        # lr=None: the paper's relative step min(1e-2, 1/√t) (see test_adafactor_relative_step_*).
        "relative_step": dict(lr=None),
        "momentum_wd": dict(beta1=0.9, weight_decay=1e-2),
        # The battery's tensors are far below the default threshold 128: force the factored path.
        "factored": dict(min_dim_size_to_factor=2, beta1=0.5),
        "unscaled": dict(lr=1e-2, scale_parameter=False),
    },
    skips={
        "test_scheduler_zero_lr_stops_movement/relative_step": (
            "lr=None is the relative step min(1e-2, 1/sqrt(t)); an lr scheduler needs a float lr "
            "(LambdaLR cannot scale None). Covered by test_adafactor_relative_step_*."
        ),
        "test_scheduler_change_takes_effect/relative_step": (
            "lr=None is the relative step min(1e-2, 1/sqrt(t)); an lr scheduler needs a float lr "
            "(StepLR cannot scale None). Covered by test_adafactor_relative_step_*."
        ),
    },
)

_AMOS_L2_NOT_LR_SCALED = (
    "extra_l2 enters Amos's update as -(γ/2 + ℓ2)·θ/(1 + d·√(ξη̃)·b) (see the Amos docstring), not multiplied "
    "by the lr ξ, so θ keeps decaying at lr 1e-28 or 0; the lr contract is checked on the other configs."
)

AMOS = OptimSpec(
    name="Amos",
    cls=danlu.Amos,
    kwargs=dict(lr=0.3),
    bad=[
        Bad({"lr": -0.1}, ValueError, r"^Invalid lr: -0\.1 \(expected a number in \[0, inf\]\)$"),
        Bad({"lr": None}, TypeError, r"^Invalid lr: None \(expected a real number\)$"),
        # Amos has no weight_decay: its decay is adaptive; extra_l2 is the extra L2 term.
        Bad({"weight_decay": 0.1}, TypeError, r"unexpected keyword argument 'weight_decay'", in_group=False),
        Bad({"extra_l2": -0.1}, ValueError, r"^Invalid extra_l2: -0\.1 \(expected a number in \[0, inf\]\)$"),
        Bad({"foo": 1}, TypeError, r"unexpected keyword argument 'foo'", in_group=False),
        Bad({"eps": -1.0}, ValueError, r"^Invalid eps: -1\.0 "),
        Bad({"momentum": 1.0}, ValueError, r"^Invalid momentum: 1\.0 \(expected a number in \[0, 1\)\)$"),
        Bad({"clip_value": 0.0}, ValueError, r"^Invalid clip_value: 0\.0 "),
        Bad({}, ValueError, r"^Invalid eta: 0\.0 \(expected a number in \(0, inf\]\)$", group={"eta": 0.0}),
        Bad({}, ValueError, r"^Invalid eta: -1\.0 ", group={"eta": -1.0}),
        Bad({}, ValueError, r"^Invalid reduce_dims: \(2,\) \(dim 2 does not exist in a parameter of shape \(3, 4\)\)$",
            group={"reduce_dims": (2,)}),
        Bad({}, ValueError, r"^Invalid reduce_dims: \(-3,\) \(dim -3 does not exist", group={"reduce_dims": (-3,)}),
        Bad({}, ValueError, r"^Invalid reduce_dims: \(1, -1\) \(repeated dim\)$", group={"reduce_dims": (1, -1)}),
        Bad({}, TypeError, r"^Invalid reduce_dims: 1 \(expected a tuple of ints\)$", group={"reduce_dims": 1}),
    ]
    + _beta_cases(),
    variants={
        "momentum": dict(momentum=0.9),
        "clip": dict(clip_value=1.0),
        "extra_l2": dict(extra_l2=1e-3),
    },
    skips={
        "test_tiny_lr_group_does_not_move/extra_l2": _AMOS_L2_NOT_LR_SCALED,
        "test_scheduler_zero_lr_stops_movement/extra_l2": _AMOS_L2_NOT_LR_SCALED,
        "test_scheduler_zero_lr_stops_movement/momentum": (
            "Amos momentum is an EMA of the already lr-scaled update (jestimator semantics), so after lr "
            "drops to 0 the EMA keeps moving θ while it decays; the base config covers lr=0."
        ),
    },
)

SGDM = OptimSpec(
    name="SGDM",
    cls=danlu.SGDM,
    kwargs=dict(lr=0.3, momentum=0.9),
    bad=_lr_weight_decay_cases()
    + _accum_cases()
    + [
        Bad({"momentum": 1.0}, ValueError, r"^Invalid momentum: 1\.0 \(expected a number in \[0, 1\)\)$"),
        Bad({"momentum": -0.1}, ValueError, r"^Invalid momentum: -0\.1 "),
    ],
    variants={"weight_decay": dict(weight_decay=1e-2), "accum": dict(accum_steps=2)},
)

ADAMW = OptimSpec(
    name="AdamW",
    cls=danlu.AdamW,
    kwargs=dict(lr=1e-2),
    bad=_lr_weight_decay_cases()
    + _betas_cases()
    + _accum_cases()
    + [Bad({"eps": -1e-8}, ValueError, r"^Invalid eps: -1e-08 \(expected a number in \[0, inf\]\)$")],
    variants={"no_decay": dict(weight_decay=0.0), "accum": dict(accum_steps=3)},
)

OPTIM_DB: list[OptimSpec] = [ADAFACTOR, ADAMW, ADAX, AMOS, LION, SGDM, TIGER]


def spec_by_name(name: str) -> OptimSpec:
    for spec in OPTIM_DB:
        if spec.name == name:
            return spec
    raise KeyError(name)


def configs(specs: list[OptimSpec] | None = None, *, variants: bool = True) -> list[Config]:
    """Every spec's base setting (variant ``"default"``) and, if ``variants``, each variant."""
    out = []
    for spec in OPTIM_DB if specs is None else specs:
        out.append(Config(spec, "default", dict(spec.kwargs)))
        if variants:
            for desc, kw in spec.variants.items():
                out.append(Config(spec, desc, {**spec.kwargs, **kw}))
    return out

