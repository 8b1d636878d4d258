"""One training loop for ``danlu compare``: a task, an optimizer, an lr and a seed → a :class:`RunResult`.

The loop is deliberately plain::

    problem = task.build(seed)
    params = problem.params if param_groups is None else param_groups(problem)
    opt = create_optimizer(name, params, lr=lr, **{**task.options.get(name, {}), **optimizer_kwargs})
    for step in range(steps):
        loss = <one optimizer step on problem.train_loss(step)>
        if problem.project is not None: problem.project()
        if not finite(loss): mark diverged, stop
        every eval_every steps (and at the end): record problem.evaluate()["val_loss"]

How a step is taken depends on the optimizer: ``zero-order`` gets a closure that returns the loss
without calling backward (it estimates the gradient from forward passes) — the task's non-differentiable
``task_loss`` when it has one (zero-one: the 0-1 error), else the minibatch loss; ``mgs`` gets a surrogate
closure (zero_grad, loss, backward) and the task's zero-one ``task_loss``; every other optimizer is
stepped from ``.grad`` (zero_grad, backward, step).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, cast

import torch

from ..registry import create_optimizer
from .speed import _state_bytes
from .tasks import Problem, Task

if TYPE_CHECKING:
    from ..zeroth.mgs import MGS
    from ..zeroth.zero_order import ZeroOrder

__all__ = ["RunResult", "run", "mean_curve", "lr_scores", "lr_beyond_edge", "sweep"]


@dataclass
class RunResult:
    """One run. ``curve`` is [(step, val_loss), ...] (steps counted after the update); ``final`` the last
    ``evaluate()`` metrics (empty when diverged); ``train_losses`` the minibatch loss per step;
    ``seconds_per_step`` the mean wall time of a training step (forward, backward, update, projection;
    evaluation excluded) over the steps after the first, which pays one-time costs."""

    task: str
    optimizer: str
    lr: float
    seed: int
    steps: int
    curve: list[tuple[int, float]] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    diverged: bool = False
    steps_done: int = 0
    seconds_per_step: float = float("nan")
    state_bytes_per_param: float = float("nan")

    @property
    def final_val_loss(self) -> float:
        return float("nan") if self.diverged else self.final.get("val_loss", float("nan"))

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["curve"] = [[s, _finite_or_none(v)] for s, v in self.curve]
        out["train_losses"] = [_finite_or_none(v) for v in self.train_losses]
        out["final"] = {k: _finite_or_none(v) for k, v in self.final.items()}
        out["seconds_per_step"] = _finite_or_none(self.seconds_per_step)
        out["state_bytes_per_param"] = _finite_or_none(self.state_bytes_per_param)
        return out


def mean_curve(runs: list[RunResult]) -> list[tuple[int, float]]:
    """The val-loss curve averaged over the runs that did not diverge, at the steps all of them evaluated."""
    ok = [r for r in runs if not r.diverged]
    if not ok:
        return []
    by_step: dict[int, list[float]] = {}
    for r in ok:
        for s, v in r.curve:
            by_step.setdefault(s, []).append(v)
    return [(s, statistics.fmean(v)) for s, v in sorted(by_step.items()) if len(v) == len(ok)]


def lr_scores(runs: list[RunResult]) -> dict[float, float]:
    """Mean final val loss per lr over its seeds, for the lrs none of whose seeds diverged."""
    by_lr: dict[float, list[float]] = {}
    for r in runs:
        by_lr.setdefault(r.lr, []).append(r.final_val_loss)
    return {lr: sum(v) / len(v) for lr, v in by_lr.items() if all(math.isfinite(x) for x in v)}


def lr_beyond_edge(runs: list[RunResult], lrs: list[float], factor: float) -> float | None:
    """When the best of ``lrs`` by :func:`lr_scores` (an lr with a diverged seed never counts as best) is
    the smallest or the largest, the next lr one ``factor`` beyond it (6 significant digits); else None.
    How an lr sweep makes sure its best is not cut off by the grid."""
    scores = {lr: v for lr, v in lr_scores(runs).items() if lr in lrs}
    if not scores:
        return None
    best, ordered = min(scores, key=scores.__getitem__), sorted(lrs)
    if best == ordered[-1]:
        return float(f"{best * factor:.6g}")
    if best == ordered[0]:
        return float(f"{best / factor:.6g}")
    return None


def sweep(lrs: list[float], seeds: int, run_one: Callable[[float, int], RunResult], extensions: int = 0,
          factor: float = 3.0, on_extend: Callable[[float], None] | None = None) -> dict[float, list[RunResult]]:
    """``run_one(lr, seed)`` for every lr of ``lrs`` and seed in range(seeds); then, up to ``extensions``
    times, while :func:`lr_beyond_edge` finds the best lr at an end of the grid, the same for the next lr
    beyond it (``on_extend(lr)`` is told first). Returns the runs per lr, in the order they ran."""
    lrs, by_lr = list(lrs), {}
    for extension in range(extensions + 1):
        for lr in lrs:
            if lr not in by_lr:
                by_lr[lr] = [run_one(lr, seed) for seed in range(seeds)]
        if extension == extensions:
            break
        beyond = lr_beyond_edge([r for rs in by_lr.values() for r in rs], lrs, factor)
        if beyond is None:
            break
        if on_extend is not None:
            on_extend(beyond)
        lrs.append(beyond)
    return by_lr


def _finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _step(opt: torch.optim.Optimizer, name: str, problem: Problem, step: int) -> float:
    """One optimizer step on ``problem.train_loss(step)``; returns that step's loss as a float."""
    loss: Any
    if name == "zero-order":
        # A task with a non-differentiable objective (zero-one) is searched on that objective itself.
        objective = problem.task_loss if problem.task_loss is not None else (lambda: problem.train_loss(step))
        with torch.no_grad():
            loss = cast("ZeroOrder", opt).step(objective)
    elif name == "mgs":
        if problem.task_loss is None:
            raise ValueError("mgs needs a task with a task_loss (e.g. zero-one)")

        def surrogate() -> torch.Tensor:
            opt.zero_grad()
            value = problem.train_loss(step)
            value.backward()
            return value

        loss = cast("MGS", opt).step(surrogate, problem.task_loss)
    else:
        opt.zero_grad()
        loss = problem.train_loss(step)
        loss.backward()
        opt.step()
    return float(loss.detach() if isinstance(loss, torch.Tensor) else loss)


