"""Exponentiated gradient (EGU, normalized EG on the simplex, signed EG±): per-tensor kernel and optimizer."""

from __future__ import annotations

from typing import Any

import torch

from .._core.distributed import amax_over, sum_over
from .._core.numerics import acc_dtype, propagate_nonfinite_
from .._core.optimizer import DanluOptimizer, ParamsT
from .._core.validate import check_bool, check_lr, check_number, check_optional

__all__ = ["EGD", "egd_update"]


def egd_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    theta_minus: torch.Tensor | None,
    *,
    lr: float | torch.Tensor,
    clamp: float,
    simplex_dim: int | None = None,
    l1_budget: float | None = None,
) -> None:
    """One exponentiated-gradient step for one tensor, in place.

    Positive (``theta_minus is None``)::

        e = clamp(−η·g, ±c);  θ ← θ·exp(e)
        simplex:  e = −η·g − max_dim(−η·g), clamped to [−2c, 0];  θ ← θ·exp(e) / Σ_dim θ·exp(e)

    Signed EG± (``theta_minus`` = θ⁻, the implicit θ⁺ = θ + θ⁻)::

        x = clamp(η·g, ±c);  θ ← θ·exp(−x) − 2·θ⁻·sinh(x);  θ⁻ ← θ⁻·exp(x)
        [budget U:  r = U / Σ(θ⁺ + θ⁻) = U / Σ(θ + 2θ⁻);  θ ← r·θ;  θ⁻ ← r·θ⁻]

    16-bit tensors are computed in float32 and rounded once at the end. A NaN or ±inf gradient entry
    makes the exponent NaN (the clamp alone would turn ±inf into ±c), so it shows in θ.
    """
    dt = acc_dtype(param)
    theta = param if param.dtype == dt else param.to(dt)
    x = grad.to(dt).mul(lr)  # η·g, a fresh buffer reused for the exponent
    if theta_minus is None:
        e = x.neg_()
        if simplex_dim is None:
            e.clamp_(-clamp, clamp)
        else:
            # Normalisation cancels any per-slice shift exactly; shifting by the max keeps every factor
            # ≤ 1 (no overflow) and keeps the ranking when all exponents are large.
            e.sub_(amax_over(e, simplex_dim, keepdim=True)).clamp_(min=-2.0 * clamp)
        propagate_nonfinite_(e, grad)
        theta.mul_(e.exp_())
        if simplex_dim is not None:
            theta.div_(sum_over(theta, simplex_dim, keepdim=True))
    else:
        x.clamp_(-clamp, clamp)
        propagate_nonfinite_(x, grad)
        tm = theta_minus if theta_minus.dtype == dt else theta_minus.to(dt)
        # θ⁺e^{−x} − θ⁻e^{x} with θ⁺ = θ + θ⁻, written so that x = 0 leaves θ bitwise unchanged and no
        # e^{−x} − e^{x} cancellation occurs for small x.
        if torch.compiler.is_compiling():
            # The compiled pass (fused=True, or an outer torch.compile): inductor's sinh runs element by
            # element on CPU and its expm1 is exp − 1, so the step is computed from one exp: e = e^x,
            # 2sinh(x) = e − 1/e. For small x that difference carries an absolute error of about two
            # roundings, so θ gains an error of order ε·(|θ| + θ⁻): one more rounding of θ⁺ + θ⁻.
            e = torch.exp(x)
            e_neg = e.reciprocal()
            theta.mul_(e_neg).sub_(e.sub(e_neg).mul_(tm))
            tm.mul_(e)
        else:
            theta.mul_(torch.exp(-x)).sub_(torch.sinh(x).mul_(tm), alpha=2.0)
            tm.mul_(x.exp_())
        if l1_budget is not None:
            r = l1_budget / (sum_over(theta) + 2.0 * sum_over(tm))
            theta.mul_(r)
            tm.mul_(r)
        if tm is not theta_minus:
            theta_minus.copy_(tm)
    if theta is not param:
        param.copy_(theta)


