"""``implicit-regularization``: does a gradient-norm penalty (implicit, explicit, or flooding) lower ‖∇L‖²
and improve generalisation?

**Claim.** Gradient descent θ ← θ − h·∇L follows, with local error O(h³), the gradient flow of the
modified loss L̃ = L + (h/4)·‖∇L‖², not that of L (Barrett & Dherin, "Implicit Gradient
Regularization", ICLR 2021, arXiv:2009.11162; Su, kexue.fm/archives/7787). Su's reading: the penalty
pushes the model into flatter regions "which helps generalisation", so the step size should not be too
small, and adding the penalty explicitly at a small step should in principle do the same. Flooding
(Ishida et al., arXiv:2002.08709), training on |L − b| + b, alternates descent and ascent once L
reaches b; Su (kexue.fm/archives/7643) shows that a descent step followed by an ascent step of lr ε
(or the reverse) moves θ by −(ε²/2)·∇‖∇L‖² + O(ε³): at the level b, flooding is gradient descent on
‖∇L‖², again a gradient-norm penalty, again argued to help generalisation. Tested (spec
``dynamics.md`` §3.3): (a) at equal flow time the final ‖∇L‖² falls as h grows; (b) an explicit
penalty (EGR, :class:`danlu.GradientPenalty`) at a small step h_s lowers ‖∇L‖² toward the large-step
value; (c) flooding, once the loss hovers at b, leaves a smaller ‖∇L‖² than plain GD had at the same
training loss; (G) these regularisers improve validation accuracy.

**Protocol.** Task ``digits`` (MLP 64–128–10), *full-batch* gradient descent (``torch.optim.SGD``, no
momentum, no weight decay) on a fixed subset: the first 200 rows of the task's frozen shuffled training
split (``problem.batch_loss(arange(200))``, 11–30 rows per class); validation on the task's 360 held-out
rows. The subset puts the runs in an *overfitting regime*, where a regulariser has something to
improve: in a pilot (plain GD h = 2, seeds 0–1, before any regularised arm was run on the subset) the
training loss fell to 1e-3 by the end (every arm here ends at training accuracy 1) while the val
loss rose again after flow time ≈ 50–100 (0.23 → 0.25) and val accuracy stayed at ≈ 0.93, against
0.976 with all 1437 rows. The
only differences between arms are the step size and the regulariser. Step sizes h ∈ {0.25, 0.5, 1, 2};
on the subset the stability edge is near 3.5–4 (lr grid 2–4, 300 steps, seeds 0–2: lr ≤ 3 never rose
above the initial loss, at 3.5 one seed spiked to 1.35× it, at 4 one seed diverged and the others
spiked 75× and more), so h_L = 2 is about half of it; the grid halves down to h_s = 0.25 so that every
arm's step count is an exact integer. Every arm runs to the same flow time T = h_L·``steps`` (h_L runs
``steps`` steps, h runs ``steps``·h_L/h), so all arms approximate the same gradient flow and differ
only by the h-dependent implicit term and their regulariser.

* Two EGR arms run h_s = 0.25 wrapped in ``GradientPenalty`` with λ = igr_strength(h_L) −
  igr_strength(h_s) = (h_L − h_s)/4: gradient descent at h_s on L + λ‖∇L‖² itself follows
  L + (λ + h_s/4)‖∇L‖² to first order, so this λ makes the total penalty h_L/4, the large step's. The
  *exact* arm (``method="double_backward"``) steps on the true gradient of L + λ‖∇L‖² and decides (b)
  and its part of (G); the *finite-diff* arm (danlu's default, the gradient at θ + 2λ∇L) is reported
  alongside. The two are not the same thing here: the MLP is piecewise linear (ReLU) and the shift
  2λ∇L = 0.875·∇L crosses activation boundaries (on the full training split, late in training, the
  finite-difference estimate of H·∇L had 13× the norm of the exact one and matched it only for
  λ ≤ 0.01), so the finite-difference arm is closer to an un-normalised SAM step than to the penalty.
* One flooding arm: plain GD at h_L = 2 on ``danlu.flood(L, b)``, the same step size as its control
  "GD h=2" (Su's two-step analysis holds for any ε; the largest stable step gives the strongest
  ε²/2 term). Rule for b (Su: b only decides *when* the alternation starts; Ishida et al. tune it on
  validation data, which would leak into the val comparison): b = the plain h_L arm's full-batch
  training loss at flow time T/8 (step round(``steps``/8)), averaged over seeds and rounded to two
  significant digits, so that every seed's flood arm is plain GD until its loss first drops below b
  (near T/8) and hovers at b for the remaining ~7/8 of the flow. T/8 lies near where the pilot's val
  loss stopped falling. A single b for all seeds (not each seed's own loss, which the seed's run would
  then hit exactly, where |L − b| has gradient 0 and training would stop).

The same seed gives the same initialisation in every arm. Recorded: at 16 equally spaced flow times,
full-batch ‖∇L‖², train loss and val loss; at T, ‖∇L‖² (sum of squares over all parameters), train
loss and accuracy, val loss and accuracy and the val predictions (for the count of val rows an arm
predicts differently from its control); for the plain h_L arm, (train loss, ‖∇L‖²) at every step,
the path (c) is read from; for the flood arm, the step where L first fell below b and the fraction of
ascent steps after it (≈ ½ when descent and ascent alternate, the case Su analyses).

Cost at the defaults (10 seeds, 200 steps): 10 × (3000 plain + 2 × 1600 penalised + 200 flooded)
steps on 200 rows, a penalised step costing about 2–2.5 plain ones: 35 s with one intra-op thread on
a lightly shared 2-core machine, where the previous protocol (5 seeds on all 1437 rows) took 82 s. With
2 intra-op threads on a shared machine this small model runs several times *slower* (thread
contention), so run it with 1.

**Verdict rule** (written before the first run of this protocol). Arms of one seed share the
initialisation, so every comparison is *paired*: per seed, a difference to the control, tested against
0 with :func:`significant` (a zero-spread reference, i.e. 2 standard errors of the mean per-seed
difference). Each part scores +1 (holds), 0 (undecided) or −1 (fails):

* (a) holds when the mean final ‖∇L‖² falls strictly with h across the grid and log(R(h_L)/R(h_s)) is
  significantly negative (R = ‖∇L‖²); fails when it is significantly positive.
* (b) holds when log(R(exact EGR)/R(h_s)) is significantly negative; fails when significantly positive.
* (c) holds when log(R(flood, T) / R(GD h_L at the flood arm's final train loss)) is significantly
  negative; fails when significantly positive. The second R is read off the plain h_L arm's per-step
  path, log-linearly interpolated in (log L, log R) between the two steps around the first step whose
  loss is ≤ the flood arm's final loss (undefined, and the seed left out, when the path never reaches
  that loss). The comparison is at *equal training loss*, because flooding keeps L at b while plain GD
  goes on to a far smaller L (and so a far smaller ‖∇L‖²): comparing them at T would test nothing.
* (G) generalisation, from three regulariser-vs-control pairs: implicit (GD h_L vs GD h_s), explicit
  (exact EGR at h_s vs GD h_s) and flooding (flood h_L vs GD h_L). A pair *improves* generalisation
  when its paired val accuracy difference is significantly positive and its paired val loss difference
  is not significantly positive (a gain that comes with a significantly worse val cross-entropy does
  not count); it *worsens* it when the val accuracy difference is significantly negative; otherwise
  "no difference". Val accuracy decides because it is what the papers report; val loss only vetoes,
  because flooding keeps the logits small and so lowers val cross-entropy almost by construction. G
  holds when at least one pair improves and none worsens, fails when at least one worsens and none
  improves, and is 0 otherwise (all "no difference", or conflicting). G is 0 as well ("not testable")
  unless the run is in the overfitting regime: the GD h_s arm's val loss at T must exceed its minimum
  over the 17 recorded flow times by a significant margin (per seed, val loss at T − minimum ≥ 0,
  tested against 0 as above).

Then: (a), (b), (c) and G all hold → *supported*; at least one but not all hold → *mixed*; none holds
and at least one fails → *not supported*; otherwise → *inconclusive* (always with one seed). The
finite-difference EGR arm is measured with the same paired tests and reported, but does not decide.
With three pairs, at least one crossing 2 standard errors by chance is likelier than for one; a G
that holds through a single pair is marked as such in the reason.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch

from ...wrappers.gradient_penalty import GradientPenalty, flood, igr_strength
from ..tasks import get_task
from ._common import Context, Experiment, Outcome, figure, fmt_spread, mean_std, save_figure, significant

TASK = "digits"
TRAIN_ROWS = 200                      # the first rows of the frozen training split: the overfitting regime
H_LARGE = 2.0
LRS = (0.25, 0.5, 1.0, 2.0)          # h_L / 2^k: every arm's step count is steps · 2^k exactly
H_SMALL = LRS[0]
CHECKPOINTS = 16                      # ‖∇L‖², train and val loss recorded at T·j/16, j = 0..16
FLOOD_AT = 8                          # b = plain h_L train loss at flow time T / FLOOD_AT
EGR = "EGR exact"               # GradientPenalty(method="double_backward"): decides part (b)
EGR_FD = "EGR finite-diff"      # GradientPenalty default (finite difference): reported alongside
FLOOD = "flood h=2"             # danlu.flood on plain GD at h_L: decides part (c)
METHODS = {EGR: "double_backward", EGR_FD: "finite_difference"}


def _egr_strength() -> float:
    return igr_strength(H_LARGE) - igr_strength(H_SMALL)


def _arm_steps(steps: int, lr: float) -> int:
    return round(steps * H_LARGE / lr)


def _flood_step(steps: int) -> int:
    """The plain h_L step whose training loss sets the flood level (flow time T / FLOOD_AT)."""
    return round(steps / FLOOD_AT)


def _units(seeds: int, steps: int) -> int:
    """Cost in plain-step units: one per plain or flooded step, two per penalised step (either method
    costs about two plain steps)."""
    plain = sum(_arm_steps(steps, h) for h in LRS) + _arm_steps(steps, H_LARGE)
    return seeds * (plain + 2 * len(METHODS) * _arm_steps(steps, H_SMALL))


def _grad_sq(grads: Any) -> float:
    return math.fsum(g.double().square().sum().item() for g in grads if g is not None)


def _full_grad_sq(problem: Any, idx: torch.Tensor) -> tuple[float, float]:
    """(full-batch train loss, ‖∇L‖² over all parameters)."""
    with torch.enable_grad():
        loss = problem.batch_loss(idx)
        grads = torch.autograd.grad(loss, problem.params)
    return loss.item(), _grad_sq(grads)


def _evaluate(problem: Any) -> tuple[dict[str, float], torch.Tensor]:
    """``problem.evaluate()`` and the val predictions (argmax of the logits of its forward pass)."""
    seen: list[torch.Tensor] = []
    hook = problem.model.register_forward_hook(lambda _m, _i, out: seen.append(out.argmax(1)))
    try:
        metrics = problem.evaluate()
    finally:
        hook.remove()
    return metrics, seen[-1]


def _train(seed: int, lr: float, steps: int, strength: float = 0.0, method: str = "finite_difference",
           flood_level: float | None = None, record_path: bool = False) -> dict[str, Any]:
    """One full-batch GD run of ``steps`` steps at ``lr`` on the TRAIN_ROWS subset: with a gradient
    penalty if strength > 0, on ``flood(L, flood_level)`` if a level is given; ``record_path`` keeps
    (train loss, ‖∇L‖²) at every step (from the step's own gradient)."""
    problem = get_task(TASK).build(seed)
    batch_loss = problem.batch_loss
    assert batch_loss is not None and problem.model is not None and problem.train_data is not None
    if TRAIN_ROWS > int(problem.info["train_size"]):
        raise ValueError(f"{TASK} has only {problem.info['train_size']} training rows, fewer than {TRAIN_ROWS}")
    idx = torch.arange(TRAIN_ROWS)
    sgd = torch.optim.SGD(problem.params, lr=lr, momentum=0.0)
    opt: torch.optim.Optimizer = GradientPenalty(sgd, strength=strength, method=method) if strength > 0 else sgd
    marks = sorted({round(steps * j / CHECKPOINTS) for j in range(CHECKPOINTS + 1)})
    curve_t: list[float] = []
    curve_r: list[float] = []
    curve_train: list[float] = []
    curve_val: list[float] = []
    path_l: list[float] = []
    path_r: list[float] = []
    first_below: int | None = None
    ascents = 0
    diverged = False

    def closure() -> torch.Tensor:
        return batch_loss(idx)

    loss: torch.Tensor
    for step in range(steps + 1):
        if step in marks:
            lt, r = _full_grad_sq(problem, idx)
            curve_t.append(step * lr)
            curve_r.append(r)
            curve_train.append(lt)
            curve_val.append(problem.evaluate()["val_loss"])
        if step == steps:
            break
        if strength > 0:
            loss = cast(GradientPenalty, opt).step(closure)
        else:
            sgd.zero_grad()
            loss = closure()
            if flood_level is not None:
                below = loss.item() < flood_level
                if below and first_below is None:
                    first_below = step
                ascents += int(below)
                flood(loss, flood_level).backward()
            else:
                loss.backward()
            if record_path:
                path_l.append(loss.item())
                path_r.append(_grad_sq(p.grad for p in problem.params))
            opt.step()
        if not math.isfinite(float(loss.detach())):
            diverged = True
            break
    nan = float("nan")
    run: dict[str, Any] = {"init_grad_sq": curve_r[0], "curve_t": curve_t, "curve_r": curve_r,
                           "curve_train": curve_train, "curve_val": curve_val, "diverged": diverged,
                           "first_below": first_below,
                           "ascent_fraction": (ascents / (steps - first_below) if first_below is not None
                                               and not diverged else nan)}
    if diverged:
        return {**run, "grad_sq": nan, "train_loss": nan, "train_acc": nan, "val_loss": nan, "val_acc": nan,
                "val_pred": None, "path_l": [], "path_r": []}
    train_loss, grad_sq = _full_grad_sq(problem, idx)
    if record_path:
        path_l.append(train_loss)
        path_r.append(grad_sq)
    xt, yt = problem.train_data
    with torch.no_grad():
        train_acc = (problem.model(xt[idx]).argmax(1) == yt[idx]).double().mean().item()
    metrics, pred = _evaluate(problem)
    return {**run, "grad_sq": grad_sq, "train_loss": train_loss, "train_acc": train_acc,
            "val_loss": metrics["val_loss"], "val_acc": metrics["val_acc"], "val_pred": pred,
            "path_l": path_l, "path_r": path_r}


def grad_sq_at_loss(path_l: list[float], path_r: list[float], target: float) -> float:
    """‖∇L‖² on a training path at the training loss ``target``: find the first step k whose loss is
    ≤ target and interpolate linearly in (log L, log ‖∇L‖²) between steps k−1 and k; nan when the path
    never gets that low, starts below it, or holds a non-positive value there."""
    if not math.isfinite(target) or target <= 0:
        return float("nan")
    for k, lk in enumerate(path_l):
        if lk <= target:
            if k == 0:
                return path_r[0] if lk == target else float("nan")
            l0, r0, r1 = path_l[k - 1], path_r[k - 1], path_r[k]
            if min(l0, lk, r0, r1) <= 0:
                return float("nan")
            if l0 == lk:
                return r1
            w = (math.log(target) - math.log(l0)) / (math.log(lk) - math.log(l0))
            return math.exp(math.log(r0) + w * (math.log(r1) - math.log(r0)))
    return float("nan")


def _log_ratio(a: list[float], b: list[float]) -> list[float]:
    return [math.log(x / y) if x > 0 and y > 0 and math.isfinite(x) and math.isfinite(y) else float("nan")
            for x, y in zip(a, b)]


def _sign_of_mean(values: list[float]) -> int:
    """+1/−1 when the mean of the finite per-seed values is beyond 2 standard errors of 0, else 0."""
    ok = [v for v in values if math.isfinite(v)]
    return significant(ok, [0.0] * len(ok)) if ok else 0


def _diff(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b)]


