"""``accumulation``: gradient accumulation hidden in the momentum, against plain small-batch SGDM.

**Claim.** Su (kexue.fm/archives/8634; used in Tiger, /9512) folds gradient accumulation into EMA
momentum: over a window of k micro-batches, decay m by β only on the window's first micro-step, add
((1−β)/k)·g every micro-step, and move θ only on the k-th. For SGDM this is *exactly* one step on the
k-times-larger batch (no gradient buffer needed). Su reports that, with β and α unchanged, updating θ
only once every k micro-steps improved results "when small batch was the bottleneck" ("fewer updates,
better"); no numbers are published. Spec: ``dynamics.md`` §2, statistical test §2.3 and its confound
note: arm 1 below moves θ by α·m once per k micro-steps, an effective lr of α/k, so the claim is only
interesting if it also beats plain small-batch SGDM at α/k.

**Protocol.** Task ``digits`` (MLP 64-128-10, 1437 train rows), loss ``problem.batch_loss`` on
micro-batches of B = 4 rows drawn without replacement from per-seed shuffled epochs (the same
micro-batch stream and the same initialisation for every arm of a seed), K = 4, ``n = steps`` rounded
down to a multiple of K (at least K) micro-batches for every arm, i.e. the same n·B samples:

1. ``accum``: ``danlu.SGDM(lr=α, momentum=0.9, accum_steps=K)``, ``zero_grad``/backward/``step`` after
   every micro-batch (n/K updates);
2. ``large batch``: ``SGDM(lr=α)`` on batches of K·B rows that are exactly the union of arm 1's K
   micro-batches (n/K updates). Arms 1 and 2 are the same algorithm (§2.3's exact identity), so they
   agree to float32 rounding; max |Δθ| between them at the end is reported;
3. ``small batch α``: ``SGDM(lr=α)``, an update per micro-batch (n updates);
4. ``small batch α/K``: ``SGDM(lr=α/K)``, an update per micro-batch: the confound control.

**Choice of α.** The best lr of the plain small-batch baseline (arm 3's configuration): the lowest mean
final val loss over the grid {0.03, 0.1, 0.3} on two separate tuning seeds (1000, 1001, not reused as
evaluation seeds), at the same budget. A development sweep at 1500 micro-steps, 3 seeds, grid
{0.01, 0.03, 0.1, 0.3, 1} gave val loss ≈ 0.22, 0.13, 0.10, diverged, diverged for plain batch-4
SGDM (and 0.78, 0.28, 0.14, 0.11, 8.8+ for the accumulated arm), so the grid brackets the optimum and
α = 0.1 is expected. Tuning α for the baseline is deliberate: the claim is that accumulation helps
*at the lr one would use anyway*; arm 1 is not re-tuned (Su keeps α unchanged).

**Metric.** Final val cross-entropy (and val accuracy) after the n micro-batches, mean ± std over seeds;
val-loss curves against micro-batches seen (same samples for all arms).

**Verdict rule** (on final val loss; a difference counts at 2 standard errors, Welch, over seeds):
*supported* if arm 1 beats arm 3 and beats arm 4; *not supported* if arm 1 is significantly worse than
arm 3 or than arm 4; *mixed* if arm 1 significantly beats exactly one of them and ties the other;
*inconclusive* if neither difference counts (always so with one seed), and also whenever the budget is
under one epoch (n·B < 1437 samples, i.e. ``steps`` < 360): that only measures early progress, where
k× fewer updates trivially lag, not the trained result the claim is about.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ... import SGDM
from ..tasks import _gen, get_task
from ._common import (Context, Experiment, Outcome, difference, figure, fmt_spread, mean_std, save_figure,
                      significant)

TASK = "digits"
B = 4                       # micro-batch rows ("small batch is the bottleneck")
K = 4                       # micro-batches per update
BETA = 0.9                  # EMA momentum of every arm
LR_GRID = (0.03, 0.1, 0.3)  # α candidates for the plain small-batch baseline
TUNE_SEEDS = (1000, 1001)   # tuning seeds, disjoint from the evaluation seeds 0..seeds-1
N_POINTS = 20               # val-loss curve points (plus the initial one)

ARMS = ("accum", "large", "small", "small_lr_over_k")
LABELS = {
    "accum": f"1. SGDM accum_steps={K}, lr α (batch {B})",
    "large": f"2. SGDM batch {K * B} (union of arm 1's micro-batches), lr α",
    "small": f"3. SGDM batch {B}, lr α",
    "small_lr_over_k": f"4. SGDM batch {B}, lr α/{K}",
}


def _micro(steps: int) -> int:
    """Micro-batches per run: ``steps`` rounded down to a multiple of K, at least K."""
    return max(K, steps - steps % K)


def _tune_seeds(seeds: int) -> int:
    return min(len(TUNE_SEEDS), max(1, seeds))


def _units(seeds: int, steps: int) -> int:
    n = _micro(steps)
    tuning = len(LR_GRID) * _tune_seeds(seeds) * n
    per_seed = n + n // K + n + n   # optimizer.step() calls of arms 1-4
    return tuning + seeds * per_seed


def _stream(seed: int, n_train: int, n_micro: int) -> torch.Tensor:
    """(n_micro, B) row indices: consecutive slices of per-seed shuffled epochs (no replacement within
    an epoch), a function of the seed only."""
    need = n_micro * B
    parts, total, epoch = [], 0, 0
    while total < need:
        perm = torch.randperm(n_train, generator=_gen("accumulation", seed, "epoch", epoch))
        parts.append(perm)
        total += len(perm)
        epoch += 1
    return torch.cat(parts)[:need].view(n_micro, B)


def _checkpoints(n_micro: int) -> list[int]:
    """Micro-step counts at which the val loss is recorded: multiples of K, 0 and n_micro included."""
    every = max(K, (n_micro // N_POINTS) // K * K)
    points = list(range(0, n_micro, every)) + [n_micro]
    return sorted(set(points))


class _Seed:
    """One seed's micro-batch stream and a fresh build of its problem (the seeded initialisation) for
    each arm (:meth:`reset`)."""

    def __init__(self, seed: int, n_micro: int) -> None:
        self.seed = seed
        self.reset()
        self.train_size = int(self.problem.info["train_size"])
        self.stream = _stream(seed, self.train_size, n_micro)

    def reset(self) -> None:
        self.problem = get_task(TASK).build(self.seed)
        assert self.problem.batch_loss is not None


def _train(setup: _Seed, arm: str, lr: float, n_micro: int) -> dict[str, Any]:
    """One run of ``arm`` from the seed's initialisation on its micro-batch stream."""
    setup.reset()
    problem, stream = setup.problem, setup.stream
    batch_loss = problem.batch_loss
    assert batch_loss is not None
    checkpoints = set(_checkpoints(n_micro))
    accum = K if arm == "accum" else 1
    opt = SGDM(problem.params, lr=lr, momentum=BETA, accum_steps=accum)
    curve: list[tuple[int, float]] = [(0, problem.evaluate()["val_loss"])]

    def record(micro_done: int) -> None:
        if micro_done in checkpoints and micro_done > 0:
            curve.append((micro_done, problem.evaluate()["val_loss"]))

    if arm == "large":
        for j in range(n_micro // K):
            opt.zero_grad(set_to_none=True)
            batch_loss(stream[j * K:(j + 1) * K].reshape(-1)).backward()
            opt.step()
            record((j + 1) * K)
    else:
        for t in range(n_micro):
            opt.zero_grad(set_to_none=True)
            batch_loss(stream[t]).backward()
            opt.step()
            record(t + 1)
    final = problem.evaluate()
    theta = torch.cat([p.detach().reshape(-1) for p in problem.params]).clone()
    return {"val_loss": float(final["val_loss"]), "val_acc": float(final["val_acc"]), "curve": curve,
            "theta": theta}


def _finite_mean(values: list[float]) -> float:
    m, _ = mean_std(values)
    return m if len(values) and all(math.isfinite(v) for v in values) else math.inf


def _run(ctx: Context) -> Outcome:
    n = _micro(ctx.steps)
    n_tune = _tune_seeds(ctx.seeds)

    # --- α: best lr of plain small-batch SGDM on separate tuning seeds ---------------------------------
    tune_setups = {s: _Seed(s, n) for s in TUNE_SEEDS[:n_tune]}
    tuning: dict[str, list[float]] = {}
    for lr in LR_GRID:
        losses = []
        for s in TUNE_SEEDS[:n_tune]:
            losses.append(_train(tune_setups[s], "small", lr, n)["val_loss"])
            ctx.advance(n, f"tuning α: batch {B}, lr {lr:g}, seed {s}")
        tuning[f"{lr:g}"] = losses
    alpha = min(LR_GRID, key=lambda lr: (_finite_mean(tuning[f"{lr:g}"]), lr))
    lrs = {"accum": alpha, "large": alpha, "small": alpha, "small_lr_over_k": alpha / K}

    # --- the four arms on the evaluation seeds -----------------------------------------------------------
    results: dict[str, list[dict[str, Any]]] = {a: [] for a in ARMS}
    max_dtheta: list[float] = []
    train_size = 0
    for s in range(ctx.seeds):
        setup = _Seed(s, n)
        train_size = setup.train_size
        for arm in ARMS:
            r = _train(setup, arm, lrs[arm], n)
            results[arm].append(r)
            ctx.advance(n // K if arm == "large" else n, f"{arm}, seed {s}")
        max_dtheta.append(float((results["accum"][-1]["theta"] - results["large"][-1]["theta"]).abs().max()))

    loss = {a: [r["val_loss"] for r in results[a]] for a in ARMS}
    acc = {a: [r["val_acc"] for r in results[a]] for a in ARMS}

    # --- verdict -----------------------------------------------------------------------------------------
    # significant(x, y) = +1 when mean(x) > mean(y): arm 1 *beats* arm j when significant(loss_j, loss_1) = +1.
    vs_small = significant(loss["small"], loss["accum"])
    vs_lr_k = significant(loss["small_lr_over_k"], loss["accum"])
    words = {1: "arm 1 significantly better", -1: "arm 1 significantly worse", 0: "not significant"}
    too_short = n * B < train_size
    if too_short:
        verdict = "inconclusive"
    elif vs_small == 1 and vs_lr_k == 1:
        verdict = "supported"
    elif vs_small == -1 or vs_lr_k == -1:
        verdict = "not supported"
    elif vs_small == 1 or vs_lr_k == 1:
        verdict = "mixed"
    else:
        verdict = "inconclusive"
    acc_small = significant(acc["accum"], acc["small"])
    acc_lr_k = significant(acc["accum"], acc["small_lr_over_k"])
    acc_words = {1: "arm 1 significantly higher", -1: "arm 1 significantly lower", 0: "not significant"}
    d3, se3 = difference(loss["accum"], loss["small"])
    d4, se4 = difference(loss["accum"], loss["small_lr_over_k"])
    wins3 = sum(a < b for a, b in zip(loss["accum"], loss["small"]))
    wins4 = sum(a < b for a, b in zip(loss["accum"], loss["small_lr_over_k"]))
    reason = (f"Rule: supported iff arm 1 (accumulation in momentum) has a lower final val loss than both arm 3 "
              f"(batch {B}, lr α) and arm 4 (batch {B}, lr α/{K}) by more than 2 standard errors; not supported "
              f"if it is significantly worse than either; mixed if it significantly beats exactly one; "
              f"inconclusive otherwise, or when the budget is under one epoch. "
              f"Loss of arm 1 − arm 3: {d3:+.3g} ± {se3:.2g} ({words[vs_small]}); "
              f"arm 1 − arm 4: {d4:+.3g} ± {se4:.2g} ({words[vs_lr_k]}); {ctx.seeds} seed(s).")
    if too_short:
        reason += (f" The budget ({n * B} samples) is under one epoch ({train_size} rows), which only measures "
                   "early progress, so the verdict is inconclusive whatever the differences.")
    elif ctx.seeds < 2:
        reason += " With one seed there is no spread, so nothing counts."

    # --- tables, plot, text ------------------------------------------------------------------------------
    rows = []
    for a in ARMS:
        updates = n // K if a in ("accum", "large") else n
        rows.append([LABELS[a], f"{lrs[a]:g}", str(updates), fmt_spread(loss[a]), fmt_spread(acc[a])])
    table = (["arm", "lr", "updates", "final val loss", "final val acc"], rows)
    tune_table = (["lr (batch 4, tuning seeds)", "final val loss"],
                  [[f"{lr:g}" + (" ← α" if lr == alpha else ""), fmt_spread(tuning[f"{lr:g}"])]
                   for lr in LR_GRID])

    plt, fig, ax = figure()
    for a in ARMS:
        curves = [r["curve"] for r in results[a]]
        xs = [x for x, _ in curves[0]]
        stats = [mean_std([c[i][1] for c in curves]) for i in range(len(xs))]
        means = [m for m, _ in stats]
        ax.plot([x * B for x in xs], means, label=LABELS[a], linestyle="--" if a == "large" else "-")
        if len(curves) > 1:
            ax.fill_between([x * B for x in xs], [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.15)
    ax.set_xlabel("training samples seen (micro-batches × 4)")
    ax.set_ylabel("val cross-entropy")
    ax.set_yscale("log")
    ax.set_title(f"digits: accumulation in momentum (k={K}, b={B}), α={alpha:g}, {ctx.seeds} seed(s)")
    plots = [save_figure(plt, fig, ax, ctx.out, "accumulation-val-loss.png")]

    protocol = (
        f"Task `digits` (MLP 64-128-10), cross-entropy on micro-batches of {B} rows from per-seed shuffled "
        f"epochs; every arm sees the same {n} micro-batches ({n * B} samples) from the same initialisation per "
        f"seed. All arms `danlu.SGDM` with EMA momentum β = {BETA}, no weight decay. Arms: (1) `accum_steps={K}`, "
        f"stepped after every micro-batch, lr α ({n // K} updates); (2) batch {K * B} = the union of arm 1's {K} "
        f"micro-batches, lr α ({n // K} updates; identical to arm 1 up to rounding, spec dynamics.md §2.3); "
        f"(3) batch {B}, lr α ({n} updates); (4) batch {B}, lr α/{K} ({n} updates; the confound control: arm 1 "
        f"moves θ once per {K} micro-steps, an effective lr α/{K}). α = the best plain batch-{B} lr over "
        f"{{{', '.join(f'{x:g}' for x in LR_GRID)}}} by mean final val loss on {n_tune} separate tuning seed(s) "
        f"at the same budget: α = {alpha:g}. {ctx.seeds} evaluation seed(s) per arm; the metric is the final "
        f"val loss (and accuracy).")
    expected = (
        "Su (kexue.fm/archives/8634; Tiger, /9512): folding k-step accumulation into the momentum is exactly the "
        "k-times-larger batch, and updating θ only every k micro-steps with α and β unchanged improved results "
        "when the small batch was the bottleneck (\"fewer updates, better\"; no numbers published). "
        "The spec's confound note (dynamics.md §2.3): this is only interesting if it also beats small-batch "
        f"SGDM at α/{K}, since arm 1's effective lr per micro-step is α/{K}.")
    measured = (
        f"Final val loss: accum {fmt_spread(loss['accum'])}, large batch {fmt_spread(loss['large'])}, "
        f"small batch α {fmt_spread(loss['small'])}, small batch α/{K} {fmt_spread(loss['small_lr_over_k'])} "
        f"(val acc: {fmt_spread(acc['accum'])}, {fmt_spread(acc['large'])}, {fmt_spread(acc['small'])}, "
        f"{fmt_spread(acc['small_lr_over_k'])}; accuracy, arm 1 vs 3: {acc_words[acc_small]}, arm 1 vs 4: "
        f"{acc_words[acc_lr_k]}). Arm 1 had a lower loss than arm 3 in {wins3}/{ctx.seeds} "
        f"seeds and than arm 4 in {wins4}/{ctx.seeds}. Exact identity arm 1 = arm 2: max |Δθ| at the end "
        f"{max(max_dtheta):.2g} (float32) over all seeds.")
    data = {
        "alpha": alpha, "k": K, "micro_batch": B, "micro_steps": n, "beta": BETA,
        "tuning": {"seeds": list(TUNE_SEEDS[:n_tune]), "val_loss": tuning},
        "val_loss": loss, "val_acc": acc, "max_abs_dtheta_accum_vs_large": max_dtheta,
        "curves": {a: {"micro_steps": [x for x, _ in results[a][0]["curve"]],
                       "val_loss": [[v for _, v in r["curve"]] for r in results[a]]} for a in ARMS},
        "significance": {"accum_beats_small": vs_small, "accum_beats_small_lr_over_k": vs_lr_k,
                         "accum_acc_vs_small": acc_small, "accum_acc_vs_small_lr_over_k": acc_lr_k},
    }
    return Outcome(protocol=protocol, tables=[table, tune_table], plots=plots, expected=expected,
                   measured=measured, verdict=verdict, reason=reason, data=data)


EXPERIMENT = Experiment(
    name="accumulation",
    title="Gradient accumulation hidden in momentum: fewer updates, better?",
    summary=f"SGDM with {K}-step accumulation folded into momentum vs batch-{B} SGDM at α and α/{K}, "
            f"and the exact large-batch identity, on digits",
    default_seeds=10,
    default_steps=1200,
    units=_units,
    run=_run,
)
