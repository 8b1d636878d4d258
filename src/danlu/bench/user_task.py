"""Your own model in ``danlu compare`` and ``danlu speed``: the entry-point protocol and its loader.

``danlu compare --task PACKAGE.MODULE:ATTR`` (or ``path/to/file.py:ATTR``) imports the module (the
current directory is put on the import path first, as ``python -m`` does; a file's own directory, as
``python file.py`` does), takes ``ATTR`` (dotted attributes are followed) and, when it is callable, calls
it with no arguments. The result is a :class:`UserTask`, or a plain ``dict`` with the same keys (so the
module need not import danlu)::

    model(seed)       -> torch.nn.Module     a fresh, untrained model
    batches(seed)     -> iterable            the training batches, one per step, of any structure
    loss_fn(model, batch) -> tensor          the differentiable scalar training loss on one batch
    metric(model)     -> float | dict        the validation metric, LOWER IS BETTER (it picks the lr);
                                             a dict must hold "val_loss" (that metric) and may hold more
    steps: int                               the default step budget (``--steps`` overrides it)
    lrs: {optimizer: lr}                     optional: the centre of an optimizer's ``--lrs auto`` grid
                                             (others: :data:`DEFAULT_LRS`, tuned on a small MLP)
    options: {optimizer: {keyword: value}}   optional: fixed keywords for an optimizer (e.g. weight_decay)
    name: str                                optional: the task's name in the report (default MODULE.ATTR)
    description: str                         optional: one line about the task

How a run uses them (one run per optimizer × lr × seed, each on a fresh model)::

    torch.manual_seed(seed); model = model(seed); data = iter(batches(seed))
    for step in range(steps):
        loss_fn(model, next(data)).backward(); opt.step(); opt.zero_grad()
        every steps // 20 steps and at the end: model.eval(); metric(model) under no_grad; model.train()

* Reproducibility: ``torch.manual_seed(seed)`` runs before ``model(seed)`` and ``batches(seed)`` are
  called, so initialisation, shuffling and dropout drawn from torch's global RNG follow the seed
  (Python's ``random`` and NumPy's are left alone: draw from the ``seed`` argument for those).
* When the iterable runs out, it is iterated again (a list, a tuple or a ``DataLoader`` starts a new
  epoch); a one-shot iterator that runs out ends the comparison with an error.
* Each run's optimizer is built over the model's parameters with ``requires_grad``; ``model(seed)``
  must build a new model on every call. A task suits danlu's gradient optimizers and the torch
  baselines (:data:`danlu.bench.tasks.NN_OPTIMIZERS`).
* Before any training, the entry point is checked: the module imports, the attribute exists, the
  fields have the types and signatures above, and on a model built with seed 0 the first batch's loss
  is a finite scalar that depends on the parameters, the metric is finite and every optimizer asked
  for accepts the options. A failure raises :class:`UserTaskError`, which the CLI prints as one line
  (exit status 2) before anything is written; an exception raised by the task's code during training
  does the same, so a report is never half-written.

``danlu speed --params-from PACKAGE.MODULE:ATTR`` takes ``ATTR`` the same way; called with no
arguments (or with a seed, 0, when it needs one) it returns an ``nn.Module``, an iterable of tensors
(or of param-group dicts with ``"params"``) or a task as above (its ``model(0)``); the step is timed on
those parameters' shapes (:func:`load_param_shapes`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import re
import sys
import weakref
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from .tasks import NN_OPTIMIZERS, TASKS, Problem, Task

__all__ = ["UserTask", "UserTaskError", "DEFAULT_LRS", "load_task", "check_task", "load_param_shapes",
           "is_entry_point"]

DEFAULT_LRS: Mapping[str, float] = MappingProxyType({name: TASKS["digits"].lrs[name] for name in NN_OPTIMIZERS})
"""The default lr per optimizer of a task that gives none: the embedded ``digits`` MLP's."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MESSAGE_CHARS = 300


class UserTaskError(ValueError):
    """A user entry point or task that cannot be used; the message is one line, fit for the CLI."""


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 1] + "…"


def _describe(exc: BaseException) -> str:
    """``Type: message`` on one line."""
    message = _one_line(str(exc))
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none: assume the call fits
        return None


def _accepts(fn: Callable[..., Any], n_args: int) -> bool:
    """Whether ``fn`` can be called with ``n_args`` positional arguments (True when unknowable)."""
    sig = _signature(fn)
    if sig is None:
        return True
    try:
        sig.bind(*range(n_args))
    except TypeError:
        return False
    return True


