"""The shared shape of ``danlu compare --experiment``: an :class:`Experiment` is a fixed protocol that
runs on a :class:`Context` and returns an :class:`Outcome` (protocol text, tables, plots, what was
expected, what was measured, a verdict and the raw numbers).

Statistics are deliberately simple and stated in every verdict: arms are compared by their mean over
seeds, and a difference *counts* when it exceeds ``Z`` = 2 standard errors of the difference
(Welch: √(s_a²/n_a + s_b²/n_b)); with one seed there is no spread and nothing counts.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..plotting import figure, save_figure

__all__ = ["Context", "Outcome", "Experiment", "Z", "mean_std", "fmt_spread", "difference", "significant",
           "figure", "save_figure", "VERDICTS"]

Z = 2.0  # a difference counts when |mean_a − mean_b| > Z · SE(difference)
VERDICTS = ("supported", "not supported", "mixed", "inconclusive")


@dataclass
class Context:
    """What an experiment runs with.

    Attributes:
        seeds: seeds per arm (``--seeds``, else the experiment's default).
        steps: the main step budget (``--steps``, else the experiment's default); an experiment derives
            every other budget from it (e.g. k× fewer steps for a k× larger batch).
        out: the directory to write plots into (``save_figure(..., ctx.out, name)``).
        advance: ``advance(units, description)`` moves the progress bar by ``units`` (training steps;
            the total is :attr:`Experiment.units`).
        grow: ``grow(units)`` adds work found on the way to the total (an lr grid extended by :func:`tune`).
    """

    seeds: int
    steps: int
    out: Path
    advance: Callable[[int, str], None] = lambda units, description: None
    grow: Callable[[int], None] = lambda units: None


@dataclass
class Outcome:
    """An experiment's result, as written into its report section.

    Attributes:
        protocol: markdown: the task, the arms, their hyperparameters, steps and seeds.
        tables: (headers, rows) pairs, cells already formatted.
        plots: PNG file names written into ``ctx.out``.
        expected: what the essay or paper claims (with the source).
        measured: what this run measured, with seeds and spread.
        verdict: one of :data:`VERDICTS`.
        reason: one sentence: why this verdict from these numbers.
        data: raw numbers for results.json (JSON-serialisable; non-finite floats become null).
    """

    protocol: str
    tables: list[tuple[list[str], list[list[str]]]]
    plots: list[str]
    expected: str
    measured: str
    verdict: str
    reason: str
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


@dataclass(frozen=True)
class Experiment:
    """A named, fixed protocol. ``units(seeds, steps)`` is the progress total (training steps, for the
    ETA); ``run(ctx)`` does the work and returns the :class:`Outcome`."""

    name: str
    title: str
    summary: str
    default_seeds: int
    default_steps: int
    units: Callable[[int, int], int]
    run: Callable[[Context], Outcome]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value; nan for none) of the finite values."""
    ok = [float(v) for v in values if math.isfinite(v)]
    if not ok:
        return math.nan, math.nan
    return statistics.fmean(ok), (statistics.stdev(ok) if len(ok) > 1 else 0.0)


def fmt_spread(values: Sequence[float], digits: int = 4) -> str:
    """"m ± s (n seeds)", "m (1 seed)", or "diverged" when no value is finite; non-finite values are
    counted as diverged seeds."""
    ok = [v for v in values if math.isfinite(v)]
    bad = len(values) - len(ok)
    tail = f", {bad} diverged" if bad else ""
    if not ok:
        return "diverged"
    m, s = mean_std(ok)
    if len(ok) == 1:
        return f"{m:.{digits}g} (1 seed{tail})"
    return f"{m:.{digits}g} ± {s:.2g} ({len(ok)} seeds{tail})"


def difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """mean(a) − mean(b) and its standard error (Welch); the error is nan with fewer than 2 finite
    values on either side."""
    ma, sa = mean_std(a)
    mb, sb = mean_std(b)
    na = sum(1 for v in a if math.isfinite(v))
    nb = sum(1 for v in b if math.isfinite(v))
    if na < 2 or nb < 2:
        return ma - mb, math.nan
    return ma - mb, math.sqrt(sa * sa / na + sb * sb / nb)


def significant(a: Sequence[float], b: Sequence[float]) -> int:
    """+1 if mean(a) > mean(b) by more than Z standard errors, −1 if less, 0 otherwise (also when the
    error is unknown). An exact tie with zero spread is 0; a nonzero difference with zero spread counts."""
    d, se = difference(a, b)
    if not math.isfinite(d) or not math.isfinite(se):
        return 0
    if se == 0.0:
        return 0 if d == 0 else (1 if d > 0 else -1)
    return 1 if d > Z * se else (-1 if d < -Z * se else 0)


_RUNS: dict[tuple[Any, ...], Any] = {}


def cached_run(task: str, optimizer: str, lr: float, seed: int, steps: int, ctx: Context, *,
               eval_points: int = 20, **kwargs: Any) -> Any:
    """:func:`danlu.bench.loop.run` on the named task, remembered for the life of the process (two
    experiments that tune AdamW on the same task and budget share the runs); advances the progress bar
    by ``steps`` on a fresh run. ``kwargs`` go to ``run`` (``param_groups=``, optimizer keywords)."""
    from ..loop import run
    from ..tasks import get_task

    key = (task, optimizer, float(lr), int(seed), int(steps), eval_points,
           tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
    if key not in _RUNS:
        _RUNS[key] = run(get_task(task), optimizer, lr, seed, steps,
                         eval_every=max(1, steps // eval_points), **kwargs)
        ctx.advance(steps, f"{task} {optimizer} lr={lr:g} seed={seed}")
    return _RUNS[key]



GRID = (1 / 3, 1.0, 3.0)  # an lr sweep: the task's default lr for the optimizer times these
EXTENSIONS = 2            # ... extended by one more factor of 3 at an edge holding the best, at most this often


def tune(task: str, optimizer: str, steps: int, ctx: Context, **kwargs: Any) -> tuple[float, dict[float, list[Any]]]:
    """Sweep ``optimizer``'s lr on ``task`` over the task's default lr × :data:`GRID` with ``ctx.seeds``
    seeds, extending the grid by a factor of 3 beyond an end that holds the best lr (at most
    :data:`EXTENSIONS` times, the rule of ``danlu compare --lrs auto``). Returns the best lr (lowest
    mean final val loss over the seeds, lrs with a diverged seed excluded; the grid's centre if every
    lr diverged) and the runs per lr. ``kwargs`` go to :func:`cached_run`."""
    from ..loop import lr_scores, sweep
    from ..tasks import get_task

    base = get_task(task).default_lr(optimizer)
    by_lr = sweep([float(f"{base * f:.6g}") for f in GRID], ctx.seeds,
                  lambda lr, seed: cached_run(task, optimizer, lr, seed, steps, ctx, **kwargs),
                  EXTENSIONS, GRID[-1] / GRID[-2], lambda lr: ctx.grow(ctx.seeds * steps))
    scores = lr_scores([r for rs in by_lr.values() for r in rs])
    best = min(scores, key=scores.__getitem__) if scores else float(f"{base:.6g}")
    return best, dict(sorted(by_lr.items()))
