"""``adax-beta``: the second-moment coefficient β̂_t, with everything else held fixed.

**Claim.** Su (kexue.fm/archives/7387, AdaX; kexue.fm/archives/7302, Adafactor) writes every
Adam-like second moment as one moving average, v̂_t = β̂_t·v̂_{t−1} + (1 − β̂_t)·g_t², the
optimizers differing only in the coefficient β̂_t:

* Adam (constant β2 with bias correction): β̂_t = β2·(1 − β2^{t−1})/(1 − β2^t) → β2 (= 0.999);
* AdaX: β̂_t = 1 − β2/((1 + β2)^t − 1) → 1 (β2 = 1e-4; ≈ 1 − 1/t, the mean of all past g², for
  t ≪ 1/β2);
* Adafactor: β̂_t = 1 − t^(−c) → 1 (c = 0.8).

All three have β̂_1 = 0. Su's argument (both essays): with Adam's β̂_t → β2 < 1 the current gradient
keeps the weight 1 − β2 for ever, which "may make training unstable": late in training the gradients
shrink and training settles, so the adaptive correction should fade out and the step tend to a constant
lr (SGD); that needs β̂_t → 1, the condition "β̂_1 = 0, β̂_∞ = 1" AdaX and Adafactor both meet. Which
of the two schedules is better Su leaves to experiment.

**Isolating β̂_t.** danlu's :func:`danlu.optim.adax.adax_update` takes this step's β̂_t as an argument,
so all three arms run that one kernel (AdaX's update, unmodified) and differ *only* in the β̂_t fed to
it: the same first moment m_t = β1·m_{t−1} + (1 − β1)·g_t (β1 = 0.9, not bias-corrected), the same
θ ← θ − η·m_t/(√v̂_t + ε), the same lr, ε and initialisation. The AdaX arm *is* ``danlu.AdaX`` (the
test checks the trajectory). :func:`beta_hat_schedule` writes the three schedules from the essays'
formulas; the test checks them against what the optimizers compute (``adax_beta_hat``,
``adafactor_scalars``, and AdamW's bias-corrected state). Two reference arms run the shipped
optimizers for comparison, outside the verdict, on the first min(seeds, :data:`REF_SEEDS`) seeds (to keep
the budget): ``danlu.AdamW`` (weight decay 0) differs from the
Adam-β̂ arm only by bias-correcting m; ``danlu.Adafactor`` (absolute lr, no parameter scaling, β1 = 0.9,
unfactored on a vector) differs from the Adafactor-β̂ arm by its momentum on the normalised update
g/√v̂, its update clipping (RMS(Û) ≤ 1) and ε1 = 1e-30 added to g² instead of ε outside the root.

**Task: ``rosenbrock``** (2-d, from (−1.2, 1) plus a seeded 0.05 jitter, minimum 0 at (1, 1)), full
batch, lr η = 0.05 (the task's default for AdamW and AdaX), ε = 1e-8 (Adam's default: the smaller of
the AdamW/AdaX defaults, so that the second moment and not ε sets the step size late in training).
Why this task: it is deterministic, so the gradient really goes to 0 as the iterate converges (Su's
premise that gradients shrink late in training), and there is no minibatch noise: any rise of the loss
is the optimizer's doing. The noisy quadratic keeps a gradient-noise floor and digits drives its train
loss to the float32 resolution of the cross-entropy, neither of which isolates that mechanism.
A one-seed pilot at 10 000 steps (before this rule was fixed) showed the Adam-β̂ arm converging to
~1e-12 and then jumping back up by many orders of magnitude, the Adafactor-β̂ arm spiking as well, and the
AdaX arm converging monotonically.

**Horizon.** Adafactor's 1 − t^(−0.8) forgets *faster* than Adam's constant β2 = 0.999 until
t_× ≈ 5 600 (where t^0.8 = 1/(1 − β̂_Adam)); only after that is it the closer of the two to 1. The
late-instability metric is taken over the second half of the run, so a run comparable to the claim needs
steps ≥ 2·t_×; the default is 20 000 steps (second half: 1 − β̂ of Adafactor 2.8–1.6× smaller than
Adam's; AdaX's 1 − β̂ ≈ 6e-5 → 1.6e-5).

**Metric.** L_s = the loss at θ_s (every step, exact: full batch). With the floor F = 1e-12 (about the
loss one float32 ulp from the optimum, 100·(2·6e-8)²), the *late spike* of a run is
max over s ≥ steps/2 of log10(max(L_s, F)/max(min_{j<s} L_j, F)), at least 0: the largest rise, in
orders of magnitude, of the loss above its best value so far, during the second half. A seed is
*unstable* when its late spike ≥ 1 (a ≥ 10× rise). A run that diverges (non-finite loss) scores
:data:`CAP` (20 orders). Also reported: the final loss, and the effective lr η·RMS(1/(√v̂ + ε)) along
the run (the mechanism: with β̂ → β2 it grows as the gradients shrink).

**Verdict rule** (fixed before the default-budget run; Welch, 2 standard errors over seeds, on the late
spike of the three β̂-only arms): *supported* if the AdaX-β̂ arm and the Adafactor-β̂ arm both have a
significantly smaller mean late spike than the Adam-β̂ arm; *mixed* if exactly one of them does and the
other is not significantly larger; *not supported* otherwise; *inconclusive* with fewer than 2 seeds or
fewer than 2·t_× steps (the second half would not lie where Adafactor's β̂ exceeds Adam's). The
reference arms and the final loss are reported, not voted.
"""

