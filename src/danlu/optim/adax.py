"""AdaX-W: Adam with a long-term-memory second moment, per-tensor kernel and optimizer class."""

from __future__ import annotations

import math
from typing import Any

import torch

from .._core.numerics import add_scaled_, decoupled_decay_
from .._core.optimizer import DanluOptimizer, ParamsT, init_moments
from .._core.validate import check_betas, check_lr, check_number

__all__ = ["AdaX", "adax_update", "adax_beta_hat"]


def adax_beta_hat(step: torch.Tensor, beta2: float) -> torch.Tensor:
    """β̂_t = 1 − β2 / ((1+β2)^t − 1), with (1+β2)^t − 1 = expm1(t·log1p(β2)) in float64.

    ``step`` is the update counter (0-d in the optimizer), cast to float64 here. β̂_1 = 0 up to float64
    rounding, β̂_t → 1.
    """
    log1p = torch.log1p(beta2.to(torch.float64)) if isinstance(beta2, torch.Tensor) else math.log1p(beta2)
    return 1.0 - beta2 / torch.expm1(step.to(torch.float64) * log1p)


def adax_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    beta_hat: torch.Tensor | None = None,
) -> None:
    """One AdaX-W step for one tensor, in place. ``step`` (the 0-d counter) is incremented here,
    unless this step's ``beta_hat`` is given (computed, and the counter incremented, by the caller).

    m ← β1·m + (1−β1)·g;  v̂ ← β̂_t·v̂ + (1−β̂_t)·g²;  θ ← θ·(1−η·λ) − η·m/(√v̂ + ε)
    """
    if beta_hat is None:
        step.add_(1)
        beta_hat = adax_beta_hat(step, beta2)
    add_scaled_(exp_avg.mul_(beta1), grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta_hat).add_(grad.square().mul_(1.0 - beta_hat))
    decoupled_decay_(param, lr, weight_decay)
    if isinstance(lr, torch.Tensor):
        add_scaled_(param, exp_avg / exp_avg_sq.sqrt().add_(eps), -lr)
    else:
        param.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-lr)


class AdaX(DanluOptimizer):
    r"""AdaX-W: Adam whose second moment remembers the whole past, with decoupled weight decay.

    AdaX replaces Adam's second moment by v_t = (1+β2)·v_{t−1} + β2·g_t², normalised by
    (1+β2)^t − 1. danlu stores the normalised v̂ directly, using the equivalent recursion (Su)::

        β̂_t = 1 − β2 / ((1+β2)^t − 1)              # β̂_1 = 0, β̂_t → 1
        m_t = β1·m_{t−1} + (1 − β1)·g_t             # no bias correction (all references agree)
        v̂_t = β̂_t·v̂_{t−1} + (1 − β̂_t)·g_t²
        θ_t = θ_{t−1}·(1 − η·λ) − η·m_t / (√v̂_t + ε)

    Unlike Adam (β̂_t → β2 < 1), β̂_t → 1, so old gradients never fade out of v̂. Because m is not
    bias-corrected, the first step is −η·(1−β1)·sign(g): an implicit warm-up over ≈1/(1−β1) steps.

    Numerics: the raw v and (1+β2)^t overflow float32 after ≈0.9M steps; the normalised recursion does
    not, and (1+β2)^t − 1 is computed as expm1(t·log1p(β2)) in float64 from the step counter (a 0-d
    float32 tensor, exact up to 2^24 ≈ 16.7M steps, as torch.optim's; by then β̂_t = 1 in float64), so
    AdaX is safe for many millions of steps.

    Args:
        params: parameters or param groups.
        lr: η (default 1e-3; the authors used 5e-3 with weight decay 5e-2 for AdaX-W on CIFAR-10).
        betas: (β1, β2) (default (0.9, 1e-4)).
        eps: ε, added outside the square root of the normalised v̂ (default 1e-6, Su's V2 value).
        weight_decay: λ, decoupled and multiplied by lr (default 0).
        fused: run the step as one ``torch.compile``-d single pass per bucket of tensors (same
            device, dtype and state dtypes; see ``danlu._core.fused``) instead of the per-tensor loop
            (default False). The first step compiles (seconds; cached in the optimizer); lr, betas and weight decay
            enter as 0-d tensors, so schedulers do not recompile. Same math as the loop, to rounding.
        state_dtype: store m and v̂ in this dtype instead of the parameter's (default None): bfloat16
            halves their memory on float32 parameters (computed in float32, rounded stochastically on
            store with counter-based noise: unbiased, reproducible, identical across DDP replicas;
            on the per-tensor and the fused path);
            float32 keeps full-precision state for bfloat16 parameters. float32 on bfloat16 parameters also keeps
            β̂_t from rounding to 1 in the state's dtype.

    State: ``step`` (0-d float32), ``exp_avg`` (m) and ``exp_avg_sq`` (v̂), in the parameter's dtype.

    References:
        Li, Zhang, Wang, Luo, "AdaX: Adaptive Gradient Descent with Exponential Long Term Memory",
        arXiv:2004.09740 (2020), Alg. 2 and AdaX-W; switchablenorms/AdaX; Su Jianlin,
        kexue.fm/archives/7387; bojone/adax ``AdaX_V2``.

    Deviations:
        ε placement: the paper has no ε; the authors' code adds 1e-12 to √v on the *unnormalised* v
        (an ε that shrinks over time); Su's essay puts ε inside the root. danlu follows Su's V2 code:
        ε outside √v̂ on the normalised v̂. Weight decay is the decoupled AdaX-W form, not the coupled
        L2 of the authors' ``AdaX`` class.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 1e-4),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        fused: bool = False,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused,
                                      state_dtype=state_dtype))

    _step_scalars = ("lr", "betas", "weight_decay")
    _low_precision_state = frozenset({"exp_avg", "exp_avg_sq"})

    def _validate_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        self._check_fused(group, params)
        self._check_state_dtype(group, params)
        group["lr"] = check_lr(group["lr"])
        beta1, beta2 = check_betas("betas", group["betas"])
        if beta2 == 0.0:
            check_number("betas[1]", beta2, low=0.0, low_open=True, high=1.0, high_open=True)
        group["betas"] = (beta1, beta2)
        check_number("eps", group["eps"], low=0.0)
        check_number("weight_decay", group["weight_decay"], low=0.0)

    def _init_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        init_moments(p, state)

    def _derive(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
        """Increment the counter; this step's β̂_t."""
        state["step"].add_(1)
        return {"beta_hat": adax_beta_hat(state["step"], group["betas"][1])}

    def _update(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                derived: dict[str, Any] | None = None) -> None:
        beta1, beta2 = group["betas"]
        if derived is None:
            derived = self._derive(p, state, group)
        adax_update(
            p,
            grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            state["step"],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            beta_hat=derived["beta_hat"],
        )