def _check_callable(value: Any, what: str, call: str, n_args: int) -> None:
    if not callable(value):
        raise TypeError(f"{what} must be callable as {call}, got {type(value).__name__}")
    if not _accepts(value, n_args):
        raise TypeError(f"{what} must be callable as {call}; its signature is {_signature(value)}")


# --------------------------------------------------------------------------- the protocol


@dataclass(frozen=True)
class UserTask:
    """A task of your own for ``danlu compare`` (see the module docstring for how a run uses it).

    Attributes:
        model: ``model(seed)`` returns a fresh, untrained :class:`torch.nn.Module` (torch's global RNG
            has been seeded with ``seed`` just before).
        batches: ``batches(seed)`` returns an iterable of training batches, one drawn per step and
            passed to ``loss_fn`` as is; iterated again when it runs out.
        loss_fn: ``loss_fn(model, batch)`` returns the differentiable scalar training loss.
        metric: ``metric(model)`` returns the validation metric (lower is better; it picks the lr) as
            a float or a one-element tensor, or a dict of them holding ``"val_loss"`` (the metric)
            and any others to record. Called in eval mode under :func:`torch.no_grad`.
        steps: the default number of steps per run.
        lrs: the default lr per optimizer (lowercase CLI names, e.g. ``{"adamw": 1e-3}``), the centre
            of the ``--lrs auto`` grid; the others default to :data:`DEFAULT_LRS`.
        options: fixed keyword arguments per optimizer, e.g. ``{"adamw": {"weight_decay": 0.1}}``.
        name: the task's name in the report and its file names (default ``MODULE.ATTR``).
        description: one line about the task.

    Raises:
        TypeError: a field of the wrong type, or a callable that cannot take the arguments above.
        ValueError: a bad value (steps < 1, an unknown optimizer, a non-positive lr, a bad name).
    """

    model: Callable[[int], nn.Module]
    batches: Callable[[int], Iterable[Any]]
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    metric: Callable[[nn.Module], Any]
    steps: int
    lrs: Mapping[str, float] = field(default_factory=dict)
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    name: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        _check_callable(self.model, "model", "model(seed)", 1)
        _check_callable(self.batches, "batches", "batches(seed)", 1)
        _check_callable(self.loss_fn, "loss_fn", "loss_fn(model, batch)", 2)
        _check_callable(self.metric, "metric", "metric(model)", 1)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int):
            raise TypeError(f"steps must be an int, got {type(self.steps).__name__}")
        if self.steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {self.steps}")
        known = ", ".join(NN_OPTIMIZERS)
        if not isinstance(self.lrs, Mapping):
            raise TypeError(f"lrs must be a dict of optimizer name to lr, got {type(self.lrs).__name__}")
        for key, lr in self.lrs.items():
            if not isinstance(key, str) or key.lower() not in NN_OPTIMIZERS:
                raise ValueError(f"lrs: unknown optimizer {key!r}; known: {known}")
            if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
                raise TypeError(f"lrs[{key!r}] must be a number, got {type(lr).__name__}")
            if not (math.isfinite(lr) and lr > 0):
                raise ValueError(f"lrs[{key!r}] must be a positive number, got {lr!r}")
        if not isinstance(self.options, Mapping):
            raise TypeError(f"options must be a dict of optimizer name to keywords, got {type(self.options).__name__}")
        for key, kwargs in self.options.items():
            if not isinstance(key, str) or key.lower() not in NN_OPTIMIZERS:
                raise ValueError(f"options: unknown optimizer {key!r}; known: {known}")
            if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
                raise TypeError(f"options[{key!r}] must be a dict of keyword arguments, got {type(kwargs).__name__}")
            if "lr" in kwargs:
                raise ValueError(f"options[{key!r}] must not set lr (the sweep sets it; use lrs for the default)")
        if self.name is not None and (not isinstance(self.name, str) or not _NAME.fullmatch(self.name)):
            raise ValueError("name must be 1-64 letters, digits, '.', '_' or '-' (it names the report's files), "
                             f"got {self.name!r}")
        if not isinstance(self.description, str):
            raise TypeError(f"description must be a str, got {type(self.description).__name__}")


_REQUIRED = tuple(f.name for f in fields(UserTask) if f.default is MISSING and f.default_factory is MISSING)
_KEYS = tuple(f.name for f in fields(UserTask))


