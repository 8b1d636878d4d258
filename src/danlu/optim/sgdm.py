"""SGD with EMA momentum (heavy ball), with gradient accumulation folded into the momentum."""

from __future__ import annotations

from typing import Any

import torch

from .._core.accumulate import AccumulatingOptimizer
from .._core.numerics import add_scaled_, decoupled_decay_
from .._core.optimizer import ParamsT
from .._core.validate import check_lr, check_number

__all__ = ["SGDM"]


class SGDM(AccumulatingOptimizer):
    r"""SGD with momentum in EMA form, decoupled weight decay, and accumulation inside the momentum.

    With ``accum_steps=k`` (micro-step t ≥ 1, χ_x = 1 when x is an integer, m_0 = 0)::

        m_t = [(β − 1)·χ_{(t−1)/k} + 1]·m_{t−1} + ((1 − β)/k)·g_t   # decay only at a window's start
        θ_t = θ_{t−1}·(1 − χ_{t/k}·η·λ) − χ_{t/k}·η·m_t             # move only on the k-th micro-step

    With k = 1 this is m ← β·m + (1−β)·g, θ ← θ(1 − ηλ) − η·m. Note the EMA form: torch.optim.SGD's
    momentum buffer is m ← μ·m + g (no 1−β factor, and m_1 = g), so η here corresponds to η/(1−β) there.

    **Exactness**: k micro-batches equal one step on the k-times-larger batch (the mean of the
    micro-batch losses), to rounding, for any k — given equal micro-batch sizes, a mean-reduced loss,
    and no batch-coupled layers (BatchNorm) or gradient clipping.

    **Cost**: per micro-step one fused multiply-add on m; no gradient buffer (state = 1 × params).
    :meth:`fuse_into_backward` also frees each ``.grad`` as soon as it is folded in.

    Args:
        params: parameters or param groups.
        lr: η (default 1e-2: with EMA momentum β = 0.9 that is the step size of
            ``torch.optim.SGD(lr=1e-3, momentum=0.9)``, torch's default lr).
        momentum: β in [0, 1) (default 0.9).
        weight_decay: λ, decoupled and multiplied by lr (default 0).
        accum_steps: k ≥ 1 micro-batches per update (default 1). Call :meth:`step` after every
            micro-batch; :attr:`is_update_step` says whether the call moved θ.
        fused: run the step as one ``torch.compile``-d single pass per bucket of tensors (same
            device, dtype and state dtypes; see ``danlu._core.fused``) instead of the per-tensor loop
            (default False). The first step compiles (seconds; cached in the optimizer); lr, momentum and
            weight decay enter as 0-d tensors, so schedulers do not recompile. Same math as the loop,
            to rounding. Not with ``accum_steps`` > 1.
        state_dtype: store the momentum buffer in this dtype instead of the parameter's (default None): bfloat16
            halves their memory on float32 parameters (computed in float32, rounded stochastically on
            store with counter-based noise: unbiased, reproducible, identical across DDP replicas;
            on the per-tensor and the fused path);
            float32 keeps full-precision state for bfloat16 parameters. bfloat16 not with ``accum_steps`` > 1.
        sync_window: average the momentum buffer over the DDP ranks at each window's end (default
            False), for micro-batches run under ``no_sync()``: exact, as the buffer is linear in the
            gradients; one all-reduce per window instead of one per micro-batch. Details as in
            :class:`danlu.Lion`.

    References:
        Su Jianlin, kexue.fm/archives/8634 (accumulation hidden in momentum) and /9512 (Tiger);
        Polyak (1964) for heavy-ball momentum.

    Deviations:
        EMA-form momentum (as Su writes it), not torch.optim.SGD's dampening form.
    """

    def __init__(
        self, params: ParamsT, lr: float = 1e-2, momentum: float = 0.9, weight_decay: float = 0.0, accum_steps: int = 1,
        *, fused: bool = False, state_dtype: torch.dtype | None = None, sync_window: bool = False,
    ) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused,
                                      state_dtype=state_dtype), accum_steps, sync_window)

    _low_precision_state = frozenset({"momentum_buffer"})
    _linear_window_state = ("momentum_buffer",)

    _step_scalars = ("lr", "momentum", "weight_decay")

    def _validate_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        self._check_fused(group, params)
        self._check_state_dtype(group, params)
        group["lr"] = check_lr(group["lr"])
        check_number("momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
        check_number("weight_decay", group["weight_decay"], low=0.0)

    def _init_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self._init_accum_state(state)

    def _absorb(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                first: bool) -> None:
        beta = group["momentum"]
        buf = state["momentum_buffer"]
        if first:
            buf.mul_(beta)
        add_scaled_(buf, grad, (1.0 - beta) / self.accum_steps)

    def _apply(self, p: torch.Tensor, grad: torch.Tensor | None, state: dict[str, Any],
               group: dict[str, Any]) -> None:
        decoupled_decay_(p, group["lr"], group["weight_decay"])
        add_scaled_(p, state["momentum_buffer"], -group["lr"])
