"""eg-distribution-shift: do EG-adapted step sizes recover after an abrupt shift of the data, without a schedule?

**Claim.** Amid, Anil, Fifty & Warmuth, "Step-size Adaptation Using Exponentiated Gradient Updates"
(arXiv:2202.00145), abstract: a global step-size scale (moved by the alignment of the averaged gradient
with the current one) and per-coordinate gains, both updated by exponentiated gradient, give compelling
accuracy "without using any specially tuned learning rate schedule", and the paper shows "the
effectiveness of [the] approach for quickly adapting to distribution shifts in the data during training".
Su Jianlin's note on the paper (kexue.fm/archives/8968) derives the simplified per-coordinate rule; the
spec (``dynamics.md`` §1.3) turns the claim into a test: the target switches at T/2 and the scale s
should increase again after the switch. (The paper's own experiment could not be read here: only its
abstract and secondary summaries were available, so this is a test of the stated claim, not a replication.)

**Task.** scikit-learn digits through the registered ``digits`` task (MLP 64-128-10, its seeded
initialisation, ``problem.model`` and ``problem.train_data``; ``tasks.py`` is used as is). The task's
1437 training rows are split once, by a fixed permutation, into 1077 rows to train on and 360 held-out
rows to score (the task's own validation rows are not exposed by its Problem). Batches of 64 training
rows, drawn without replacement per step from a per-seed stream that every arm of a seed shares.
T = ``ctx.steps`` steps; at step T/2 the labels switch abruptly and stay switched: class y becomes
(y + 1) mod 10 in both the training batches and the held-out labels (every label changes; the inputs,
hence the learned features, stay useful). Val loss = held-out cross-entropy on the labels in force.

**Arms** (all on ``torch.optim.SGD(momentum=0.9)``, the paper's SGDM setting, where danlu's paper form
matches the paper's equations for the scale exactly):

1. ``constant``: a tuned constant lr;
2. ``schedule``: cosine decay from a tuned peak lr to 0 over the T steps (a standard schedule, which
   cannot know about the shift: its lr is half the peak at the shift and keeps falling);
3. ``eg``: ``danlu.EGStepSize(SGD, meta_lr=γ, form="paper")`` at the constant arm's lr, no schedule,
   every other setting at the wrapper's defaults (γ_s = γ, β = 0.9, exponent clamp ±0.5, ν ∈ [1e-2, 1e2],
   s ∈ [1e-3, 1e3], no normalisation: the faithful rule).

**Tuning** (on pilot seeds 1000 and 1001, never evaluation seeds; the same budget and shift): each arm's
free number is picked by the end-of-phase score L_A(T/2) + L_B(T) (val loss just before the shift on the
old labels plus final val loss on the new ones: what a tuned run aims at), lowest mean, ties to the
smaller value. Constant lr and schedule peak from {0.01, 0.03, 0.1, 0.3}; γ from {0.01, 0.03, 0.1, 0.3}.
The score does not look at the recovery window, so nothing is tuned on the test metric. Development
runs (dev seeds 2000-2001, T = 1200, not reused) bracket the grids: lr 0.3 diverges for the constant
arm; γ = 0.3 recovers markedly worse; the raw per-coordinate hypergradient m⊙g is ~1e-6 here, so at
these γ the gains ν barely move and the arm tests mainly the global scale s (giving the gains their
own 1e3-1e4× larger rate made every phase much worse in those runs). ν's spread is reported.

**Metrics.** Each held-out val loss is capped at 10·ln 10 (≈ 23; the post-shift "shock" of a confident
model is ~10-18) and a non-finite one counts as the cap, so a diverged run scores worst instead of
dropping out. Primary, the **recovery loss**: the mean val loss on the new labels over the evaluation
points in (T/2, T/2 + N], N = T/8 (every T/80 steps: the area under the first part of the recovery
curve, lower = quicker recovery). Reported too: L_A(T/2), the shock L_B(T/2) (before any step on the
new labels), L_B(T/2 + N) and its ratio to L_A(T/2), L_B(T), and for EG the scale s along the run and
ln(s(T/2 + N) / s(T/2)).

**Verdict rule** (fixed before the default-budget run; differences count at 2 standard errors, Welch,
over the evaluation seeds, via ``_common.significant``): *inconclusive* if the constant arm's mean
L_A(T/2) is not below ½·ln 10 (the budget is too small to learn the first task) or there are fewer than
2 seeds. Otherwise, with a = EG vs schedule and b = EG vs constant on the recovery loss, and "s rises" =
ln(s(T/2 + N)/s(T/2)) significantly above 0: *supported* if EG recovers significantly faster than the
schedule (a = −1), not significantly slower than the tuned constant lr (b ≠ +1) and s rises; *mixed*
if a = −1 but b = +1 or s does not rise, or if a ≠ −1 but b = −1; otherwise *not supported* with ≥ 5
seeds, *inconclusive* with fewer.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch
import torch.nn.functional as F

import danlu
from danlu.bench.tasks import get_task

from ._common import Context, Experiment, Outcome, difference, figure, fmt_spread, mean_std, save_figure, significant

__all__ = ["EXPERIMENT"]

NAME = "eg-distribution-shift"
TASK = "digits"
BATCH = 64
MOMENTUM = 0.9
HELD_OUT = 360                       # rows of the task's training split kept for scoring
LR_GRID: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
GAMMA_GRID: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
PILOT_SEEDS: tuple[int, ...] = (1000, 1001)
CAP = 10.0 * math.log(10.0)          # cap on every val loss (a diverged evaluation scores this)
HALF_UNIFORM = 0.5 * math.log(10.0)  # the constant arm must get below this before the shift
ARMS = ("constant", "schedule", "eg")
LABELS = {"constant": "SGDM, tuned constant lr", "schedule": "SGDM, cosine schedule",
          "eg": "EGStepSize(SGDM, form='paper')"}
COLORS = {"constant": "tab:blue", "schedule": "tab:green", "eg": "tab:orange"}


def _shift(steps: int) -> int:
    return max(1, steps // 2)


def _window(steps: int) -> int:
    return max(1, steps // 8)


def _every(steps: int) -> int:
    return max(1, steps // 80)


def _units(seeds: int, steps: int) -> int:
    pilots = (2 * len(LR_GRID) + len(GAMMA_GRID)) * len(PILOT_SEEDS)
    return (pilots + len(ARMS) * max(1, int(seeds))) * max(2, int(steps))


def _shifted(y: torch.Tensor) -> torch.Tensor:
    """The labels after the shift: class y becomes (y + 1) mod 10 (every label changes)."""
    return (y + 1) % 10


def _split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed split of the task's training rows into (train, held-out) indices."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(20220131))
    return perm[HELD_OUT:], perm[:HELD_OUT]


def _points(steps: int) -> list[int]:
    shift, every = _shift(steps), _every(steps)
    return sorted(set(range(0, steps + 1, every)) | {shift, shift + _window(steps), steps})


def _capped(v: float) -> float:
    return v if math.isfinite(v) and v < CAP else CAP


def _train(seed: int, arm: str, lr: float, steps: int, gamma: float | None = None) -> dict[str, Any]:
    """One run of ``arm`` (constant / schedule / eg) from the seed's initialisation, with the shift at
    T/2. Returns the val-loss curve on the labels in force, L_A(T/2), the shock L_B(T/2), and for EG the
    scale s at the evaluation points and a ν summary."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}")
    steps = max(2, int(steps))
    shift, window = _shift(steps), _window(steps)
    problem = get_task(TASK).build(seed)
    model = problem.model
    assert model is not None and problem.train_data is not None
    x, y = problem.train_data
    train_rows, held = _split(len(y))
    x_val, y_val = x[held], y[held]
    y_val_b = _shifted(y_val)

    inner = torch.optim.SGD(problem.params, lr=lr, momentum=MOMENTUM)
    opt: torch.optim.Optimizer = inner
    if arm == "eg":
        if gamma is None:
            raise ValueError("the eg arm needs gamma")
        opt = danlu.EGStepSize(inner, meta_lr=gamma, form="paper")
    gen = torch.Generator().manual_seed(1_000_003 + int(seed))
    points = set(_points(steps))

    @torch.no_grad()
    def val(labels: torch.Tensor) -> float:
        return _capped(float(F.cross_entropy(model(x_val), labels)))

    def scale() -> float:
        s = opt.param_groups[0].get("egs_scale")
        return 1.0 if s is None else float(s)

    curve: list[tuple[int, float]] = []
    s_curve: list[tuple[int, float]] = []
    pre = shock = CAP
    diverged = False
    for t in range(steps + 1):
        if t in points:
            if diverged:
                curve.append((t, CAP))
            elif t == shift:
                pre, shock = val(y_val), val(y_val_b)
                curve.append((t, shock))
            else:
                curve.append((t, val(y_val_b if t > shift else y_val)))
            if arm == "eg":
                s_curve.append((t, math.nan if diverged else scale()))
        if t == steps:
            break
        if diverged:
            continue
        rows = train_rows[torch.randperm(len(train_rows), generator=gen)[:BATCH]]
        labels = _shifted(y[rows]) if t >= shift else y[rows]
        if arm == "schedule":
            inner.param_groups[0]["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * t / steps))
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[rows]), labels)
        if not math.isfinite(loss.item()):
            diverged = True
            continue
        loss.backward()
        opt.step()
    by_step = dict(curve)
    recovery_points = [v for t, v in curve if shift < t <= shift + window]
    out: dict[str, Any] = {
        "seed": seed, "arm": arm, "lr": lr, "gamma": gamma, "diverged": diverged, "curve": curve,
        "pre": pre, "shock": shock, "recovery": statistics.fmean(recovery_points),
        "after_window": by_step[shift + window], "end": by_step[steps],
    }
    out["ratio"] = out["after_window"] / pre if pre > 0 else math.nan
    out["tuning_score"] = pre + out["end"]
    if arm == "eg":
        out["s_curve"] = s_curve
        s_by = dict(s_curve)
        s0, s1 = s_by[shift], s_by[shift + window]
        out["log_s_rise"] = math.log(s1 / s0) if (math.isfinite(s0) and math.isfinite(s1) and s0 > 0 and s1 > 0) \
            else math.nan
        nus = [opt.state[p]["egs_nu"].detach().double().flatten() for p in problem.params
               if "egs_nu" in opt.state[p]]
        if nus and not diverged:
            nu = torch.cat(nus)
            out["nu_geomean"] = float(nu.log().mean().exp())
            q05, q95 = torch.quantile(nu, torch.tensor([0.05, 0.95], dtype=nu.dtype)).tolist()
            out["nu_q05"], out["nu_q95"] = q05, q95
        else:
            out["nu_geomean"] = out["nu_q05"] = out["nu_q95"] = math.nan
    return out


