"""danlu in the optimizer factories people already use: timm's registry and HF Trainer's optimizer slot.

Neither timm nor transformers is a dependency: this module imports timm only inside
:func:`register_timm`, and :func:`hf_optimizer` needs nothing from transformers.

**timm** (≥ 1.0.12, the version that introduced its optimizer registry). :func:`register_timm` adds
danlu's optimizers and wrappers to the registry that ``timm.optim.create_optimizer_v2``,
``timm.optim.list_optimizers`` and timm's ``train.py --opt`` read::

    import timm.optim
    from danlu.integrations import register_timm

    register_timm()                                   # ['danlu-adafactor', 'danlu-adamw', ...]; again: no-op
    opt = timm.optim.create_optimizer_v2(model, "danlu-lion", lr=1e-4, weight_decay=1.0)
    opt = timm.optim.create_optimizer_v2(model, "lookahead_danlu-lion", lr=1e-4)  # in timm's Lookahead
    opt = timm.optim.create_optimizer_v2(model, "danlu-chi-gated", inner="lion", k=4, lr=1e-4)

The names use ``-``, not ``_``: timm reads everything before the last ``_`` of a name as a modifier
(only ``lookahead_`` means anything) and looks up the rest, so ``"danlu_lion"`` builds timm's own
Lion. :func:`register_timm` therefore refuses a prefix containing ``_``.

Given a model, timm builds two param groups: 1-D tensors and tensors named ``*.bias`` (biases, norm
gains) at weight decay 0, everything else at ``weight_decay`` (``filter_bias_and_bn=False`` puts all
of them at ``weight_decay``; a model's ``no_weight_decay()`` names join the first group). What
``weight_decay`` means, per registered name:

- ``danlu-adamw``, ``-adax``, ``-lion``, ``-tiger``, ``-sgdm``, ``-zero-order``: λ, decoupled,
  θ ← θ·(1 − lr·λ) per update (``danlu-adafactor``: ρ_t·λ, with ρ_t its relative step size); timm's
  zero-λ group stays at 0.
- ``danlu-amos``: refused unless 0. Amos decays every tensor toward its own target scale η̃ (its γ/2
  term), so there is no λ to set; ``extra_l2=`` adds an L2 pull per step, and
  ``param_group_fn=lambda m: danlu.amos_groups(m, momentum=0.9)`` gives its per-module η̃ (and momentum).
- ``danlu-egd``: refused unless 0; exponentiated gradient has no decay term.
- the wrappers ``danlu-chi-gated``, ``-eg-step-size``, ``-gradient-penalty``, ``-mgs``,
  ``-scale-aware-step``: that of the inner optimizer, ``inner=<danlu name>`` (default ``"adamw"``).
  The wrapper's own keywords go to the wrapper, all others (``lr``, ``betas``, ``weight_decay``, …) to
  the inner optimizer, as in :func:`danlu.create_optimizer`. ScaleAwareStep applies its own decay and
  needs ``weight_decay=0``.

timm's flags are set to what each constructor accepts, because timm drops ``betas`` and ``eps``
silently where its flags say an optimizer has none: Lion and Tiger take no ``eps``; Tiger takes
``beta=0.965`` (a float), Amos ``beta=``, Adafactor ``beta1=`` and a pair ``eps=(eps1, eps2)``;
AdaX's ``betas[1]`` is its own β₂ (≈ 1e-4, not Adam's 0.999). Adafactor's ``lr`` may be left out
(timm's ``lr=None``): the relative step. timm's ``momentum`` (default 0.9) reaches SGDM only; Amos's
momentum goes in a param group (above). The wrappers forward ``betas``/``eps`` to the inner optimizer.
EGD needs positive parameters, or ``signed=True`` for a model's. Closure-driven ones are built by the
factory like the rest, but timm's ``train.py`` calls ``step()`` after its own backward and never
passes a closure: ``danlu-zero-order`` and ``danlu-gradient-penalty`` need ``opt.step(closure)``,
``danlu-mgs`` ``opt.step(surrogate_closure, task_loss)``, i.e. a loop of your own.

**HF Trainer** (``Trainer(..., optimizer_cls_and_kwargs=(cls, kwargs))``) calls ``cls(groups,
**kwargs)`` with two groups of its own: the parameters it decays at ``args.weight_decay`` and those it
does not (biases, LayerNorm and other ``*norm*`` weights) at 0. Two consequences that fail silently:
a ``weight_decay`` in ``kwargs`` is never used (both groups set their own), and
``args.learning_rate`` is not passed (the class's default lr is used, and Trainer's scheduler scales
that). :func:`hf_optimizer` returns the tuple with both handled::

    from danlu.integrations import hf_optimizer

    lion = danlu.lion_from_adamw(3e-4, 0.1)      # your AdamW's lr and λ → Lion's {'lr': 3e-05, 'weight_decay': 1.0}
    args = TrainingArguments(..., learning_rate=lion["lr"], weight_decay=lion["weight_decay"])
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizer_cls_and_kwargs=hf_optimizer("lion", args, betas=(0.9, 0.99)))
    # the same by hand: optimizer_cls_and_kwargs=(danlu.Lion, {"lr": args.learning_rate, "betas": (0.9, 0.99)})
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, NamedTuple

import torch

from .registry import OPTIMIZERS, WRAPPERS, create_optimizer

__all__ = ["register_timm", "hf_optimizer"]

# Optimizers without a weight-decay term, and why timm's / Trainer's weight_decay is refused for them.
_NO_WEIGHT_DECAY = {
    "amos": ("Amos decays every tensor toward its target scale η̃ by itself (its γ/2 term), so there is no λ "
             "to set; use weight_decay=0, extra_l2=... for an extra L2 pull per step, and danlu.amos_groups "
             "for its per-module η̃"),
    "egd": "EGD (exponentiated gradient) has no weight-decay term; use weight_decay=0",
}

# Names that need a closure in step(), which timm's train.py and HF Trainer never pass.
_CLOSURE_DRIVEN = {
    "zero-order": "opt.step(closure) with a closure that returns the loss without calling backward",
    "gradient-penalty": "opt.step(closure) with a closure that evaluates the loss",
    "mgs": "opt.step(surrogate_closure, task_loss)",
}


class _TimmSpec(NamedTuple):
    description: str
    has_eps: bool
    has_betas: bool
    has_momentum: bool = False


# timm's flags per danlu name: what the constructor accepts (timm drops betas/eps where a flag is False).
_TIMM_SPECS: dict[str, _TimmSpec] = {
    "adafactor": _TimmSpec("danlu Adafactor: factored second moments; lr=None gives the relative step; "
                           "eps is a pair (eps1, eps2), beta1= for momentum", has_eps=True, has_betas=False),
    "adamw": _TimmSpec("danlu AdamW: decoupled weight decay; accum_steps=k accumulates in the moments",
                       has_eps=True, has_betas=True),
    "adax": _TimmSpec("danlu AdaX: exponential long-term memory of g²; betas=(β1, β2) with β2 ≈ 1e-4",
                      has_eps=True, has_betas=True),
    "amos": _TimmSpec("danlu Amos: adaptive decay toward a target scale (weight_decay must be 0; beta=, extra_l2=)",
                      has_eps=True, has_betas=False),
    "egd": _TimmSpec("danlu EGD: exponentiated gradient for positive parameters (signed=True: any sign); "
                     "no weight decay", has_eps=False, has_betas=False),
    "lion": _TimmSpec("danlu Lion: sign of an interpolated momentum, decoupled weight decay",
                      has_eps=False, has_betas=True),
    "sgdm": _TimmSpec("danlu SGDM: SGD with momentum as an EMA; accum_steps=k accumulates in the momentum",
                      has_eps=False, has_betas=False, has_momentum=True),
    "tiger": _TimmSpec("danlu Tiger: sign of the momentum (beta=, a float), decoupled weight decay",
                       has_eps=False, has_betas=False),
    "zero-order": _TimmSpec("danlu ZeroOrder: zeroth-order (MeZO-style) estimates; step(closure) only",
                            has_eps=False, has_betas=False),
    "chi-gated": _TimmSpec("danlu ChiGated(inner=..., k=...): accumulation over k micro-batches by gating the lr",
                           has_eps=True, has_betas=True),
    "eg-step-size": _TimmSpec("danlu EGStepSize(inner=..., meta_lr=...): per-coordinate step sizes by "
                              "exponentiated gradient", has_eps=True, has_betas=True),
    "gradient-penalty": _TimmSpec("danlu GradientPenalty(inner=..., strength=...): descent on L + λ‖∇L‖²; "
                                  "step(closure) only", has_eps=True, has_betas=True),
    "mgs": _TimmSpec("danlu MGS(inner=...): MLE-guided parameter search; step(surrogate_closure, task_loss) only",
                     has_eps=True, has_betas=True),
    "scale-aware-step": _TimmSpec("danlu ScaleAwareStep(inner=..., q=...): Amos-derived per-tensor step "
                                  "(weight_decay must be 0)", has_eps=True, has_betas=True),
}


def _without_weight_decay(params: Any, weight_decay: Any, name: str) -> Any:
    """``params`` with the ``weight_decay`` keys of its groups removed, after checking that it and every
    group's is 0 (``ValueError`` naming the reason otherwise)."""
    who = OPTIMIZERS[name].__name__
    if weight_decay:
        raise ValueError(f"Invalid weight_decay: {weight_decay!r} for {who}: {_NO_WEIGHT_DECAY[name]}")
    if isinstance(params, torch.Tensor):  # not an iterable of tensors: the optimizer's own error
        return params
    out = []
    for i, item in enumerate(params):
        if isinstance(item, dict) and "weight_decay" in item:
            if item["weight_decay"]:
                raise ValueError(f"Invalid weight_decay: {item['weight_decay']!r} in param group {i} for {who}: "
                                 f"{_NO_WEIGHT_DECAY[name]}")
            item = {k: v for k, v in item.items() if k != "weight_decay"}
        out.append(item)
    return out


