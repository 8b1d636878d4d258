"""``fewer-updates``: Su's "no code change" accumulation recipe (β̃ and χ_{t/k}) against its controls.

**Claim.** Su (kexue.fm/archives/8634, "结论反思"): if a small batch is what holds training back, then
without writing accumulation or touching the optimizer, (1) replace every β by β̃ = 1 − (1 − β)/k and
(2) multiply the lr by χ_{t/k} so that θ moves only once every k micro-steps; this approximates
k-step gradient accumulation. Su found (2) more important than (1): even with β unchanged, updating
only every k steps improved results ("fewer updates, better"). No numbers are published. The
``accumulation`` experiment found danlu's exact rule (``accum_steps``) indistinguishable from the
plain small batch at lr α/k on SGDM (spec ``dynamics.md`` §2.3's confound: gating θ to every k-th
micro-step is, per micro-batch, roughly an lr of α/k), so here the recipe faces that control too.

**Protocol.** Task ``digits`` (MLP 64-128-10), micro-batches of B = 4 rows from per-seed shuffled epochs
(the ``accumulation`` experiment's stream and initialisation: the same for every arm of a seed), K = 4,
``n = steps`` rounded down to a multiple of K micro-batches for every arm (the same n·B samples). For
each optimizer O ∈ {``danlu.SGDM`` (EMA momentum β = 0.9, no weight decay), ``danlu.AdamW`` (betas
(0.9, 0.999), weight decay 1e-2)}, ``zero_grad``/backward/``step`` after every micro-batch:

1. ``exact``: O(lr α, ``accum_steps=K``): danlu's exact χ rule (n/K updates);
2. ``chi``: ``ChiGated(O(lr α), K, rescale_betas=False)``: Su's point (2) alone, β unchanged (n/K updates);
3. ``tilde_chi``: ``ChiGated(O(lr α), K)``: Su's full recipe, β̃ and χ (n/K updates);
4. ``small``: O(lr α), an update per micro-batch (n updates);
5. ``small_lr_over_k``: O(lr α/K), an update per micro-batch: the confound control.

**Choice of α** (per optimizer). The best lr of the plain small batch (arm 4): the lowest mean final val
loss over a grid, on two tuning seeds (1000, 1001; not evaluation seeds) at the same budget: SGDM
{0.03, 0.1, 0.3} (the ``accumulation`` experiment's grid), AdamW {1e-3, 3e-3, 1e-2} (a development sweep
at 1200 micro-steps on the tuning seeds gave ≈ 0.25, 0.12, 0.11, 0.6 at 3e-4, 1e-3, 3e-3, 1e-2, so the
grid brackets the optimum). The other arms are not re-tuned: the recipe is a claim at the lr one uses.

**Metric.** Final val cross-entropy (and accuracy) after the n micro-batches, mean ± std over seeds;
val-loss curves against samples seen.

**Verdict rule** (written before the runs; final val loss; a difference counts at 2 standard errors,
Welch, over seeds). Per optimizer: *supported* if arm 3 (the recipe) beats both arm 4 (small batch) and
arm 5 (lr/k control); *not supported* if it is significantly worse than either; *mixed* if it
significantly beats exactly one and ties the other; *inconclusive* otherwise. Overall: the two
optimizers' verdict when they agree, else *mixed*; *inconclusive* whatever the numbers when the budget is
under one epoch (n·B < 1437 samples, ``steps`` < 360), where k× fewer updates trivially lag.
Reported beside the verdict, not in it: Su's "(2) matters more than (1)", per optimizer, as the per-seed
gain of χ alone over the small batch (arm 4 − arm 2) against the further gain of β̃ (arm 2 − arm 3):
"χ matters more" when the first is larger by 2 standard errors, "χ gains less than β̃" when smaller,
"no difference" otherwise; and each ChiGated arm against the exact rule (arm 1).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ... import AdamW, SGDM
from ...wrappers.chi_gate import ChiGated
from ._common import (Context, Experiment, Outcome, difference, figure, fmt_spread, mean_std, save_figure,
                      significant)
from .accumulation import TUNE_SEEDS, B, K, _checkpoints, _micro, _Seed, _tune_seeds

OPTIMIZERS = ("sgdm", "adamw")
NAMES = {"sgdm": "SGDM", "adamw": "AdamW"}
GRIDS = {"sgdm": (0.03, 0.1, 0.3), "adamw": (1e-3, 3e-3, 1e-2)}
SGDM_BETA = 0.9
ADAMW_BETAS = (0.9, 0.999)
ADAMW_WD = 1e-2
ARMS = ("exact", "chi", "tilde_chi", "small", "small_lr_over_k")
GATED = ("exact", "chi", "tilde_chi")
LABELS = {
    "exact": f"1. exact χ rule (accum_steps={K})",
    "chi": f"2. χ only (ChiGated k={K}, β unchanged)",
    "tilde_chi": f"3. β̃ + χ (ChiGated k={K})",
    "small": f"4. batch {B}, lr α",
    "small_lr_over_k": f"5. batch {B}, lr α/{K}",
}


def _units(seeds: int, steps: int) -> int:
    n = _micro(steps)
    return sum(len(GRIDS[o]) * _tune_seeds(seeds) * n + seeds * len(ARMS) * n for o in OPTIMIZERS)


def _build(opt: str, arm: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    accum = K if arm == "exact" else 1
    if opt == "sgdm":
        inner: torch.optim.Optimizer = SGDM(params, lr=lr, momentum=SGDM_BETA, accum_steps=accum)
    else:
        inner = AdamW(params, lr=lr, betas=ADAMW_BETAS, weight_decay=ADAMW_WD, accum_steps=accum)
    if arm in ("chi", "tilde_chi"):
        return ChiGated(inner, K, rescale_betas=arm == "tilde_chi")
    return inner


def _coefficients(o: torch.optim.Optimizer) -> list[float]:
    g = o.param_groups[0]
    return [float(g["momentum"])] if "momentum" in g else [float(b) for b in g["betas"]]


def _train(setup: _Seed, opt_name: str, arm: str, lr: float, n: int) -> dict[str, Any]:
    setup.reset()
    problem, stream = setup.problem, setup.stream
    batch_loss = problem.batch_loss
    assert batch_loss is not None
    checkpoints = set(_checkpoints(n))
    opt = _build(opt_name, arm, problem.params, lr)
    curve: list[tuple[int, float]] = [(0, problem.evaluate()["val_loss"])]
    moves = 0
    for t in range(n):
        opt.zero_grad(set_to_none=True)
        batch_loss(stream[t]).backward()
        before = problem.params[0].detach().clone()
        opt.step()
        moves += int(not torch.equal(before, problem.params[0]))
        if t + 1 in checkpoints:
            curve.append((t + 1, problem.evaluate()["val_loss"]))
    final = problem.evaluate()
    return {"val_loss": float(final["val_loss"]), "val_acc": float(final["val_acc"]), "curve": curve,
            "moves": moves, "coefficients": _coefficients(opt)}


def _finite_mean(values: list[float]) -> float:
    m, _ = mean_std(values)
    return m if values and all(math.isfinite(v) for v in values) else math.inf


def _per_optimizer_verdict(vs_small: int, vs_lr_k: int) -> str:
    if vs_small == 1 and vs_lr_k == 1:
        return "supported"
    if vs_small == -1 or vs_lr_k == -1:
        return "not supported"
    if vs_small == 1 or vs_lr_k == 1:
        return "mixed"
    return "inconclusive"


_BEATS = {1: "significantly better", -1: "significantly worse", 0: "not significant"}
_MORE = {1: "χ matters more", -1: "χ gains less than β̃", 0: "no difference"}


def _run(ctx: Context) -> Outcome:
    n = _micro(ctx.steps)
    n_tune = _tune_seeds(ctx.seeds)
    tune_setups = {s: _Seed(s, n) for s in TUNE_SEEDS[:n_tune]}
    alphas: dict[str, float] = {}
    tuning: dict[str, dict[str, list[float]]] = {}
    for o in OPTIMIZERS:
        tuning[o] = {}
        for lr in GRIDS[o]:
            losses = []
            for s in TUNE_SEEDS[:n_tune]:
                losses.append(_train(tune_setups[s], o, "small", lr, n)["val_loss"])
                ctx.advance(n, f"tuning α: {NAMES[o]} batch {B}, lr {lr:g}, seed {s}")
            tuning[o][f"{lr:g}"] = losses
        alphas[o] = min(GRIDS[o], key=lambda lr: (_finite_mean(tuning[o][f"{lr:g}"]), lr))

    results: dict[str, dict[str, list[dict[str, Any]]]] = {o: {a: [] for a in ARMS} for o in OPTIMIZERS}
    train_size = 0
    for s in range(ctx.seeds):
        setup = _Seed(s, n)
        train_size = setup.train_size
        for o in OPTIMIZERS:
            for a in ARMS:
                lr = alphas[o] / K if a == "small_lr_over_k" else alphas[o]
                results[o][a].append(_train(setup, o, a, lr, n))
                ctx.advance(n, f"{NAMES[o]} {a}, seed {s}")

    loss = {o: {a: [r["val_loss"] for r in results[o][a]] for a in ARMS} for o in OPTIMIZERS}
    acc = {o: {a: [r["val_acc"] for r in results[o][a]] for a in ARMS} for o in OPTIMIZERS}
    moves = {o: {a: [r["moves"] for r in results[o][a]] for a in ARMS} for o in OPTIMIZERS}
    coefficients = {o: {a: results[o][a][0]["coefficients"] for a in ARMS} for o in OPTIMIZERS}

    # --- verdict -----------------------------------------------------------------------------------------
    # significant(x, y) = +1 when mean(x) > mean(y): arm 3 beats arm j when significant(loss_j, loss_3) = +1.
    too_short = n * B < train_size
    per: dict[str, dict[str, Any]] = {}
    for o in OPTIMIZERS:
        L = loss[o]
        vs_small = significant(L["small"], L["tilde_chi"])
        vs_lr_k = significant(L["small_lr_over_k"], L["tilde_chi"])
        gain_chi = [a - b for a, b in zip(L["small"], L["chi"])]
        gain_tilde = [a - b for a, b in zip(L["chi"], L["tilde_chi"])]
        per[o] = {
            "verdict": _per_optimizer_verdict(vs_small, vs_lr_k),
            "recipe_beats_small": vs_small, "recipe_beats_small_lr_over_k": vs_lr_k,
            "chi_only_beats_small": significant(L["small"], L["chi"]),
            "chi_only_beats_small_lr_over_k": significant(L["small_lr_over_k"], L["chi"]),
            "chi_vs_tilde": significant(gain_chi, gain_tilde),
            "gain_chi": difference(L["small"], L["chi"]), "gain_tilde": difference(L["chi"], L["tilde_chi"]),
            "recipe_minus_small": difference(L["tilde_chi"], L["small"]),
            "recipe_minus_lr_k": difference(L["tilde_chi"], L["small_lr_over_k"]),
            "chi_minus_exact": difference(L["chi"], L["exact"]),
            "tilde_minus_exact": difference(L["tilde_chi"], L["exact"]),
            "exact_minus_lr_k": difference(L["exact"], L["small_lr_over_k"]),
        }
    verdicts = {per[o]["verdict"] for o in OPTIMIZERS}
    if too_short:
        verdict = "inconclusive"
    elif len(verdicts) == 1:
        verdict = next(iter(verdicts))
    else:
        verdict = "mixed"

    def pm(x: tuple[float, float]) -> str:
        return f"{x[0]:+.3g} ± {x[1]:.2g}"

    parts = []
    for o in OPTIMIZERS:
        q = per[o]
        parts.append(
            f"{NAMES[o]}: {q['verdict']} (arm 3 − arm 4: {pm(q['recipe_minus_small'])}, "
            f"{_BEATS[q['recipe_beats_small']]}; arm 3 − arm 5: {pm(q['recipe_minus_lr_k'])}, "
            f"{_BEATS[q['recipe_beats_small_lr_over_k']]})")
    reason = ("Rule: per optimizer, supported iff arm 3 (β̃ + χ) has a lower final val loss than both arm 4 "
              f"(batch {B}, lr α) and arm 5 (batch {B}, lr α/{K}) by more than 2 standard errors; not supported "
              "if significantly worse than either; mixed if it beats exactly one; inconclusive otherwise; overall "
              "the common verdict, else mixed. " + "; ".join(parts) + f"; {ctx.seeds} seed(s).")
    if too_short:
        reason += (f" The budget ({n * B} samples) is under one epoch ({train_size} rows): inconclusive whatever "
                   "the differences.")
    elif ctx.seeds < 2:
        reason += " With one seed there is no spread, so nothing counts."

    # --- tables, plots, text -----------------------------------------------------------------------------
    rows = []
    for o in OPTIMIZERS:
        for a in ARMS:
            lr = alphas[o] / K if a == "small_lr_over_k" else alphas[o]
            coef = ", ".join(f"{c:.6g}" for c in coefficients[o][a])
            rows.append([NAMES[o], LABELS[a], f"{lr:g}", coef, str(n // K if a in GATED else n),
                         fmt_spread(loss[o][a]), fmt_spread(acc[o][a])])
    table = (["optimizer", "arm", "lr", "β (as run)", "updates", "final val loss", "final val acc"], rows)
    tune_rows = [[NAMES[o], f"{lr:g}" + (" ← α" if lr == alphas[o] else ""), fmt_spread(tuning[o][f"{lr:g}"])]
                 for o in OPTIMIZERS for lr in GRIDS[o]]
    tune_table = (["optimizer", f"lr (batch {B}, tuning seeds)", "final val loss"], tune_rows)
    side_rows = []
    for o in OPTIMIZERS:
        q = per[o]
        side_rows.append([NAMES[o], pm(q["gain_chi"]), pm(q["gain_tilde"]), _MORE[q["chi_vs_tilde"]],
                          _BEATS[q["chi_only_beats_small"]], _BEATS[q["chi_only_beats_small_lr_over_k"]],
                          pm(q["chi_minus_exact"]), pm(q["tilde_minus_exact"]), pm(q["exact_minus_lr_k"])])
    side_table = (["optimizer", "gain of χ (4 − 2)", "further gain of β̃ (2 − 3)", "Su: (2) > (1)?",
                   "χ only vs 4", "χ only vs 5", "2 − 1", "3 − 1", "1 − 5"], side_rows)

    plots = []
    for o in OPTIMIZERS:
        plt, fig, ax = figure()
        for a in ARMS:
            curves = [r["curve"] for r in results[o][a]]
            xs = [x * B for x, _ in curves[0]]
            stats = [mean_std([c[i][1] for c in curves]) for i in range(len(xs))]
            ax.plot(xs, [m for m, _ in stats], label=LABELS[a], linestyle="--" if a == "exact" else "-")
            if len(curves) > 1:
                ax.fill_between(xs, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.12)
        ax.set_xlabel(f"training samples seen (micro-batches × {B})")
        ax.set_ylabel("val cross-entropy")
        ax.set_yscale("log")
        ax.set_title(f"digits, {NAMES[o]}: fewer updates (k={K}, b={B}), α={alphas[o]:g}, {ctx.seeds} seed(s)")
        plots.append(save_figure(plt, fig, ax, ctx.out, f"fewer-updates-{o}.png"))

    protocol = (
        f"Task `digits` (MLP 64-128-10), cross-entropy on micro-batches of {B} rows from per-seed shuffled epochs "
        f"(the `accumulation` experiment's stream); every arm sees the same {n} micro-batches ({n * B} samples) "
        f"from the same initialisation per seed, with `step()` after every micro-batch. Optimizers: `danlu.SGDM` "
        f"(EMA momentum β = {SGDM_BETA}, no weight decay) and `danlu.AdamW` (betas {ADAMW_BETAS}, weight decay "
        f"{ADAMW_WD:g}). Arms per optimizer: (1) `accum_steps={K}`, danlu's exact χ rule; (2) "
        f"`ChiGated(opt, {K}, rescale_betas=False)`: θ moves every {K}th micro-step, β unchanged; (3) "
        f"`ChiGated(opt, {K})`: β → 1 − (1 − β)/{K} and the χ gate (Su's recipe); (4) plain batch {B} at α; "
        f"(5) plain batch {B} at α/{K} (the confound control). Arms 1–3 make {n // K} updates, 4–5 make {n}. "
        f"α per optimizer = the best plain batch-{B} lr by mean final val loss on {n_tune} separate tuning "
        f"seed(s) at the same budget: SGDM {{{', '.join(f'{x:g}' for x in GRIDS['sgdm'])}}} → "
        f"{alphas['sgdm']:g}, AdamW {{{', '.join(f'{x:g}' for x in GRIDS['adamw'])}}} → {alphas['adamw']:g}. "
        f"{ctx.seeds} evaluation seed(s) per arm; the metric is the final val loss (and accuracy).")
    expected = (
        "Su (kexue.fm/archives/8634): to get accumulation without code changes, (1) set every β to "
        "1 − (1 − β)/k and (2) multiply the lr by χ_{t/k} (θ moves every k steps); point (2) matters more "
        "than point (1): even with β unchanged, fewer updates improved results when the small batch was the "
        "bottleneck (no numbers published). The confound (spec dynamics.md §2.3; the `accumulation` "
        f"experiment): gating θ is about an lr of α/{K} per micro-batch, so the recipe must also beat the "
        f"small batch at α/{K}.")
    mparts = []
    for o in OPTIMIZERS:
        mparts.append(f"{NAMES[o]}: " + ", ".join(f"({i + 1}) {fmt_spread(loss[o][a])}" for i, a in enumerate(ARMS)))
    measured = ("Final val loss, arms 1–5. " + "; ".join(mparts) + ". Su's \"(2) matters more than (1)\": "
                + "; ".join(f"{NAMES[o]} {_MORE[per[o]['chi_vs_tilde']]} (gain of χ {pm(per[o]['gain_chi'])}, "
                            f"further gain of β̃ {pm(per[o]['gain_tilde'])})" for o in OPTIMIZERS)
                + ". θ moved on " + ", ".join(
                    f"{NAMES[o]} {a} {sorted(set(moves[o][a]))}" for o in OPTIMIZERS for a in ("chi", "small"))
                + f" micro-steps of {n}.")
    data = {
        "alpha": alphas, "k": K, "micro_batch": B, "micro_steps": n,
        "tuning": {"seeds": list(TUNE_SEEDS[:n_tune]), "val_loss": tuning},
        "val_loss": loss, "val_acc": acc, "theta_moves": moves, "coefficients": coefficients,
        "per_optimizer": per,
        "curves": {o: {a: {"micro_steps": [x for x, _ in results[o][a][0]["curve"]],
                           "val_loss": [[v for _, v in r["curve"]] for r in results[o][a]]} for a in ARMS}
                   for o in OPTIMIZERS},
    }
    return Outcome(protocol=protocol, tables=[table, side_table, tune_table], plots=plots, expected=expected,
                   measured=measured, verdict=verdict, reason=reason, data=data)


EXPERIMENT = Experiment(
    name="fewer-updates",
    title="Su's β̃ + χ recipe: fewer updates of a bigger effective batch, better?",
    summary=f"ChiGated (χ only, and β̃ + χ) vs the exact accum_steps={K} rule, batch {B} at α and at α/{K}, "
            "on SGDM and AdamW, digits",
    default_seeds=8,
    default_steps=1200,
    units=_units,
    run=_run,
)
