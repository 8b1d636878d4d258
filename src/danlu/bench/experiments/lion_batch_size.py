"""``lion-batch-size``: does Lion's standing against a tuned AdamW improve with the batch size?

**Claim.** Chen et al. (arXiv:2302.06675, limitations) and Su (kexue.fm/archives/9473, "延伸思考"):
Lion does worse than AdamW at small batch sizes (below 64), because the sign already adds noise and a
small batch adds more ("noise must be in moderation"); its gain grows with the batch. Su also relays
the paper's generalisation claim: Lion's validation results are better although its training-set
results are not necessarily better than AdamW's (the ImageNet curves), attributed to the sign's noise
leading to flatter regions; Su's own guess is that the sign treats every coordinate equally. Here
that is the train/validation gap: Lion's val loss minus its full-train loss is smaller, at a val loss no
worse. Finally, 9473 calls the Amos-derived recipe of kexue.fm/archives/9344 "the most convenient" way
to set Lion: η = α0·σ and λ = α0/(2qσ) per tensor (σ its init scale, q = 1; α0 "about 1e-3", 9344
adding "up to 1e-2 if the task is simple"), implemented as :func:`danlu.scale_aware_groups`.

**Protocol.** Task ``digits`` (MLP 64-128-10, 1437 train / 360 val rows), built with batch B ∈
{16, 64, 256} rows per step at *equal examples seen*: ``steps`` steps at B = 256 and
``steps · 256 / B`` at smaller B (the default 150 steps = 38,400 examples ≈ 27 epochs). Per B:

1. ``adamw``: danlu AdamW (betas 0.9, 0.999, weight decay 0.01) tuned over the lr grid
   base_B × (1/3, 1, 3), base_B = 3e-3·√(B/64) (the task's AdamW lr at its batch 64, moved by the
   square-root scaling rule for Adam), extended by ×3 beyond an end that holds the best (at most twice:
   the rule of :func:`danlu.bench.experiments._common.tune`); best = lowest mean final val loss.
2. ``lion ÷10`` and ``lion ÷3``: Lion (betas 0.9, 0.99) at ``lion_from_adamw(best_lr, 0.01, k)``,
   untuned. **Lion (converted)** is the better of the two at that B by mean final val loss — a two-point
   sweep, like AdamW's own, on the same seeds.
3. ``lion (own sweep)``, a diagnostic added after the first default-budget run (it does not enter
   the verdict): Lion at weight decay 0.1 (the ÷10 conversion's) tuned over its own grid, the ÷10 lr
   × (1/3, 1, 3) extended like AdamW's, so that a conversion that suits one batch size and not another
   cannot masquerade as a batch-size effect.
4. ``lion scale-aware``: Lion over ``scale_aware_groups(model, alpha0=0.01, q=1)`` (the easy-task end
   of 9344's α0, since digits is easy and the budget is short; constant lr: the loop has no schedule and
   Su leaves κ to the data size), not tuned and not batch-aware.

Same seeds (initialisation, and at a given B the batch order) for every arm. Each run records its final
val loss and accuracy and, on the full train split, its train loss and accuracy; gap = val loss − train
loss.

**Verdict rule** (written before the numbers; a difference counts at 2 standard errors, Welch, over
seeds). Per seed and B, r = ln(val loss of Lion (converted) / val loss of tuned AdamW).
(A) batch trend: *holds* iff mean r at B = 256 is significantly below mean r at B = 16.
(B) generalisation, at B = 256 (the batch where Lion should be at its best): *holds* iff Lion
(converted)'s gap is significantly smaller than AdamW's and its val loss is not significantly higher.
Both hold → *supported*; neither → *not supported*; one → *mixed*; one seed → *inconclusive*. The
own-sweep and scale-aware arms are reported beside them (their r per B) but do not enter the verdict.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ...recipes import lion_from_adamw, scale_aware_groups
from ..loop import RunResult, lr_scores, run, sweep
from ..tasks import Problem, Task, _build_digits, get_task
from ._common import (EXTENSIONS, GRID, Context, Experiment, Outcome, difference, figure, fmt_spread, mean_std,
                      save_figure, significant)

BATCHES = (16, 64, 256)      # rows per step; the budget is steps at the largest
BASE_BATCH = 64              # the batch of the registered digits task, where its default AdamW lr lives
WEIGHT_DECAY = 0.01          # AdamW's (the library default), as in lion-vs-adamw
FACTORS = (10.0, 3.0)        # lion_from_adamw factors: Su's ≥10 and the paper's other end
ALPHA0 = 1e-2                # scale_aware_groups' α0 (9344: ~1e-3, up to 1e-2 on simple tasks)
Q = 1.0
EVAL_POINTS = 20
ARMS = ("adamw", "lion ÷10", "lion ÷3", "lion (own sweep)", "lion scale-aware")


def _steps(ctx_steps: int, batch: int) -> int:
    """Steps at ``batch`` for the examples of ``ctx_steps`` steps at the largest batch."""
    return max(1, ctx_steps) * (BATCHES[-1] // batch)


def _units(seeds: int, steps: int) -> int:
    # AdamW's grid, the two conversions, Lion's own grid less its centre (the ÷10 runs), scale-aware
    return sum(seeds * _steps(steps, b) * (len(GRID) + len(FACTORS) + len(GRID) - 1 + 1) for b in BATCHES)


def _base_lr(batch: int) -> float:
    return get_task("digits").default_lr("adamw") * math.sqrt(batch / BASE_BATCH)


def _with_train_metrics(build: Callable[[int], Problem], seed: int) -> Problem:
    """``build(seed)`` whose ``evaluate`` also reports the loss and accuracy on the full train split."""
    problem = build(seed)
    assert problem.model is not None and problem.train_data is not None
    model, (xt, yt), evaluate = problem.model, problem.train_data, problem.evaluate

    @torch.no_grad()
    def evaluate_all() -> dict[str, float]:
        logits = model(xt)
        return {**evaluate(), "train_loss": F.cross_entropy(logits, yt).item(),
                "train_acc": (logits.argmax(1) == yt).float().mean().item()}

    problem.evaluate = evaluate_all
    return problem


def _task(batch: int) -> Task:
    build = functools.partial(_build_digits, batch=batch)
    return dataclasses.replace(get_task("digits"), name=f"digits-b{batch}",
                               description=f"digits at batch {batch}",
                               builder=functools.partial(_with_train_metrics, build))


def _metric(runs: list[RunResult], key: str) -> list[float]:
    return [math.nan if r.diverged else r.final.get(key, math.nan) for r in runs]


def _gap(runs: list[RunResult]) -> list[float]:
    return [v - t for v, t in zip(_metric(runs, "val_loss"), _metric(runs, "train_loss"))]


def _log_ratio(a: list[RunResult], b: list[RunResult]) -> list[float]:
    out = []
    for x, y in zip(_metric(a, "val_loss"), _metric(b, "val_loss")):
        out.append(math.log(x / y) if math.isfinite(x) and math.isfinite(y) and x > 0 and y > 0 else math.nan)
    return out


def _mean_or_inf(values: list[float]) -> float:
    """Mean of ``values``; +inf if any is not finite (a diverged seed never makes an arm the better)."""
    return mean_std(values)[0] if values and all(math.isfinite(v) for v in values) else math.inf


def _batch_ticks(ax: Any, xs: list[int]) -> None:
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xticks([], minor=True)


def _run_batch(batch: int, ctx: Context) -> dict[str, Any]:
    task, steps = _task(batch), _steps(ctx.steps, batch)
    every = max(1, steps // EVAL_POINTS)

    def one(optimizer: str, lr: float, seed: int, label: str, **kwargs: Any) -> RunResult:
        result = run(task, optimizer, lr, seed, steps, eval_every=every, **kwargs)
        ctx.advance(steps, f"batch {batch}: {label} lr={lr:g} seed={seed}")
        return result

    base = _base_lr(batch)
    by_lr = sweep([float(f"{base * f:.6g}") for f in GRID], ctx.seeds,
                  lambda lr, seed: one("adamw", lr, seed, "adamw", weight_decay=WEIGHT_DECAY),
                  EXTENSIONS, GRID[-1] / GRID[-2], lambda lr: ctx.grow(ctx.seeds * steps))
    scores = lr_scores([r for rs in by_lr.values() for r in rs])
    best = min(scores, key=scores.__getitem__) if scores else float(f"{base:.6g}")
    arms: dict[str, dict[str, Any]] = {"adamw": {"lr": best, "weight_decay": WEIGHT_DECAY, "runs": by_lr[best]}}
    for k in FACTORS:
        hp = lion_from_adamw(best, WEIGHT_DECAY, factor=k)
        arms[f"lion ÷{k:g}"] = {**hp, "runs": [one("lion", hp["lr"], s, f"lion ÷{k:g}",
                                                    weight_decay=hp["weight_decay"]) for s in range(ctx.seeds)]}
    # diagnostic: Lion's own lr sweep at the ÷10 weight decay, centred on the ÷10 lr (whose runs it reuses)
    centre = arms[f"lion ÷{FACTORS[0]:g}"]
    lion_grid = sweep([centre["lr"] * f for f in GRID], ctx.seeds,
                      lambda lr, seed: centre["runs"][seed] if lr == centre["lr"] else
                      one("lion", lr, seed, "lion (own sweep)", weight_decay=centre["weight_decay"]),
                      EXTENSIONS, GRID[-1] / GRID[-2], lambda lr: ctx.grow(ctx.seeds * steps))
    lion_scores = lr_scores([r for rs in lion_grid.values() for r in rs])
    lion_best = min(lion_scores, key=lion_scores.__getitem__) if lion_scores else centre["lr"]
    arms["lion (own sweep)"] = {"lr": lion_best, "weight_decay": centre["weight_decay"],
                                "runs": lion_grid[lion_best]}
    groups = lambda p: scale_aware_groups(p.model, alpha0=ALPHA0, q=Q)  # noqa: E731
    arms["lion scale-aware"] = {"lr": math.nan, "weight_decay": math.nan,
                                "runs": [one("lion", ALPHA0, s, "lion scale-aware", param_groups=groups)
                                         for s in range(ctx.seeds)]}
    # the converted Lion: the better factor by mean final val loss (ties and divergence → the first, ÷10)
    converted = min((f"lion ÷{k:g}" for k in FACTORS),
                    key=lambda n: _mean_or_inf(_metric(arms[n]["runs"], "val_loss")))
    return {"batch": batch, "steps": steps, "grid": by_lr, "best_lr": best, "arms": arms, "converted": converted,
            "lion_grid": lion_grid}


def _run(ctx: Context) -> Outcome:
    per_batch = [_run_batch(b, ctx) for b in BATCHES]
    small, large = per_batch[0], per_batch[-1]

    def conv(p: dict[str, Any]) -> list[RunResult]:
        return p["arms"][p["converted"]]["runs"]

    def adamw(p: dict[str, Any]) -> list[RunResult]:
        return p["arms"]["adamw"]["runs"]

    ratio = {p["batch"]: _log_ratio(conv(p), adamw(p)) for p in per_batch}
    ratio_own = {p["batch"]: _log_ratio(p["arms"]["lion (own sweep)"]["runs"], adamw(p)) for p in per_batch}
    ratio_sa = {p["batch"]: _log_ratio(p["arms"]["lion scale-aware"]["runs"], adamw(p)) for p in per_batch}
    d_own, se_own = difference(ratio_own[large["batch"]], ratio_own[small["batch"]])
    trend = significant(ratio[large["batch"]], ratio[small["batch"]])       # −1: standing improves with batch
    d_trend, se_trend = difference(ratio[large["batch"]], ratio[small["batch"]])
    gap_sign = significant(_gap(conv(large)), _gap(adamw(large)))             # −1: Lion's gap smaller
    loss_sign = significant(_metric(conv(large), "val_loss"), _metric(adamw(large), "val_loss"))
    d_gap, se_gap = difference(_gap(conv(large)), _gap(adamw(large)))
    a_holds, b_holds = trend == -1, gap_sign == -1 and loss_sign != 1
    if ctx.seeds < 2:
        verdict, tail = "inconclusive", " With one seed there is no spread, so nothing counts."
    else:
        verdict = "supported" if a_holds and b_holds else (
            "not supported" if not (a_holds or b_holds) else "mixed")
        tail = ""
    word = {1: "significantly higher", -1: "significantly lower", 0: "not significantly different"}
    reason = (f"(A) ln(Lion/AdamW val loss) at batch {large['batch']} minus at batch {small['batch']}: "
              f"{d_trend:+.3g} ± {se_trend:.2g} ({word[trend]}; A {'holds' if a_holds else 'fails'}). "
              f"(B) at batch {large['batch']}, Lion's gap minus AdamW's: {d_gap:+.3g} ± {se_gap:.2g} "
              f"({word[gap_sign]}), its val loss {word[loss_sign]} than AdamW's "
              f"(B {'holds' if b_holds else 'fails'}). Rule: supported iff A and B hold, not supported iff "
              f"neither, mixed otherwise.{tail}")

    rows, data_batches = [], {}
    for p in per_batch:
        for name in ARMS:
            arm = p["arms"][name]
            runs = arm["runs"]
            label = name + (" ← converted" if name == p["converted"] else "") + (
                " (tuned)" if name == "adamw" else "")
            lr = "per tensor" if name == "lion scale-aware" else f"{arm['lr']:g}"
            wd = "per tensor" if name == "lion scale-aware" else f"{arm['weight_decay']:g}"
            rows.append([str(p["batch"]), str(p["steps"]), label, lr, wd,
                         fmt_spread(_metric(runs, "val_loss")), fmt_spread(_metric(runs, "val_acc")),
                         fmt_spread(_metric(runs, "train_loss")), fmt_spread(_gap(runs))])
        data_batches[str(p["batch"])] = {
            "steps": p["steps"], "best_adamw_lr": p["best_lr"], "converted": p["converted"],
            "adamw_grid": {f"{lr:g}": _metric(rs, "val_loss") for lr, rs in sorted(p["grid"].items())},
            "log_ratio_converted_vs_adamw": ratio[p["batch"]],
            "log_ratio_own_sweep_vs_adamw": ratio_own[p["batch"]],
            "log_ratio_scale_aware_vs_adamw": ratio_sa[p["batch"]],
            "lion_grid": {f"{lr:g}": _metric(rs, "val_loss") for lr, rs in sorted(p["lion_grid"].items())},
            "arms": {n: {"lr": p["arms"][n]["lr"], "weight_decay": p["arms"][n]["weight_decay"],
                         "val_loss": _metric(p["arms"][n]["runs"], "val_loss"),
                         "val_acc": _metric(p["arms"][n]["runs"], "val_acc"),
                         "train_loss": _metric(p["arms"][n]["runs"], "train_loss"),
                         "train_acc": _metric(p["arms"][n]["runs"], "train_acc"),
                         "gap": _gap(p["arms"][n]["runs"]),
                         "steps_done": [r.steps_done for r in p["arms"][n]["runs"]]} for n in ARMS}}
    headers = ["batch", "steps", "arm", "lr", "weight decay", "final val loss", "val acc", "train loss (full)",
               "gap (val − train)"]
    ratio_rows = [[str(p["batch"]), p["converted"], fmt_spread(ratio[p["batch"]], 3),
                   fmt_spread(ratio_own[p["batch"]], 3), fmt_spread(ratio_sa[p["batch"]], 3)] for p in per_batch]

    def grid_row(p: dict[str, Any], name: str, grid: dict[float, list[RunResult]], best: float) -> list[str]:
        return [str(p["batch"]), name, ", ".join(f"{lr:g}" + ("*" if lr == best else "") for lr in sorted(grid)),
                ", ".join(f"{mean_std(_metric(grid[lr], 'val_loss'))[0]:.3g}" for lr in sorted(grid))]

    grid_rows = [row for p in per_batch for row in (
        grid_row(p, "adamw", p["grid"], p["best_lr"]),
        grid_row(p, "lion (wd 0.1)", p["lion_grid"], p["arms"]["lion (own sweep)"]["lr"]))]

    plots = []
    xs = [p["batch"] for p in per_batch]
    for _key, ylabel, fname, fn in (
            ("val_loss", "final val loss", "lion-batch-size-val-loss.png", lambda rs: _metric(rs, "val_loss")),
            ("gap", "val loss − full-train loss", "lion-batch-size-gap.png", _gap)):
        plt, fig, ax = figure()
        for name in ARMS:
            stats = [mean_std(fn(p["arms"][name]["runs"])) for p in per_batch]
            ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=name,
                        linestyle="--" if name == "lion (own sweep)" else "-")
        ax.set(xscale="log", xlabel="batch size (equal examples seen)", ylabel=ylabel + " (mean ± std over seeds)",
               title=f"digits: Lion vs tuned AdamW across batch sizes, {ctx.seeds} seed(s)")
        _batch_ticks(ax, xs)
        plots.append(save_figure(plt, fig, ax, ctx.out, fname))
    plt, fig, ax = figure()
    for label, r in (("Lion (converted)", ratio), ("Lion (own lr sweep)", ratio_own), ("Lion scale-aware", ratio_sa)):
        stats = [mean_std(r[b]) for b in xs]
        ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=label,
                    linestyle="--" if r is ratio_own else "-")
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set(xscale="log", xlabel="batch size (equal examples seen)", ylabel="ln(Lion / AdamW final val loss)",
           title="Lion's standing against tuned AdamW (below 0: Lion better)")
    _batch_ticks(ax, xs)
    plots.append(save_figure(plt, fig, ax, ctx.out, "lion-batch-size-ratio.png"))

    protocol = (
        f"Task digits (MLP 64-128-10) at batch sizes {', '.join(map(str, BATCHES))} with equal examples seen "
        f"({_steps(ctx.steps, BATCHES[-1]) * BATCHES[-1]} per run: "
        f"{', '.join(f'{_steps(ctx.steps, b)} steps at {b}' for b in BATCHES)}); {ctx.seeds} seeds per arm, the "
        f"same seeds for every arm. Per batch B: AdamW (weight decay {WEIGHT_DECAY:g}) tuned over "
        f"3e-3·√(B/{BASE_BATCH}) × (1/3, 1, 3), extended ×3 beyond an end holding the best (at most "
        f"{EXTENSIONS}×); Lion (betas 0.9, 0.99) at `lion_from_adamw(best_lr, {WEIGHT_DECAY:g}, k)` for "
        f"k = 10 and 3, the better of the two by mean val loss being *Lion (converted)*; a diagnostic Lion with "
        f"its own lr sweep (the ÷10 lr × (1/3, 1, 3), extended likewise, weight decay 0.1; not in the verdict); "
        f"and Lion over "
        f"`scale_aware_groups(model, alpha0={ALPHA0:g}, q={Q:g})` (η = α0·σ, λ = α0/(2qσ) per tensor, "
        "constant). "
        f"Train loss on the full train split; gap = final val loss − train loss. r = ln(Lion/AdamW val loss) "
        f"per seed.")
    expected = (
        "Chen et al. (arXiv:2302.06675) and Su (kexue.fm/archives/9473): Lion's gain over AdamW shrinks at small "
        "batch sizes (Lion no better than AdamW below 64: the sign's noise adds to the small batch's) and grows "
        "with the batch; Lion's validation results are better although its training-set results need not be "
        "(generalisation: a smaller train/val gap); the Amos-derived per-tensor recipe "
        "(kexue.fm/archives/9344: η = α0·σ, λ = α0/2σ, α0 ≈ 1e-3 to 1e-2, q = 1) is the most convenient "
        "setting.")
    measured = "; ".join(
        f"batch {p['batch']} ({p['steps']} steps): tuned AdamW (lr {p['best_lr']:g}) val loss "
        f"{fmt_spread(_metric(adamw(p), 'val_loss'))}, gap {fmt_spread(_gap(adamw(p)))}; Lion (converted, "
        f"{p['converted']}) {fmt_spread(_metric(conv(p), 'val_loss'))}, gap {fmt_spread(_gap(conv(p)))}; "
        f"Lion scale-aware {fmt_spread(_metric(p['arms']['lion scale-aware']['runs'], 'val_loss'))}; "
        f"r = {fmt_spread(ratio[p['batch']], 3)}" for p in per_batch) + (
        f". Diagnostic: Lion with its own lr sweep has r = "
        f"{', '.join(fmt_spread(ratio_own[b], 3) + f' at {b}' for b in ratio_own)} (r at {large['batch']} minus "
        f"at {small['batch']}: {d_own:+.3g} ± {se_own:.2g}).")
    data = {"batches": list(BATCHES), "alpha0": ALPHA0, "q": Q, "weight_decay": WEIGHT_DECAY,
            "factors": list(FACTORS), "per_batch": data_batches,
            "verdict_parts": {"trend_sign": trend, "trend_diff": d_trend, "trend_se": se_trend,
                              "gap_sign": gap_sign, "gap_diff": d_gap, "gap_se": se_gap,
                              "val_loss_sign_at_largest": loss_sign, "A": a_holds, "B": b_holds,
                              "own_sweep_trend_diff": d_own, "own_sweep_trend_se": se_own}}
    return Outcome(protocol=protocol,
                   tables=[(headers, rows),
                           (["batch", "converted Lion", "r = ln(Lion conv. / AdamW)", "r own-sweep Lion",
                             "r scale-aware"], ratio_rows),
                           (["batch", "optimizer", "lr grid (* best)", "mean final val loss"], grid_rows)],
                   plots=plots, expected=expected, measured=measured, verdict=verdict, reason=reason, data=data)


EXPERIMENT = Experiment(
    name="lion-batch-size",
    title="Lion vs tuned AdamW across batch sizes (16 → 256), generalisation gap, scale-aware Lion",
    summary="digits at batch 16/64/256 with equal examples seen: tuned AdamW, lion_from_adamw ÷10/÷3 and "
            "scale_aware_groups Lion; val loss, train/val gap, and Lion's standing per batch",
    default_seeds=4,
    default_steps=150,
    units=_units,
    run=_run,
)