@dataclasses.dataclass(frozen=True)
class _TimmFactory:
    """What timm's registry calls as ``opt_class(params, **kwargs)`` for a danlu name whose constructor
    does not take timm's ``weight_decay`` as it is: Amos and EGD (no such term), and the wrappers (an
    inner optimizer by name). A frozen dataclass, so two registrations compare equal."""

    name: str

    def __call__(self, params: Any, weight_decay: Any = 0.0, **kwargs: Any) -> torch.optim.Optimizer:
        if self.name in WRAPPERS:
            inner = kwargs.pop("inner", "adamw")
            key = inner.lower() if isinstance(inner, str) else inner
            if key in _NO_WEIGHT_DECAY:
                params = _without_weight_decay(params, weight_decay, key)
            else:
                kwargs["weight_decay"] = weight_decay
            return create_optimizer(self.name, params, inner=inner, **kwargs)
        return OPTIMIZERS[self.name](_without_weight_decay(params, weight_decay, self.name), **kwargs)


def _timm_opt_class(name: str) -> Callable[..., torch.optim.Optimizer]:
    if name in WRAPPERS or name in _NO_WEIGHT_DECAY:
        return _TimmFactory(name)
    return OPTIMIZERS[name]  # timm's get_optimizer_class then returns danlu's class itself