def _as_user_task(value: Any, where: str) -> UserTask:
    """``value`` (a UserTask or a dict of its fields) as a UserTask; UserTaskError otherwise."""
    if isinstance(value, UserTask):
        return value
    if isinstance(value, Mapping):
        unknown = [repr(k) for k in value if k not in _KEYS]
        if unknown:
            raise UserTaskError(f"{where}: unknown key(s) {', '.join(unknown)}; a task's keys are {', '.join(_KEYS)}")
        missing = [k for k in _REQUIRED if k not in value]
        if missing:
            raise UserTaskError(f"{where}: missing key(s) {', '.join(missing)}; required: {', '.join(_REQUIRED)}")
        try:
            return UserTask(**value)
        except (TypeError, ValueError) as exc:
            raise UserTaskError(f"{where}: {_one_line(str(exc))}") from None
    raise UserTaskError(f"{where} is a {type(value).__name__}; expected a danlu.bench.user_task.UserTask or a dict "
                        f"with keys {', '.join(_REQUIRED)} (see danlu.bench.user_task)")


# --------------------------------------------------------------------------- entry points


def is_entry_point(text: str) -> bool:
    """Whether a ``--task`` value names an entry point (``MODULE:ATTR``) rather than an embedded task."""
    return ":" in text


def _split_spec(spec: str) -> tuple[str, str]:
    module_ref, sep, attr = spec.strip().rpartition(":")
    if not sep or not module_ref or not attr or not all(part.isidentifier() for part in attr.split(".")):
        raise UserTaskError(f"expected MODULE:ATTR (e.g. my_package.my_module:make_task or path/to/file.py:make_task), "
                            f"got {spec!r}")
    return module_ref, attr


def _import(module_ref: str) -> ModuleType:
    """Import a dotted module name (the current directory first on sys.path) or a ``.py`` file."""
    try:
        if module_ref.endswith(".py"):
            path = Path(module_ref).resolve()
            if not path.is_file():
                raise UserTaskError(f"cannot import {module_ref!r} (no such file)")
            digest = hashlib.blake2b(str(path).encode(), digest_size=4).hexdigest()
            name = f"_danlu_user_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest}"
            if name in sys.modules:
                return sys.modules[name]
            if str(path.parent) not in sys.path:
                sys.path.insert(0, str(path.parent))  # the file's siblings import, as under `python file.py`
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise UserTaskError(f"cannot import {module_ref!r} (not a Python source file)")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
            return module
        cwd = os.getcwd()
        if cwd not in sys.path and "" not in sys.path:
            sys.path.insert(0, cwd)  # as `python -m` does; the `danlu` script's own sys.path[0] is its bin dir
        return importlib.import_module(module_ref)
    except UserTaskError:
        raise
    except Exception as exc:
        raise UserTaskError(f"cannot import {module_ref!r} ({_describe(exc)})") from exc


def _resolve(spec: str) -> tuple[Any, str, str]:
    """The object ``spec`` names, with its module reference and attribute path."""
    module_ref, attr = _split_spec(spec)
    obj: Any = _import(module_ref)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except Exception:
            raise UserTaskError(f"module {module_ref!r} has no attribute {attr!r}") from None
    return obj, module_ref, attr


