"""torch's own generic optimizer checks, run against danlu's optimizers.

The infrastructure is torch's: :class:`OptimizerInfo`, :class:`OptimizerInput`,
:class:`ErrorOptimizerInput`, ``get_error_inputs_for_all_optims`` (the errors torch expects from every
optimizer), ``_get_optim_inputs_including_global_cliquey_kwargs``, ``TensorTracker`` and torch's
``TestCase.assertEqual``, all from the wheel's ``torch.testing._internal``. The test bodies are adapted
from ``TestOptimRenewed`` in torch's ``test/test_optim.py`` (not shipped in the wheel): each test below
names the torch test it follows and says where it checks more than torch's (torch only checks that
some of them run; here each one asserts something that a broken optimizer would violate).

``DB`` holds one :class:`DanluInfo` (an ``OptimizerInfo``) per danlu optimizer, with a few constructor
settings each (``optim_inputs_func``) and the errors it must raise (``optim_error_inputs_func``). The
danlu optimizers differ from torch's in how a step is driven (``kind``):

* ``"grad"``: backward, then ``step()`` (Lion, Tiger, SGDM, AdamW, AdaX, Adafactor, Amos, EGD,
  EGStepSize);
* ``"closure"``: ``step(closure)`` is required (GradientPenalty; the closure returns the loss and the
  wrapper differentiates it);
* ``"mgs"``: ``step(surrogate_closure, task_loss)`` (MGS);
* ``"zo"``: ``step(closure)`` with a closure that returns the loss WITHOUT backward (ZeroOrder).

:func:`take_step` drives one step of any kind on a loss function of the current parameters. A check
that does not apply to an optimizer is skipped with its reason (``DanluInfo.skips``); a check that
fails because danlu breaks the torch.optim contract is a strict xfail whose reason is the diagnosis
(``DanluInfo.xfails``). Tiny tensors and few steps: the file runs in well under a minute on CPU.
"""

from __future__ import annotations

import copy
import functools
import inspect
import io
import math
from typing import Any, Callable

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ExponentialLR, ReduceLROnPlateau, StepLR

from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    TensorTracker,
    _get_optim_inputs_including_global_cliquey_kwargs,
    get_error_inputs_for_all_optims,
)
from torch.testing._internal.common_utils import TestCase

import danlu

DEVICE = "cpu"
DTYPE = torch.float32
# torch's assertEqual (recursive over dicts/lists/tuples, torch's per-dtype tolerances for tensors).
TC = TestCase()


# --------------------------------------------------------------------------------------------------
# The danlu OptimizerInfo database
# --------------------------------------------------------------------------------------------------