class EGD(DanluOptimizer):
    r"""Exponentiated gradient descent: multiplicative updates for positive (or signed) parameters.

    **EGU** (default, every θ > 0), for each parameter with gradient g_t::

        θ_{t+1} = θ_t ⊙ exp(clamp(−η·g_t, ±c))       ⇔   log θ_{t+1} = log θ_t − η·g_t  (|η·g| ≤ c)

    Su's derivation: write θ = e^φ; gradient descent on φ has gradient θ⊙∇_θL; dropping the θ⊙ factor
    (a per-coordinate learning rate) gives the update above, i.e. mirror descent with the log link.
    Every entry keeps its sign, so positive parameters stay positive; an entry that is exactly 0
    (or underflows to 0 after many steps of large positive gradients) can never move again.

    **Normalized EG** (``simplex_dim=d``, Kivinen & Warmuth; not in Su's essay): after the
    multiplicative step each slice along ``d`` is divided by its sum, so it lies on the probability
    simplex::

        θ_i ← θ_i·e^{−η g_i} / Σ_j θ_j·e^{−η g_j}        (sums over dim d)

    The first step also normalises an initial θ that does not sum to 1.

    **EG±** (``signed=True``, parameters of either sign): θ = θ⁺ − θ⁻ with θ⁺, θ⁻ > 0 and::

        θ⁺ ← θ⁺ ⊙ e^{−η g},   θ⁻ ← θ⁻ ⊙ e^{+η g}       [optional: rescale so Σθ⁺ + Σθ⁻ = U]

    Only θ⁻ is stored; θ⁺ = θ + θ⁻ is implicit, and the update is applied as
    θ ← θ·e^{−x} − 2θ⁻·sinh(x), x = clamp(η g, ±c), which equals θ⁺e^{−x} − θ⁻e^{x} exactly in real
    arithmetic. At the first step with a gradient θ⁻ = max(−θ, 0) + δ, so θ⁺ = max(θ, 0) + δ and
    θ⁺ − θ⁻ is the parameter *exactly* (nothing is rounded: the parameter itself is the stored
    difference). Without a budget θ⁺⊙θ⁻ is invariant, so each coordinate moves along a hyperbola; for
    small steps Δθ ≈ −η·(θ⁺ + θ⁻)·g = −η·(|θ| + 2δ)·g: gradient descent with a per-coordinate lr that
    grows with |θ| and is 2ηδ at θ = 0. δ therefore sets the scale below which the update is additive.

    Args:
        params: parameters or param groups.
        lr: η ≥ 0 (default 1e-2). In EGU mode η·g is a relative change of θ, so η is scale-free in θ
            but not in g.
        simplex_dim: renormalise every slice along this dim onto the simplex (default None: EGU).
            Not with ``signed=True``.
        signed: EG± for parameters of either sign (default False: every entry must be > 0, checked
            when the group is added; ``ValueError`` otherwise).
        clamp: c, the largest |exponent| of one step (default 20: one step changes an entry by at most
            e^{±20} ≈ 5·10^{±8}, so no single step overflows; on the simplex the exponent after the
            shift lies in [−2c, 0]). float16 spans only about e^{±11} around 1: lower c for it.
        delta: δ > 0, the offset of EG±'s θ⁺ and θ⁻ at initialisation (default 0.1; signed mode only).
        l1_budget: U > 0, rescale after every step so that Σθ⁺ + Σθ⁻ = U per tensor (default None:
            unnormalised EG±). Signed mode only.
        fused: run the step as one ``torch.compile``-d single pass per bucket of tensors (same
            device, dtype and state dtypes; see ``danlu._core.fused``) instead of the per-tensor loop
            (default False). The first step compiles (seconds; cached in the optimizer); the lr enters
            as a 0-d tensor, so schedulers do not recompile. Same math as the loop, to rounding.

    Exactness and cost per step: EGU is one elementwise pass (a fresh exponent buffer, no state); the
    simplex adds a max and a sum along ``simplex_dim``; EG± keeps one state tensor θ⁻ (1× the
    parameter, in its dtype) and evaluates exp twice and sinh once; the budget adds two sums.
    ``log θ_{t+1} − log θ_t = −η g_t`` holds to the rounding of one exp and one multiply whenever
    |η g| ≤ c. No extra forward/backward passes. 16-bit parameters are updated in float32 and rounded
    once.

    References:
        Kivinen & Warmuth, "Exponentiated Gradient versus Gradient Descent for Linear Predictors",
        Information and Computation 132(1), 1997 (EGU, normalized EG, EG±); Su Jianlin,
        kexue.fm/archives/8968 (the log-parametrisation derivation); Amid, Anil, Fifty & Warmuth,
        "Step-size Adaptation Using Exponentiated Gradient Updates", arXiv:2202.00145 (2022).

    Deviations:
        The clamp on the exponent is ours (the papers have none); it only acts when |η g| > c. On the
        simplex the exponent is shifted by its max along the dim before clamping (exact: normalisation
        cancels the shift), so the clamp bounds *relative* factors to e^{−2c}. Kivinen & Warmuth start
        EG± from θ⁺ = θ⁻ = U/(2N); we start from any θ with the offset δ, and the budget U, if set, is
        enforced from the first step on. Positive mode keeps no state (``state[p]`` stays empty). EG±
        computes its θ⁻ from θ's *values* at the first step with a gradient, unlike other danlu
        optimizers whose initial state depends only on the shape.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        simplex_dim: int | None = None,
        signed: bool = False,
        clamp: float = 20.0,
        delta: float = 0.1,
        l1_budget: float | None = None,
        *,
        fused: bool = False,
    ) -> None:
        defaults = dict(lr=lr, simplex_dim=simplex_dim, signed=signed, clamp=clamp, delta=delta, l1_budget=l1_budget,
                        fused=fused)
        super().__init__(params, defaults)

    _step_scalars = ("lr",)

    def _validate_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        self._check_fused(group, params)
        group["lr"] = check_lr(group["lr"])
        check_number("clamp", group["clamp"], low=0.0, low_open=True)
        check_number("delta", group["delta"], low=0.0, low_open=True)
        check_optional("l1_budget", group["l1_budget"], low=0.0, low_open=True)
        signed = check_bool("signed", group["signed"])
        dim = group["simplex_dim"]
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
            raise TypeError(f"Invalid simplex_dim: {dim!r} (expected None or an int)")
        if signed and dim is not None:
            raise ValueError(f"Invalid simplex_dim: {dim!r} (expected None with signed=True; the simplex holds "
                             "positive parameters)")
        if not signed and group["l1_budget"] is not None:
            raise ValueError(
                f"Invalid l1_budget: {group['l1_budget']!r} (expected None with signed=False; "
                "use simplex_dim to normalise positive parameters)"
            )
        for i, p in enumerate(params):
            if dim is not None and not -max(p.dim(), 1) <= dim < max(p.dim(), 1):
                raise ValueError(f"Invalid simplex_dim: {dim!r} (dim {dim} does not exist in a parameter of shape "
                                 f"{tuple(p.shape)})")
            if not signed and p.numel() and not bool((p.detach() > 0).all()):
                raise ValueError(
                    f"Invalid params[{i}]: shape {tuple(p.shape)}, min {p.detach().min().item()!r} (expected every "
                    "entry > 0: EGD multiplies parameters, so a zero never moves and a negative entry moves the "
                    "wrong way; use signed=True (EG±) for parameters of either sign)"
                )

    def _reduces_across_rows(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        dim = group["simplex_dim"]
        return group["l1_budget"] is not None or (dim is not None and dim % max(p.dim(), 1) == 0)

    def _init_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        if group["signed"]:
            # θ⁻ = max(−θ, 0) + δ, so that the implicit θ⁺ = θ + θ⁻ = max(θ, 0) + δ.
            state["theta_minus"] = p.detach().neg().clamp_(min=0.0).add_(group["delta"])

    def _update(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        egd_update(
            p,
            grad,
            state.get("theta_minus") if group["signed"] else None,
            lr=group["lr"],
            clamp=group["clamp"],
            simplex_dim=group["simplex_dim"],
            l1_budget=group["l1_budget"],
        )