def _guard(where: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, with any exception from it turned into a one-line UserTaskError naming ``where``."""
    try:
        return fn(*args)
    except UserTaskError:
        raise
    except Exception as exc:
        raise UserTaskError(f"{where} raised {_describe(exc)}") from exc


def _call_entry(obj: Any, spec: str, seeded: bool) -> Any:
    """A UserTask/dict/module as is; a callable called with no arguments (or, when ``seeded`` and it
    needs one, with the seed 0)."""
    if isinstance(obj, (UserTask, Mapping, nn.Module)) or not callable(obj):
        return obj
    if _accepts(obj, 0):
        return _guard(f"{spec}()", obj)
    if seeded and _accepts(obj, 1):
        return _guard(f"{spec}(0)", obj, 0)
    call = f"{spec}() or {spec}(seed)" if seeded else f"{spec}()"
    raise UserTaskError(f"{spec} must be callable as {call}; its signature is {_signature(obj)}")


def load_task(spec: str) -> Task:
    """The :class:`~danlu.bench.tasks.Task` that the entry point ``spec`` (``MODULE:ATTR``) describes.

    Imports, resolves and calls the entry point and checks the fields it returns; builds nothing
    (:func:`check_task` does). Raises :class:`UserTaskError` with a one-line message.
    """
    obj, module_ref, attr = _resolve(spec)
    if not isinstance(obj, (UserTask, Mapping)) and not callable(obj):
        raise UserTaskError(f"{spec} is a {type(obj).__name__}; expected a function returning a UserTask or a dict")
    user = _as_user_task(_call_entry(obj, spec, seeded=False), spec if not callable(obj) else f"{spec}()")
    default = f"{Path(module_ref).stem if module_ref.endswith('.py') else module_ref.rpartition('.')[2]}.{attr}"
    name = user.name or default
    if not _NAME.fullmatch(name):
        raise UserTaskError(f"{spec}: the default task name {name!r} is not usable in file names; give the task a name")
    lrs = {**DEFAULT_LRS, **{k.lower(): float(v) for k, v in user.lrs.items()}}
    options = {k.lower(): MappingProxyType(dict(v)) for k, v in user.options.items()}
    description = _one_line(user.description) or f"your task {spec}"
    return Task(name, description, user.steps, NN_OPTIMIZERS, MappingProxyType(lrs),
                functools.partial(_build, user, name, weakref.WeakSet()), MappingProxyType(options))


# --------------------------------------------------------------------------- building a run


class _Batches:
    """One batch per step from ``batches(seed)``: the same batch for repeated calls within a step
    (a closure evaluated several times), the next one for the next step, a new pass when exhausted."""

    def __init__(self, factory: Callable[[int], Iterable[Any]], seed: int, task: str) -> None:
        self._task = task
        self._source = _guard(f"task {task!r}: batches({seed})", factory, seed)
        self._iter = self._start()
        self._step: int | None = None
        self._batch: Any = None
        self._drawn = 0  # batches drawn in this pass

    def _start(self) -> Iterator[Any]:
        try:
            return iter(self._source)
        except TypeError:
            raise UserTaskError(f"task {self._task!r}: batches(seed) must return an iterable of batches, "
                                f"got {type(self._source).__name__}") from None

    def get(self, step: int) -> Any:
        if step != self._step:
            self._batch, self._step = self._next(step), step
        return self._batch

    def _next(self, step: int) -> Any:
        where = f"task {self._task!r}: batches(seed) at step {step}"
        for fresh in (False, True):
            try:
                batch = next(self._iter)
            except StopIteration:
                if self._drawn == 0:
                    raise UserTaskError(f"task {self._task!r}: batches(seed) yields no batches") from None
                if fresh or self._iter is self._source:  # a one-shot iterator: no second pass
                    raise UserTaskError(f"task {self._task!r}: batches(seed) ran out after {self._drawn} batches "
                                        f"(at step {step}); return a list, a DataLoader or an endless "
                                        "generator") from None
                self._iter, self._drawn = self._start(), 0
                continue
            except Exception as exc:
                raise UserTaskError(f"{where} raised {_describe(exc)}") from exc
            self._drawn += 1
            return batch
        raise AssertionError("unreachable")  # pragma: no cover


def _scalar(value: Any, where: str) -> float:
    """A metric value as a float; UserTaskError for anything but a real number or a one-element tensor."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
        return float(value.item())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    shown = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
    raise UserTaskError(f"{where} must be a number or a one-element tensor, got {shown}")


def _metrics(value: Any, task: str) -> dict[str, float]:
    where = f"task {task!r}: metric(model)"
    if isinstance(value, Mapping):
        if "val_loss" not in value:
            raise UserTaskError(f"{where} returned a dict without 'val_loss' (the lower-is-better value that picks "
                                f"the lr); its keys: {', '.join(map(repr, value))}")
        return {str(k): _scalar(v, f"{where}[{k!r}]") for k, v in value.items()}
    return {"val_loss": _scalar(value, where)}


def _build(user: UserTask, task: str, built: weakref.WeakSet[nn.Module], seed: int) -> Problem:
    """A fresh :class:`Problem` from the user's callables (see the module docstring); ``built`` holds
    the task's earlier models, so that one handed out twice (trained further by every run) is refused."""
    torch.manual_seed(seed)
    model = _guard(f"task {task!r}: model({seed})", user.model, seed)
    if not isinstance(model, nn.Module):
        raise UserTaskError(f"task {task!r}: model(seed) must return a torch.nn.Module, got {type(model).__name__}")
    if model in built:
        raise UserTaskError(f"task {task!r}: model(seed) returned a model it had returned before; it must build a "
                            "fresh one on each call (every run starts untrained)")
    built.add(model)
    params: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserTaskError(f"task {task!r}: model(seed) has no parameters with requires_grad")
    model.train()
    batches = _Batches(user.batches, seed, task)

    def train_loss(step: int) -> torch.Tensor:
        batch = batches.get(step)
        loss = _guard(f"task {task!r}: loss_fn(model, batch) at step {step}", user.loss_fn, model, batch)
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.is_floating_point()):
            shown = (f"a {loss.dtype} tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor)
                     else type(loss).__name__)
            raise UserTaskError(f"task {task!r}: loss_fn(model, batch) must return a scalar floating-point tensor, "
                                f"got {shown}")
        return loss.reshape(())

    def evaluate() -> dict[str, float]:
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                value = _guard(f"task {task!r}: metric(model)", user.metric, model)
        finally:
            model.train(training)
        return _metrics(value, task)

    return Problem(params, train_loss, evaluate, model=model,
                   info={"n_params": float(sum(p.numel() for p in params))})


