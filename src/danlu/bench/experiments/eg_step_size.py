"""eg-step-size: does learning the step sizes by exponentiated gradient make SGD less sensitive to its lr?

Claim (spec ``dynamics.md`` §1.3). Su Jianlin, kexue.fm/archives/8968, learns a per-coordinate
multiplier ν of the lr by exponentiated gradient on the loss: with plain SGD the hypergradient is
exactly ∂L(θ_t)/∂ν_t = −η·g_{t−1}⊙g_t, so ν_{t+1} = ν_t ⊙ exp(γ·g_{t−1}⊙g_t) — coordinates whose
successive gradients agree get a larger step, sign flips shrink it. Amid, Anil, Fifty & Warmuth,
"Step-size Adaptation Using Exponentiated Gradient Updates" (arXiv:2202.00145) make the same kind of
update with a global scale and per-unit gains. The testable consequence in the spec: over a wide lr
grid the final loss should vary less with :class:`danlu.EGStepSize` than with the base optimizer.

Protocol. Task ``digits`` (MLP 64-128-10, the task's own batch-64 minibatches ``train_loss(step)``,
``ctx.steps`` steps, final validation cross-entropy). Base optimizer: plain SGD, i.e. ``danlu.SGDM``
with ``momentum=0`` — chosen because Su's hypergradient −η·g_{t−1}⊙g_t is exact for SGD and only an
approximation under momentum (the wrapper scales the finished inner update, which the momentum does
not see). Arms: SGD, and ``EGStepSize(SGD, meta_lr=γ)`` in its default form (Su's rule, one ν per
coordinate, exponent clamp ±0.5, ν ∈ [1e-2, 1e2], no normalisation). lr grid: 9 points, 10^{-4} … 1
in half decades; ``ctx.seeds`` seeds per (arm, lr); a seed fixes the initialisation and the batch
order, shared by both arms.

γ, the one hyperparameter EG adds, is selected on held-out seeds before the sweep, for what EG is
meant to do: γ ∈ {10, 100, 1000, 10000} (the raw hypergradient scales like |g|² and the mean squared
gradient coordinate of this MLP at initialisation is 4e-5 … 2e-3, so γ's natural scale is 1e2 … 1e4),
each trained at the grid's two ends and centre (lr 1e-4, 1e-2, 1) on two pilot seeds (1000, 1001) that
the sweep does not use; the γ with the lowest mean score (below) wins, ties to the smaller γ. The sweep
then tests it on fresh seeds and on six lrs the pilot never saw. (A first version tuned γ at SGD's
registered lr 0.1 only: at a good lr every γ does about equally well, so that pilot picked by noise.)

Diverged runs: a non-finite training or validation loss, or a final val loss above 10·ln 10 (ten times
the loss of the uniform predictor). For the sensitivity measures every run scores min(val loss, ln 10)
and a diverged run scores ln 10: nothing does worse than predicting uniformly. Per seed (a curve over
the grid) we measure the spread max − min of the scores, the number of lrs whose score is within 10%
of that seed's best, the grid mean and the best. Verdict rule (in code, :func:`_verdict`): if the
base optimizer never gets below ½·ln 10 the budget is too small → inconclusive. Else, with the
spread compared by ``significant`` (2 standard errors, Welch): smaller with EG → supported, unless EG's
best score is significantly worse than 1.1× the base's best or it has significantly fewer lrs within
10% of its best (then mixed); larger → not supported; no significant difference → mixed if EG has
significantly more lrs within 10% of its best, else not supported with ≥ 5 seeds, inconclusive with
fewer.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch

import danlu
from danlu.bench.tasks import get_task

from ._common import Context, Experiment, Outcome, difference, figure, fmt_spread, mean_std, save_figure, significant

__all__ = ["EXPERIMENT"]

NAME = "eg-step-size"
TASK = "digits"
LRS: tuple[float, ...] = tuple(10.0 ** (k / 2) for k in range(-8, 1))  # 1e-4 … 1, half decades
META_GRID: tuple[float, ...] = (10.0, 100.0, 1000.0, 10000.0)
PILOT_SEEDS: tuple[int, ...] = (1000, 1001)
PILOT_LRS: tuple[float, ...] = (1e-4, 1e-2, 1.0)  # the grid's two ends and its (log) centre
CAP = math.log(10.0)  # val loss of the uniform predictor over 10 classes: the worst outcome
BLOWUP = 10.0 * CAP  # a finite final val loss above this counts as diverged
TOL = 0.10  # "near the best": score ≤ (1 + TOL) · best
ARMS = ("sgd", "eg")
LABELS = {"sgd": "SGD", "eg": "EGStepSize(SGD)"}


def _units(seeds: int, steps: int) -> int:
    return (len(META_GRID) * len(PILOT_LRS) * len(PILOT_SEEDS) + len(ARMS) * len(LRS) * seeds) * steps


def _train(seed: int, lr: float, meta_lr: float | None, steps: int) -> dict[str, Any]:
    """One run: SGD (``meta_lr=None``) or EGStepSize(SGD); final val loss/acc, divergence, ν summary."""
    problem = get_task(TASK).build(seed)
    base = danlu.SGDM(problem.params, lr=lr, momentum=0.0)
    opt: torch.optim.Optimizer = base if meta_lr is None else danlu.EGStepSize(base, meta_lr=meta_lr)
    diverged = False
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = problem.train_loss(t)
        if not math.isfinite(loss.item()):
            diverged = True
            break
        loss.backward()
        opt.step()
    val_loss, val_acc = math.nan, math.nan
    if not diverged:
        ev = problem.evaluate()
        val_loss, val_acc = float(ev["val_loss"]), float(ev["val_acc"])
        if not math.isfinite(val_loss) or val_loss > BLOWUP:
            diverged = True
    if diverged:
        val_loss, val_acc = math.nan, math.nan
    out: dict[str, Any] = {"seed": seed, "lr": lr, "val_loss": val_loss, "val_acc": val_acc, "diverged": diverged,
                           "score": CAP if diverged else min(val_loss, CAP)}
    if meta_lr is not None:
        assert isinstance(opt, danlu.EGStepSize)
        nus = [opt.state[p]["egs_nu"].detach().double().flatten() for p in problem.params if "egs_nu" in opt.state[p]]
        if nus and not diverged:
            nu = torch.cat(nus)
            out["nu_geomean"] = float(nu.log().mean().exp())
            out["nu_at_max"] = float((nu >= 0.999 * opt.nu_max).double().mean())
            out["nu_at_min"] = float((nu <= 1.001 * opt.nu_min).double().mean())
        else:
            out["nu_geomean"] = out["nu_at_max"] = out["nu_at_min"] = math.nan
    return out


def _per_seed(curve: list[float]) -> dict[str, float]:
    """Sensitivity of one seed's score curve over the lr grid."""
    best = min(curve)
    return {"spread": max(curve) - best, "near_best": float(sum(1 for v in curve if v <= (1 + TOL) * best)),
            "grid_mean": statistics.fmean(curve), "best": best}