def _timm_registry() -> tuple[Any, Any]:
    """timm's ``OptimInfo`` and the registry its public functions read, or ImportError with the fix."""
    try:
        import timm  # noqa: PLC0415
        import timm.optim  # noqa: PLC0415
    except ImportError as e:
        raise ImportError("danlu.integrations.register_timm needs timm >= 1.0.12 (pip install timm)") from e
    info_cls = getattr(timm.optim, "OptimInfo", None)
    # create_optimizer_v2, list_optimizers and get_optimizer_info all read this one instance; timm has
    # no public function to add to it, only its register() method.
    registry = getattr(timm.optim, "default_registry", None)
    if registry is None:
        factory = getattr(timm.optim, "_optim_factory", None)
        registry = getattr(factory, "default_registry", None)
    if info_cls is None or registry is None or not hasattr(registry, "register"):
        raise ImportError(f"timm {getattr(timm, '__version__', '?')} has no optimizer registry (timm.optim.OptimInfo "
                          "and its default_registry, added in timm 1.0.12); pip install -U timm")
    return info_cls, registry


def _is_danlu(info: Any) -> bool:
    """Whether a timm registry entry is one :func:`register_timm` made (torch's AdamW and SGD are not)."""
    opt_class = getattr(info, "opt_class", None)
    return isinstance(opt_class, _TimmFactory) or any(opt_class is OPTIMIZERS[n] for n in _TIMM_SPECS
                                                      if n in OPTIMIZERS)


