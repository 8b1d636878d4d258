"""Summaries and the written report of ``danlu compare``.

For each (task, optimizer) the runs are grouped by lr; an lr's score is the mean final val loss over
its seeds, with diverged runs left out (an lr whose every seed diverged has no score). The best lr is
the one with the lowest score. The leaderboard of a task lists its optimizers at their best lr, best
first, with mean ± std over seeds, steps to target, seconds per step and optimizer-state bytes per
parameter.

*Steps to target*: a task's target is the worst of its optimizers' best mean final val losses (so every
optimizer that did not diverge reaches it); an optimizer's steps to target is the first evaluated step
at which its mean val-loss curve (best lr, mean over seeds) is at or below the target.

matplotlib (Agg backend) is imported only when plots are written.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from .. import __version__
from .loop import RunResult, mean_curve
from .plotting import figure, save_figure

__all__ = ["LrScore", "Summary", "summarize", "format_leaderboard", "environment", "write_report", "MARKER"]

MARKER = "danlu compare"  # results.json's "generator": how an earlier report is recognised


@dataclass
class LrScore:
    lr: float
    mean: float      # mean final val loss over the non-diverged seeds (nan when all diverged)
    std: float
    n_ok: int        # seeds that did not diverge
    n_diverged: int

    @property
    def diverged(self) -> bool:
        return self.n_ok == 0


@dataclass
class Summary:
    task: str
    optimizer: str
    lrs: list[LrScore]
    best_lr: float | None               # None when every lr diverged
    mean: float = float("nan")
    std: float = float("nan")
    steps_to_target: int | None = None
    seconds_per_step: float = float("nan")
    state_bytes_per_param: float = float("nan")
    curve: list[tuple[int, float]] = field(default_factory=list)  # mean val loss over seeds at best lr

    def to_json(self) -> dict[str, Any]:
        f = _num
        return {"task": self.task, "optimizer": self.optimizer, "best_lr": self.best_lr,
                "mean_val_loss": f(self.mean), "std_val_loss": f(self.std),
                "steps_to_target": self.steps_to_target, "seconds_per_step": f(self.seconds_per_step),
                "state_bytes_per_param": f(self.state_bytes_per_param),
                "lrs": [{"lr": s.lr, "mean_val_loss": f(s.mean), "std_val_loss": f(s.std),
                         "seeds_ok": s.n_ok, "seeds_diverged": s.n_diverged} for s in self.lrs]}


def _num(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: Iterable[RunResult]) -> list[Summary]:
    """One :class:`Summary` per (task, optimizer), in first-seen order; within a task the steps to
    target are filled in once every optimizer's best lr is known."""
    groups: dict[tuple[str, str], dict[float, list[RunResult]]] = {}
    for r in results:
        groups.setdefault((r.task, r.optimizer), {}).setdefault(r.lr, []).append(r)
    summaries = []
    for (task, opt), by_lr in groups.items():
        scores = []
        for lr, runs in sorted(by_lr.items()):
            finals = [r.final_val_loss for r in runs if not r.diverged and math.isfinite(r.final_val_loss)]
            mean, std = _mean_std(finals)
            scores.append(LrScore(lr, mean, std, len(finals), len(runs) - len(finals)))
        ok = [s for s in scores if not s.diverged]
        summary = Summary(task, opt, scores, best_lr=None)
        if ok:
            best = min(ok, key=lambda s: s.mean)
            runs = by_lr[best.lr]
            summary.best_lr, summary.mean, summary.std = best.lr, best.mean, best.std
            summary.seconds_per_step = statistics.fmean(r.seconds_per_step for r in runs)
            summary.state_bytes_per_param = statistics.fmean(r.state_bytes_per_param for r in runs)
            summary.curve = mean_curve(runs)
        summaries.append(summary)
    for task in dict.fromkeys(s.task for s in summaries):
        rows = [s for s in summaries if s.task == task and s.best_lr is not None]
        if not rows:
            continue
        target = max(s.mean for s in rows)
        for s in rows:
            s.steps_to_target = next((step for step, v in s.curve if v <= target * (1 + 1e-9)), None)
    return summaries


def _fmt(x: float, digits: int = 4) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _mean_pm(score: LrScore) -> str:
    """"mean ± std" over seeds, or "mean (1 seed)" when there is no spread to show."""
    if score.n_ok == 1:
        return f"{_fmt(score.mean)} (1 seed)"
    return f"{_fmt(score.mean)} ± {_fmt(score.std, 2)}"


def leaderboard_rows(summaries: list[Summary], task: str) -> list[list[str]]:
    rows = sorted((s for s in summaries if s.task == task),
                  key=lambda s: (s.best_lr is None, s.mean if s.best_lr is not None else 0.0))
    out = []
    for rank, s in enumerate(rows, 1):
        if s.best_lr is None:
            out.append([str(rank), s.optimizer, "diverged at every lr", "—", "—", "—", "—"])
            continue
        best = next(sc for sc in s.lrs if sc.lr == s.best_lr)
        out.append([str(rank), s.optimizer, _mean_pm(best), f"{s.best_lr:g}",
                    "—" if s.steps_to_target is None else str(s.steps_to_target),
                    f"{1e3 * s.seconds_per_step:.2f}", f"{s.state_bytes_per_param:.2f}"])
    return out


