"""One spec per exported danlu optimizer: what the shared battery (tests/test_battery.py) runs.

Each :class:`OptimSpec` says how to build the optimizer so that it trains a small problem well
(``kwargs``), which constructions must fail and how (``bad``), which extra settings to run the battery
on as well (``variants``) and which battery tests do not apply (``skips``, always with a reason).

Adding an optimizer to ``danlu.__all__`` without an entry here fails
``test_battery.py::test_every_exported_optimizer_is_enrolled``. A wrapper (a subclass of
``danlu._core.wrapper.OptimizerWrapper``) has one entry per inner optimizer, named
``"<Wrapper>[<inner>]"``, at least one for each of :data:`WRAPPER_INNERS`; its ``factory`` builds the
inner optimizer from the params and the keys of ``kwargs`` that are not the wrapper's, then wraps it.

Skip keys are a battery test's function name (skips it for every variant of the spec) or
``"<test name>/<variant>"`` (skips it for that variant only; the base settings are variant ``"default"``),
either optionally followed by ``"@<value>"``: only where another parameter of the test is that string
(e.g. a layout) or the spec of that name (e.g. the source of a foreign state dict).
``test_battery.py::test_skip_keys_name_real_tests`` checks that every key names a real test, variant
and value.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple

import torch

import danlu

__all__ = ["Bad", "OptimSpec", "Config", "OPTIM_DB", "WRAPPER_INNERS", "configs", "spec_by_name"]


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
    # How the battery calls ``step`` with its closure where ``requires_closure``; None: ``opt.step(closure)``.
    step_with: Callable[[torch.optim.Optimizer, Callable], Any] | None = None
    # The closure returns the loss WITHOUT backward (derivative-free optimizers).
    zeroth_order: bool = False
    # No per-parameter state (ZeroOrder's only state is its generator): state checks do not apply.
    stateless: bool = False
    # Final loss must be below this fraction of the initial loss on the battery's MLP regression.
    loss_ratio: float = 0.3
    # How to build it: ``factory(params, **kwargs)``; None means ``cls(params, **kwargs)``. Every
    # construction in the battery goes through :meth:`build`.
    factory: Callable[..., torch.optim.Optimizer] | None = None
    # For a wrapper: the class of the inner optimizer its factory builds.
    inner: type | None = None
    # State entries of ``cls`` kept in float32 for 16-bit params by design (documented); the rest of
    # the state must have the param's dtype.
    acc_state: frozenset[str] = frozenset()

    def step(self, opt: torch.optim.Optimizer, closure: Callable) -> Any:
        """``opt.step(closure)`` the spec's way: through ``step_with`` where set, and with the
        closure's ``backward`` a no-op for a zeroth-order spec (see :func:`loss_only`)."""
        if self.zeroth_order:
            closure = loss_only(closure)
        return (self.step_with or (lambda o, c: o.step(c)))(opt, closure)

    def build(self, params: Any, **kwargs: Any) -> torch.optim.Optimizer:
        return (self.factory or self.cls)(params, **kwargs)

    def skip_reason(self, test_name: str, variant: str = "default", values: Iterable[str] = ()) -> str | None:
        """The reason to skip ``test_name`` for ``variant`` where the test's other parameters are
        ``values`` (strings, and the names of specs), or None."""
        keys = [f"{test_name}/{variant}@{v}" for v in values] + [f"{test_name}@{v}" for v in values]
        keys += [f"{test_name}/{variant}", test_name]
        return next((self.skips[k] for k in keys if k in self.skips), None)


@dataclass(frozen=True)
class Config:
    """One runnable setting: a spec with a variant's kwargs merged over the base kwargs."""

    spec: OptimSpec
    variant: str
    kwargs: dict[str, Any]

    @property
    def id(self) -> str:
        return self.spec.name if self.variant == "default" else f"{self.spec.name}-{self.variant}"

    def skip_reason(self, test_name: str, values: Iterable[str] = ()) -> str | None:
        return self.spec.skip_reason(test_name, self.variant, values)

    def make(self, params: Any, **overrides: Any):
        return self.spec.build(params, **{**self.kwargs, **overrides})