def _pick(grid: tuple[float, ...], scores: dict[str, list[float]]) -> float:
    return min(grid, key=lambda v: (statistics.fmean(scores[repr(v)]), v))


def _verdict(seeds: int, runs: dict[str, list[dict[str, Any]]]) -> tuple[str, str]:
    rec = {arm: [r["recovery"] for r in runs[arm]] for arm in ARMS}
    rise = [r["log_s_rise"] for r in runs["eg"]]
    a = significant(rec["eg"], rec["schedule"])
    b = significant(rec["eg"], rec["constant"])
    s_rises = significant(rise, [0.0] * len(rise)) == 1
    d_a, se_a = difference(rec["eg"], rec["schedule"])
    d_b, se_b = difference(rec["eg"], rec["constant"])
    nums = (f"recovery loss EG − schedule = {d_a:+.3g} ± {se_a:.2g}, EG − constant = {d_b:+.3g} ± {se_b:.2g} (SE); "
            f"ln(s(T/2+N)/s(T/2)) = {fmt_spread(rise, 3)}")
    rule = ("rule: supported if EG recovers significantly faster than the schedule, not significantly slower than "
            "the constant lr and s rises; mixed if only part of that holds (or EG beats only the constant lr); "
            "otherwise not supported (≥ 5 seeds) / inconclusive")
    pre_const = mean_std([r["pre"] for r in runs["constant"]])[0]
    if seeds < 2:
        return "inconclusive", f"One seed has no spread, so no difference can count ({nums})."
    if not pre_const < HALF_UNIFORM:
        return "inconclusive", (f"The budget is too small to learn the first task: the constant arm's val loss before "
                                f"the shift is {pre_const:.3g}, not below ½·ln 10 ({nums}).")
    if a == -1 and b != 1 and s_rises:
        return "supported", (f"EGStepSize recovers from the shift significantly faster than the cosine schedule, no "
                             f"slower than the tuned constant lr, and its scale rises after the shift: {nums}; {rule}.")
    if a == -1:
        why = "slower than the tuned constant lr" if b == 1 else "its scale does not rise significantly"
        return "mixed", f"EGStepSize recovers faster than the cosine schedule but {why}: {nums}; {rule}."
    if b == -1:
        return "mixed", (f"EGStepSize recovers faster than the tuned constant lr but not significantly faster than "
                         f"the cosine schedule: {nums}; {rule}.")
    if seeds >= 5:
        return "not supported", (f"EGStepSize recovers from the shift no faster than either baseline with {seeds} "
                                 f"seeds: {nums}; {rule}.")
    return "inconclusive", f"No significant difference with {seeds} seeds (fewer than 5): {nums}; {rule}."