def _verdict(seeds: int, per_seed: dict[str, dict[str, list[float]]], base_best_mean: float) -> tuple[str, str]:
    eg, sgd = per_seed["eg"], per_seed["sgd"]
    s_spread = significant(eg["spread"], sgd["spread"])
    s_near = significant(eg["near_best"], sgd["near_best"])
    s_cost = significant(eg["best"], [1.1 * v for v in sgd["best"]])
    d, se = difference(eg["spread"], sgd["spread"])
    nums = (f"per-seed spread (max − min over the grid) EG − SGD = {d:+.3f} ± {se:.2g} (SE), lrs within "
            f"{TOL:.0%} of the best {mean_std(eg['near_best'])[0]:.1f} vs {mean_std(sgd['near_best'])[0]:.1f}, "
            f"best score {mean_std(eg['best'])[0]:.4g} vs {mean_std(sgd['best'])[0]:.4g}")
    rule = ("rule: smaller spread (2 SE) → supported unless EG's best is significantly worse than 1.1× SGD's or it "
            "has significantly fewer lrs near its best (mixed); larger → not supported; no difference → mixed if "
            "EG has significantly more lrs near its best, else not supported (≥ 5 seeds) / inconclusive")
    if not base_best_mean < 0.5 * CAP:
        return "inconclusive", (f"The budget is too small to train: SGD's best mean val loss {base_best_mean:.3g} is "
                                f"not below ½·ln 10, so the sweep says nothing about lr sensitivity ({nums}).")
    if s_spread == -1:
        if s_cost == 1 or s_near == -1:
            why = ("its best is significantly worse than 1.1× SGD's" if s_cost == 1
                   else "it has significantly fewer lrs near its best")
            return "mixed", (f"EGStepSize narrows the spread of the final val loss over the lr grid but {why}: "
                             f"{nums}; {rule}.")
        return "supported", (f"EGStepSize narrows the spread of the final val loss over the lr grid significantly at "
                             f"no significant cost at the best lr: {nums}; {rule}.")
    if s_spread == 1:
        return "not supported", f"The spread over the lr grid is significantly larger with EGStepSize: {nums}; {rule}."
    if s_near == 1:
        return "mixed", (f"The max − min spread is not significantly different, but EGStepSize keeps significantly "
                         f"more lrs within {TOL:.0%} of its best: {nums}; {rule}.")
    if seeds >= 5:
        return "not supported", f"No significant reduction of the lr sensitivity with {seeds} seeds: {nums}; {rule}."
    return "inconclusive", f"No significant difference with {seeds} seed(s) (fewer than 5): {nums}; {rule}."