def _fmt(values: list[float]) -> str:
    return fmt_spread(values, digits=4)


def _arm_name(lr: float) -> str:
    return f"GD h={lr:g}"


def _generalisation(acc_sign: int, loss_sign: int) -> int:
    """+1 improves (val acc significantly up, val loss not significantly up), −1 worsens (val acc
    significantly down), 0 otherwise."""
    if acc_sign > 0 and loss_sign <= 0:
        return 1
    return -1 if acc_sign < 0 else 0


def _combine(parts: list[int]) -> int:
    """+1 if some part is +1 and none −1; −1 if some is −1 and none +1; 0 otherwise."""
    if 1 in parts and -1 not in parts:
        return 1
    if -1 in parts and 1 not in parts:
        return -1
    return 0


def _verdict(parts: list[int]) -> str:
    if all(p == 1 for p in parts):
        return "supported"
    if any(p == 1 for p in parts):
        return "mixed"
    if any(p == -1 for p in parts):
        return "not supported"
    return "inconclusive"


def _run(ctx: Context) -> Outcome:
    seeds = list(range(ctx.seeds))
    lam = _egr_strength()
    small, large = _arm_name(H_SMALL), _arm_name(H_LARGE)
    # name: (lr, λ, method, flood level)
    arms: dict[str, tuple[float, float, str, float | None]] = {_arm_name(h): (h, 0.0, "", None) for h in LRS}
    arms[EGR] = (H_SMALL, lam, METHODS[EGR], None)
    arms[EGR_FD] = (H_SMALL, lam, METHODS[EGR_FD], None)
    runs: dict[str, list[dict[str, Any]]] = {}
    for name, (lr, strength, method, _) in arms.items():
        n = _arm_steps(ctx.steps, lr)
        runs[name] = []
        for s in seeds:
            runs[name].append(_train(s, lr, n, strength, method or "finite_difference", record_path=name == large))
            ctx.advance(n * (2 if strength > 0 else 1), f"{name} seed {s}")

    # The flood level from the plain h_L arm (training loss only), then the flood arm.
    k_b = _flood_step(ctx.steps)
    at_kb = [r["path_l"][k_b] for r in runs[large] if len(r["path_l"]) > k_b and math.isfinite(r["path_l"][k_b])]
    level = float(f"{mean_std(at_kb)[0]:.2g}") if at_kb else float("nan")
    arms[FLOOD] = (H_LARGE, 0.0, "", level)
    runs[FLOOD] = []
    n_flood = _arm_steps(ctx.steps, H_LARGE)
    for s in seeds:
        if math.isfinite(level):
            runs[FLOOD].append(_train(s, H_LARGE, n_flood, flood_level=level))
        else:  # every plain h_L seed diverged before T/8: nothing to flood at
            nan = float("nan")
            runs[FLOOD].append({**{k: nan for k in ("grad_sq", "train_loss", "train_acc", "val_loss",
                                                     "val_acc", "init_grad_sq", "ascent_fraction")},
                                "curve_t": [], "curve_r": [], "curve_train": [], "curve_val": [],
                                "diverged": True, "first_below": None, "val_pred": None})
        ctx.advance(n_flood, f"{FLOOD} seed {s}")

    def col(name: str, key: str) -> list[float]:
        return [r[key] for r in runs[name]]

    r_small = col(small, "grad_sq")
    flow_time = ctx.steps * H_LARGE
    word = {1: "holds", 0: "undecided", -1: "fails"}
    sign_word = {1: "significantly higher", 0: "not significantly different", -1: "significantly lower"}

    # --- part (a): ‖∇L‖² decreases with h -----------------------------------------------------------
    means = [mean_std(col(_arm_name(h), "grad_sq"))[0] for h in LRS]
    monotone = all(math.isfinite(m) for m in means) and all(b < a for a, b in zip(means, means[1:]))
    lr_large = _log_ratio(col(large, "grad_sq"), r_small)
    sig_a = _sign_of_mean(lr_large)
    part_a = 1 if (monotone and sig_a < 0) else (-1 if sig_a > 0 else 0)

    # --- part (b): the explicit penalty moves small-h ‖∇L‖² toward the large-h value ------------------
    lr_egr = _log_ratio(col(EGR, "grad_sq"), r_small)
    sig_b = _sign_of_mean(lr_egr)
    part_b = 1 if sig_b < 0 else (-1 if sig_b > 0 else 0)
    lr_fd = _log_ratio(col(EGR_FD, "grad_sq"), r_small)
    sig_fd = _sign_of_mean(lr_fd)
    m_large, m_egr, m_fd = mean_std(lr_large)[0], mean_std(lr_egr)[0], mean_std(lr_fd)[0]
    usable = math.isfinite(m_large) and m_large != 0
    gap_closed = m_egr / m_large if usable else float("nan")
    gap_closed_fd = m_fd / m_large if usable else float("nan")

    # --- part (c): flooding lowers ‖∇L‖² at equal training loss ---------------------------------------
    r_plain_at = [grad_sq_at_loss(p["path_l"], p["path_r"], f["train_loss"]) if not p["diverged"] else float("nan")
                  for p, f in zip(runs[large], runs[FLOOD])]
    lr_flood = _log_ratio(col(FLOOD, "grad_sq"), r_plain_at)
    sig_c = _sign_of_mean(lr_flood)
    part_c = 1 if sig_c < 0 else (-1 if sig_c > 0 else 0)
    m_flood = mean_std(lr_flood)[0]
    hover = [f["train_loss"] / level - 1.0 if math.isfinite(level) else float("nan") for f in runs[FLOOD]]
    first_below = [f["first_below"] for f in runs[FLOOD]]
    ascent = col(FLOOD, "ascent_fraction")

    # --- part (G): generalisation ----------------------------------------------------------------------
    rise = [r["val_loss"] - min(r["curve_val"]) if r["curve_val"] and math.isfinite(r["val_loss"]) else float("nan")
            for r in runs[small]]
    overfit = _sign_of_mean(rise) > 0
    best_t = [r["curve_t"][r["curve_val"].index(min(r["curve_val"]))] if r["curve_val"] else float("nan")
              for r in runs[small]]
    pairs = {"implicit": (large, small), "explicit": (EGR, small), "flooding": (FLOOD, large),
             "explicit (finite-diff, reported only)": (EGR_FD, small)}
    gen: dict[str, dict[str, Any]] = {}
    for label, (arm, ref) in pairs.items():
        d_acc = _diff(col(arm, "val_acc"), col(ref, "val_acc"))
        d_loss = _diff(col(arm, "val_loss"), col(ref, "val_loss"))
        disagree = [int((a["val_pred"] != b["val_pred"]).sum().item())
                    if a["val_pred"] is not None and b["val_pred"] is not None else -1
                    for a, b in zip(runs[arm], runs[ref])]
        s_acc, s_loss = _sign_of_mean(d_acc), _sign_of_mean(d_loss)
        gen[label] = {"arm": arm, "reference": ref, "d_val_acc": d_acc, "d_val_loss": d_loss,
                      "sign_acc": s_acc, "sign_loss": s_loss, "score": _generalisation(s_acc, s_loss),
                      "val_rows_changed": disagree}
    deciding = ("implicit", "explicit", "flooding")
    g_scores = [gen[k]["score"] for k in deciding]
    part_g = _combine(g_scores) if overfit else 0

    # --- verdict ----------------------------------------------------------------------------------------
    verdict = _verdict([part_a, part_b, part_c, part_g])
    gen_word = {1: "improves", 0: "no difference", -1: "worsens"}

    def gtxt(label: str) -> str:
        g = gen[label]
        ch = [c for c in g["val_rows_changed"] if c >= 0]
        return (f"{label} ({g['arm']} vs {g['reference']}): Δ val acc {mean_std(g['d_val_acc'])[0]:+.3g} "
                f"({sign_word[g['sign_acc']]}), Δ val loss {mean_std(g['d_val_loss'])[0]:+.3g} "
                f"({sign_word[g['sign_loss']]}), {mean_std(ch)[0]:.1f} of 360 val predictions changed → "
                f"{gen_word[g['score']]}")

    single = (part_g == 1 and sum(1 for s in g_scores if s == 1) == 1)
    reason = (
        f"Part (a) {word[part_a]}: mean final ‖∇L‖² is {'' if monotone else 'not '}strictly decreasing in h "
        f"over {', '.join(f'{h:g}' for h in LRS)}, and per seed ‖∇L‖²(h={H_LARGE:g}) is "
        f"{sign_word[sig_a]} than at h={H_SMALL:g} (paired log ratio {m_large:+.3g}). Part (b) "
        f"{word[part_b]}: the exact penalty (double backward) at h={H_SMALL:g}, λ={lam:g}, leaves ‖∇L‖² "
        f"{sign_word[sig_b]} than plain h={H_SMALL:g} (paired log ratio {m_egr:+.3g}, {gap_closed:.0%} of "
        f"the log gap to h={H_LARGE:g}). Part (c) {word[part_c]}: flooding at b={level:.2g} (h={H_LARGE:g}) "
        f"ends with ‖∇L‖² {sign_word[sig_c]} than plain h={H_LARGE:g} had at the same train loss (paired "
        f"log ratio {m_flood:+.3g}; the loss ends {mean_std(hover)[0]:+.1%} from b, ascent on "
        f"{mean_std(ascent)[0]:.0%} of the steps after the first crossing). Part (G) "
        f"{word[part_g] if overfit else 'not testable (no significant val-loss rise of GD h=0.25: not overfitting)'}"
        f"{' (through a single pair)' if single else ''}: "
        f"{'; '.join(gtxt(k) for k in deciding)}. Rule: each part +1/0/−1 from paired 2-standard-error tests "
        f"(module docstring); all four hold → supported, some → mixed, none but a failure → not supported, "
        f"else inconclusive. Not part of the rule: danlu's default finite-difference penalty leaves ‖∇L‖² "
        f"{sign_word[sig_fd]} ({m_fd:+.3g}, {gap_closed_fd:.0%} of the gap); "
        f"{gtxt('explicit (finite-diff, reported only)')}."
    ).replace("nan%", "n/a").replace("+nan", "n/a")

    # --- tables -------------------------------------------------------------------------------------------
    headers = ["arm", "h", "λ / flood b", "steps", "final ‖∇L‖²", "log(‖∇L‖²/‖∇L‖²(h=0.25)) per seed",
               "train loss", "train acc", "val loss", "val acc"]
    rows = []
    for name, (lr, strength, _, lvl) in arms.items():
        rows.append([name, f"{lr:g}", f"b={lvl:.2g}" if lvl is not None else f"{strength:g}",
                     str(_arm_steps(ctx.steps, lr)), _fmt(col(name, "grad_sq")),
                     _fmt(_log_ratio(col(name, "grad_sq"), r_small)), _fmt(col(name, "train_loss")),
                     _fmt(col(name, "train_acc")), _fmt(col(name, "val_loss")), _fmt(col(name, "val_acc"))])
    mech_headers = ["part", "paired per-seed quantity", "value", "test", "part"]
    mech_rows = [
        ["(a)", f"log ‖∇L‖²(h={H_LARGE:g}) / ‖∇L‖²(h={H_SMALL:g}); mean monotone in h: {monotone}",
         _fmt(lr_large), sign_word[sig_a], word[part_a]],
        ["(b)", f"log ‖∇L‖²(EGR exact) / ‖∇L‖²(h={H_SMALL:g})", _fmt(lr_egr), sign_word[sig_b], word[part_b]],
        ["(c)", f"log ‖∇L‖²(flood, T) / ‖∇L‖²(GD h={H_LARGE:g} at the same train loss)", _fmt(lr_flood),
         sign_word[sig_c], word[part_c]],
        ["(G) regime", (f"val loss at T − its minimum over t, GD h={H_SMALL:g} (minimum at t = "
                        f"{_fmt(best_t)})"), _fmt(rise), "overfitting" if overfit else "not overfitting", ""],
    ]
    gen_headers = ["pair", "arm vs control", "Δ val acc (paired)", "test", "Δ val loss (paired)", "test",
                   "val rows predicted differently (of 360)", "generalisation"]
    gen_rows = [[label, f"{g['arm']} vs {g['reference']}", _fmt(g["d_val_acc"]), sign_word[g["sign_acc"]],
                 _fmt(g["d_val_loss"]), sign_word[g["sign_loss"]],
                 _fmt([float(c) for c in g["val_rows_changed"] if c >= 0]), gen_word[g["score"]]]
                for label, g in gen.items()]
    gen_rows.append(["(G)", "", "", "", "", "", "",
                     (word[part_g] if overfit else "not testable") + (" (single pair)" if single else "")])

    # --- plots -------------------------------------------------------------------------------------------
    plots = [
        _plot_final(ctx, runs, arms, "grad_sq", f"full-batch ‖∇L‖² at flow time T = {flow_time:g} (log)",
                    f"Final ‖∇L‖² vs step size, equal flow time (digits, {TRAIN_ROWS} rows)",
                    "implicit-regularization-gradnorm.png", log_y=True, with_flood=False),
        _plot_curves(ctx, runs),
        _plot_final(ctx, runs, arms, "val_acc", "val accuracy",
                    f"Val accuracy at flow time T = {flow_time:g} (digits, {TRAIN_ROWS} rows)",
                    "implicit-regularization-valacc.png", log_y=False, with_flood=True),
        _plot_losses(ctx, runs, level),
    ]

    protocol = (
        f"Task `{TASK}` (MLP 64–128–10), full-batch gradient descent (`torch.optim.SGD`, no momentum, no "
        f"weight decay) on the first {TRAIN_ROWS} rows of the frozen training split (an overfitting regime: "
        f"training loss → ~1e-3 and training accuracy 1 while the val loss rises again), validation on the "
        f"360 held-out rows. Step sizes h ∈ {{{', '.join(f'{h:g}' for h in LRS)}}} (h_L = {H_LARGE:g} ≈ ½ "
        f"of the stability edge, which lies near 3.5–4 on this subset; halvings down to h_s = {H_SMALL:g}), "
        f"each run to the same flow time T = {H_LARGE:g}·{ctx.steps} = {flow_time:g} (h = {H_LARGE:g}: "
        f"{ctx.steps} steps, h = {H_SMALL:g}: {_arm_steps(ctx.steps, H_SMALL)} steps), so every arm "
        f"approximates the same gradient flow and only the implicit (h/4)‖∇L‖² term and the regulariser "
        f"differ. Two EGR arms: h_s = {H_SMALL:g} wrapped in `danlu.GradientPenalty` with "
        f"λ = (h_L − h_s)/4 = {lam:g}, so that explicit plus implicit penalty equals h_L/4; *exact* "
        f"(`method=\"double_backward\"`, the gradient of L + λ‖∇L‖², decides) and *finite-diff* (danlu's "
        f"default, the gradient at θ + 2λ∇L, closer to an un-normalised SAM step on this ReLU net; "
        f"reported only). One flooding arm: GD h = {H_LARGE:g} on `danlu.flood(L, b)` with "
        f"b = {level:.2g}, the plain h = {H_LARGE:g} arm's training loss at flow time T/{FLOOD_AT} (step "
        f"{k_b}) averaged over seeds, two significant digits; it is plain GD until its loss first drops "
        f"below b (step {_fmt([float(k) for k in first_below if k is not None])}), then hovers there. "
        f"{ctx.seeds} seed(s) per arm; a seed fixes the initialisation, shared by all arms, so every "
        f"comparison is paired per seed. Measured at T: full-batch ‖∇L‖², train loss and accuracy, val "
        f"loss and accuracy, val predictions; ‖∇L‖², train and val loss also at {CHECKPOINTS + 1} flow "
        f"times; the plain h = {H_LARGE:g} arm's (train loss, ‖∇L‖²) at every step, for part (c)."
    )
    expected = (
        "Gradient descent with step h follows the flow of L + (h/4)·‖∇L‖² (Su, kexue.fm/archives/7787; "
        "Barrett & Dherin, arXiv:2009.11162), so at equal flow time the final ‖∇L‖² should decrease with h, "
        "and an explicit penalty with λ = h_L/4 at a small h should move ‖∇L‖² toward the large-h value "
        "(spec dynamics.md §3.3). Flooding |L − b| + b (Ishida et al., arXiv:2002.08709) alternates "
        "descent and ascent at the level b, which amounts to gradient descent on ‖∇L‖² with lr ε²/2 "
        "(Su, kexue.fm/archives/7643). In both essays the gradient-norm penalty moves the model to flatter "
        "regions and so should improve generalisation (here: val accuracy in an overfitting regime)."
    )
    measured = (
        f"Final ‖∇L‖² at T = {flow_time:g}: "
        + "; ".join(f"h={h:g}: {_fmt(col(_arm_name(h), 'grad_sq'))}" for h in LRS)
        + f"; h={H_SMALL:g} + exact EGR (λ={lam:g}): {_fmt(col(EGR, 'grad_sq'))}; h={H_SMALL:g} + "
        f"finite-difference EGR: {_fmt(col(EGR_FD, 'grad_sq'))}; flood (b={level:.2g}): "
        f"{_fmt(col(FLOOD, 'grad_sq'))} at train loss {_fmt(col(FLOOD, 'train_loss'))}, where plain "
        f"h={H_LARGE:g} had {_fmt(r_plain_at)}. Paired log ratios: h={H_LARGE:g} vs h={H_SMALL:g} "
        f"{_fmt(lr_large)}, exact EGR vs h={H_SMALL:g} {_fmt(lr_egr)}, finite-diff EGR {_fmt(lr_fd)}, flood vs "
        f"plain h={H_LARGE:g} at equal loss {_fmt(lr_flood)}. Val acc: "
        + ", ".join(f"{name} {_fmt(col(name, 'val_acc'))}" for name in (small, large, EGR, EGR_FD, FLOOD))
        + ". Val loss: " + ", ".join(f"{name} {_fmt(col(name, 'val_loss'))}"
                                      for name in (small, large, EGR, EGR_FD, FLOOD))
        + f". Overfitting check (GD h={H_SMALL:g}): val loss at T exceeds its minimum over t by {_fmt(rise)}."
    )
    data = {
        "task": TASK, "train_size": TRAIN_ROWS, "flow_time": flow_time, "lrs": list(LRS), "egr_strength": lam,
        "flood_level": level, "flood_step": k_b,
        "arms": {name: {"lr": lr, "strength": strength, "flood_level": lvl, "steps": _arm_steps(ctx.steps, lr),
                        **{k: col(name, k) for k in ("grad_sq", "train_loss", "train_acc", "val_loss", "val_acc",
                                                      "init_grad_sq", "diverged", "first_below")},
                        "curve_t": runs[name][0]["curve_t"] if runs[name] else [],
                        **{k: [r[k] for r in runs[name]] for k in ("curve_r", "curve_train", "curve_val")}}
                 for name, (lr, strength, _, lvl) in arms.items()},
        "plain_large_path": {"train_loss": [r["path_l"] for r in runs[large]],
                             "grad_sq": [r["path_r"] for r in runs[large]]},
        "log_ratio_large_vs_small": lr_large, "log_ratio_egr_vs_small": lr_egr,
        "log_ratio_egr_fd_vs_small": lr_fd, "gap_closed_log_fd": gap_closed_fd,
        "log_ratio_flood_vs_plain_at_equal_loss": lr_flood, "plain_large_grad_sq_at_flood_loss": r_plain_at,
        "flood_hover_rel": hover, "flood_ascent_fraction": ascent,
        "monotone_in_mean": monotone, "part_a": part_a, "part_b": part_b, "part_c": part_c, "part_g": part_g,
        "gap_closed_log": gap_closed, "overfit": overfit, "val_loss_rise_small": rise,
        "generalisation": gen,
    }
    return Outcome(protocol=protocol, tables=[(headers, rows), (mech_headers, mech_rows), (gen_headers, gen_rows)],
                   plots=plots, expected=expected, measured=measured, verdict=verdict, reason=reason, data=data)