class DanluInfo(OptimizerInfo):
    """torch's OptimizerInfo plus what driving a danlu optimizer needs.

    ``supported_impls=()``: danlu has no foreach/fused/differentiable implementations, so torch's
    ``_get_optim_inputs_including_global_cliquey_kwargs`` returns ``optim_inputs_func``'s settings as
    they are. ``not_og_supported_flags``: group keys added after the first danlu release (what
    ``test_can_load_older_state_dict`` deletes).
    """

    def __init__(
        self,
        name: str,
        optim_cls: type,
        *,
        build: Callable[..., torch.optim.Optimizer] | None = None,
        kind: str = "grad",
        base_kwargs: dict[str, Any] | None = None,
        has_weight_decay: bool = True,
        has_step: bool = False,
        drift: bool = False,
        inner_steps: int = 0,
        skips: dict[str, str] | None = None,
        xfails: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("supported_impls", ())
        kwargs.setdefault("not_og_supported_flags", ())
        kwargs.setdefault("supports_complex", False)
        kwargs.setdefault("step_requires_closure", kind != "grad")
        kwargs.setdefault(
            "scheduler_inputs",
            (
                [lambda opt: StepLR(opt, gamma=0.9, step_size=10), lambda opt: ReduceLROnPlateau(opt)],
                [lambda opt: ExponentialLR(opt, gamma=0.9)],
            ),
        )
        super().__init__(optim_cls, **kwargs)
        self._name = name
        self.build = build or optim_cls
        self.kind = kind
        self.base_kwargs = dict(base_kwargs or {})
        self.has_weight_decay = has_weight_decay  # a ``weight_decay`` group key (the inner's, for a wrapper)
        self.has_step = has_step  # a ``step`` entry in the per-parameter state
        # θ is restored by subtraction after in-place perturbations (a few ulp of float32 rounding):
        # "unchanged" is checked with torch's tolerances instead of bitwise.
        self.drift = drift
        self.inner_steps = inner_steps  # how many inner optimizer steps one step takes (wrappers)
        self.skips = dict(skips or {})
        self.xfails = dict(xfails or {})

    @property
    def name(self) -> str:
        return self._name

    def make(self, params: Any, **kwargs: Any) -> torch.optim.Optimizer:
        return self.build(params, **{**self.base_kwargs, **kwargs})

    @functools.cached_property
    def group_keys(self) -> frozenset[str]:
        """Keys a param group carries (``defaults``; a wrapper's are its inner optimizer's)."""
        return frozenset(self.make([Parameter(torch.ones(2))]).defaults)

    def split(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(group-level kwargs, constructor-only kwargs such as accum_steps, samples or meta_lr)."""
        group = {k: v for k, v in kwargs.items() if k in self.group_keys}
        return group, {k: v for k, v in kwargs.items() if k not in group}


def inputs(*settings: tuple[str, Callable[[], dict[str, Any]] | dict[str, Any]]):
    """An ``optim_inputs_func``: fresh kwargs (and fresh tensors for a tensor lr) on every call."""

    def optim_inputs_func(device, dtype=None):
        return [
            OptimizerInput(params=None, kwargs=kw() if callable(kw) else copy.deepcopy(kw), desc=desc)
            for desc, kw in settings
        ]

    return optim_inputs_func


def bad(kwargs: dict[str, Any], error_type: type, regex: str, desc: str = "", params: Any = None,
        on_step: bool = False) -> ErrorOptimizerInput:
    return ErrorOptimizerInput(
        OptimizerInput(params=params, kwargs=kwargs, desc=desc or f"{kwargs}"),
        error_on=OptimizerErrorEnum.STEP_ERROR if on_step else OptimizerErrorEnum.CONSTRUCTION_ERROR,
        error_type=error_type,
        error_regex=regex,
    )


def sparse_grad_params() -> list[Parameter]:
    p = Parameter(torch.randn(3, 2))
    p.grad = torch.randn(3, 2).to_sparse()
    return [p]


def complex_params() -> list[torch.Tensor]:
    return [torch.randn(3, dtype=torch.complex64, requires_grad=True)]


def errors(*specific: Callable[[], list[ErrorOptimizerInput]], sparse_step: str | None = None,
           no_closure_step: str | None = None):
    """An ``optim_error_inputs_func``: torch's errors for every optimizer, danlu's refusal of complex
    parameters, then the optimizer's own (built fresh on every call)."""

    def optim_error_inputs_func(device, dtype):
        out = list(get_error_inputs_for_all_optims(device, dtype))
        out.append(bad({}, TypeError, r"does not support complex parameters", "complex params refused",
                       params=complex_params()))
        if sparse_step:
            out.append(bad({}, RuntimeError, sparse_step, "sparse grads refused at step", params=sparse_grad_params(),
                           on_step=True))
        if no_closure_step:
            p = [Parameter(torch.randn(3))]
            out.append(bad({}, TypeError, no_closure_step, "step without closure", params=p, on_step=True))
        for f in specific:
            out.extend(f())
        return out

    return optim_error_inputs_func


def lr_errors() -> list[ErrorOptimizerInput]:
    return [
        bad({"lr": -1e-3}, ValueError, r"^Invalid lr: -0\.001 \(expected a number in \[0, inf\]\)$"),
        bad({"lr": float("inf")}, ValueError, r"^Invalid lr: inf \(expected a finite number"),
        bad({"lr": "1e-3"}, TypeError, r"^Invalid lr: '1e-3' \(expected a real number\)$"),
        bad({"lr": torch.tensor(1e-3, requires_grad=True)}, TypeError, r"does not require grad"),
        bad({"lr": torch.tensor(1)}, TypeError, r"a floating-point tensor"),
    ]


def wd_errors() -> list[ErrorOptimizerInput]:
    return [bad({"weight_decay": -1}, ValueError, r"^Invalid weight_decay: -1 \(expected a number in \[0, inf\]\)$")]


def accum_errors() -> list[ErrorOptimizerInput]:
    return [
        bad({"accum_steps": 0}, ValueError, r"^Invalid accum_steps: 0 \(expected a number in \[1, inf\]\)$"),
        bad({"accum_steps": 2.0}, TypeError, r"^Invalid accum_steps: 2\.0 \(expected an int\)$"),
    ]


def betas_errors() -> list[ErrorOptimizerInput]:
    return [
        bad({"betas": (1.0, 0.0)}, ValueError, r"^Invalid betas\[0\]: 1\.0 \(expected a number in \[0, 1\)\)$"),
        bad({"betas": (0.9, 1.0)}, ValueError, r"^Invalid betas\[1\]: 1\.0"),
        bad({"betas": 0.9}, TypeError, r"^Invalid betas: 0\.9 \(expected a pair of floats\)$"),
    ]


def wrapped(wrapper: type, inner: type, lead: tuple = ()) -> Callable[..., torch.optim.Optimizer]:
    """``build(params, **kwargs)``: the wrapper's own keywords go to the wrapper, the rest to
    ``inner(params, ...)``."""
    own = {n for n in inspect.signature(wrapper).parameters if n not in ("optimizer", "params")}

    def build(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
        mine = {k: kwargs.pop(k) for k in list(kwargs) if k in own}
        return wrapper(*lead, inner(params, **kwargs), **mine)

    build.__name__ = f"{wrapper.__name__}[{inner.__name__}]"
    return build


def wrapper_errors(wrapper: type, own: list[tuple[dict[str, Any], type, str]]):
    def f() -> list[ErrorOptimizerInput]:
        out = [bad(kw, exc, regex, params=[Parameter(torch.randn(3))]) for kw, exc, regex in own]
        # Only the inner's validation can see a bad inner lr with params=None.
        out.append(bad({"lr": -1e-3}, ValueError, r"^Invalid lr: -0\.001", "inner lr checked by the inner"))
        return out

    return f


# Diagnoses of the danlu bugs these checks find (see the tests marked with them).
NO_STEP = "keeps no 'step' counter in its per-parameter state"
NO_WD = "has no weight_decay hyperparameter"
ZO_NO_GRADS = "ZeroOrder reads no gradients (its closure returns the loss without backward)"

DB: list[DanluInfo] = [
    DanluInfo(
        "Lion", danlu.Lion,
        optim_inputs_func=inputs(
            ("default", {}),
            ("lr, weight_decay", {"lr": 1e-3, "weight_decay": 0.1}),
            ("betas, accum_steps=3", {"betas": (0.95, 0.98), "accum_steps": 3}),
            ("tensor lr", lambda: {"lr": torch.tensor(1e-3)}),
        ),
        optim_error_inputs_func=errors(lr_errors, wd_errors, betas_errors, accum_errors,
                                       sparse_step=r"Lion does not support sparse gradients"),
        not_og_supported_flags=("accum_micro_step",),
        skips={"test_load_nontensor_step": f"Lion {NO_STEP}",
               "test_load_state_dict_post_hook_sees_loaded_state": f"Lion {NO_STEP}"},
    ),
    DanluInfo(
        "Tiger", danlu.Tiger,
        optim_inputs_func=inputs(
            ("default", {}),
            ("lr, weight_decay", {"lr": 1e-3, "weight_decay": 0.1}),
            ("accum_steps=3", {"accum_steps": 3}),
        ),
        optim_error_inputs_func=errors(
            lr_errors, wd_errors, accum_errors,
            lambda: [bad({"beta": 1.0}, ValueError, r"^Invalid beta: 1\.0 \(expected a number in \[0, 1\)\)$")],
            sparse_step=r"Tiger does not support sparse gradients"),
        not_og_supported_flags=("accum_micro_step",),
        skips={"test_load_nontensor_step": f"Tiger {NO_STEP}",
               "test_load_state_dict_post_hook_sees_loaded_state": f"Tiger {NO_STEP}"},
    ),
    DanluInfo(
        "SGDM", danlu.SGDM,
        optim_inputs_func=inputs(
            ("default", {}),
            ("weight_decay", {"weight_decay": 0.1}),
            ("no momentum", {"momentum": 0.0, "lr": 0.05}),
            ("accum_steps=3", {"accum_steps": 3}),
        ),
        optim_error_inputs_func=errors(
            lr_errors, wd_errors, accum_errors,
            # torch's SGD error input: "momentum should be between 0 and 1".
            lambda: [bad({"momentum": -0.5}, ValueError, r"^Invalid momentum: -0\.5"),
                     bad({"momentum": 1.0}, ValueError, r"^Invalid momentum: 1\.0")],
            sparse_step=r"SGDM does not support sparse gradients"),
        not_og_supported_flags=("accum_micro_step",),
        skips={"test_load_nontensor_step": f"SGDM {NO_STEP}",
               "test_load_state_dict_post_hook_sees_loaded_state": f"SGDM {NO_STEP}"},
    ),
    DanluInfo(
        "AdamW", danlu.AdamW,
        optim_inputs_func=inputs(
            ("default", {}),
            ("lr, no weight_decay", {"lr": 1e-2, "weight_decay": 0.0}),
            ("betas, accum_steps=2", {"betas": (0.8, 0.99), "accum_steps": 2}),
        ),
        optim_error_inputs_func=errors(
            lr_errors, wd_errors, betas_errors, accum_errors,
            lambda: [bad({"eps": -1e-8}, ValueError, r"^Invalid eps: -1e-08")],
            sparse_step=r"AdamW does not support sparse gradients"),
        not_og_supported_flags=("accum_micro_step",),
        has_step=True,
    ),
    DanluInfo(
        "AdaX", danlu.AdaX,
        optim_inputs_func=inputs(
            ("default", {}),
            ("lr, weight_decay", {"lr": 1e-2, "weight_decay": 0.1}),
        ),
        optim_error_inputs_func=errors(
            lr_errors, wd_errors, betas_errors,
            lambda: [bad({"betas": (0.9, 0.0)}, ValueError,
                         r"^Invalid betas\[1\]: 0\.0 \(expected a number in \(0, 1\)\)$")],
            sparse_step=r"AdaX does not support sparse gradients"),
        has_step=True,
    ),
    DanluInfo(
        "Adafactor", danlu.Adafactor,
        optim_inputs_func=inputs(
            ("default (relative step)", {}),
            ("absolute lr", {"lr": 1e-2, "relative_step": False}),
            ("beta1, weight_decay", {"beta1": 0.9, "weight_decay": 0.1}),
            ("factored", {"min_dim_size_to_factor": 2}),
        ),
        optim_error_inputs_func=errors(
            lr_errors, wd_errors,
            lambda: [
                bad({"relative_step": "yes"}, TypeError, r"^Invalid relative_step: 'yes' \(expected a bool\)$"),
                bad({"decay_rate": 0.0}, ValueError, r"^Invalid decay_rate: 0\.0 \(expected a number in \(0, 1\)\)$"),
                bad({"beta1": 1.0}, ValueError, r"^Invalid beta1: 1\.0"),
                bad({"eps": (1e-30,)}, TypeError, r"^Invalid eps: \(1e-30,\) \(expected a pair"),
                bad({"clip_threshold": 0.0}, ValueError, r"^Invalid clip_threshold: 0\.0"),
            ],
            sparse_step=r"Adafactor does not support sparse gradients"),
        # danlu <= 0.1 had no relative_step (its load converts such a group).
        not_og_supported_flags=("relative_step",),
        has_step=True,
    ),
    DanluInfo(
        "Amos", danlu.Amos,
        optim_inputs_func=inputs(
            ("default", {}),
            ("momentum", {"momentum": 0.9, "lr": 0.05}),
            ("extra_l2, clip_value", {"extra_l2": 0.01, "clip_value": 1.0}),
        ),
        optim_error_inputs_func=errors(
            lr_errors,
            lambda: [
                bad({"beta": 1.0}, ValueError, r"^Invalid beta: 1\.0"),
                bad({"momentum": 1.0}, ValueError, r"^Invalid momentum: 1\.0"),
                bad({"clip_value": 0.0}, ValueError, r"^Invalid clip_value: 0\.0"),
                bad({"extra_l2": -1.0}, ValueError, r"^Invalid extra_l2: -1\.0"),
                # reduce_dims and eta are param-group keys (amos_groups), not constructor keywords.
                bad({}, ValueError, r"^Invalid reduce_dims: \(3,\) \(dim 3 does not exist", "group reduce_dims=(3,)",
                    params=[{"params": [Parameter(torch.randn(2, 3))], "reduce_dims": (3,)}]),
                bad({}, TypeError, r"^Invalid reduce_dims: 1 \(expected a tuple of ints\)$", "group reduce_dims=1",
                    params=[{"params": [Parameter(torch.randn(2, 3))], "reduce_dims": 1}]),
                bad({}, ValueError, r"^Invalid eta: 0\.0", "group eta=0",
                    params=[{"params": [Parameter(torch.randn(2, 3))], "eta": 0.0}]),
            ],
            sparse_step=r"Amos does not support sparse gradients"),
        has_weight_decay=False,
        has_step=True,
        skips={k: "Amos " + NO_WD + " (its decay toward the target scale is adaptive; extra_l2 is not a "
                    "decoupled lr-scaled weight decay)"
               for k in ("test_param_groups_weight_decay", "test_weight_decay_group_shrinks_without_grads")},
    ),
    DanluInfo(
        "EGD", danlu.EGD,
        base_kwargs={"signed": True},  # EG± for parameters of either sign (torch's tests use randn)
        optim_inputs_func=inputs(
            ("signed", {}),
            ("lr, delta", {"lr": 0.05, "delta": 0.5}),
            ("clamp", {"clamp": 0.5}),
        ),
        optim_error_inputs_func=errors(
            lr_errors,
            lambda: [
                bad({"signed": False}, ValueError, r"expected every entry > 0", "negative params with signed=False",
                    params=[Parameter(-torch.rand(3) - 0.1)]),
                bad({"simplex_dim": 0}, ValueError, r"^Invalid simplex_dim: 0 \(expected None with signed=True"),
                bad({"signed": False, "l1_budget": 1.0}, ValueError, r"^Invalid l1_budget: 1\.0"),
                bad({"clamp": 0.0}, ValueError, r"^Invalid clamp: 0\.0"),
                bad({"delta": 0.0}, ValueError, r"^Invalid delta: 0\.0"),
                bad({"signed": 1}, TypeError, r"^Invalid signed: 1 \(expected a bool\)$"),
            ],
            sparse_step=r"EGD does not support sparse gradients"),
        has_weight_decay=False,
        skips={"test_param_groups_weight_decay": f"EGD {NO_WD} (it is multiplicative; l1_budget rescales instead)",
               "test_weight_decay_group_shrinks_without_grads": f"EGD {NO_WD}",
               "test_load_nontensor_step": f"EGD {NO_STEP}",
               "test_load_state_dict_post_hook_sees_loaded_state": f"EGD {NO_STEP}"},
    ),
    DanluInfo(
        "EGStepSize[SGDM]", danlu.EGStepSize, build=wrapped(danlu.EGStepSize, danlu.SGDM),
        base_kwargs={"meta_lr": 0.05},
        optim_inputs_func=inputs(
            ("su", {}),
            ("paper", {"form": "paper", "weight_decay": 0.1}),
            ("group, cosine", {"granularity": "group", "normalize": "cosine"}),
        ),
        optim_error_inputs_func=errors(
            wrapper_errors(danlu.EGStepSize, [
                ({"meta_lr": -0.1}, ValueError, r"^Invalid meta_lr: -0\.1"),
                ({"form": "adam"}, ValueError, r"^Invalid form: 'adam'"),
                ({"granularity": 1}, TypeError, r"^Invalid granularity: 1"),
            ]),
            sparse_step=r"does not support sparse gradients"),
        inner_steps=1,
        skips={"test_load_nontensor_step": f"EGStepSize[SGDM] {NO_STEP} (SGDM has none; see EGStepSize[AdamW])",
               "test_load_state_dict_post_hook_sees_loaded_state": f"EGStepSize[SGDM] {NO_STEP}"},
    ),
    DanluInfo(
        "EGStepSize[AdamW]", danlu.EGStepSize, build=wrapped(danlu.EGStepSize, danlu.AdamW),
        base_kwargs={"meta_lr": 0.05},
        optim_inputs_func=inputs(
            ("su", {}),
            ("paper, tensor", {"form": "paper", "granularity": "tensor", "lr": 1e-2}),
        ),
        optim_error_inputs_func=errors(
            wrapper_errors(danlu.EGStepSize, [({"max_exponent": 0.0}, ValueError, r"^Invalid max_exponent: 0\.0")]),
            sparse_step=r"does not support sparse gradients"),
        has_step=True,
        inner_steps=1,
    ),
    DanluInfo(
        "GradientPenalty[SGDM]", danlu.GradientPenalty, build=wrapped(danlu.GradientPenalty, danlu.SGDM),
        kind="closure",
        base_kwargs={"strength": 1e-3},
        optim_inputs_func=inputs(
            ("finite difference", {}),
            ("double backward", {"method": "double_backward", "strength": 1e-2, "weight_decay": 0.1}),
            ("accum_steps=2", {"accum_steps": 2}),
        ),
        optim_error_inputs_func=errors(
            wrapper_errors(danlu.GradientPenalty, [
                ({"strength": -1e-3}, ValueError, r"^Invalid strength: -0\.001"),
                ({"method": "exact"}, ValueError, r"^Invalid method: 'exact'"),
            ]),
            no_closure_step=r"GradientPenalty\.step needs a closure"),
        inner_steps=1,
        skips={"test_load_nontensor_step": f"GradientPenalty[SGDM] {NO_STEP}",
               "test_load_state_dict_post_hook_sees_loaded_state": f"GradientPenalty[SGDM] {NO_STEP}"},
    ),
    DanluInfo(
        "ScaleAwareStep[AdamW]", danlu.ScaleAwareStep, build=wrapped(danlu.ScaleAwareStep, danlu.AdamW),
        base_kwargs={"weight_decay": 0.0},  # the inner's own decay must be 0: the wrapper applies ρ_t
        optim_inputs_func=inputs(
            ("q=1", {}),
            ("q=2, no decay", {"q": 2.0, "decay": False, "lr": 1e-2}),
        ),
        optim_error_inputs_func=errors(
            wrapper_errors(danlu.ScaleAwareStep, [
                ({"q": 0.0}, ValueError, r"^Invalid q: 0\.0"),
                ({"decay": 1}, TypeError, r"^Invalid decay: 1"),
            ]),
            sparse_step=r"does not support sparse gradients"),
        has_step=True,
        has_weight_decay=False,
        inner_steps=1,
        skips={k: "ScaleAwareStep " + NO_WD + " (its decay ρ_t = α0·lr/(2q) is its own; the inner's must be 0)"
               for k in ("test_param_groups_weight_decay", "test_weight_decay_group_shrinks_without_grads")},
    ),
    DanluInfo(
        "ChiGated[SGDM]", danlu.ChiGated, build=wrapped(danlu.ChiGated, danlu.SGDM),
        base_kwargs={"k": 1},
        optim_inputs_func=inputs(
            ("k=1", {}),
            ("k=2", {"k": 2, "weight_decay": 0.1}),
            ("k=3, chi only", {"k": 3, "rescale_betas": False}),
        ),
        optim_error_inputs_func=errors(
            wrapper_errors(danlu.ChiGated, [
                ({"k": 0}, ValueError, r"^Invalid k: 0"),
            ])),
        inner_steps=1,
        skips={"test_load_nontensor_step": f"ChiGated[SGDM] {NO_STEP}",
               "test_load_state_dict_post_hook_sees_loaded_state": f"ChiGated[SGDM] {NO_STEP}",
               "test_weight_decay_group_shrinks_without_grads": (
                   "ChiGated gates the lr, so the decoupled decay applies once per window of k micro-steps "
                   "(as one step of the k-times-larger batch); tests/test_chi_gate.py checks it")},
    ),
    DanluInfo(
        "MGS[AdamW]", danlu.MGS, build=wrapped(danlu.MGS, danlu.AdamW, lead=(None,)),
        kind="mgs",
        optim_inputs_func=inputs(
            ("replay", {}),
            ("snapshot", {"restore": "snapshot", "candidates": 3, "weight_decay": 0.1}),
        ),
        optim_error_inputs_func=errors(
            wrapper_errors(danlu.MGS, [
                ({"candidates": 0}, ValueError, r"^Invalid candidates: 0"),
                ({"mix": 1.5}, ValueError, r"^Invalid mix: 1\.5"),
                ({"restore": "copy"}, ValueError, r"^Invalid restore: 'copy'"),
            ]),
            no_closure_step=r"MGS\.step needs a surrogate closure"),
        has_step=True,
        drift=True,  # restore='replay' undoes each candidate by subtraction (MGS docstring)
        inner_steps=1,
    ),
    DanluInfo(
        "ZeroOrder", danlu.ZeroOrder,
        kind="zo",
        base_kwargs={"lr": 1e-2, "samples": 8, "sigma": 1e-2},
        optim_inputs_func=inputs(
            ("two-sided", {}),
            ("one-sided, weight_decay", {"estimator": "one_sided", "baseline": "leave_one_out", "weight_decay": 0.01}),
            ("tensor lr", lambda: {"lr": torch.tensor(1e-2)}),
        ),
        optim_error_inputs_func=errors(
            lr_errors, wd_errors,
            lambda: [
                bad({"lr": None}, TypeError, r"^Invalid lr: None \(expected a real number: lr is required"),
                bad({"sigma": 0.0}, ValueError, r"^Invalid sigma: 0\.0"),
                bad({"samples": 0}, ValueError, r"^Invalid samples: 0"),
                bad({"estimator": "central"}, ValueError, r"^Invalid estimator: 'central'"),
                bad({"baseline": "mean"}, ValueError, r"^Invalid baseline: 'mean' \(expected the default 'f0' with "
                    r"estimator='two_sided'"),
                bad({"optimizer": torch.optim.SGD}, TypeError, r"^Invalid optimizer"),
            ],
            no_closure_step=r"ZeroOrder\.step needs a closure"),
        drift=True,  # θ + σu − σu (MeZO): a few ulp of float32 rounding per perturbation
        skips={
            "test_load_nontensor_step": f"ZeroOrder {NO_STEP} (its only state is its generator)",
            "test_load_state_dict_post_hook_sees_loaded_state": f"ZeroOrder {NO_STEP}",
            "test_non_empty_state": "ZeroOrder keeps no per-parameter state (its only state is the generator, "
                                    "in the top-level 'danlu_zero_order' entry and in param group 0)",
            "test_step_is_noop_for_zero_grads": ZO_NO_GRADS + ": zero gradients do not exist for it (the constant-"
                                                "loss analogue is test_weight_decay_group_shrinks_without_grads)",
        },
    ),
]

GENERATOR_IN_ENTRY = ("keeps its random generator's state in its top-level 'danlu_*' entry: a dict with only "
                      "'state' and 'param_groups' loads but keeps the current generator (documented), so the "
                      "continuation is another random stream")
for _info in DB:
    if _info.kind in ("zo", "mgs"):
        _info.skips["test_torch_layout_state_dict_continues_identically"] = f"{_info.name} {GENERATOR_IN_ENTRY}"


def cases(test_name: str) -> list[Any]:
    """The DB as pytest params for ``test_name``, with each entry's skip or xfail for it."""
    out = []
    for info in DB:
        marks = []
        if test_name in info.skips:
            marks.append(pytest.mark.skip(reason=info.skips[test_name]))
        elif test_name in info.xfails:
            marks.append(pytest.mark.xfail(strict=True, reason=info.xfails[test_name]))
        out.append(pytest.param(info, id=info.name, marks=marks))
    return out


def for_each(test: Callable) -> Callable:
    return pytest.mark.parametrize("info", cases(test.__name__))(test)


def all_inputs(info: DanluInfo) -> list[OptimizerInput]:
    return _get_optim_inputs_including_global_cliquey_kwargs(DEVICE, DTYPE, info)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------------------------------
# Driving a step of any kind
# --------------------------------------------------------------------------------------------------


def take_step(info: DanluInfo, opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor]) -> Any:
    """One step on ``loss_fn()`` (a differentiable function of the current parameters), the way ``info``'s
    optimizer takes it; returns what ``step`` returns (or the loss for a plain step)."""
    opt.zero_grad()  # torch's loop; closure-driven wrappers refuse gradients that their closure did not make
    if info.kind == "grad":
        loss = loss_fn()
        loss.backward()
        opt.step()
        return loss
    if info.kind == "closure":
        return opt.step(loss_fn)  # the wrapper differentiates (and, for the penalty, re-evaluates) it
    if info.kind == "mgs":
        def surrogate():
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        return opt.step(surrogate, lambda: float(loss_fn()))
    if info.kind == "zo":
        return opt.step(loss_fn)  # run under no_grad: the loss without backward
    raise AssertionError(info.kind)


def linear_problem(contiguous: bool = True, shapes=((10, 5), 10)):
    (rows, cols), n = shapes
    if contiguous:
        weight = Parameter(torch.randn(rows, cols))
        bias = Parameter(torch.randn(n))
    else:
        weight = Parameter(torch.randn(rows, cols, 2)[..., 0])
        bias = Parameter(torch.randn(n, 2)[..., 0])
    x = torch.randn(cols)
    return weight, bias, x


def mv_loss(weight, bias, x) -> Callable[[], torch.Tensor]:
    return lambda: (weight.mv(x) + bias).pow(2).sum()


def zero_grad_loss(params) -> Callable[[], torch.Tensor]:
    """A loss whose gradient is exactly zero for every parameter (and whose value is constant)."""
    return lambda: sum((p * 0.0).sum() for p in params) + 1.0


def clone_param(p: torch.Tensor) -> Parameter:
    with torch.no_grad():
        return Parameter(p.detach().clone())


def named(params, is_named: bool):
    return [(f"name{i}", p) for i, p in enumerate(params)] if is_named else list(params)


def without_param_names(state_dict):
    sd = copy.deepcopy(state_dict)
    for group in sd["param_groups"]:
        group.pop("param_names", None)
    return sd


def step_schedulers(schedulers, loss):
    for scheduler in schedulers:
        if isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step(float(loss.detach()) if torch.is_tensor(loss) else float(loss))
        else:
            scheduler.step()


def conv_bn_model():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2, eps=1e-05, momentum=0.1))
    x = torch.rand(1, 4, 16, 16)
    return model, lambda: model(x).sum()