from __future__ import annotations

import functools
import math
from typing import Any, cast

import torch

from ...optim.adax import adax_update
from ..loop import run as run_task
from ..tasks import get_task
from ._common import (
    Context,
    Experiment,
    Outcome,
    difference,
    figure,
    fmt_spread,
    save_figure,
    significant,
)

__all__ = ["EXPERIMENT", "SCHEDULES", "beta_hat_schedule", "crossing_step", "late_spike"]

TASK = "rosenbrock"
LR = 5e-2
BETA1 = 0.9
EPS = 1e-8
ADAM_BETA2 = 0.999
ADAX_BETA2 = 1e-4
ADAFACTOR_C = 0.8
FLOOR = 1e-12     # loss floor for the log-scale metric: ≈ the loss one float32 ulp from (1, 1)
UNSTABLE = 1.0    # a late spike of ≥ 1 order of magnitude marks a seed unstable
CAP = 20.0        # the late spike given to a diverged run
N_POINTS = 200    # points kept per curve for the plots and results.json

SCHEDULES = ("adam", "adax", "adafactor")
LABELS = {
    "adam": f"β̂ Adam: β2(1−β2^(t−1))/(1−β2^t), β2={ADAM_BETA2:g}",
    "adax": f"β̂ AdaX: 1−β2/((1+β2)^t−1), β2={ADAX_BETA2:g}",
    "adafactor": f"β̂ Adafactor: 1−t^(−{ADAFACTOR_C:g})",
}
REFERENCE = ("adamw", "adafactor")   # the shipped optimizers, for comparison (outside the verdict)
REF_SEEDS = 3                        # ... run on the first min(seeds, REF_SEEDS) seeds
REF_LABELS = {"adamw": "danlu.AdamW (m bias-corrected)",
              "adafactor": "danlu.Adafactor (momentum on Û, clipped)"}