def run(task: Task, optimizer_name: str, lr: float, seed: int, steps: int, eval_every: int | None = None,
        param_groups: Callable[[Problem], Any] | None = None, lr_lambda: Callable[[int], float] | None = None,
        **optimizer_kwargs: Any) -> RunResult:
    """Train ``task.build(seed)`` with ``optimizer_name`` at ``lr`` for ``steps`` steps.

    ``eval_every`` (default: about 20 points per curve) sets how often the val loss is recorded; the
    last step is always evaluated. A non-finite training or val loss stops the run and sets ``diverged``.
    ``param_groups(problem)`` (default: ``problem.params``) gives what the optimizer is built over, e.g.
    ``lambda p: danlu.amos_groups(p.model)``; ``lr_lambda`` (default none) schedules the lr with
    ``torch.optim.lr_scheduler.LambdaLR``, stepped after every update; ``optimizer_kwargs`` go to
    :func:`danlu.create_optimizer`.
    """
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    eval_every = eval_every or max(1, steps // 20)
    name = optimizer_name.lower()
    result = RunResult(task.name, name, float(lr), int(seed), int(steps))
    problem = task.build(seed)
    params = problem.params if param_groups is None else param_groups(problem)
    opt = create_optimizer(name, params, lr=lr, **{**task.options.get(name, {}), **optimizer_kwargs})
    sched = None if lr_lambda is None else torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    train_time = first_time = 0.0
    for step in range(steps):
        t0 = time.perf_counter()
        loss = _step(opt, name, problem, step)
        if sched is not None:
            sched.step()
        if problem.project is not None:
            problem.project()
        if step == 0:  # the first step pays one-time costs (allocation, lazy state): timed apart
            first_time = time.perf_counter() - t0
        else:
            train_time += time.perf_counter() - t0
        result.train_losses.append(loss)
        result.steps_done = step + 1
        if not math.isfinite(loss):
            result.diverged = True
            break
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            metrics = problem.evaluate()
            result.curve.append((step + 1, metrics["val_loss"]))
            if not math.isfinite(metrics["val_loss"]):
                result.diverged = True
                break
            if step + 1 == steps:
                result.final = metrics
    # seconds per step after the first (the first alone when the run had one step)
    result.seconds_per_step = train_time / (result.steps_done - 1) if result.steps_done > 1 else first_time
    n_params = sum(p.numel() for p in problem.params)
    result.state_bytes_per_param = _state_bytes(opt) / n_params
    return result