def assert_unchanged(info: DanluInfo, actual, expected, what: str) -> None:
    if info.drift:
        TC.assertEqual(actual, expected, msg=what)
    else:
        for a, e in zip(actual, expected):
            assert torch.equal(a, e), f"{what}: changed (max |Δ| {float((a - e).abs().max())})"


# --------------------------------------------------------------------------------------------------
# Errors (torch: test_errors)
# --------------------------------------------------------------------------------------------------

ERROR_CASES = []
for _info in DB:
    for _i, _e in enumerate(_info.optim_error_inputs_func(device=DEVICE, dtype=DTYPE)):
        _desc = _e.optimizer_error_input.desc
        ERROR_CASES.append(pytest.param(_info, _i, id=f"{_info.name}-{_i}-{_desc}"))


@pytest.mark.parametrize("info, index", ERROR_CASES)
def test_errors(info, index):
    """torch's test_errors: every ErrorOptimizerInput raises (or warns) its type, matching its regex,
    at construction or at step. torch's generic inputs (``get_error_inputs_for_all_optims``: bad params
    type, duplicate params, Tensor lr with more than one element, mixed named/unnamed params) come with
    torch's own messages; the rest are danlu's hyperparameter checks."""
    error_input = info.optim_error_inputs_func(device=DEVICE, dtype=DTYPE)[index]
    optim_input = error_input.optimizer_error_input
    params, kwargs = optim_input.params, optim_input.kwargs
    if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        if issubclass(error_input.error_type, Warning):
            with pytest.warns(error_input.error_type, match=error_input.error_regex):
                info.make(params, **kwargs)
        else:
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                info.make(params, **kwargs)
    else:
        opt = info.make(params, **kwargs)
        before = [p.detach().clone() for p in params]
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            opt.step()
        assert_unchanged(info, [p.detach() for p in params], before, "params after a refused step")