def loss_only(closure: Callable) -> Callable:
    """The battery's closure with ``backward`` a no-op: what a zeroth-order optimizer's closure is."""
    from unittest import mock

    def run():
        with mock.patch.object(torch.Tensor, "backward", lambda self, *a, **k: None):
            return closure()

    return run


def _lr_weight_decay_cases(wd_name: str = "weight_decay") -> list[Bad]:
    return [
        Bad({"lr": -1e-3}, ValueError, r"^Invalid lr: -0\.001 \(expected a number in \[0, inf\]\)$"),
        Bad({"lr": float("nan")}, ValueError, r"^Invalid lr: nan \(expected a finite number"),
        Bad({"lr": "1e-3"}, TypeError, r"^Invalid lr: '1e-3' \(expected a real number\)$"),
        # A 0-d (or 1-element) tensor lr is accepted, as in torch.optim; more elements are not.
        Bad({"lr": torch.tensor([1e-3, 1e-3])}, ValueError, r"^Invalid lr: tensor\(\[0\.0010, 0\.0010\]\) \(expected a "
            r"number or a 1-element tensor: Tensor lr must be 1-element\)$"),
        Bad({"lr": torch.tensor(1)}, TypeError, r"^Invalid lr: tensor\(1\) \(expected a floating-point tensor"),
        Bad({"lr": torch.tensor(-1e-3)}, ValueError, r"^Invalid lr: -0\.001"),
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


def _sync_window_cases() -> list[Bad]:
    """sync_window (Lion, Tiger, SGDM): a bool, with accum_steps > 1 and an initialized process group."""
    return [
        Bad({"sync_window": "yes", "accum_steps": 2}, TypeError, r"^Invalid sync_window: 'yes' \(expected a bool\)$",
            in_group=False),
        Bad({"sync_window": True}, ValueError, r"^Invalid sync_window: True \(expected False with accum_steps=1",
            in_group=False),
        Bad({"sync_window": True, "accum_steps": 2}, ValueError,
            r"^Invalid sync_window: True \(expected an initialized torch\.distributed process group", in_group=False),
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
    + _sync_window_cases()
    + [Bad({"betas": (0.9, 0.0), "accum_steps": 2}, ValueError,
           r"^Invalid betas: \(0\.9, 0\.0\) \(expected betas\[1\] > 0",
           in_group=False)],
    variants={"weight_decay": dict(weight_decay=0.1), "accum": dict(accum_steps=2)},
)

TIGER = OptimSpec(
    name="Tiger",
    cls=danlu.Tiger,
    kwargs=dict(lr=3e-3, beta=0.9),
    bad=_lr_weight_decay_cases() + _beta_cases() + _accum_cases() + _sync_window_cases() + [
        Bad({"lr_scale": "row"}, ValueError, r"^Invalid lr_scale: 'row' \(expected one of None, 'rms', 'row_rms'\)$"),
        Bad({"lr_scale": 1}, TypeError, r"^Invalid lr_scale: 1 \(expected one of None, 'rms', 'row_rms'\)$"),
        Bad({"on_nan": "zero"}, ValueError, r"^Invalid on_nan: 'zero' \(expected one of 'propagate', 'skip'\)$"),
        Bad({"shrink": 0.0}, ValueError, r"^Invalid shrink: 0\.0 \(expected a number in \(0, 1\]\)$"),
        Bad({"shrink": 1.5}, ValueError, r"^Invalid shrink: 1\.5 \(expected a number in \(0, 1\]\)$"),
        Bad({"shrink_center": float("nan")}, ValueError, r"^Invalid shrink_center: nan"),
    ],
    variants={"weight_decay": dict(weight_decay=0.1), "accum": dict(accum_steps=2, weight_decay=0.1),
              # Su's recipe: lr relative to RMS(θ) (here one lr for every tensor), NaN skip-and-shrink.
              "recipe": dict(lr=3e-2, lr_scale="rms", on_nan="skip", weight_decay=0.01),
              "recipe_accum": dict(lr=3e-2, lr_scale="row_rms", on_nan="skip", accum_steps=2)},
    skips={key: ("on_nan='skip' skips a tensor's step on a non-finite gradient and shrinks it instead of "
                 "propagating the NaN (Su's strategy); tests/test_tiger_recipe.py checks that contract")
           for key in ("test_nonfinite_grad_shows_in_params/recipe",
                       "test_nonfinite_grad_shows_in_params/recipe_accum")},
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
    # A float lr without relative_step is the absolute ρ.
    kwargs=dict(lr=2e-2),
    bad=_lr_weight_decay_cases()
    + [
        Bad({"decay_rate": 0.0}, ValueError, r"^Invalid decay_rate: 0\.0 \(expected a number in \(0, 1\)\)$"),
        Bad({"shard_statistics": "global"}, ValueError,
            r"^Invalid shard_statistics: 'global' \(expected 'exact' or 'local'\)$"),
        Bad({"decay_rate": -0.8}, ValueError, r"^Invalid decay_rate: -0\.8 "),
        # 0 < c < 1 (kexue.fm/archives/7302): c = 1 weights all past gradients equally, c > 1 the old ones more.
        Bad({"decay_rate": 1.0}, ValueError, r"^Invalid decay_rate: 1\.0 \(expected a number in \(0, 1\)\)$"),
        Bad({"decay_rate": 1.5}, ValueError, r"^Invalid decay_rate: 1\.5 \(expected a number in \(0, 1\)\)$"),
        Bad({"eps": (-1e-30, 1e-3)}, ValueError, r"^Invalid eps\[0\]: -1e-30 \(expected a number in \[0, inf\]\)$"),
        Bad({"eps": (1e-30, -1e-3)}, ValueError, r"^Invalid eps\[1\]: -0\.001 \(expected a number in \[0, inf\]\)$"),
        Bad({"eps": 1e-30}, TypeError, r"^Invalid eps: 1e-30 \(expected a pair"),
        Bad({"beta1": 1.0}, ValueError, r"^Invalid beta1: 1\.0 \(expected a number in \[0, 1\)\)$"),
        Bad({"clip_threshold": 0.0}, ValueError, r"^Invalid clip_threshold: 0\.0 "),
        Bad({"scale_parameter": 1}, TypeError, r"^Invalid scale_parameter: 1 \(expected a bool\)$"),
        Bad({"min_dim_size_to_factor": 128.0}, TypeError,
            r"^Invalid min_dim_size_to_factor: 128\.0 \(expected an int\)$"),
        Bad({"min_dim_size_to_factor": 0}, ValueError, r"^Invalid min_dim_size_to_factor: 0 "),
    ],
    variants={
        # lr unset: the paper's relative step min(1e-2, 1/√t), with lr = 1e-2 the cap a scheduler scales
        # (see test_adafactor_relative_step_*).
        "relative_step": dict(lr=None),
        "relative_step_cap": dict(lr=2e-2, relative_step=True, beta1=0.9),
        "momentum_wd": dict(beta1=0.9, weight_decay=1e-2),
        # The battery's tensors are far below the default threshold 128: force the factored path.
        "factored": dict(min_dim_size_to_factor=2, beta1=0.5),
        "unscaled": dict(lr=1e-2, scale_parameter=False),
    },
    skips={},
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
        Bad({"shard_statistics": None}, ValueError,
            r"^Invalid shard_statistics: None \(expected 'exact' or 'local'\)$"),
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
    + _sync_window_cases()
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

EGD = OptimSpec(
    name="EGD",
    cls=danlu.EGD,
    # The battery's parameters have both signs: EG± (signed=True). Positive/simplex modes: tests/test_eg.py.
    kwargs=dict(lr=0.3, signed=True),
    bad=[
        Bad({"lr": -0.1}, ValueError, r"^Invalid lr: -0\.1 \(expected a number in \[0, inf\]\)$"),
        Bad({"lr": float("nan")}, ValueError, r"^Invalid lr: nan \(expected a finite number"),
        Bad({"lr": "0.1"}, TypeError, r"^Invalid lr: '0\.1' \(expected a real number\)$"),
        Bad({"signed": 1}, TypeError, r"^Invalid signed: 1 \(expected a bool\)$"),
        Bad({"clamp": 0.0}, ValueError, r"^Invalid clamp: 0\.0 \(expected a number in \(0, inf\]\)$"),
        Bad({"delta": -1.0}, ValueError, r"^Invalid delta: -1\.0 \(expected a number in \(0, inf\]\)$"),
        Bad({"simplex_dim": 0}, ValueError, r"^Invalid simplex_dim: 0 \(expected None with signed=True"),
        Bad({"simplex_dim": 1.0}, TypeError, r"^Invalid simplex_dim: 1\.0 \(expected None or an int\)$"),
        Bad({"signed": False, "simplex_dim": 2}, ValueError,
            r"^Invalid simplex_dim: 2 \(dim 2 does not exist in a parameter of shape \(3, 4\)\)$"),
        Bad({"signed": False}, ValueError,
            r"^Invalid params\[0\]: shape \(3, 4\), min 0\.0 \(expected every entry > 0"),
        Bad({"signed": False, "l1_budget": 1.0}, ValueError,
            r"^Invalid l1_budget: 1\.0 \(expected None with signed=False"),
        Bad({"weight_decay": 0.1}, TypeError, r"unexpected keyword argument 'weight_decay'", in_group=False),
        Bad({"foo": 1}, TypeError, r"unexpected keyword argument 'foo'", in_group=False),
    ],
    variants={"small_delta": dict(lr=1.0, delta=0.01)},
)


# --- wrappers: one entry per (wrapper, inner optimizer) ----------------------------------------------

# Every wrapper is enrolled with (at least) each of these as its inner optimizer.
WRAPPER_INNERS: dict[str, type] = {
    "SGDM": danlu.SGDM,
    "AdamW": danlu.AdamW,
    "Lion": danlu.Lion,
    "torch-SGD": torch.optim.SGD,
}

# The inner optimizers' settings on the battery's MLP (those of the plain entries above; torch's SGD
# like SGDM).
_INNER_KWARGS: dict[str, dict[str, Any]] = {
    "SGDM": dict(lr=0.3, momentum=0.9),
    "AdamW": dict(lr=1e-2),
    "Lion": dict(lr=3e-3, betas=(0.9, 0.99)),
    "torch-SGD": dict(lr=0.3, momentum=0.9),
}


def _inner_bad(inner: str) -> list[Bad]:
    """The inner optimizer's errors a wrapper entry checks. ``in_group``: a danlu optimizer validates a
    group added later (through the wrapper's add_param_group); torch.optim.SGD validates only in __init__."""
    unknown = Bad({"foo": 1}, TypeError, r"unexpected keyword argument 'foo'", in_group=False)
    if inner == "torch-SGD":
        return [Bad({"lr": -1e-3}, ValueError, r"^Invalid learning rate: -0\.001$", in_group=False), unknown]
    return [
        Bad({"lr": -1e-3}, ValueError, r"^Invalid lr: -0\.001 \(expected a number in \[0, inf\]\)$"),
        Bad({"lr": "1e-3"}, TypeError, r"^Invalid lr: '1e-3' \(expected a real number\)$"),
        unknown,
    ]


def _wrapper_factory(wrapper: type, inner: type) -> Callable[..., torch.optim.Optimizer]:
    """``factory(params, **kwargs)``: the wrapper's own keywords go to the wrapper, the rest to
    ``inner(params, ...)``. ``optimizer=x`` wraps ``x`` instead (to check what a wrapper refuses)."""
    own = [n for n in inspect.signature(wrapper).parameters if n not in ("optimizer", "params")]
    # MGS(params, optimizer, ...): params=None searches all of the inner optimizer's parameters.
    lead = (None,) if "params" in inspect.signature(wrapper).parameters else ()

    def factory(params: Any, *, optimizer: Any = None, **kwargs: Any) -> torch.optim.Optimizer:
        wrapper_kwargs = {k: kwargs.pop(k) for k in own if k in kwargs}
        if optimizer is None:
            optimizer = inner(params, **kwargs)
        return wrapper(*lead, optimizer, **wrapper_kwargs)

    return factory


def _not_an_optimizer(wrapper: type) -> Bad:
    # A common slip: passing the optimizer class instead of an instance.
    return Bad({"optimizer": torch.optim.SGD}, TypeError,
               rf"^{wrapper.__name__} wraps a torch\.optim\.Optimizer, got type; build the optimizer first",
               in_group=False)


_TORCH_SGD_NO_LOAD_CHECKS = (
    "torch.optim.SGD.load_state_dict checks only the number of param groups and of params per group: "
    "as the inner optimizer it takes another optimizer's state dict (and invalid hyperparameters) as is; "
    "the wrapper's own part is checked, see the other inners"
)


def _wrapper_specs(
    wrapper: type,
    wrapper_kwargs: dict[str, Any],
    bad: list[Bad],
    *,
    variants: dict[str, dict[str, dict[str, Any]]] | None = None,
    skips: dict[str, dict[str, str]] | None = None,
    **spec_fields: Any,
) -> list[OptimSpec]:
    """One spec per inner optimizer in :data:`WRAPPER_INNERS`; ``variants``/``skips`` are keyed by the
    inner's label. torch.optim.SGD entries get the skips of :data:`_TORCH_SGD_NO_LOAD_CHECKS`."""
    specs = []
    for label, inner in WRAPPER_INNERS.items():
        name = f"{wrapper.__name__}[{label}]"
        my_skips = dict((skips or {}).get(label, {}))
        if label == "torch-SGD":
            my_skips["test_state_dict_with_invalid_hyperparameter_is_refused"] = _TORCH_SGD_NO_LOAD_CHECKS
            if wrapper in (danlu.GradientPenalty, danlu.MGS, danlu.ChiGated):
                # No per-parameter entries of its own: a torch optimizer's dict passes to SGD as is.
                my_skips["test_state_dict_from_torch_optimizer_is_refused"] = _TORCH_SGD_NO_LOAD_CHECKS
            # The same wrapper around another inner: the wrapper's part matches, the inner's is not checked.
            for other in WRAPPER_INNERS:
                if other != label:
                    key = f"test_state_dict_from_other_danlu_optimizer_is_refused@{wrapper.__name__}[{other}]"
                    my_skips[key] = _TORCH_SGD_NO_LOAD_CHECKS
        specs.append(OptimSpec(
            name=name,
            cls=wrapper,
            kwargs={**_INNER_KWARGS[label], **wrapper_kwargs},
            bad=_inner_bad(label) + bad + [_not_an_optimizer(wrapper)],
            variants=dict((variants or {}).get(label, {})),
            skips=my_skips,
            factory=_wrapper_factory(wrapper, inner),
            inner=inner,
            **spec_fields,
        ))
    return specs


EG_STEP_SIZE = _wrapper_specs(
    danlu.EGStepSize,
    dict(meta_lr=0.05),
    [
        Bad({"meta_lr": -0.1}, ValueError, r"^Invalid meta_lr: -0\.1 \(expected a number in \[0, inf\]\)$",
            in_group=False),
        Bad({"meta_lr": "0.1"}, TypeError, r"^Invalid meta_lr: '0\.1' \(expected a real number\)$", in_group=False),
        Bad({"form": "adam"}, ValueError, r"^Invalid form: 'adam' \(expected one of 'su', 'paper'\)$", in_group=False),
        Bad({"granularity": "row"}, ValueError,
            r"^Invalid granularity: 'row' \(expected one of 'coordinate', 'tensor', 'group'\)$", in_group=False),
        Bad({"granularity": 1}, TypeError, r"^Invalid granularity: 1 \(expected one of 'coordinate'", in_group=False),
        Bad({"normalize": "l2"}, ValueError, r"^Invalid normalize: 'l2' \(expected one of None, 'cosine'\)$",
            in_group=False),
        Bad({"max_exponent": 0.0}, ValueError, r"^Invalid max_exponent: 0\.0 \(expected a number in \(0, inf\]\)$",
            in_group=False),
        Bad({"nu_min": 0.0}, ValueError, r"^Invalid nu_min: 0\.0 \(expected a number in \(0, 1\]\)$", in_group=False),
        Bad({"nu_max": 0.5}, ValueError, r"^Invalid nu_max: 0\.5 \(expected a number in \[1, inf\]\)$", in_group=False),
        Bad({"scale_min": 2.0}, ValueError, r"^Invalid scale_min: 2\.0 \(expected a number in \(0, 1\]\)$",
            in_group=False),
        Bad({"beta": 0.9}, ValueError, r"^Invalid beta: 0\.9 \(expected None with form='su'", in_group=False),
        Bad({"scale_meta_lr": 0.1}, ValueError, r"^Invalid scale_meta_lr: 0\.1 \(expected None with form='su'",
            in_group=False),
        Bad({"form": "paper", "beta": 1.0}, ValueError, r"^Invalid beta: 1\.0 \(expected a number in \[0, 1\)\)$",
            in_group=False),
        Bad({"form": "paper", "scale_meta_lr": -1.0}, ValueError,
            r"^Invalid scale_meta_lr: -1\.0 \(expected a number in \[0, inf\]\)$", in_group=False),
    ],
    variants={
        "SGDM": {
            "paper": dict(form="paper"),
            "group_cosine": dict(granularity="group", normalize="cosine"),
        },
        "AdamW": {"paper_tensor": dict(form="paper", granularity="tensor")},
    },
    # ν is kept in float32 for 16-bit params (EGStepSize docstring: "nu and the per-group scalars").
    acc_state=frozenset({"egs_nu"}),
)

GRADIENT_PENALTY = _wrapper_specs(
    danlu.GradientPenalty,
    dict(strength=1e-3),
    [
        Bad({"strength": -1e-3}, ValueError, r"^Invalid strength: -0\.001 \(expected a number in \[0, inf\]\)$",
            in_group=False),
        Bad({"strength": float("nan")}, ValueError, r"^Invalid strength: nan \(expected a finite number",
            in_group=False),
        Bad({"strength": "1e-3"}, TypeError, r"^Invalid strength: '1e-3' \(expected a real number\)$", in_group=False),
        Bad({"method": "exact"}, ValueError,
            r"^Invalid method: 'exact' \(expected one of 'finite_difference', 'double_backward'\)$", in_group=False),
        Bad({"method": None}, TypeError, r"^Invalid method: None \(expected one of 'finite_difference'",
            in_group=False),
    ],
    # accum_steps goes to the inner SGDM: each micro-step absorbs a penalised gradient.
    variants={"SGDM": {"accum": dict(accum_steps=2), "strong": dict(strength=1e-2)}},
    skips={
        "torch-SGD": {
            "test_complex_params_raise_type_error": (
                "torch.optim.SGD takes complex params and GradientPenalty passes them on (θ + 2λg and the "
                "second gradient are well defined for a real loss of complex params); EGStepSize[torch-SGD] "
                "shows the step-time refusal"
            ),
            "test_sparse_grad_raises_and_changes_nothing": (
                "torch.optim.SGD supports sparse gradients and GradientPenalty passes them on (θ + 2λg with a "
                "sparse g is a dense add); the danlu inners show that a refused step leaves θ bitwise restored"
            ),
            "test_state_dict_from_other_layout_is_refused@other_shapes": (
                "GradientPenalty keeps no state of its own and torch.optim.SGD.load_state_dict does not check "
                "state shapes: a momentum buffer of transposed shape is taken as is (fewer/more params and "
                "groups are still refused)"
            ),
        },
    },
    requires_closure=True,
)

_CHI_GATED_WINDOW = ("k = 2: the battery's third step, the first after the scheduler halves the lr, is a gated "
                     "micro-step on which θ does not move in either run; tests/test_chi_gate.py checks schedulers "
                     "over whole windows, and variant k1 runs this test")
CHI_GATED = _wrapper_specs(
    danlu.ChiGated,
    dict(k=2, rescale_betas=True),
    [
        Bad({"k": 0}, ValueError, r"^Invalid k: 0", in_group=False),
        Bad({"k": 2.5}, TypeError, r"^Invalid k: 2\.5", in_group=False),
    ],
    variants={"SGDM": {"chi_only": dict(rescale_betas=False), "k1": dict(k=1)}},
    skips={label: {
        "test_scheduler_change_takes_effect/default": _CHI_GATED_WINDOW,
        **({"test_scheduler_change_takes_effect/chi_only": _CHI_GATED_WINDOW} if label == "SGDM" else {}),
        **({"test_complex_params_raise_type_error": (
                "torch.optim.SGD takes complex params and ChiGated only gates its lr (as GradientPenalty passes "
                "them on)"),
            "test_sparse_grad_raises_and_changes_nothing": (
                "torch.optim.SGD supports sparse gradients and ChiGated only gates its lr"),
            "test_state_dict_from_other_layout_is_refused@other_shapes": (
                "ChiGated keeps no per-parameter state and torch.optim.SGD.load_state_dict does not check state "
                "shapes (as for GradientPenalty[torch-SGD])")} if label == "torch-SGD" else {}),
    } for label in WRAPPER_INNERS},
)

SCALE_AWARE_STEP = _wrapper_specs(
    danlu.ScaleAwareStep,
    # lr is α0, the relative change per step; the inner optimizer's weight decay must be 0.
    dict(lr=1e-2, weight_decay=0.0, q=1.0),
    [
        Bad({"q": 0.0}, ValueError, r"^Invalid q: 0\.0 \(expected a number in \(0, inf\]\)$", in_group=False),
        Bad({"decay": 1}, TypeError, r"^Invalid decay: 1 \(expected a bool\)$", in_group=False),
        Bad({"bias_sigma": -1.0}, ValueError, r"^Invalid bias_sigma: -1\.0", in_group=False),
        Bad({"weight_decay": 0.1}, ValueError, r"^Invalid weight_decay of param group 0: 0\.1 \(expected 0",
            in_group=False),
    ],
    variants={"SGDM": {"no_decay": dict(decay=False)}},
    skips={"torch-SGD": {"test_state_dict_from_other_layout_is_refused@other_shapes": (
        "ScaleAwareStep's own entries are 0-d and torch.optim.SGD.load_state_dict does not check state shapes "
        "(as for GradientPenalty[torch-SGD]); the danlu inners refuse them")}},
    acc_state=frozenset({"sas_scale"}),  # ‖ε0‖ = √k·σ, kept in float32 for 16-bit params
)

def _mgs_step(opt: torch.optim.Optimizer, closure: Callable) -> Any:
    """The battery has one closure (forward + backward of a loss): it is MGS's surrogate, and its loss
    value, re-evaluated at each candidate, is the task loss (MGS holds the surrogate gradient apart
    while task_loss runs, so the closure's own backward does not disturb the step)."""

    def task_loss() -> float:
        with torch.enable_grad():
            return float(closure().detach())

    return opt.step(closure, task_loss)


_MGS_DRIFT = ("MGS's default restore='replay' (no model copy) undoes each candidate by subtraction: in "
              "float32 that leaves a few ulp of rounding, so a group at lr ~0 is not bitwise still; the "
              "'snapshot' variant checks the exact contract and tests/test_mgs.py bounds the drift")

MGS_SPECS = _wrapper_specs(
    danlu.MGS,
    # max_grad_norm 0.3: |Δ| ≤ 0.3 keeps torch.optim.SGD's undamped momentum (0.9, lr 0.3) stable.
    dict(candidates=4, noise=1.0, beta=100.0, max_grad_norm=0.3),
    [
        Bad({"candidates": 0}, ValueError, r"^Invalid candidates: 0 \(expected a number in \[1, inf\]\)$",
            in_group=False),
        Bad({"candidates": 2.0}, TypeError, r"^Invalid candidates: 2\.0 \(expected an int\)$", in_group=False),
        Bad({"noise": 0.0}, ValueError, r"^Invalid noise: 0\.0 \(expected a number in \(0, inf\]\)$", in_group=False),
        Bad({"beta": -1.0}, ValueError, r"^Invalid beta: -1\.0 \(expected a number in \[0, inf\]\)$", in_group=False),
        Bad({"mix": 1.5}, ValueError, r"^Invalid mix: 1\.5 \(expected a number in \[0, 1\]\)$", in_group=False),
        Bad({"q_density": "sigma"}, ValueError, r"^Invalid q_density: 'sigma' ", in_group=False),
    ],
    variants={"SGDM": {
        "random_exact": dict(assignment="random", q_density="exact", noise_scale="constant", noise=0.05),
        # restore='snapshot' restores θ bitwise, so the lr-0 contract holds exactly (see _MGS_DRIFT).
        "snapshot": dict(restore="snapshot"),
    }},
    requires_closure=True,
    step_with=_mgs_step,
    skips={label: {
        "test_tiny_lr_group_does_not_move/default": _MGS_DRIFT,
        "test_scheduler_zero_lr_stops_movement/default": _MGS_DRIFT,
        **({"test_tiny_lr_group_does_not_move/random_exact": _MGS_DRIFT,
            "test_scheduler_zero_lr_stops_movement/random_exact": _MGS_DRIFT} if label == "SGDM" else {}),
        "test_nonfinite_grad_shows_in_params": (
            "MGS refuses a non-finite surrogate gradient (RuntimeError before anything moves): every "
            "candidate built from it would be non-finite; tests/test_mgs.py checks the refusal"),
        **({"test_state_dict_from_other_layout_is_refused@other_shapes": (
            "MGS keeps no per-parameter state and torch.optim.SGD.load_state_dict does not check state "
            "shapes (as for GradientPenalty[torch-SGD])")} if label == "torch-SGD" else {}),
    } for label in WRAPPER_INNERS},
)


_ZO_DRIFT = ("ZeroOrder perturbs θ in place and restores it by subtraction (MeZO): in float32 each "
             "perturb/restore cycle leaves a rounding of θ + σu (a few ulp), so a group at lr ~0 is not "
             "bitwise still; tests/test_zero_order.py bounds the drift")
ZERO_ORDER = OptimSpec(
    name="ZeroOrder",
    cls=danlu.ZeroOrder,
    kwargs=dict(lr=0.05, samples=8, sigma=1e-2),
    bad=_lr_weight_decay_cases() + [
        Bad({"sigma": 0.0}, ValueError, r"^Invalid sigma: 0\.0 \(expected a number in \(0, inf\]\)$", in_group=False),
        Bad({"samples": 0}, ValueError, r"^Invalid samples: 0 \(expected a number in \[1, inf\]\)$", in_group=False),
        Bad({"samples": 2.0}, TypeError, r"^Invalid samples: 2\.0 \(expected an int\)$", in_group=False),
        Bad({"estimator": "central"}, ValueError, r"^Invalid estimator: 'central' ", in_group=False),
    ],
    variants={"one_sided": dict(estimator="one_sided", baseline="leave_one_out", weight_decay=1e-2)},
    requires_closure=True,
    zeroth_order=True,
    stateless=True,
    loss_ratio=0.6,
    skips={
        "test_tiny_lr_group_does_not_move": _ZO_DRIFT,
        "test_scheduler_zero_lr_stops_movement": _ZO_DRIFT,
        "test_params_without_grad_untouched_and_stateless": (
            "ZeroOrder perturbs and updates every parameter with requires_grad (MeZO's convention): one the "
            "loss does not use still moves along the drawn directions; it never reads .grad"),
        "test_nonfinite_grad_shows_in_params": (
            "ZeroOrder reads no gradients; a non-finite loss raises ValueError with the parameters restored "
            "(tests/test_zero_order.py::test_bad_closure_raises_and_restores_everything)"),
        "test_sparse_grad_raises_and_changes_nothing": (
            "ZeroOrder reads no gradients: an embedding with sparse=True is a dense parameter to it"),
        "test_step_with_closure_returns_loss_with_grad_enabled": (
            "a zeroth-order closure runs under torch.no_grad() and must not call backward; step returns f(θ) "
            "or the mean of the step's evaluations (tests/test_zero_order.py)"),
    },
)

OPTIM_DB: list[OptimSpec] = [ADAFACTOR, ADAMW, ADAX, AMOS, EGD, LION, SGDM, TIGER, *EG_STEP_SIZE, *GRADIENT_PENALTY,
                           *MGS_SPECS, *SCALE_AWARE_STEP, *CHI_GATED, ZERO_ORDER]


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