def beta_hat_schedule(name: str, steps: int) -> torch.Tensor:
    """β̂_t for t = 1..``steps`` (float64, shape (steps,)) of the named second-moment schedule, from
    Su's formulas (kexue.fm/archives/7387, /7302), in which v̂_t = β̂_t·v̂_{t−1} + (1 − β̂_t)·g_t²:

    * ``"adam"``: β̂_t = β2·(1 − β2^{t−1})/(1 − β2^t) with β2 = 0.999 (Adam's bias-corrected v̂);
    * ``"adax"``: β̂_t = 1 − β2/((1 + β2)^t − 1) with β2 = 1e-4;
    * ``"adafactor"``: β̂_t = 1 − t^(−c) with c = 0.8.

    The powers are taken as expm1(t·log β) so that 1 − β^t keeps its digits. β̂_1 = 0 for all three.

    Raises:
        ValueError: an unknown ``name`` or ``steps`` < 1.
    """
    if name not in SCHEDULES:
        raise ValueError(f"Unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer ≥ 1, got {steps!r}")
    t = torch.arange(1, steps + 1, dtype=torch.float64)
    if name == "adam":
        log_b = math.log(ADAM_BETA2)
        return ADAM_BETA2 * torch.expm1((t - 1) * log_b) / torch.expm1(t * log_b)
    if name == "adax":
        return 1.0 - ADAX_BETA2 / torch.expm1(t * math.log1p(ADAX_BETA2))
    return 1.0 - t.pow(-ADAFACTOR_C)


@functools.cache
def crossing_step(limit: int = 10**6) -> int:
    """t_×: the first step at which Adafactor's β̂_t is at least Adam's (before it, 1 − t^(−0.8) forgets
    faster than the constant β2 = 0.999)."""
    ahead = beta_hat_schedule("adafactor", limit) >= beta_hat_schedule("adam", limit)
    ahead[0] = False  # both are 0 at t = 1
    return int(torch.nonzero(ahead)[0, 0].item()) + 1


def late_spike(losses: list[float], floor: float = FLOOR) -> float:
    """max over s ≥ len/2 of log10(max(L_s, floor) / max(min_{j<s} L_j, floor)), at least 0: the largest
    rise of the loss above its best value so far during the second half, in orders of magnitude;
    :data:`CAP` when a loss is non-finite."""
    if not losses:
        raise ValueError("late_spike needs at least one loss")
    if not all(math.isfinite(v) for v in losses):
        return CAP
    best, worst = math.inf, 0.0
    half = len(losses) // 2
    for s, v in enumerate(losses):
        if s >= half and s > 0:
            worst = max(worst, math.log10(max(v, floor) / max(best, floor)))
        best = min(best, v)
    return worst


def _units(seeds: int, steps: int) -> int:
    return steps * (seeds * len(SCHEDULES) + min(seeds, REF_SEEDS) * len(REFERENCE))


def _thin(values: list[float], points: int = N_POINTS) -> tuple[list[int], list[float]]:
    """(step, max of the values in its bin) for about ``points`` bins: spikes survive the thinning."""
    n = len(values)
    width = max(1, math.ceil(n / points))
    steps, out = [], []
    for start in range(0, n, width):
        chunk = values[start:start + width]
        steps.append(start + len(chunk))
        out.append(max(chunk) if all(math.isfinite(v) for v in chunk) else math.inf)
    return steps, out