# ------------------------------------------------------------------------------------------ plots


def _errorbar(ax: Any, xs: list[float], groups: list[list[float]], **kw: Any) -> None:
    stats = [mean_std(g) for g in groups]
    ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3, **kw)


_EGR_STYLE = {EGR: {"marker": "*", "markersize": 13, "color": "C4"},
              EGR_FD: {"marker": "P", "markersize": 9, "color": "C5"}}
_FLOOD_STYLE = {"marker": "D", "markersize": 8, "color": "C3"}


def _plot_final(ctx: Context, runs: dict[str, list[dict[str, Any]]], arms: dict[str, Any], key: str,
                ylabel: str, title: str, name: str, log_y: bool, with_flood: bool) -> str:
    plt, fig, ax = figure()
    _errorbar(ax, list(LRS), [[r[key] for r in runs[_arm_name(h)]] for h in LRS], marker="o", color="C0",
              label="plain GD (mean ± sd over seeds; tests are paired per seed)")
    for arm, style in _EGR_STYLE.items():
        _errorbar(ax, [H_SMALL], [[r[key] for r in runs[arm]]], linestyle="none",
                  label=f"GD h={H_SMALL:g} + {arm} λ={arms[arm][1]:g}", **style)
    if with_flood:
        _errorbar(ax, [H_LARGE], [[r[key] for r in runs[FLOOD]]], linestyle="none",
                  label=f"GD h={H_LARGE:g} + flooding b={arms[FLOOD][3]:.2g}", **_FLOOD_STYLE)
    ax.set_xscale("log")
    if log_y:
        from matplotlib.ticker import FormatStrFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
    ax.set_xlabel("step size h (log)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return save_figure(plt, fig, ax, ctx.out, name)


def _mean_curve(rs: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """Flow times and the mean over seeds of ``key`` (seeds that stopped early leave later points)."""
    if not rs:
        return [], []
    ts, ys = [], []
    for j, t in enumerate(rs[0]["curve_t"]):
        vals = [r[key][j] for r in rs if j < len(r[key]) and math.isfinite(r[key][j])]
        if vals:
            ts.append(t)
            ys.append(mean_std(vals)[0])
    return ts, ys


def _plot_curves(ctx: Context, runs: dict[str, list[dict[str, Any]]]) -> str:
    """Per seed log(‖∇L‖²(arm, t) / ‖∇L‖²(h_s, t)) at the shared flow times, mean over seeds: the arms'
    curves of ‖∇L‖² itself overlap on a log scale (they follow the same flow), their ratios do not. The
    flood arm is left out: it stops descending at b, so its ratio to a descending arm says nothing."""
    plt, fig, ax = figure()
    base = runs[_arm_name(H_SMALL)]
    base_t = base[0]["curve_t"] if base else []
    for i, name in enumerate(runs):
        rs = runs[name]
        if not rs or name == FLOOD:
            continue
        ts, ys = [], []
        for j, t in enumerate(rs[0]["curve_t"]):
            if t not in base_t:
                continue
            k = base_t.index(t)
            ratios = [math.log(r["curve_r"][j] / b["curve_r"][k]) for r, b in zip(rs, base)
                      if j < len(r["curve_r"]) and k < len(b["curve_r"]) and r["curve_r"][j] > 0
                      and b["curve_r"][k] > 0 and math.isfinite(r["curve_r"][j])]
            if ratios:
                ts.append(t)
                ys.append(mean_std(ratios)[0])
        style = ({"linestyle": "--", **{k: v for k, v in _EGR_STYLE[name].items() if k == "color"}}
                 if name in _EGR_STYLE else {"color": f"C{i}"})
        ax.plot(ts, ys, marker=".", label=name if name not in _EGR_STYLE else f"{name} (h={H_SMALL:g})", **style)
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set_xlabel("flow time t = h · step")
    ax.set_ylabel(f"log(‖∇L‖² / ‖∇L‖² of GD h={H_SMALL:g}), mean over seeds")
    ax.set_title("Gradient norm relative to the smallest step, at equal flow time")
    return save_figure(plt, fig, ax, ctx.out, "implicit-regularization-trajectory.png")


def _plot_losses(ctx: Context, runs: dict[str, list[dict[str, Any]]], level: float) -> str:
    """Train loss (dashed, left axis, log) and val loss (solid, right axis, linear) against flow time,
    mean over seeds, from the first checkpoint after t = 0: the overfitting regime (val loss rising
    again while train loss falls) and the flood arm hovering at b."""
    plt, fig, ax = figure()
    ax2 = ax.twinx()
    shown = {_arm_name(H_SMALL): "C0", _arm_name(H_LARGE): "C3", EGR: "C4", FLOOD: "C2"}
    for name, color in shown.items():
        ts, ys = _mean_curve(runs[name], "curve_train")
        ax.plot(ts[1:], ys[1:], linestyle="--", color=color, label=name)
        ts, ys = _mean_curve(runs[name], "curve_val")
        ax2.plot(ts[1:], ys[1:], linestyle="-", marker=".", color=color)
    if math.isfinite(level):
        ax.axhline(level, color="grey", linewidth=0.6, linestyle=":", label=f"flood level b = {level:.2g}")
    ax.set_yscale("log")
    ax.set_xlabel("flow time t = h · step")
    ax.set_ylabel("train cross-entropy (dashed, log), mean over seeds")
    ax2.set_ylabel("val cross-entropy (solid), mean over seeds")
    ax.set_title(f"Train and val loss, digits {TRAIN_ROWS} training rows")
    return save_figure(plt, fig, ax, ctx.out, "implicit-regularization-losses.png")


EXPERIMENT = Experiment(
    name="implicit-regularization",
    title="Gradient-norm regularisation (large step, explicit penalty, flooding): ‖∇L‖² and val accuracy",
    summary="Full-batch GD on 200 digits rows (overfitting) at 4 step sizes to equal flow time, a small step "
            "with GradientPenalty λ=(h_L−h_s)/4, and flooding at h_L: final ‖∇L‖² and paired val accuracy.",
    default_seeds=10,
    default_steps=200,
    units=_units,
    run=_run,
)