def test_error_inputs_include_torchs_generic_ones():
    """Each entry's error inputs start with torch's generic ones (so the list above can't drift away)."""
    generic = [e.optimizer_error_input.desc for e in get_error_inputs_for_all_optims(DEVICE, DTYPE)]
    assert "Tensor lr must be 1-element" in generic
    for info in DB:
        descs = [e.optimizer_error_input.desc for e in info.optim_error_inputs_func(device=DEVICE, dtype=DTYPE)]
        assert descs[: len(generic)] == generic, info.name


# --------------------------------------------------------------------------------------------------
# Direction, lr schedulers, tensor lr, param groups
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_lrsched", [True, False])
@pytest.mark.parametrize("contiguous", [True, False])
@for_each
def test_forloop_goes_right_direction(info, contiguous, with_lrsched):
    """torch's test_forloop_goes_right_direction: 20 steps (with each scheduler set of the entry, or
    none) lower the loss, on contiguous and non-contiguous parameters."""
    for schedulers_c in info.scheduler_inputs if with_lrsched else [None]:
        for optim_input in all_inputs(info):
            weight, bias, x = linear_problem(contiguous)
            opt = info.make([weight, bias], **optim_input.kwargs)
            schedulers = [s(opt) for s in (schedulers_c or [])]
            loss_fn = mv_loss(weight, bias, x)
            initial = loss_fn().item()
            for _ in range(20):
                loss = take_step(info, opt, loss_fn)
                step_schedulers(schedulers, loss)
            assert loss_fn().item() < initial, optim_input.desc