def _train_isolated(schedule: str, seed: int, steps: int) -> dict[str, Any]:
    """One run of the AdaX kernel with the named β̂_t schedule; every step's loss (at θ before the update)
    and the effective lr η·RMS(1/(√v̂ + ε)) at about N_POINTS steps."""
    problem = get_task(TASK).build(seed)
    beta_hat = beta_hat_schedule(schedule, steps)
    params = problem.params
    states = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    counter = torch.zeros((), dtype=torch.float32)  # unused by the kernel once β̂_t is given
    every = max(1, steps // N_POINTS)
    losses: list[float] = []
    eff_lr: list[tuple[int, float]] = []
    for s in range(steps):
        for p in params:
            p.grad = None
        loss = problem.train_loss(s)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
        loss.backward()
        with torch.no_grad():
            for p, (m, v) in zip(params, states):
                adax_update(p, cast(torch.Tensor, p.grad), m, v, counter, lr=LR, beta1=BETA1, beta2=ADAX_BETA2, eps=EPS,
                            weight_decay=0.0, beta_hat=beta_hat[s])
        if (s + 1) % every == 0 or s + 1 == steps:
            inv = torch.cat([(v.sqrt() + EPS).reciprocal().reshape(-1) for _, v in states])
            eff_lr.append((s + 1, LR * float(inv.square().mean().sqrt())))
    final = problem.evaluate()
    theta = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    return {"losses": losses, "eff_lr": eff_lr, "final": float(final["val_loss"]), "theta": theta}


def _train_reference(name: str, seed: int, steps: int) -> dict[str, Any]:
    kwargs: dict[str, Any]
    if name == "adamw":
        kwargs = {"betas": (BETA1, ADAM_BETA2), "eps": EPS, "weight_decay": 0.0}
    else:
        kwargs = {"relative_step": False, "scale_parameter": False, "beta1": BETA1, "decay_rate": ADAFACTOR_C}
    r = run_task(get_task(TASK), name, LR, seed, steps, eval_every=steps, **kwargs)
    return {"losses": list(r.train_losses), "final": r.final_val_loss}


def _log10(v: float) -> float:
    return math.log10(max(v, FLOOR)) if math.isfinite(v) else math.inf


def _run(ctx: Context) -> Outcome:
    steps, seeds = ctx.steps, ctx.seeds
    t_cross = crossing_step()
    iso: dict[str, list[dict[str, Any]]] = {a: [] for a in SCHEDULES}
    ref: dict[str, list[dict[str, Any]]] = {a: [] for a in REFERENCE}
    for seed in range(seeds):
        for a in SCHEDULES:
            iso[a].append(_train_isolated(a, seed, steps))
            ctx.advance(steps, f"{TASK} β̂ {a} seed {seed}")
        for a in REFERENCE if seed < REF_SEEDS else ():
            ref[a].append(_train_reference(a, seed, steps))
            ctx.advance(steps, f"{TASK} {a} seed {seed}")

    runs = {**{a: iso[a] for a in SCHEDULES}, **{f"ref_{a}": ref[a] for a in REFERENCE}}
    spike = {k: [late_spike(r["losses"]) for r in rs] for k, rs in runs.items()}
    final = {k: [_log10(r["final"]) for r in rs] for k, rs in runs.items()}
    unstable = {k: sum(v >= UNSTABLE for v in spike[k]) for k in runs}
    diverged = {k: sum(not all(math.isfinite(x) for x in r["losses"]) for r in rs) for k, rs in runs.items()}

    # --- verdict (the β̂-only arms) -------------------------------------------------------------------
    # significant(x, y) = +1 when mean(x) > mean(y): arm a is *more stable* than Adam when significant(adam, a) = +1.
    vs = {a: significant(spike["adam"], spike[a]) for a in ("adax", "adafactor")}
    too_short = steps < 2 * t_cross
    if seeds < 2 or too_short:
        verdict = "inconclusive"
    elif vs["adax"] == 1 and vs["adafactor"] == 1:
        verdict = "supported"
    elif (vs["adax"] == 1 and vs["adafactor"] == 0) or (vs["adax"] == 0 and vs["adafactor"] == 1):
        verdict = "mixed"
    else:
        verdict = "not supported"
    words = {1: "significantly smaller than Adam's", -1: "significantly larger than Adam's",
             0: "not significantly different from Adam's"}
    diffs = {a: difference(spike[a], spike["adam"]) for a in ("adax", "adafactor")}
    reason = (f"Rule: supported iff the AdaX-β̂ and the Adafactor-β̂ arms both have a mean late spike (the largest "
              f"rise of the loss above its best so far in the second half, log10) smaller than the Adam-β̂ arm's "
              f"by more than 2 standard errors; mixed if exactly one does and the other is not significantly "
              f"larger; not supported otherwise; inconclusive with < 2 seeds or < 2·t_× = {2 * t_cross} steps. "
              f"AdaX − Adam: {diffs['adax'][0]:+.3g} ± {diffs['adax'][1]:.2g} ({words[vs['adax']]}); "
              f"Adafactor − Adam: {diffs['adafactor'][0]:+.3g} ± {diffs['adafactor'][1]:.2g} "
              f"({words[vs['adafactor']]}); {seeds} seed(s), {steps} steps. Seeds with a ≥10× late rise: "
              + ", ".join(f"{a}-β̂ {unstable[a]}/{seeds}" for a in SCHEDULES) + ".")
    if too_short:
        reason += (f" The run is shorter than 2·t_× = {2 * t_cross} steps, so its second half is not where "
                   "Adafactor's β̂ exceeds Adam's: inconclusive whatever the differences.")
    elif seeds < 2:
        reason += " With one seed there is no spread, so nothing counts."

    # --- tables ---------------------------------------------------------------------------------------
    def row(key: str, label: str) -> list[str]:
        return [label, fmt_spread(spike[key], 3), f"{unstable[key]}/{len(spike[key])}", fmt_spread(final[key], 3),
                str(diverged[key])]

    headers = ["arm", "late spike (log10 rise)", "unstable seeds (≥10× rise)", "final loss (log10)", "diverged"]
    table = (headers, [row(a, LABELS[a]) for a in SCHEDULES])
    ref_table = (["reference (not voted)"] + headers[1:], [row(f"ref_{a}", REF_LABELS[a]) for a in REFERENCE])
    probe = [1, 10, 100, 1000, t_cross, steps // 2, steps]
    probe = sorted({t for t in probe if 1 <= t <= steps})
    sched = {a: beta_hat_schedule(a, steps) for a in SCHEDULES}
    beta_table = (["t"] + [f"1 − β̂_t, {a}" for a in SCHEDULES],
                  [[str(t)] + [f"{1.0 - float(sched[a][t - 1]):.3g}" for a in SCHEDULES] for t in probe])

    # --- plots ----------------------------------------------------------------------------------------
    plots = []
    plt, fig, ax = figure()
    for a in SCHEDULES:
        xs, ys = _thin([max(v, FLOOR) for v in iso[a][0]["losses"]])
        ax.plot(xs, ys, label=LABELS[a])
    for a in REFERENCE:
        xs, ys = _thin([max(v, FLOOR) for v in ref[a][0]["losses"]])
        ax.plot(xs, ys, label=REF_LABELS[a], linestyle=":", linewidth=1)
    ax.axvline(steps / 2, color="grey", linewidth=0.5)
    ax.set(xlabel="step", ylabel=f"loss (max per bin, floored at {FLOOR:g})", yscale="log",
           title=f"rosenbrock, lr {LR:g}, seed 0: the late half is right of the line")
    plots.append(save_figure(plt, fig, ax, ctx.out, "adax-beta-loss.png"))

    plt, fig, ax = figure()
    t = torch.arange(1, steps + 1, dtype=torch.float64)
    for a in SCHEDULES:
        ax.plot(t[1:].tolist(), (1.0 - sched[a][1:]).tolist(), label=LABELS[a])
    ax.axvline(t_cross, color="grey", linewidth=0.5, linestyle="--")
    ax.set(xlabel="step t", ylabel="1 − β̂_t (weight of the current g²)", xscale="log", yscale="log",
           title=f"second-moment schedules; Adafactor passes Adam at t_× = {t_cross}")
    plots.append(save_figure(plt, fig, ax, ctx.out, "adax-beta-schedules.png"))

    plt, fig, ax = figure()
    for a in SCHEDULES:
        pts = iso[a][0]["eff_lr"]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=LABELS[a])
    ax.set(xlabel="step", ylabel="η·RMS(1/(√v̂+ε))", yscale="log", title="effective lr, seed 0")
    plots.append(save_figure(plt, fig, ax, ctx.out, "adax-beta-effective-lr.png"))

    # --- text -----------------------------------------------------------------------------------------
    protocol = (
        f"Task `{TASK}` (2-d, deterministic, full batch), {steps} steps, {seeds} seed(s) (the seed sets a 0.05 "
        f"jitter of the start (−1.2, 1)). Three β̂-only arms: `danlu.optim.adax.adax_update` (AdaX's kernel) "
        f"with this step's β̂_t passed in from the Adam, AdaX or Adafactor schedule; all with lr {LR:g}, "
        f"β1 = {BETA1:g} (m not bias-corrected), ε = {EPS:g} outside √v̂, no weight decay, the same start. "
        f"Reference arms (not voted): `danlu.AdamW` (betas ({BETA1:g}, {ADAM_BETA2:g}), ε {EPS:g}, weight decay 0: "
        f"the Adam-β̂ arm plus bias correction of m) and `danlu.Adafactor` (lr {LR:g} absolute, "
        f"scale_parameter=False, beta1 {BETA1:g}, decay_rate {ADAFACTOR_C:g}, clip_threshold 1, unfactored: "
        f"momentum on the clipped g/√v̂, ε1 = 1e-30 in g²), on the first {min(seeds, REF_SEEDS)} seed(s). Metric: "
        f"the late spike, the largest rise of the loss (every step, floored at {FLOOR:g}) above its best value so "
        f"far during steps ≥ {steps // 2}, in orders of magnitude; a seed is unstable at ≥ 1. Adafactor's β̂ "
        f"passes Adam's at t_× = {t_cross}.")
    expected = (
        "Su (kexue.fm/archives/7387, /7302): Adam's β̂_t → β2 < 1 keeps weight 1 − β2 on the current g², which "
        "may make late training unstable, as the gradients shrink; a schedule with β̂_1 = 0 and β̂_t → 1 "
        "(AdaX's 1 − β2/((1+β2)^t − 1), Adafactor's 1 − t^(−0.8)) lets the adaptive correction fade so that the "
        "step tends to a constant lr. Which of the two is better Su leaves to experiment.")
    measured = (
        "Late spike (log10 rise above the best loss so far, second half): "
        + "; ".join(f"{a}-β̂ {fmt_spread(spike[a], 3)}, unstable {unstable[a]}/{seeds}" for a in SCHEDULES)
        + ". Final loss (log10): "
        + "; ".join(f"{a}-β̂ {fmt_spread(final[a], 3)}" for a in SCHEDULES)
        + ". Reference optimizers: "
        + "; ".join(f"{REF_LABELS[a]} late spike {fmt_spread(spike['ref_' + a], 3)}, unstable "
                    f"{unstable['ref_' + a]}/{len(spike['ref_' + a])}, final {fmt_spread(final['ref_' + a], 3)}"
                    for a in REFERENCE) + ".")
    data: dict[str, Any] = {
        "task": TASK, "steps": steps, "seeds": seeds, "lr": LR, "beta1": BETA1, "eps": EPS,
        "adam_beta2": ADAM_BETA2, "adax_beta2": ADAX_BETA2, "adafactor_c": ADAFACTOR_C, "floor": FLOOR,
        "crossing_step": t_cross,
        "late_spike": spike, "final_log10_loss": final, "unstable_seeds": unstable, "diverged_seeds": diverged,
        "significance_vs_adam": vs,
        "one_minus_beta_hat": {a: {str(t): 1.0 - float(sched[a][t - 1]) for t in probe} for a in SCHEDULES},
        "curves": {k: [dict(zip(("steps", "max_loss"), _thin(r["losses"]))) for r in rs] for k, rs in runs.items()},
        "effective_lr": {a: [[p[1] for p in r["eff_lr"]] for r in iso[a]] for a in SCHEDULES},
        "final_theta": {a: [r["theta"].tolist() for r in iso[a]] for a in SCHEDULES},
    }
    return Outcome(protocol=protocol, tables=[table, ref_table, beta_table], plots=plots, expected=expected,
                   measured=measured, verdict=verdict, reason=reason, data=data)


EXPERIMENT = Experiment(
    name="adax-beta",
    title="The second-moment coefficient β̂_t: Adam's constant β2 vs AdaX's and Adafactor's β̂_t → 1",
    summary="AdaX's kernel fed Adam's, AdaX's or Adafactor's β̂_t (nothing else differs), on a long "
            "deterministic Rosenbrock run: late loss spikes",
    default_seeds=5,
    default_steps=20000,
    units=_units,
    run=_run,
)
