"""AdamW with gradient accumulation folded into its moments."""

from __future__ import annotations

from typing import Any

import torch

from .._core.accumulate import AccumulatingOptimizer
from .._core.numerics import add_scaled_, addcmul_scaled_, decoupled_decay_
from .._core.optimizer import ParamsT, init_moments
from .._core.validate import check_betas, check_lr, check_number

__all__ = ["AdamW"]


class AdamW(AccumulatingOptimizer):
    r"""AdamW (decoupled weight decay) with gradient accumulation folded into m and v.

    With ``accum_steps=k`` (micro-step t, χ_x = 1 when x is an integer, n = number of updates so far
    including this one)::

        m_t = [(β1 − 1)·χ_{(t−1)/k} + 1]·m_{t−1} + ((1 − β1)/k)·g_t
        v_t = [(β2 − 1)·χ_{(t−1)/k} + 1]·v_{t−1} + ((1 − β2)/k)·g_t²
        on the k-th micro-step:
            m̂ = m/(1 − β1^n),  v̂ = v/(1 − β2^n)
            θ ← θ·(1 − η·λ) − η·m̂/(√v̂ + ε)

    With k = 1 this is ``torch.optim.AdamW`` (same defaults, ε outside the root, decay ×lr); the step
    counter and bias corrections count updates, not micro-steps.

    **Exactness**: m is exactly the big-batch EMA. v is not: it averages the micro-gradients'
    squares, where the big batch squares their mean, so accumulation is exact only when the k
    micro-gradients are identical, and otherwise approximate (v is then larger in expectation, so
    steps are somewhat smaller). Su's argument is that the two are strongly correlated.

    **Cost**: as AdamW (state = 2 × params); no gradient buffer. :meth:`fuse_into_backward` also frees
    each ``.grad`` as soon as it is folded in.

    Args:
        params: parameters or param groups.
        lr: η (default 1e-3).
        betas: (β1, β2) (default (0.9, 0.999)).
        eps: ε, added outside the square root (default 1e-8).
        weight_decay: λ, decoupled and multiplied by lr (default 1e-2).
        accum_steps: k ≥ 1 micro-batches per update (default 1).
        fused: run the step as one ``torch.compile``-d single pass per bucket of tensors (same
            device, dtype and state dtypes; see ``danlu._core.fused``) instead of the per-tensor loop
            (default False). The first step compiles (seconds; cached in the optimizer); lr, betas and weight decay
            enter as 0-d tensors, so schedulers do not recompile. Same math as the loop, to rounding.
            Not with ``accum_steps`` > 1.
        state_dtype: store m and v in this dtype instead of the parameter's (default None): bfloat16
            halves their memory on float32 parameters (computed in float32, rounded stochastically on
            store with counter-based noise: unbiased, reproducible, identical across DDP replicas;
            on the per-tensor and the fused path);
            float32 keeps full-precision state for bfloat16 parameters. bfloat16 not with ``accum_steps`` > 1.

    References:
        Loshchilov & Hutter, "Decoupled Weight Decay Regularization", arXiv:1711.05101;
        Kingma & Ba, arXiv:1412.6980; Su Jianlin, kexue.fm/archives/8634.

    Deviations:
        Su writes ε inside the root (√(v̂ + ε)); danlu keeps torch's √v̂ + ε so that k = 1 is torch's
        AdamW. No amsgrad, maximize, foreach or fused options.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        accum_steps: int = 1,
        *,
        fused: bool = False,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused, state_dtype=state_dtype)
        super().__init__(params, defaults, accum_steps)

    _step_scalars = ("lr", "betas", "weight_decay")
    _low_precision_state = frozenset({"exp_avg", "exp_avg_sq"})

    def _validate_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        self._check_fused(group, params)
        self._check_state_dtype(group, params)
        group["lr"] = check_lr(group["lr"])
        group["betas"] = check_betas("betas", group["betas"])
        check_number("eps", group["eps"], low=0.0)
        check_number("weight_decay", group["weight_decay"], low=0.0)

    def _init_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        init_moments(p, state)
        self._init_accum_state(state)

    def _absorb(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                first: bool) -> None:
        beta1, beta2 = group["betas"]
        k = self.accum_steps
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if first:
            m.mul_(beta1)
            v.mul_(beta2)
        add_scaled_(m, grad, (1.0 - beta1) / k)
        addcmul_scaled_(v, grad, grad, (1.0 - beta2) / k)

    def _derive(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
        """Increment the counter; the step size lr/(1 − β1^t) and √(1 − β2^t) (0-d float64)."""
        beta1, beta2 = group["betas"]
        step = state["step"]
        step.add_(1)
        t = step.to(torch.float64)
        return {"step_size": group["lr"] / (1.0 - torch.pow(beta1, t)),
                "bias_correction2_sqrt": (1.0 - torch.pow(beta2, t)).sqrt()}

    def _apply(self, p: torch.Tensor, grad: torch.Tensor | None, state: dict[str, Any], group: dict[str, Any],
               derived: dict[str, Any] | None = None) -> None:
        if derived is None:
            derived = self._derive(p, state, group)
        decoupled_decay_(p, group["lr"], group["weight_decay"])
        denom = (state["exp_avg_sq"].sqrt() / derived["bias_correction2_sqrt"]).add_(group["eps"])
        p.sub_(state["exp_avg"].div(denom).mul_(derived["step_size"]))