def _fmt_lr(lr: float) -> str:
    return f"{lr:.2g}"


def _run(ctx: Context) -> Outcome:
    # The MLP's tensors are tiny: intra-op threads only add synchronisation (5-8x slower with 2 threads on a
    # busy machine), so the sweep runs on one thread and restores the caller's setting afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _sweep(ctx)
    finally:
        torch.set_num_threads(threads)


def _sweep(ctx: Context) -> Outcome:
    steps, seeds = max(1, int(ctx.steps)), max(1, int(ctx.seeds))

    # 1. pilot: γ for the lowest mean score over the grid's ends and centre, on seeds the sweep does not use
    pilot: dict[str, list[float]] = {}
    for gamma in META_GRID:
        pilot[repr(gamma)] = []
        for lr in PILOT_LRS:
            for seed in PILOT_SEEDS:
                pilot[repr(gamma)].append(_train(seed, lr, gamma, steps)["score"])
                ctx.advance(steps, f"pilot γ={gamma:g} lr={lr:g} seed {seed}")
    meta_lr = min(META_GRID, key=lambda g: (statistics.fmean(pilot[repr(g)]), g))

    # 2. the sweep
    runs: dict[str, list[list[dict[str, Any]]]] = {arm: [] for arm in ARMS}  # [lr index][seed index]
    for lr in LRS:
        for arm in ARMS:
            row = []
            for seed in range(seeds):
                row.append(_train(seed, lr, None if arm == "sgd" else meta_lr, steps))
                ctx.advance(steps, f"{LABELS[arm]} lr={lr:.2g} seed {seed}")
            runs[arm].append(row)

    score = {arm: [[r["score"] for r in row] for row in runs[arm]] for arm in ARMS}  # [lr][seed]
    val = {arm: [[r["val_loss"] for r in row] for row in runs[arm]] for arm in ARMS}
    mean_curve = {arm: [statistics.fmean(s) for s in score[arm]] for arm in ARMS}
    per_seed: dict[str, dict[str, list[float]]] = {}
    for arm in ARMS:
        stats = [_per_seed([score[arm][i][j] for i in range(len(LRS))]) for j in range(seeds)]
        per_seed[arm] = {k: [s[k] for s in stats] for k in ("spread", "near_best", "grid_mean", "best")}
    curve_stats = {arm: _per_seed(mean_curve[arm]) for arm in ARMS}
    best_lr = {arm: LRS[min(range(len(LRS)), key=lambda i: mean_curve[arm][i])] for arm in ARMS}
    verdict, reason = _verdict(seeds, per_seed, curve_stats["sgd"]["best"])

    # 3. tables
    rows = []
    for i, lr in enumerate(LRS):
        d, se = difference(score["eg"][i], score["sgd"][i])
        sig = significant(score["eg"][i], score["sgd"][i])
        nu = [r["nu_geomean"] for r in runs["eg"][i]]
        nu_m = mean_std(nu)[0]
        rows.append([_fmt_lr(lr), fmt_spread(val["sgd"][i]), fmt_spread(val["eg"][i]),
                     f"{d:+.3g}" + (f" ± {se:.2g}" if math.isfinite(se) else "")
                     + {1: " (EG worse)", -1: " (EG better)", 0: ""}[sig],
                     f"{lr * nu_m:.2g}" if math.isfinite(nu_m) else "–"])
    t_grid = (["lr η", "SGD final val loss", "EG final val loss", "EG − SGD score", "EG effective lr η·ν̄"], rows)
    srows = []
    for arm in ARMS:
        ps = per_seed[arm]
        srows.append([LABELS[arm], _fmt_lr(best_lr[arm]), f"{curve_stats[arm]['best']:.4g}", fmt_spread(ps["best"]),
                      fmt_spread(ps["spread"], 3), fmt_spread(ps["near_best"], 2), fmt_spread(ps["grid_mean"], 3),
                      f"{curve_stats[arm]['spread']:.3g} / {int(curve_stats[arm]['near_best'])}"])
    t_sum = (["arm", "best lr (mean curve)", "best mean score", "per-seed best", "per-seed spread",
              f"per-seed # lrs within {TOL:.0%} of best", "per-seed grid mean", "mean curve: spread / # near best"],
             srows)

    # 4. plots
    plt, fig, ax = figure()
    colors = {"sgd": "tab:blue", "eg": "tab:orange"}
    for arm in ARMS:
        ms = [mean_std(s) for s in score[arm]]
        ax.errorbar(LRS, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=3, color=colors[arm],
                    label=LABELS[arm] + (f" (γ={meta_lr:g})" if arm == "eg" else ""))
        bad = [(lr, mean_curve[arm][i]) for i, lr in enumerate(LRS) if any(r["diverged"] for r in runs[arm][i])]
        if bad:
            ax.scatter([b[0] for b in bad], [b[1] for b in bad], marker="x", s=90, color="red", zorder=5,
                       label=f"{LABELS[arm]}: ≥ 1 seed diverged")
    ax.axhline(CAP, color="gray", ls=":", lw=1, label="ln 10 (uniform predictor; cap)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("lr η")
    ax.set_ylabel("final val loss (capped at ln 10)")
    ax.set_title(f"digits MLP, {steps} steps, {seeds} seed(s): mean ± std")
    plots = [save_figure(plt, fig, ax, ctx.out, f"{NAME}-sweep.png")]

    plt, fig, ax = figure()
    eff = []
    for i, lr in enumerate(LRS):
        nu = [r["nu_geomean"] for r in runs["eg"][i] if math.isfinite(r["nu_geomean"])]
        eff.append(lr * math.exp(statistics.fmean(math.log(v) for v in nu)) if nu else math.nan)
    ax.plot(LRS, LRS, color="tab:blue", ls="--", label="SGD: η")
    ax.plot(LRS, [1e2 * x for x in LRS], color="gray", ls=":", lw=1, label="bounds η·1e-2, η·1e2")
    ax.plot(LRS, [1e-2 * x for x in LRS], color="gray", ls=":", lw=1)
    ax.plot(LRS, eff, marker="o", color="tab:orange", label="EG: η × geometric mean of ν at the end")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("lr η")
    ax.set_ylabel("effective lr")
    ax.set_title("Where EGStepSize moves the step size")
    plots.append(save_figure(plt, fig, ax, ctx.out, f"{NAME}-effective-lr.png"))

    # 5. text
    protocol = (
        f"Task `digits` (MLP 64-128-10, the task's batch-64 minibatches, {steps} steps, final val cross-entropy). "
        f"Arms: plain SGD (`danlu.SGDM(momentum=0)`; Su's hypergradient −η·g_{{t−1}}⊙g_t is exact for SGD) and "
        f"`danlu.EGStepSize(SGD, meta_lr=γ)` in its default form (Su's rule, one ν per coordinate, exponent clamp "
        f"±0.5, ν ∈ [1e-2, 1e2], no normalisation). lr grid: {', '.join(_fmt_lr(x) for x in LRS)}; {seeds} seed(s) "
        f"per (arm, lr), a seed fixing the initialisation and batch order for both arms. γ = {meta_lr:g}, chosen "
        f"before the sweep by a pilot: γ ∈ {{{', '.join(f'{g:g}' for g in META_GRID)}}} at lrs "
        f"{', '.join(f'{x:g}' for x in PILOT_LRS)} (the grid's ends and centre) on pilot seeds "
        f"{', '.join(map(str, PILOT_SEEDS))} (not in the sweep), lowest mean score "
        f"(pilot means: {', '.join(f'{g:g}: {statistics.fmean(pilot[repr(g)]):.4g}' for g in META_GRID)}). "
        f"Diverged = a non-finite loss or a final val loss > 10·ln 10; scores for the sensitivity measures are "
        f"min(val loss, ln 10), diverged = ln 10 (the uniform predictor, the worst outcome). Per seed over the grid: "
        f"spread = max − min score, # lrs within {TOL:.0%} of the best score, grid mean, best.")
    expected = (
        "Learning the lr multiplier ν by exponentiated gradient (ν ← ν·exp(γ·g_{t−1}⊙g_t), Su, kexue.fm/archives/8968; "
        "Amid, Anil, Fifty & Warmuth, arXiv:2202.00145) should make the final loss depend less on the base lr: over a "
        "wide lr grid the spread of the final loss is smaller with EGStepSize than with the base optimizer (spec "
        "dynamics.md §1.3), at little cost at the best lr.")
    measured = (
        f"Per-seed spread of the score over the grid: SGD {fmt_spread(per_seed['sgd']['spread'], 3)}, EG "
        f"{fmt_spread(per_seed['eg']['spread'], 3)}. lrs (of {len(LRS)}) within {TOL:.0%} of the seed's best: SGD "
        f"{fmt_spread(per_seed['sgd']['near_best'], 2)}, EG {fmt_spread(per_seed['eg']['near_best'], 2)}. Grid-mean "
        f"score: SGD {fmt_spread(per_seed['sgd']['grid_mean'], 3)}, EG {fmt_spread(per_seed['eg']['grid_mean'], 3)}. "
        f"Best score per seed: SGD {fmt_spread(per_seed['sgd']['best'])}, EG {fmt_spread(per_seed['eg']['best'])} "
        f"(mean curve's best lr: SGD {_fmt_lr(best_lr['sgd'])}, EG {_fmt_lr(best_lr['eg'])}). Diverged runs: SGD "
        f"{sum(r['diverged'] for row in runs['sgd'] for r in row)}, EG "
        f"{sum(r['diverged'] for row in runs['eg'] for r in row)} of {len(LRS) * seeds} each.")
    data = {"task": TASK, "steps": steps, "seeds": seeds, "lrs": list(LRS), "meta_lr": meta_lr,
            "pilot": {"meta_grid": list(META_GRID), "seeds": list(PILOT_SEEDS), "lrs": list(PILOT_LRS),
                      "scores": pilot},
            "cap": CAP, "blowup": BLOWUP, "tolerance": TOL,
            "runs": {arm: [r for row in runs[arm] for r in row] for arm in ARMS},
            "per_seed": per_seed, "mean_curve": mean_curve, "mean_curve_stats": curve_stats}
    return Outcome(protocol=protocol, tables=[t_grid, t_sum], plots=plots, expected=expected, measured=measured,
                   verdict=verdict, reason=reason, data=data)


EXPERIMENT = Experiment(
    name=NAME,
    title="EG-learned step sizes vs lr sensitivity",
    summary="lr sweep 1e-4…1 on digits: does EGStepSize (Su's rule) narrow the spread of SGD's final val loss?",
    default_seeds=5,
    default_steps=600,
    units=_units,
    run=_run,
)
