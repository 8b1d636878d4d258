"""``amos``: how many steps Amos needs to reach tuned AdamW's final validation loss, and its state memory.

**Claim.** Tian & Parikh (arXiv:2210.11693, abstract): on BERT variants and T5, Amos reaches a better
validation loss than tuned AdamW in ≤ 70% of the training steps and time, with ≤ 51% of AdamW's slot
memory. Su (kexue.fm/archives/9344) derives the same kind of schedule (lr ∝ the parameter's scale,
weight decay one order higher, both decaying) from first principles.

**Protocol.** Tasks ``digits`` (``steps`` steps) and ``charlm`` (``steps // 2``), evaluated 20 times per
run. AdamW (weight decay 0.01, the library default) is tuned over the task's lr grid (default lr × 1/3,
1, 3); its mean final val loss over the seeds is the *target*. Amos runs with per-parameter target
scales and factored state from :func:`danlu.amos_groups` (√(1/fan_in) for matrices, 0.5 for biases,
1 for norm gains; one second moment per output unit) and momentum 0.9 (the paper's ≤ 51% slot memory
is with a momentum buffer), its lr ξ tuned over the same kind of grid (the task's Amos default × 1/3,
1, 3). Both grids are extended by a factor of 3 beyond an end that holds the best lr, at most twice
(``danlu compare``'s rule). *Steps to target*: the
first evaluated step at which the mean (over seeds) val loss of Amos at its best ξ is at or below the
target, as a fraction of the budget; per seed, the same with that seed's own curve. Memory: optimizer
state bytes per parameter, Amos over AdamW.

**Verdict rule.** Per task: the mean curve reaches the target within 70% of the budget → the speed claim
holds; never within the budget → fails; in between → partly. The memory claim holds when the state
ratio is ≤ 51% at the paper's precision (whole percent). *supported*: every task holds and memory
holds; *not supported*: no task reaches the target; otherwise *mixed*. One seed → *inconclusive*.
"""

from __future__ import annotations

import math
from typing import Any

from ...optim.amos import amos_groups
from ..loop import mean_curve
from ..tasks import Problem
from ._common import GRID, Context, Experiment, Outcome, figure, fmt_spread, mean_std, save_figure, tune

TASKS = (("digits", 1.0), ("charlm", 0.5))
WEIGHT_DECAY = 0.01
MOMENTUM = 0.9
EVAL_POINTS = 20
SPEED_FRACTION = 0.70
MEMORY_FRACTION = 0.51


def _groups(problem: Problem) -> list[dict[str, Any]]:
    assert problem.model is not None  # both tasks train a model
    return amos_groups(problem.model, momentum=MOMENTUM)


def _steps(ctx_steps: int, fraction: float) -> int:
    return max(1, int(ctx_steps * fraction))


def _units(seeds: int, steps: int) -> int:
    return sum(_steps(steps, f) * seeds * 2 * len(GRID) for _, f in TASKS)  # without grid extensions


