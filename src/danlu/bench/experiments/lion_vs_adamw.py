"""``lion-vs-adamw``: Lion with hyperparameters converted from a tuned AdamW, against that AdamW.

**Claim.** Chen et al. (arXiv:2302.06675, §5 and the google/automl README) report that Lion matches or
beats AdamW when its lr is 3–10× smaller and its weight decay 3–10× larger (the product lr·λ, the decay
per step, unchanged); Su (kexue.fm/archives/9473) reads their experiments as "at least 10× smaller".
Both note that Lion's advantage shrinks at small batch sizes (Su: below about 64), because the sign adds
its own noise to the minibatch noise. :func:`danlu.lion_from_adamw` implements the conversion, so the
user's question is: tune AdamW as usual, convert, and is Lion then as good?

**Protocol.** Tasks ``digits`` (MLP, batch 64, ``steps`` steps) and ``charlm`` (2-layer transformer,
batch 32, ``steps // 2`` steps). AdamW (danlu's, betas (0.9, 0.999), weight decay 0.01, the library
default) is tuned over the task's lr grid (its default lr × 1/3, 1, 3, extended by ×3 beyond an end
that holds the best, at most twice), picking the lr with the lowest mean final val loss over the seeds.
Lion (betas (0.9, 0.99)) then runs, without tuning, at ``lion_from_adamw(best_lr, 0.01, factor)`` for
factor 10 (the converter's default, Su) and 3 (the paper's other end). Same seeds (initialisation and
batch order) for every arm.

**Verdict rule.** Per task, Lion ÷10 against tuned AdamW on final val loss: significantly worse
(> 2 standard errors, Welch, over seeds) → the claim fails on that task; otherwise it holds (matches or
beats). All tasks hold → *supported*; none → *not supported*; some → *mixed*; one seed → *inconclusive*.
"""

from __future__ import annotations

from typing import Any

from ...recipes import lion_from_adamw
from ._common import GRID, Context, Experiment, Outcome, cached_run, figure, fmt_spread, save_figure, significant, tune
from ..loop import mean_curve

TASKS = (("digits", 1.0), ("charlm", 0.5))   # (task, fraction of --steps)
WEIGHT_DECAY = 0.01
FACTORS = (10.0, 3.0)


def _steps(ctx_steps: int, fraction: float) -> int:
    return max(1, int(ctx_steps * fraction))


def _units(seeds: int, steps: int) -> int:
    return sum(_steps(steps, f) * seeds * (len(GRID) + len(FACTORS)) for _, f in TASKS)


def _finals(runs: list[Any]) -> list[float]:
    return [r.final_val_loss for r in runs]


def _run(ctx: Context) -> Outcome:
    seeds = range(ctx.seeds)
    rows, data, holds, plots, measured = [], {}, [], [], []
    for task, fraction in TASKS:
        steps = _steps(ctx.steps, fraction)
        best_lr, adamw = tune(task, "adamw", steps, ctx, weight_decay=WEIGHT_DECAY)
        arms = {"adamw (tuned)": (best_lr, WEIGHT_DECAY, adamw[best_lr])}
        for factor in FACTORS:
            hp = lion_from_adamw(best_lr, WEIGHT_DECAY, factor=factor)
            runs = [cached_run(task, "lion", hp["lr"], s, steps, ctx, weight_decay=hp["weight_decay"])
                    for s in seeds]
            arms[f"lion ÷{factor:g}"] = (hp["lr"], hp["weight_decay"], runs)
        a_final = _finals(arms["adamw (tuned)"][2])
        l_final = _finals(arms[f"lion ÷{FACTORS[0]:g}"][2])
        sign = significant(l_final, a_final)
        holds.append(sign <= 0)
        for name, (lr, wd, runs) in arms.items():
            accs = [r.final.get("val_acc", r.final.get("val_bpc", float("nan"))) for r in runs]
            rows.append([task, name, f"{lr:g}", f"{wd:g}", fmt_spread(_finals(runs)), fmt_spread(accs)])
        data[task] = {"steps": steps, "adamw_grid": {str(lr): _finals(rs) for lr, rs in adamw.items()},
                      "best_adamw_lr": best_lr,
                      "arms": {n: {"lr": lr, "weight_decay": wd, "final_val_loss": _finals(rs)}
                               for n, (lr, wd, rs) in arms.items()}}
        verb = {1: "is worse than", 0: "matches", -1: "beats"}[sign]
        measured.append(f"on {task} ({steps} steps) Lion ÷10 {verb} tuned AdamW (lr {best_lr:g}): "
                        f"{fmt_spread(l_final)} vs {fmt_spread(a_final)} final val loss; Lion ÷3: "
                        f"{fmt_spread(_finals(arms['lion ÷3'][2]))}")
        plt, fig, ax = figure()
        for name, (lr, _, runs) in arms.items():
            curve = mean_curve(runs)
            if curve:
                ax.plot([c[0] for c in curve], [c[1] for c in curve], label=f"{name} (lr {lr:g})")
        ax.set(xlabel="step", ylabel="val loss (mean over seeds)", yscale="log",
               title=f"{task}: Lion from lion_from_adamw vs tuned AdamW")
        plots.append(save_figure(plt, fig, ax, ctx.out, f"lion-vs-adamw-{task}.png"))
    if ctx.seeds < 2:
        verdict, reason = "inconclusive", "one seed gives no spread to judge a difference by."
    else:
        verdict = "supported" if all(holds) else ("not supported" if not any(holds) else "mixed")
        worse = len(holds) - sum(holds)
        reason = (f"Lion ÷10 is significantly worse than tuned AdamW on {worse} of {len(holds)} tasks and matches "
                  f"or beats it on {sum(holds)} (worse: mean final val loss higher by more than 2 standard "
                  "errors over seeds).")
    protocol = (f"Tasks digits ({_steps(ctx.steps, 1.0)} steps, batch 64) and charlm ({_steps(ctx.steps, 0.5)} "
                f"steps, batch 32); {ctx.seeds} seeds per arm. AdamW (weight decay {WEIGHT_DECAY:g}) tuned over "
                "the task's default lr × (1/3, 1, 3), extended by ×3 beyond an end that holds the best; Lion "
                "(betas 0.9, 0.99) untuned at "
                "`lion_from_adamw(best_lr, 0.01, factor)` for factor 10 and 3.")
    return Outcome(
        protocol=protocol,
        tables=[(["task", "arm", "lr", "weight decay", "final val loss", "val acc / bpc"], rows)],
        plots=plots,
        expected=("Lion with lr 3–10× smaller and weight decay 3–10× larger than a tuned AdamW matches or beats "
                  "it (Chen et al., arXiv:2302.06675; Su, kexue.fm/archives/9473: ≥10× smaller), with less "
                  "of an edge at small batches (Su: below about 64)."),
        measured="; ".join(measured) + ".",
        verdict=verdict, reason=reason, data=data)


EXPERIMENT = Experiment(
    name="lion-vs-adamw",
    title="Lion with converted hyperparameters vs tuned AdamW",
    summary="tune AdamW, convert with lion_from_adamw (÷10, ÷3), compare final val loss on digits and charlm",
    default_seeds=3,
    default_steps=600,
    units=_units,
    run=_run,
)