def check_task(task: Task, optimizers: Iterable[str] = ()) -> None:
    """Refuse a task that cannot be compared, before any training: build it with seed 0; its first
    batch's loss must be finite and depend on the parameters, its metric finite on the untrained model,
    and each of ``optimizers`` must accept the task's options. Raises :class:`UserTaskError`."""
    from ..registry import create_optimizer

    problem = task.build(0)
    loss = problem.train_loss(0)
    if loss.grad_fn is None:
        raise UserTaskError(f"task {task.name!r}: loss_fn(model, batch) does not depend on the model's parameters "
                            "(the loss it returns has no grad_fn)")
    if not math.isfinite(loss.item()):
        raise UserTaskError(f"task {task.name!r}: loss_fn(model, batch) is {loss.item()} on the untrained model "
                            "(seed 0, step 0)")
    val = problem.evaluate()["val_loss"]
    if not math.isfinite(val):
        raise UserTaskError(f"task {task.name!r}: metric(model) is {val} on the untrained model (seed 0); the "
                            "validation metric must be finite to pick an lr by")
    for name in dict.fromkeys(optimizers):
        kwargs = dict(task.options.get(name, {}))
        try:
            create_optimizer(name, problem.params, lr=task.default_lr(name), **kwargs)
        except Exception as exc:
            raise UserTaskError(f"task {task.name!r}: {name} refuses options {kwargs} ({_describe(exc)})") from exc


# --------------------------------------------------------------------------- danlu speed


def load_param_shapes(spec: str) -> list[tuple[int, ...]]:
    """The shapes of the trainable tensors that the entry point ``spec`` (``MODULE:ATTR``) gives: an
    ``nn.Module`` (its parameters with ``requires_grad``), an iterable of tensors or of param-group dicts,
    or a task (its ``model(0)``); a callable is called with no arguments, or with 0 when it needs a
    seed. Raises :class:`UserTaskError` with a one-line message."""
    obj, _, _ = _resolve(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        value = _call_entry(obj, spec, seeded=True)
        if isinstance(value, (UserTask, Mapping)):
            user = _as_user_task(value, spec)
            value = _guard(f"{spec}: model(0)", user.model, 0)
    tensors: list[torch.Tensor]
    if isinstance(value, nn.Module):
        tensors = [p for p in value.parameters() if p.requires_grad]
    elif isinstance(value, torch.Tensor):
        tensors = [value]
    else:
        try:
            items = list(value)
        except Exception:
            raise UserTaskError(f"{spec} gave a {type(value).__name__}; expected an nn.Module, an iterable of tensors "
                                "or a task") from None
        tensors = []
        for item in items:
            group: Any = item.get("params") if isinstance(item, Mapping) else item
            group = [group] if isinstance(group, torch.Tensor) else group
            try:
                group = list(group)
            except TypeError:
                group = [group]
            bad = [type(t).__name__ for t in group if not isinstance(t, torch.Tensor)]
            if bad:
                raise UserTaskError(f"{spec} gave an iterable holding {bad[0]}; expected tensors or param-group dicts "
                                    "with 'params'")
            tensors += group
    shapes = [tuple(int(d) for d in t.shape) for t in tensors]
    if not any(math.prod(s) for s in shapes):
        raise UserTaskError(f"{spec} has no trainable parameters to time")
    return shapes