HEADERS = ["#", "optimizer", "val loss (mean ± std)", "best lr", "steps to target", "ms/step", "state B/param"]


def format_leaderboard(summaries: list[Summary]) -> str:
    """Plain-text leaderboards, one per task."""
    blocks = []
    for task in dict.fromkeys(s.task for s in summaries):
        rows = [HEADERS] + leaderboard_rows(summaries, task)
        widths = [max(len(r[i]) for r in rows) for i in range(len(HEADERS))]
        lines = [f"{task}"] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def environment() -> dict[str, Any]:
    """danlu and torch versions, the git commit of the working directory (None outside a repository),
    the processor and the CPU count."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent)
        git = commit.stdout.strip() if commit.returncode == 0 and commit.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        git = None
    return {"danlu_version": __version__, "git_commit": git, "torch_version": torch.__version__,
            "python_version": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def _plots(summaries: list[Summary], task: str, out: Path) -> list[str]:
    rows = [s for s in summaries if s.task == task]
    files = []
    plt, fig, ax = figure()
    for s in rows:
        if s.curve:
            ax.plot([c[0] for c in s.curve], [c[1] for c in s.curve], label=f"{s.optimizer} (lr {s.best_lr:g})")
    ax.set(xlabel="step", ylabel="val loss", title=f"{task}: val loss at the best lr (mean over seeds)")
    if any(c[1] > 0 for s in rows for c in s.curve):
        ax.set_yscale("log")
    files.append(save_figure(plt, fig, ax, out, f"{task}-curves.png"))

    plt, fig, ax = figure()
    finite = [sc.mean for s in rows for sc in s.lrs if not sc.diverged]
    top = max(finite) if finite else 1.0
    for s in rows:
        line = ax.plot([sc.lr for sc in s.lrs if not sc.diverged], [sc.mean for sc in s.lrs if not sc.diverged],
                       marker="o", label=s.optimizer)[0]
        bad = [sc.lr for sc in s.lrs if sc.diverged]
        if bad:
            ax.scatter(bad, [top] * len(bad), marker="x", color=line.get_color())
    ax.set_xscale("log")
    if finite and min(finite) > 0:
        ax.set_yscale("log")
    ax.set(xlabel="learning rate", ylabel="final val loss (mean over seeds)",
           title=f"{task}: lr sensitivity (x = diverged)")
    files.append(save_figure(plt, fig, ax, out, f"{task}-lr.png"))
    return files


def _markdown(summaries: list[Summary], config: dict[str, Any], env: dict[str, Any],
              plots: dict[str, list[str]]) -> str:
    lines = ["# danlu compare", "",
             f"danlu {env['danlu_version']} (commit {env['git_commit'] or 'n/a'}), torch {env['torch_version']}, "
             f"{env['processor']}, {env['cpu_count']} CPUs.", "",
             "Steps: " + ", ".join(f"{t} {n}" for t, n in config["steps"].items())
             + f"; seeds: {config['seeds']}; lrs: {config['lrs']}. "
             "The best lr per optimizer is the one with the lowest mean final val loss over seeds "
             "(diverged runs excluded). Steps to target: first evaluated step at which the mean val "
             "loss reaches the worst optimizer's best final val loss on that task.", ""]
    if config.get("extended"):
        lines += ["Auto grids extended because the best lr was at an end: " + ", ".join(
            f"{e['task']} {e['optimizer']} → {e['lr']:g}" for e in config["extended"]) + ".", ""]
    for task in dict.fromkeys(s.task for s in summaries):
        lines += [f"## {task}", "", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
        lines += ["| " + " | ".join(r) + " |" for r in leaderboard_rows(summaries, task)]
        lines += ["", "Final val loss per lr (mean ± std over seeds; *diverged* when every seed diverged):", "",
                  "| optimizer | lr | val loss | diverged seeds |",
                  "|---|---|---|---|"]
        for s in (s for s in summaries if s.task == task):
            for sc in s.lrs:
                val = "*diverged*" if sc.diverged else _mean_pm(sc)
                best = " **(best)**" if sc.lr == s.best_lr else ""
                lines.append(f"| {s.optimizer} | {sc.lr:g}{best} | {val} | {sc.n_diverged} |")
        lines.append("")
        lines += [f"![{name}]({name})" for name in plots.get(task, [])] + [""]
    return "\n".join(lines)


def write_report(out: Path, results: list[RunResult], config: dict[str, Any],
                 env: dict[str, Any] | None = None) -> list[Summary]:
    """Write report.md, the PNG plots and results.json into the (existing, empty) directory ``out``."""
    env = env or environment()
    summaries = summarize(results)
    plots = {task: _plots(summaries, task, out) for task in dict.fromkeys(s.task for s in summaries)}
    (out / "report.md").write_text(_markdown(summaries, config, env, plots), encoding="utf-8")
    payload = {"generator": MARKER, "environment": env, "config": config,
               "summary": [s.to_json() for s in summaries], "runs": [r.to_json() for r in results]}
    (out / "results.json").write_text(json.dumps(payload, indent=1, allow_nan=False), encoding="utf-8")
    return summaries