@for_each
def test_param_group_with_lrscheduler_goes_right_direction(info):
    """torch's test_param_group_with_lrscheduler_goes_right_direction: two param groups (one with its
    own lr) under each scheduler set; the loss goes down."""
    for schedulers_c in info.scheduler_inputs:
        weight, bias, x = linear_problem()
        opt = info.make([{"params": [weight]}, {"params": [bias], "lr": 0.01}])
        schedulers = [s(opt) for s in schedulers_c]
        loss_fn = mv_loss(weight, bias, x)
        initial = loss_fn().item()
        for _ in range(20):
            loss = take_step(info, opt, loss_fn)
            step_schedulers(schedulers, loss)
        assert loss_fn().item() < initial


SCHEDULES = {
    "StepLR": (lambda opt: StepLR(opt, step_size=2, gamma=0.5), lambda lr0, k: lr0 * 0.5 ** (k // 2)),
    "ExponentialLR": (lambda opt: ExponentialLR(opt, gamma=0.7), lambda lr0, k: lr0 * 0.7**k),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@for_each
def test_scheduler_direction_and_optimizer_follows(info, schedule):
    """Scheduler direction (beyond torch's goes-right-direction checks): the schedule lowers every
    group's lr as the scheduler's formula says, and the optimizer follows it: a twin whose lr is set
    by hand to the same values before each step takes bitwise the same steps, and a twin at constant
    lr does not."""
    make_sched, formula = SCHEDULES[schedule]
    n_steps = 6
    runs = {}
    for mode in ("scheduled", "by_hand", "constant"):
        torch.manual_seed(3)
        weight, bias, x = linear_problem()
        opt = info.make([weight, bias])
        sched = make_sched(opt) if mode == "scheduled" else None
        loss_fn = mv_loss(weight, bias, x)
        lrs, traj = [], []
        for k in range(n_steps):
            if mode == "by_hand":
                for group in opt.param_groups:
                    group["lr"] = runs["scheduled"]["lrs"][k]
            lrs.append(float(opt.param_groups[0]["lr"]))
            take_step(info, opt, loss_fn)
            if sched is not None:
                sched.step()
            traj.append(torch.cat([weight.detach().flatten(), bias.detach().flatten()]).clone())
        runs[mode] = {"lrs": lrs, "traj": traj}
    lrs = runs["scheduled"]["lrs"]
    lr0 = lrs[0]
    for k, lr in enumerate(lrs):
        assert math.isclose(lr, formula(lr0, k), rel_tol=1e-12), (k, lr, formula(lr0, k))
    assert all(b <= a for a, b in zip(lrs, lrs[1:])) and lrs[-1] < lrs[0]
    for k, (a, b) in enumerate(zip(runs["scheduled"]["traj"], runs["by_hand"]["traj"])):
        assert torch.equal(a, b), f"step {k}: the optimizer does not take the scheduled lr from its groups"
    assert not torch.equal(runs["scheduled"]["traj"][-1], runs["constant"]["traj"][-1]), \
        "the schedule had no effect on the steps"


@for_each
def test_tensor_lr(info):
    """torch's test_tensor_lr: a 0-d tensor lr takes the same steps as the float lr (torch's
    assertEqual tolerances), for every setting; and the steps do move the parameters."""
    for optim_input in all_inputs(info):
        weight, bias, x = linear_problem()
        weight_c, bias_c = clone_param(weight), clone_param(bias)
        start = [weight.detach().clone(), bias.detach().clone()]
        kwargs = dict(optim_input.kwargs)
        kwargs["lr"] = 1e-3
        opt_r = info.make([weight, bias], **kwargs)
        kwargs["lr"] = torch.tensor(1e-3)
        opt = info.make([weight_c, bias_c], **kwargs)
        assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
        for _ in range(5):
            take_step(info, opt_r, mv_loss(weight, bias, x))
            take_step(info, opt, mv_loss(weight_c, bias_c, x))
            TC.assertEqual(weight, weight_c)
            TC.assertEqual(bias, bias_c)
        assert not torch.equal(weight.detach(), start[0]), optim_input.desc


def _wd_groups(info, optim_input, weight, bias, wd):
    group_kwargs, ctor_kwargs = info.split(optim_input.kwargs)
    weight_kwargs = {**group_kwargs, "weight_decay": wd}
    bias_kwargs = {**group_kwargs, "weight_decay": 0.0}
    return info.make([dict(params=[weight], **weight_kwargs), dict(params=[bias], **bias_kwargs)], **ctor_kwargs)


@for_each
def test_param_groups_weight_decay(info):
    """torch's test_param_groups_weight_decay (a group with weight_decay, one without: the loss goes
    down) and, beyond it: the group with weight decay ends elsewhere than in a run without any."""
    for optim_input in all_inputs(info):
        wd = optim_input.kwargs.get("weight_decay") or 0.1
        finals = []
        for decay in (wd, 0.0):
            torch.manual_seed(5)
            weight, bias, x = linear_problem()
            opt = _wd_groups(info, optim_input, weight, bias, decay)
            loss_fn = mv_loss(weight, bias, x)
            initial = loss_fn().item()
            for _ in range(20):
                take_step(info, opt, loss_fn)
            assert loss_fn().item() < initial, optim_input.desc
            finals.append(weight.detach().clone())
        assert not torch.allclose(finals[0], finals[1]), f"{optim_input.desc}: weight_decay={wd} changed nothing"


@for_each
def test_weight_decay_group_shrinks_without_grads(info):
    """Param-group weight decay where nothing else moves the parameters (torch's
    test_step_is_noop_for_zero_grads skips weight decay because "params will decay even if grads are
    empty"; this checks that they do, by the decoupled factor): with all-zero gradients (for ZeroOrder a
    constant loss), k steps scale the decayed group by (1 − lr·λ)^k and leave the other group as it was."""
    checked = 0
    for optim_input in all_inputs(info):
        group_kwargs, _ = info.split(optim_input.kwargs)
        if any(group_kwargs.get(k) for k in ("extra_l2", "l1_budget")) or info.kind == "mgs" and \
                group_kwargs.get("noise_scale") == "constant":
            continue  # something else moves them without gradients
        weight, bias, _ = linear_problem()
        w0, b0 = weight.detach().clone(), bias.detach().clone()
        opt = _wd_groups(info, optim_input, weight, bias, 0.1)
        if getattr(opt, "accum_steps", getattr(getattr(opt, "optimizer", None), "accum_steps", 1)) != 1:
            continue  # decay is applied once per accumulation window; covered by the other settings
        lr = float(opt.param_groups[0]["lr"])
        k = 3
        for _ in range(k):
            if info.kind == "grad":
                weight.grad, bias.grad = torch.zeros_like(weight), torch.zeros_like(bias)
                opt.step()
            else:
                take_step(info, opt, zero_grad_loss([weight, bias]))
        TC.assertEqual(weight.detach(), w0 * (1 - lr * 0.1) ** k, msg=optim_input.desc)
        TC.assertEqual(bias.detach(), b0, msg=optim_input.desc)
        checked += 1
    assert checked, "no setting of this entry was checked"


@for_each
def test_param_groups_lr(info):
    """torch's test_param_groups_lr: the group with an lr lowers the loss, a group at lr 1e-28 (the
    outer default) with gradients does not move (torch's tolerances)."""
    for optim_input in all_inputs(info):
        kwargs = dict(optim_input.kwargs)
        if not kwargs.get("lr"):
            kwargs["lr"] = 1e-3
        group_kwargs, ctor_kwargs = info.split(kwargs)
        weight, bias, x = linear_problem()
        irrelevant = Parameter(torch.randn(2))
        irrelevant_clone = irrelevant.detach().clone()
        opt = info.make([dict(params=[weight, bias], **group_kwargs), dict(params=[irrelevant])],
                        **{**ctor_kwargs, "lr": 1e-28})
        main = mv_loss(weight, bias, x)

        def loss_fn():  # the irrelevant param gets a random gradient through the loss
            return main() + (irrelevant * torch.rand(2)).sum()

        initial = main().item()
        for _ in range(20):
            take_step(info, opt, loss_fn)
        assert main().item() < initial, optim_input.desc
        TC.assertEqual(irrelevant.detach(), irrelevant_clone)


@for_each
def test_step_is_noop_when_params_have_no_grad(info):
    """torch's test_step_is_noop_when_params_have_no_grad (which only checks that it runs): parameters
    with requires_grad=False are left bitwise as they were and get no state."""
    params = [torch.randn(2, 3, requires_grad=False) for _ in range(2)]
    old = [p.clone() for p in params]

    def closure():
        return torch.tensor([1.0])

    for optim_input in all_inputs(info):
        opt = info.make(params, **optim_input.kwargs)
        if info.kind == "mgs":
            opt.step(closure, lambda: 1.0)
        else:
            opt.step(closure)
        for p, o in zip(params, old):
            assert torch.equal(p, o), optim_input.desc
        assert all(len(opt.state[p]) == 0 for p in params), optim_input.desc


@for_each
def test_step_is_noop_for_zero_grads(info):
    """torch's test_step_is_noop_for_zero_grads: with all-zero gradients and no weight decay (nor
    another decay without gradients: extra_l2, l1_budget), a step leaves the parameter as it was
    (bitwise here; torch uses its tolerances)."""
    param = torch.randn((5, 1), requires_grad=True)
    old = param.detach().clone()
    checked = 0
    for optim_input in all_inputs(info):
        kwargs = dict(optim_input.kwargs)
        if any(kwargs.get(k) for k in ("weight_decay", "extra_l2", "l1_budget")):
            continue
        if info.optim_cls is danlu.ScaleAwareStep and kwargs.get("decay", True):
            continue  # its own decay ρ_t·θ applies without gradients (weight_decay's role here)
        if info.has_weight_decay:
            kwargs["weight_decay"] = 0.0  # AdamW's default is 1e-2 (torch lowers AdamW's lr instead)
        opt = info.make([param], **kwargs)
        for _ in range(2):
            if info.kind == "grad":
                param.grad = torch.zeros_like(param)
                opt.step()
            else:
                take_step(info, opt, zero_grad_loss([param]))
        assert_unchanged(info, [param.detach()], [old], optim_input.desc)
        checked += 1
    assert checked, "no setting of this entry was checked"


@for_each
def test_optimizer_can_be_printed(info):
    """torch's test_optimizer_can_be_printed, and the repr names the class and each group setting."""
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for optim_input in all_inputs(info):
        text = repr(info.make(params, **optim_input.kwargs))
        assert info.optim_cls.__name__ in text
        for key in info.split({**info.base_kwargs, **optim_input.kwargs})[0]:
            assert f"{key}:" in text, (key, text)


# --------------------------------------------------------------------------------------------------
# state_dict: determinism, serialisation, older/other formats
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("is_named_optim1", [True, False])
@pytest.mark.parametrize("is_named_optim0", [True, False])
@for_each
def test_state_dict_deterministic(info, is_named_optim0, is_named_optim1):
    """torch's test_state_dict_deterministic: prime 10 steps, load the state dict into a new optimizer
    over equal (not identical) parameters, run both 10 more steps: bitwise the same parameters (torch:
    its tolerances) at every step, equal state dicts (param_names aside), and repeated param groups
    are represented identically. Named and unnamed parameters, in all four combinations."""
    for optim_input in all_inputs(info):
        weight = Parameter(torch.randn(2, 3))
        bias = Parameter(torch.randn(2))
        x = torch.randn(3)
        opt = info.make(named([weight, bias], is_named_optim0), **optim_input.kwargs)
        for _ in range(10):
            take_step(info, opt, mv_loss(weight, bias, x))
        weight_c, bias_c = clone_param(weight), clone_param(bias)
        opt_c = info.make(named([weight_c, bias_c], is_named_optim1), **optim_input.kwargs)
        saved = copy.deepcopy(opt.state_dict())
        opt_c.load_state_dict(copy.deepcopy(saved))
        for k in range(10):
            take_step(info, opt, mv_loss(weight, bias, x))
            take_step(info, opt_c, mv_loss(weight_c, bias_c, x))
            assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c), f"{optim_input.desc}: step {k}"
        TC.assertEqual(without_param_names(opt.state_dict()), without_param_names(opt_c.state_dict()))
        opt_c.param_groups.extend(opt_c.param_groups)
        TC.assertEqual(without_param_names(opt.state_dict())["param_groups"][-1],
                       without_param_names(opt_c.state_dict())["param_groups"][-1])


@pytest.mark.parametrize("is_named_optim", [True, False])
@for_each
def test_save_load_equality_with_weights_only(info, is_named_optim):
    """torch's test_save_load_equality_with_weights_only: torch.save then torch.load, with and without
    weights_only=True, give back an equal state dict."""
    weight = Parameter(torch.randn(2, 3))
    bias = Parameter(torch.randn(2))
    x = torch.randn(3)
    for optim_input in all_inputs(info):
        opt = info.make(named([weight, bias], is_named_optim), **optim_input.kwargs)
        for _ in range(3):
            take_step(info, opt, mv_loss(weight, bias, x))
        sd = opt.state_dict()
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        TC.assertEqual(torch.load(buf, weights_only=False), sd)
        buf.seek(0)
        TC.assertEqual(torch.load(buf, weights_only=True), sd)


@for_each
def test_can_load_older_state_dict(info):
    """torch's test_can_load_older_state_dict: delete the group flags added after the first release
    (``not_og_supported_flags``: danlu's are Adafactor's ``relative_step``, converted on load, and the
    accumulation window position ``accum_micro_step``) and load; the optimizer still steps, to finite
    parameters."""
    for optim_input in all_inputs(info):
        model, loss_fn = conv_bn_model()
        opt = info.make(model.parameters(), **optim_input.kwargs)
        for _ in range(3):
            take_step(info, opt, loss_fn)
        old = copy.deepcopy(opt.state_dict())
        for group in old["param_groups"]:
            for flag in info.not_og_supported_flags:
                group.pop(flag, None)
        opt.load_state_dict(old)
        before = [p.detach().clone() for p in model.parameters()]
        for _ in range(3):  # a whole accumulation window (accum_steps <= 3 here) moves the parameters
            take_step(info, opt, loss_fn)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before)), optim_input.desc