def _first_at_or_below(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((s for s, v in curve if v <= target), None)


def _run(ctx: Context) -> Outcome:
    rows, data, plots, measured, speed = [], {}, [], [], []
    mem_ratios = []
    for task, fraction in TASKS:
        steps = _steps(ctx.steps, fraction)
        a_lr, a_grid = tune(task, "adamw", steps, ctx, eval_points=EVAL_POINTS, weight_decay=WEIGHT_DECAY)
        m_lr, m_grid = tune(task, "amos", steps, ctx, eval_points=EVAL_POINTS, param_groups=_groups)
        a_runs, m_runs = a_grid[a_lr], m_grid[m_lr]
        a_final = [r.final_val_loss for r in a_runs]
        target = mean_std(a_final)[0]
        m_curve = mean_curve(m_runs)
        hit = _first_at_or_below(m_curve, target) if math.isfinite(target) else None
        per_seed = [_first_at_or_below(r.curve, target) for r in m_runs] if math.isfinite(target) else []
        reached = [s / steps for s in per_seed if s is not None]
        ratio = m_runs[0].state_bytes_per_param / a_runs[0].state_bytes_per_param
        mem_ratios.append(ratio)
        frac = None if hit is None else hit / steps
        speed.append("holds" if frac is not None and frac <= SPEED_FRACTION else
                     ("fails" if frac is None else "partly"))
        rows.append([task, f"{a_lr:g}", fmt_spread(a_final), f"{m_lr:g}",
                     fmt_spread([r.final_val_loss for r in m_runs]),
                     "never" if hit is None else f"{hit} of {steps} ({frac:.0%})",
                     f"{len(reached)} of {len(per_seed)}" + (f", {fmt_spread(reached, 2)}" if reached else ""),
                     f"{m_runs[0].state_bytes_per_param:.2f} / {a_runs[0].state_bytes_per_param:.2f} ({ratio:.0%})"])
        measured.append(f"on {task} ({steps} steps) the target (tuned AdamW, lr {a_lr:g}) is {fmt_spread(a_final)}; "
                        f"Amos (ξ {m_lr:g}) " + ("never reaches it on average" if hit is None else
                                                f"reaches it at step {hit} ({frac:.0%} of the budget)")
                        + f", {len(reached)} of {len(per_seed)} seeds on their own; state {ratio:.0%} of AdamW's")
        data[task] = {"steps": steps, "adamw_lr": a_lr, "amos_lr": m_lr, "target": target,
                      "adamw_final": a_final, "amos_final": [r.final_val_loss for r in m_runs],
                      "amos_curve": m_curve, "adamw_curve": mean_curve(a_runs),
                      "adamw_grid": {str(lr): [r.final_val_loss for r in rs] for lr, rs in a_grid.items()},
                      "amos_grid": {str(lr): [r.final_val_loss for r in rs] for lr, rs in m_grid.items()},
                      "steps_to_target": hit, "per_seed_steps_to_target": per_seed,
                      "state_bytes_per_param": {"amos": m_runs[0].state_bytes_per_param,
                                                "adamw": a_runs[0].state_bytes_per_param}}
        plt, fig, ax = figure()
        for name, lr, runs in (("adamw", a_lr, a_runs), ("amos", m_lr, m_runs)):
            c = mean_curve(runs)
            ax.plot([p[0] for p in c], [p[1] for p in c], label=f"{name} (lr {lr:g})")
        if math.isfinite(target):
            ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="target: AdamW's final")
        if hit is not None:
            ax.axvline(hit, color="grey", linestyle=":", linewidth=1)
        ax.axvline(SPEED_FRACTION * steps, color="red", linestyle=":", linewidth=1, label="70% of the budget")
        ax.set(xlabel="step", ylabel="val loss (mean over seeds)", yscale="log", title=f"{task}: Amos vs tuned AdamW")
        plots.append(save_figure(plt, fig, ax, ctx.out, f"amos-{task}.png"))
    # at the paper's precision (whole percent)
    memory_holds = all(round(100 * r) <= round(100 * MEMORY_FRACTION) for r in mem_ratios)
    if ctx.seeds < 2:
        verdict, reason = "inconclusive", "one seed gives no spread to judge by."
    else:
        if all(s == "holds" for s in speed) and memory_holds:
            verdict = "supported"
        elif all(s == "fails" for s in speed):
            verdict = "not supported"
        else:
            verdict = "mixed"
        reason = (f"speed (target within {SPEED_FRACTION:.0%} of the budget): "
                  + ", ".join(f"{t} {s}" for (t, _), s in zip(TASKS, speed))
                  + f"; memory (state ≤ {MEMORY_FRACTION:.0%} of AdamW's): {'holds' if memory_holds else 'fails'}.")
    protocol = (f"Tasks digits ({_steps(ctx.steps, 1.0)} steps) and charlm ({_steps(ctx.steps, 0.5)} steps), "
                f"{ctx.seeds} seeds, {EVAL_POINTS} evaluations per run. AdamW (weight decay {WEIGHT_DECAY:g}) "
                "and Amos (`amos_groups(model, momentum=0.9)`) each tuned over their task default lr × (1/3, 1, 3), "
                "extended by ×3 beyond an end that holds the best (at most twice). "
                "Target: tuned AdamW's mean final val loss.")
    return Outcome(
        protocol=protocol,
        tables=[(["task", "adamw lr", "adamw final val loss (target)", "amos ξ", "amos final val loss",
                  "amos steps to target (mean curve)", "seeds reaching it (fraction of budget)",
                  "state B/param amos / adamw"], rows)],
        plots=plots,
        expected=("Amos reaches a better validation loss than tuned AdamW in ≤ 70% of the steps, with ≤ 51% of "
                  "its slot memory (Tian & Parikh, arXiv:2210.11693; Su, kexue.fm/archives/9344)."),
        measured="; ".join(measured) + ".",
        verdict=verdict, reason=reason, data=data)


EXPERIMENT = Experiment(
    name="amos",
    title="Amos: steps to tuned AdamW's final val loss, and state memory",
    summary="both tuned on digits and charlm; when does Amos reach AdamW's final val loss, at what memory",
    default_seeds=3,
    default_steps=600,
    units=_units,
    run=_run,
)