def register_timm(prefix: str = "danlu-") -> list[str]:
    """Register danlu's optimizers and wrappers in timm's optimizer registry; returns their timm names.

    Every name of :func:`danlu.list_optimizers` but torch's baselines (``torch-adamw``, ``torch-sgd``:
    timm has ``adamw`` and ``sgd``) is registered as ``prefix + name`` (``danlu-lion``,
    ``danlu-zero-order``, ``danlu-chi-gated``, …), with timm's ``has_eps``/``has_betas``/
    ``has_momentum`` flags set to what its constructor accepts; ``create_optimizer_v2(model, name,
    ...)`` then builds it with timm's weight-decay/no-decay param groups. See the module docstring for
    what ``weight_decay`` means per optimizer and which need a closure.

    Calling it again registers nothing new and returns the same names. Nothing is registered when it
    raises.

    Args:
        prefix: prepended to every danlu name (default ``"danlu-"``); lowercased, as timm stores names.

    Returns:
        The registered timm names, sorted.

    Raises:
        ImportError: timm is not installed, or too old to have an optimizer registry (< 1.0.12).
        TypeError: ``prefix`` is not a string.
        ValueError: ``prefix`` contains ``_`` (timm's factory would read ``danlu_lion`` as ``lion``: its
            own Lion), or a name is taken by an optimizer that is not danlu's (``prefix=""``: timm's
            ``adamw``, ``lion``, ``adafactor``).
    """
    if not isinstance(prefix, str):
        raise TypeError(f"Invalid prefix: {prefix!r} (expected a str, e.g. 'danlu-')")
    prefix = prefix.lower()
    if "_" in prefix:
        raise ValueError(f"Invalid prefix: {prefix!r}: timm's create_optimizer_v2 reads the part of a name before "
                         f"the last '_' as a modifier ('lookahead_') and looks up the rest, so "
                         f"{prefix + 'lion'!r} would build timm's own Lion; use '-' (e.g. 'danlu-')")
    info_cls, registry = _timm_registry()
    wanted = {}
    for name, spec in _TIMM_SPECS.items():
        wanted[prefix + name] = info_cls(name=prefix + name, opt_class=_timm_opt_class(name),
                                         description=spec.description, has_eps=spec.has_eps,
                                         has_momentum=spec.has_momentum, has_betas=spec.has_betas)
    existing = set(registry.list_optimizers())
    taken = sorted(n for n in wanted if n in existing and not _is_danlu(registry.get_optimizer_info(n)))
    if taken:
        raise ValueError(f"timm already has optimizer(s) named {', '.join(map(repr, taken))} that are not danlu's; "
                         f"choose another prefix than {prefix!r}")
    for timm_name, info in wanted.items():
        if timm_name not in existing or registry.get_optimizer_info(timm_name) != info:
            registry.register(info)
    return sorted(wanted)