@for_each
def test_torch_layout_state_dict_continues_identically(info):
    """Another format: what torch's own tools keep of a state dict (DCP's get/set_optimizer_state_dict,
    ZeroRedundancyOptimizer), only 'state' and 'param_groups' without danlu's top-level entries, loads
    into a fresh optimizer and continues bitwise like the original."""
    for optim_input in all_inputs(info):
        weight, bias, x = linear_problem(shapes=((2, 3), 2))
        opt = info.make([weight, bias], **optim_input.kwargs)
        for _ in range(4):
            take_step(info, opt, mv_loss(weight, bias, x))
        sd = copy.deepcopy(opt.state_dict())
        torch_layout = {"state": sd["state"], "param_groups": sd["param_groups"]}
        weight_c, bias_c = clone_param(weight), clone_param(bias)
        opt_c = info.make([weight_c, bias_c], **optim_input.kwargs)
        opt_c.load_state_dict(torch_layout)
        for k in range(4):
            take_step(info, opt, mv_loss(weight, bias, x))
            take_step(info, opt_c, mv_loss(weight_c, bias_c, x))
            assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c), f"{optim_input.desc}: step {k}"


@pytest.mark.parametrize("is_named_optim1", [True, False])
@pytest.mark.parametrize("is_named_optim0", [True, False])
@for_each
def test_can_load_from_to_named_state_dict(info, is_named_optim0, is_named_optim1):
    """torch's test_can_load_from_to_named_state_dict: a state dict saved with or without param names
    loads into an optimizer built with or without them, steps, and keeps the names when either side
    had them."""
    for optim_input in all_inputs(info):
        model, loss_fn = conv_bn_model()
        opt = info.make(model.named_parameters() if is_named_optim0 else model.parameters(), **optim_input.kwargs)
        for _ in range(3):
            take_step(info, opt, loss_fn)
        old = copy.deepcopy(opt.state_dict())
        opt2 = info.make(model.named_parameters() if is_named_optim1 else model.parameters(), **optim_input.kwargs)
        opt2.load_state_dict(old)
        take_step(info, opt2, loss_fn)
        if is_named_optim0 or is_named_optim1:
            assert opt2.state_dict()["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
        else:
            assert "param_names" not in opt2.state_dict()["param_groups"][0]


def _quadratic(params, targets):
    return lambda: sum(((p - t) ** 2).sum() for p, t in zip(params, targets))


@for_each
def test_load_nontensor_step(info):
    """torch's test_load_nontensor_step: a state dict whose ``step`` entries are Python numbers (torch's
    older layout) loads and steps; beyond torch's: ``step`` is the 0-d float32 tensor again, and the
    continuation equals that from the unconverted dict."""
    assert info.has_step
    for optim_input in all_inputs(info):
        params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
        targets = [torch.randn(2, 3) for _ in range(2)]
        opt = info.make(params, **optim_input.kwargs)
        for _ in range(3):
            take_step(info, opt, _quadratic(params, targets))
        state_dict = copy.deepcopy(opt.state_dict())
        steps = {i: float(st["step"]) for i, st in state_dict["state"].items()}
        assert all(n >= 1 for n in steps.values())
        converted = 0
        for p_state in state_dict["state"].values():
            assert torch.is_tensor(p_state["step"]) and p_state["step"].dtype == torch.float32
            p_state["step"] = p_state["step"].item()
            converted += 1
        assert converted == len(params)
        twins = []
        for sd in (state_dict, copy.deepcopy(opt.state_dict())):
            ps = [clone_param(p) for p in params]
            o = info.make(ps, **optim_input.kwargs)
            o.load_state_dict(copy.deepcopy(sd))
            for i, p in enumerate(ps):
                step = o.state[p]["step"]
                assert torch.is_tensor(step) and step.dtype == torch.float32 and step.dim() == 0
                assert float(step) == steps[i]
            for _ in range(2):
                take_step(info, o, _quadratic(ps, targets))
            twins.append(ps)
        for a, b in zip(*twins):
            assert torch.equal(a, b), optim_input.desc
        opt.load_state_dict(state_dict)
        take_step(info, opt, _quadratic(params, targets))


@for_each
def test_non_empty_state(info):
    """torch's test_non_empty_state: after a step every parameter's state has entries."""
    for optim_input in all_inputs(info):
        model = torch.nn.Linear(5, 5)
        x = torch.rand(2, 5)
        opt = info.make(model.parameters(), **optim_input.kwargs)
        take_step(info, opt, lambda: model(x).sum())
        assert len(opt.state) == 2
        for state in opt.state.values():
            assert len(state) > 0


@for_each
def test_deepcopy_copies_all_public_attrs(info):
    """torch's test_deepcopy_copies_all_public_attrs."""
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    targets = [torch.randn(2, 3) for _ in range(2)]

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    for optim_input in all_inputs(info):
        opt = info.make(params, **optim_input.kwargs)
        for _ in range(3):
            take_step(info, opt, _quadratic(params, targets))
        assert public(opt) == public(copy.deepcopy(opt))


# --------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------


def _state_dict_pre_hook(optimizer) -> None:
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer, state_dict):
    if "test" in state_dict["state"]:
        state_dict["state"].pop("test")
        state_dict["ran_state_dict_pre_hook"] = True
    else:
        state_dict["ran_state_dict_pre_hook"] = False
    return state_dict