def _run(ctx: Context) -> Outcome:
    # The MLP's tensors are tiny: extra intra-op threads only synchronise; one thread, restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _experiment(ctx)
    finally:
        torch.set_num_threads(threads)


def _experiment(ctx: Context) -> Outcome:
    steps, seeds = max(2, int(ctx.steps)), max(1, int(ctx.seeds))
    shift, window = _shift(steps), _window(steps)

    # 1. pilots: each arm's free number by the end-of-phase score, on seeds the evaluation does not use
    pilot: dict[str, dict[str, list[float]]] = {"constant": {}, "schedule": {}, "eg": {}}
    for arm in ("constant", "schedule"):
        for lr in LR_GRID:
            pilot[arm][repr(lr)] = []
            for seed in PILOT_SEEDS:
                pilot[arm][repr(lr)].append(_train(seed, arm, lr, steps)["tuning_score"])
                ctx.advance(steps, f"pilot {arm} lr={lr:g} seed {seed}")
    lr_const = _pick(LR_GRID, pilot["constant"])
    lr_sched = _pick(LR_GRID, pilot["schedule"])
    for gamma in GAMMA_GRID:
        pilot["eg"][repr(gamma)] = []
        for seed in PILOT_SEEDS:
            pilot["eg"][repr(gamma)].append(_train(seed, "eg", lr_const, steps, gamma)["tuning_score"])
            ctx.advance(steps, f"pilot eg γ={gamma:g} seed {seed}")
    gamma = _pick(GAMMA_GRID, pilot["eg"])
    lrs = {"constant": lr_const, "schedule": lr_sched, "eg": lr_const}

    # 2. the arms on the evaluation seeds
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for seed in range(seeds):
        for arm in ARMS:
            runs[arm].append(_train(seed, arm, lrs[arm], steps, gamma if arm == "eg" else None))
            ctx.advance(steps, f"{arm} seed {seed}")
    verdict, reason = _verdict(seeds, runs)

    # 3. tables
    def col(arm: str, key: str) -> list[float]:
        return [r[key] for r in runs[arm]]

    rows = []
    for arm in ARMS:
        hyper = f"lr {lrs[arm]:g}" + (f", γ = γ_s = {gamma:g}" if arm == "eg" else "") + \
            (" (peak, cosine to 0)" if arm == "schedule" else "")
        rows.append([LABELS[arm], hyper, fmt_spread(col(arm, "pre")), fmt_spread(col(arm, "shock"), 3),
                     fmt_spread(col(arm, "recovery")), fmt_spread(col(arm, "after_window")),
                     fmt_spread(col(arm, "ratio"), 3), fmt_spread(col(arm, "end")),
                     str(sum(r["diverged"] for r in runs[arm]))])
    t_main = (["arm", "hyperparameters", "L_A(T/2) before the shift", "shock L_B(T/2)",
               f"recovery loss (mean over (T/2, T/2+{window}])", f"L_B(T/2+{window})", "ratio to L_A(T/2)",
               "final L_B(T)", "diverged"], rows)
    prow = []
    for arm, grid in (("constant", LR_GRID), ("schedule", LR_GRID), ("eg", GAMMA_GRID)):
        chosen = {"constant": lr_const, "schedule": lr_sched, "eg": gamma}[arm]
        for v in grid:
            m = statistics.fmean(pilot[arm][repr(v)])
            prow.append([LABELS[arm], ("γ " if arm == "eg" else "lr ") + f"{v:g}", f"{m:.4g}",
                         "chosen" if v == chosen else ""])
    t_pilot = (["arm", "value", f"pilot score L_A(T/2) + L_B(T), mean of seeds {', '.join(map(str, PILOT_SEEDS))}",
                ""], prow)
    eg_rows = [[str(r["seed"]), f"{dict(r['s_curve'])[shift]:.3g}", f"{dict(r['s_curve'])[shift + window]:.3g}",
                f"{dict(r['s_curve'])[steps]:.3g}", f"{r['log_s_rise']:+.3g}",
                f"{r['nu_geomean']:.4g} [{r['nu_q05']:.3g}, {r['nu_q95']:.3g}]"] for r in runs["eg"]]
    t_eg = (["seed", "s(T/2)", f"s(T/2+{window})", "s(T)", "ln s rise", "ν: geometric mean [5%, 95%] at T"], eg_rows)

    # 4. plots
    plt, fig, ax = figure()
    xs = [t for t, _ in runs["constant"][0]["curve"]]
    for arm in ARMS:
        curves = [[v for _, v in r["curve"]] for r in runs[arm]]
        ms = [mean_std([c[i] for c in curves]) for i in range(len(xs))]
        ax.plot(xs, [m for m, _ in ms], color=COLORS[arm], label=LABELS[arm])
        ax.fill_between(xs, [m - s for m, s in ms], [m + s for m, s in ms], color=COLORS[arm], alpha=0.15)
    ax.axvline(shift, color="gray", ls="--", lw=1, label="labels switch")
    ax.axvspan(shift, shift + window, color="gray", alpha=0.1, label="recovery window")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out val loss (labels in force)")
    ax.set_title(f"digits MLP, shift at step {shift}, {seeds} seed(s): mean ± std")
    plots = [save_figure(plt, fig, ax, ctx.out, f"{NAME}-curves.png")]

    plt, fig, ax = figure()
    ax.plot(xs, [lr_const] * len(xs), color=COLORS["constant"], label=LABELS["constant"])
    ax.plot(xs, [lr_sched * 0.5 * (1 + math.cos(math.pi * t / steps)) for t in xs],
            color=COLORS["schedule"], label=LABELS["schedule"])
    s_logs = [[math.log(v) if math.isfinite(v) and v > 0 else math.nan for _, v in r["s_curve"]] for r in runs["eg"]]
    geo = []
    for i in range(len(xs)):
        vals = [c[i] for c in s_logs if math.isfinite(c[i])]
        geo.append(lr_const * math.exp(statistics.fmean(vals)) if vals else math.nan)
    ax.plot(xs, geo, color=COLORS["eg"], label="EG: lr × s (geometric mean over seeds)")
    ax.axvline(shift, color="gray", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("step size (lr; EG: lr·s, gains ν aside)")
    ax.set_title("Step size along the run")
    plots.append(save_figure(plt, fig, ax, ctx.out, f"{NAME}-step-size.png"))

    # 5. text
    protocol = (
        f"Task `digits` (MLP 64-128-10, seeded init of the registered task), {len(runs['constant'][0]['curve'])} "
        f"evaluations on 360 held-out rows of its training split, training on the other 1077 in batches of {BATCH} "
        f"(one stream per seed, shared by the arms). T = {steps} steps; at step {shift} every label y becomes "
        f"(y + 1) mod 10 (training and held-out). Arms, all on `torch.optim.SGD(momentum={MOMENTUM})`: constant lr "
        f"{lr_const:g}; cosine schedule from {lr_sched:g} to 0 over T; `danlu.EGStepSize(SGD(lr={lr_const:g}), "
        f"meta_lr={gamma:g}, form='paper')` (γ_s = γ, β = 0.9, clamp ±0.5, ν ∈ [1e-2, 1e2], s ∈ [1e-3, 1e3], no "
        f"normalisation), no schedule. lr / peak / γ tuned on pilot seeds {', '.join(map(str, PILOT_SEEDS))} by "
        f"L_A(T/2) + L_B(T) over {{{', '.join(f'{v:g}' for v in LR_GRID)}}} / same / "
        f"{{{', '.join(f'{v:g}' for v in GAMMA_GRID)}}}. {seeds} evaluation seed(s). Val losses capped at 10·ln 10. "
        f"Primary metric: the recovery loss, mean val loss on the new labels over the evaluations in "
        f"({shift}, {shift + window}] (N = T/8 = {window} steps).")
    expected = (
        "Amid, Anil, Fifty & Warmuth (arXiv:2202.00145, abstract): EG-adapted step sizes (a global scale following "
        "the alignment of the averaged and the current gradient, and per-coordinate gains) need no tuned lr "
        "schedule and adapt quickly to distribution shifts during training; Su, kexue.fm/archives/8968, "
        "discusses the method; spec dynamics.md §1.3: after the target switches at T/2, s increases again. "
        "Testable here: after the labels switch, EGStepSize(SGDM) recovers faster than a decaying schedule and "
        "no slower than a tuned constant lr, with its scale rising after the shift.")
    diverged = ", ".join(f"{arm} {sum(r['diverged'] for r in runs[arm])}" for arm in ARMS)
    measured = (
        f"Recovery loss over ({shift}, {shift + window}]: constant {fmt_spread(col('constant', 'recovery'))}, "
        f"schedule {fmt_spread(col('schedule', 'recovery'))}, EG {fmt_spread(col('eg', 'recovery'))}. Before the "
        f"shift L_A(T/2): constant {fmt_spread(col('constant', 'pre'))}, schedule "
        f"{fmt_spread(col('schedule', 'pre'))}, EG {fmt_spread(col('eg', 'pre'))}. Final L_B(T): constant "
        f"{fmt_spread(col('constant', 'end'))}, schedule "
        f"{fmt_spread(col('schedule', 'end'))}, EG {fmt_spread(col('eg', 'end'))}. EG's scale: ln(s(T/2+N)/s(T/2)) = "
        f"{fmt_spread(col('eg', 'log_s_rise'), 3)}; s(T/2) = "
        f"{fmt_spread([dict(r['s_curve'])[shift] for r in runs['eg']], 3)}. Diverged runs: {diverged} of {seeds} each.")

    data = {"task": TASK, "steps": steps, "seeds": seeds, "shift": shift, "window": window,
            "eval_every": _every(steps), "batch": BATCH, "momentum": MOMENTUM, "cap": CAP,
            "lr_grid": list(LR_GRID), "gamma_grid": list(GAMMA_GRID), "pilot_seeds": list(PILOT_SEEDS),
            "pilot": pilot, "lr": lrs, "gamma": gamma,
            "runs": runs}
    return Outcome(protocol=protocol, tables=[t_main, t_eg, t_pilot], plots=plots, expected=expected,
                   measured=measured, verdict=verdict, reason=reason, data=data)


EXPERIMENT = Experiment(
    name=NAME,
    title="EG step sizes after an abrupt distribution shift",
    summary="digits with its labels switched at T/2: does EGStepSize(SGDM, paper form) recover faster than a "
            "cosine schedule and as fast as a tuned constant lr, its scale rising after the shift?",
    default_seeds=8,
    default_steps=1200,
    units=_units,
    run=_run,
)