def hf_optimizer(name: str, args: Any = None, **kwargs: Any) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """``(cls, kwargs)`` for HF ``Trainer(..., optimizer_cls_and_kwargs=...)`` building danlu's ``name``.

    Trainer calls ``cls(groups, **kwargs)`` with its own two param groups (decayed at
    ``args.weight_decay``, biases and norm weights at 0) and does not pass ``args.learning_rate``.
    So, with ``args`` (the ``TrainingArguments``) given, ``lr`` defaults to ``args.learning_rate``
    (pass ``lr=None`` to keep Adafactor's relative step), and the weight decay is the one in ``args``
    (for Amos and EGD, which have none, it must be 0). ``kwargs`` are checked against the constructor now, not at
    ``trainer.train()``. ``kwargs`` may hold ``params`` (e.g. ``danlu.tiger_groups(model)``), which
    Trainer then uses instead of its groups.

    Args:
        name: a danlu optimizer's name (:data:`danlu.registry.OPTIMIZERS`: ``"lion"``, ``"tiger"``, …).
        args: the ``TrainingArguments`` (anything with ``learning_rate`` and ``weight_decay``), optional.
        kwargs: the optimizer's hyperparameters, e.g. ``betas=(0.95, 0.98)`` or Tiger's ``beta=0.965``.

    Returns:
        The optimizer class (a ``torch.optim.Optimizer`` subclass, which Trainer instantiates with its
        param groups) and the keywords.

    Raises:
        ValueError: an unknown name; a wrapper, or an optimizer that needs a closure (Trainer never
            passes one to ``step``); ``weight_decay`` in ``kwargs`` (Trainer's groups override it: set
            ``TrainingArguments(weight_decay=...)``); a nonzero ``args.weight_decay`` for Amos or EGD,
            which have no weight-decay term.
        TypeError: a keyword the constructor does not take, or ``args`` without ``learning_rate``.
    """
    key = name.lower() if isinstance(name, str) else name
    if key in _CLOSURE_DRIVEN:
        raise ValueError(f"{name!r} needs {_CLOSURE_DRIVEN[key]}; HF Trainer calls step() after its own backward "
                         "and never passes a closure (use a torch loop or Lightning)")
    if key in WRAPPERS:
        raise ValueError(f"{name!r} is a wrapper around an optimizer you build; Trainer builds its optimizer as "
                         f"cls(param_groups, **kwargs): build both and pass Trainer(optimizers=(opt, scheduler))")
    if key not in OPTIMIZERS:
        known = ", ".join(sorted(set(OPTIMIZERS) - set(_CLOSURE_DRIVEN)))
        raise ValueError(f"Unknown optimizer {name!r} for HF Trainer; known: {known}")
    if "weight_decay" in kwargs:
        raise ValueError("weight_decay in the optimizer's kwargs is never used by HF Trainer: it puts "
                         "args.weight_decay on the parameters it decays and 0 on biases and norm weights; "
                         "set TrainingArguments(weight_decay=...) instead")
    cls = OPTIMIZERS[key]
    kwargs = dict(kwargs)
    if args is not None:
        if not hasattr(args, "learning_rate") or not hasattr(args, "weight_decay"):
            raise TypeError(f"Invalid args: {type(args).__name__} (expected transformers.TrainingArguments, "
                            "with learning_rate and weight_decay)")
        if key in _NO_WEIGHT_DECAY and args.weight_decay:
            raise ValueError(f"Invalid args.weight_decay: {args.weight_decay!r} for {cls.__name__}: "
                             f"{_NO_WEIGHT_DECAY[key]} (TrainingArguments(weight_decay=0.0))")
        kwargs.setdefault("lr", args.learning_rate)
    try:
        inspect.signature(cls).bind(kwargs.get("params"), **{k: v for k, v in kwargs.items() if k != "params"})
    except TypeError as e:
        accepted = [p for p in inspect.signature(cls).parameters if p != "params"]
        raise TypeError(f"{cls.__name__} does not take these keywords ({e}); it takes {', '.join(accepted)}") from None
    return cls, kwargs