def _load_state_dict_pre_hook1(optimizer, state_dict) -> None:
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_state_dict_pre_hook2(optimizer, state_dict):
    my_state_dict = copy.deepcopy(state_dict)
    my_state_dict["param_groups"][0]["lr"] = 0.003
    return my_state_dict


def _load_state_dict_post_hook(optimizer) -> None:
    # bool(): torch's hook, made to hold for a tensor lr too (tensor == float is a tensor)
    optimizer.state["ran_load_state_dict_pre_hook2"] = bool(optimizer.param_groups[0]["lr"] == 0.003)
    optimizer.state["ran_load_state_dict_post_hook"] = True


def _one_param_optims(info):
    for optim_input in all_inputs(info):
        param = torch.rand(2, 3, requires_grad=True)
        yield optim_input, info.make([param], **optim_input.kwargs)


@for_each
def test_state_dict_pre_hook(info):
    """torch's test_state_dict_pre_hook."""
    for _, opt in _one_param_optims(info):
        opt.register_state_dict_pre_hook(_state_dict_pre_hook)
        assert opt.state_dict()["state"]["test"] == 1


@for_each
def test_state_dict_post_hook(info):
    """torch's test_state_dict_post_hook."""
    for _, opt in _one_param_optims(info):
        opt.register_state_dict_post_hook(_state_dict_post_hook)
        assert opt.state_dict()["ran_state_dict_pre_hook"] is False


@for_each
def test_state_dict_pre_post_hook(info):
    """torch's test_state_dict_pre_post_hook."""
    for _, opt in _one_param_optims(info):
        opt.register_state_dict_pre_hook(_state_dict_pre_hook)
        opt.register_state_dict_post_hook(_state_dict_post_hook)
        sd = opt.state_dict()
        assert "test" not in sd["state"]
        assert sd["ran_state_dict_pre_hook"] is True


@for_each
def test_state_dict_post_hook_result_is_returned(info):
    """The state-dict post-hook contract (torch: "may modify the state_dict inplace or optionally return
    a new one"): the hook sees the complete state dict, and what it returns is what state_dict()
    returns. A hook that converts to torch's bare layout gets exactly that back."""
    for _, opt in _one_param_optims(info):
        expected_keys = set(opt.state_dict())
        seen = []

        def post_hook(optimizer, state_dict):
            seen.append(set(state_dict))
            return {"state": state_dict["state"], "param_groups": state_dict["param_groups"], "converted": True}

        opt.register_state_dict_post_hook(post_hook)
        sd = opt.state_dict()
        assert seen == [expected_keys], "the post-hook did not see the whole state dict"
        assert set(sd) == {"state", "param_groups", "converted"}, sorted(sd)


@for_each
def test_load_state_dict_pre_hook_and_prepend(info):
    """torch's test_load_state_dict_pre_hook_and_prepend."""
    for _, opt in _one_param_optims(info):
        state_dict = opt.state_dict()
        opt.register_load_state_dict_pre_hook(_load_state_dict_pre_hook1)
        opt.load_state_dict(state_dict)
        assert opt.param_groups[0]["lr"] == 0.002
        opt.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2, prepend=True)
        opt.load_state_dict(state_dict)
        # With prepend, hook2 runs first and hook1 (run on its result) overrides it.
        assert opt.param_groups[0]["lr"] == 0.002


@for_each
def test_load_state_dict_post_hook(info):
    """torch's test_load_state_dict_post_hook."""
    for _, opt in _one_param_optims(info):
        opt.register_load_state_dict_post_hook(_load_state_dict_post_hook)
        opt.load_state_dict(opt.state_dict())
        assert opt.state["ran_load_state_dict_pre_hook2"] is False
        assert opt.state["ran_load_state_dict_post_hook"] is True


@for_each
def test_load_state_dict_pre_post_hook(info):
    """torch's test_load_state_dict_pre_post_hook."""
    for _, opt in _one_param_optims(info):
        opt.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2)
        opt.register_load_state_dict_post_hook(_load_state_dict_post_hook)
        opt.load_state_dict(opt.state_dict())
        assert opt.state["ran_load_state_dict_pre_hook2"] is True
        assert opt.state["ran_load_state_dict_post_hook"] is True


@for_each
def test_load_state_dict_pre_hook_converts_before_checks(info):
    """A load pre-hook runs first (torch runs them before anything else), so it can convert a dict in a
    format the optimizer would refuse: here one whose 'state'/'param_groups' sit under other names."""
    weight, bias, x = linear_problem(shapes=((2, 3), 2))
    opt = info.make([weight, bias])
    for _ in range(2):
        take_step(info, opt, mv_loss(weight, bias, x))
    sd = copy.deepcopy(opt.state_dict())
    old_format = {("old_" + k if k in ("state", "param_groups") else k): v for k, v in sd.items()}

    def convert(optimizer, state_dict):
        return {k.removeprefix("old_"): v for k, v in state_dict.items()}

    opt2 = info.make([clone_param(weight), clone_param(bias)])
    opt2.register_load_state_dict_pre_hook(convert)
    opt2.load_state_dict(old_format)
    TC.assertEqual(opt2.state_dict(), sd)


@for_each
def test_load_state_dict_post_hook_sees_loaded_state(info):
    """A load post-hook runs once loading is done (torch: after __setstate__ has converted a Python-
    number ``step``): it sees the state as load_state_dict leaves it, here ``step`` as the 0-d float32
    tensor, for a state dict with Python-number steps."""
    params = [Parameter(torch.randn(2, 3))]
    targets = [torch.randn(2, 3)]
    opt = info.make(params)
    for _ in range(2):
        take_step(info, opt, _quadratic(params, targets))
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        st["step"] = float(st["step"])
    opt2 = info.make([clone_param(params[0])])
    seen = []
    opt2.register_load_state_dict_post_hook(
        lambda o: seen.extend((type(st["step"]), getattr(st["step"], "dtype", None)) for st in o.state.values()))
    opt2.load_state_dict(sd)
    final = [(type(st["step"]), getattr(st["step"], "dtype", None)) for st in opt2.state.values()]
    assert final == [(torch.Tensor, torch.float32)]
    assert seen == final


@for_each
@pytest.mark.parametrize("when", ["pre", "post"])
def test_step_pre_and_post_hook(info, when):
    """torch's test_step_pre_hook and test_step_post_hook: each of two steps runs the hook once; after
    ``handle.remove()`` it runs no more."""
    def hook(opt, args, kwargs):
        nonlocal data
        data += 2

    weight, bias, x = linear_problem()
    start = 5 if when == "pre" else 2
    for optim_input in all_inputs(info):
        opt = info.make([weight, bias], **optim_input.kwargs)
        data = start
        register = opt.register_step_pre_hook if when == "pre" else opt.register_step_post_hook
        handle = register(hook)
        take_step(info, opt, mv_loss(weight, bias, x))
        take_step(info, opt, mv_loss(weight, bias, x))
        assert data == start + 4
        handle.remove()
        take_step(info, opt, mv_loss(weight, bias, x))
        assert data == start + 4


@for_each
def test_step_all_hooks(info):
    """torch's test_step_all_hooks: global hooks (register_optimizer_step_pre/post_hook) around local
    ones, for this optimizer and for a torch SGD: 0 (global pre), 1 (local pre), 2 (local post), 5
    (global post). A wrapper's inner optimizer is an optimizer too: the global hooks also fire around
    its step, nested inside the wrapper's (as for torch's ZeroRedundancyOptimizer)."""
    data = []
    weight, bias, x = linear_problem()
    one = [0, 1] + [0, 5] * info.inner_steps + [2, 5]
    for optim_input in all_inputs(info):
        opt = info.make([weight, bias], **optim_input.kwargs)
        opt2 = torch.optim.SGD([weight, bias], lr=1e-3)
        data = []
        handles = [
            register_optimizer_step_pre_hook(lambda o, a, k: data.append(0)),
            register_optimizer_step_post_hook(lambda o, a, k: data.append(5)),
        ]
        try:
            handles += [
                opt.register_step_pre_hook(lambda o, a, k: data.append(1)),
                opt.register_step_post_hook(lambda o, a, k: data.append(2)),
                opt2.register_step_pre_hook(lambda o, a, k: data.append(1)),
                opt2.register_step_post_hook(lambda o, a, k: data.append(2)),
            ]
            take_step(info, opt, mv_loss(weight, bias, x))
            assert data == one
            opt2.step()
            assert data == one + [0, 1, 2, 5]
            take_step(info, opt, mv_loss(weight, bias, x))
            assert data == one + [0, 1, 2, 5] + one
        finally:
            for h in handles:
                h.remove()
        take_step(info, opt, mv_loss(weight, bias, x))
        opt2.step()
        assert data == one + [0, 1, 2, 5] + one


def test_every_danlu_optimizer_is_covered():
    """The DB covers every optimizer class danlu exports (a new one must be added here)."""
    exported = {getattr(danlu, n) for n in danlu.__all__ if isinstance(getattr(danlu, n), type)
                and issubclass(getattr(danlu, n), torch.optim.Optimizer)}
    assert exported == {info.optim_cls for info in DB}


def test_tracker_compares_like_torch():
    """TensorTracker (torch's helper for stepwise comparisons) with this file's TestCase: a sanity check
    that torch's assertEqual machinery is live here (a wrong value must fail)."""
    tracker = TensorTracker()
    tracker.add(torch.ones(2))
    with pytest.raises(AssertionError):
        tracker.pop_check_set(torch.zeros(2), TC)
    assert tracker.all_popped()


def test_skip_and_xfail_keys_name_real_tests():
    """Every skip/xfail key names a test of this file that is parametrized over the DB (a typo would
    otherwise silently run a check that was meant to be skipped, or drop an xfail)."""
    tests = {name for name, obj in globals().items() if name.startswith("test_") and callable(obj)
             and any(m.name == "parametrize" and m.args[0] == "info" for m in getattr(obj, "pytestmark", []))}
    for info in DB:
        assert set(info.skips) <= tests, (info.name, set(info.skips) - tests)
        assert set(info.xfails) <= tests, (info.name, set(info.xfails) - tests)
        assert not set(info.skips) & set(info.xfails), info.name
