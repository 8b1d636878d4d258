"""Lion (EvoLved Sign Momentum) and Tiger (Lion with one β), per-tensor kernel and optimizer classes."""

from __future__ import annotations

from typing import Any

import torch

from .._core.accumulate import AccumulatingOptimizer
from .._core.numerics import add_scaled_, decoupled_decay_, propagate_nonfinite_
from .._core.optimizer import ParamsT
from .._core.validate import check_betas, check_lr, check_number

__all__ = ["Lion", "Tiger", "lion_update"]


def lion_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    beta1: float | torch.Tensor,
    beta2: float | torch.Tensor,
    weight_decay: float | torch.Tensor,
) -> None:
    """One Lion step for one tensor, in place (google/automl order); scalars are numbers or 0-d tensors.

    c = β1·m + (1−β1)·g;  θ ← θ·(1 − η·λ) − η·sign(c);  m ← β2·m + (1−β2)·g
    """
    sign_step_(param, add_scaled_(exp_avg.mul(beta1), grad, 1.0 - beta1), lr=lr, weight_decay=weight_decay)
    add_scaled_(exp_avg.mul_(beta2), grad, 1.0 - beta2)


def sign_step_(param: torch.Tensor, c: torch.Tensor, *, lr: float | torch.Tensor, weight_decay: float) -> None:
    """θ ← θ·(1 − η·λ) − η·sign(c), with NaN wherever c is not finite."""
    update = propagate_nonfinite_(torch.sign(c), c)
    decoupled_decay_(param, lr, weight_decay)
    add_scaled_(param, update, -lr)


class _SignMomentum(AccumulatingOptimizer):
    """Accumulation for Lion/Tiger: the window's micro-gradients are folded into m with β2."""

    _low_precision_state = frozenset({"exp_avg"})
    _linear_window_state = ("exp_avg",)

    def _betas(self, group: dict[str, Any]) -> tuple[float, float]:
        raise NotImplementedError

    def _init_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self._init_accum_state(state)

    def _update(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        beta1, beta2 = self._betas(group)
        lion_update(p, grad, state["exp_avg"], lr=group["lr"], beta1=beta1, beta2=beta2,
                    weight_decay=group["weight_decay"])

    def _absorb(self, p, grad, state, group, first) -> None:  # type: ignore[no-untyped-def]
        beta2 = self._betas(group)[1]
        m = state["exp_avg"]
        if first:
            m.mul_(beta2)
        m.add_(grad, alpha=(1.0 - beta2) / self.accum_steps)

    def _apply(self, p, grad, state, group) -> None:  # type: ignore[no-untyped-def]
        beta1, beta2 = self._betas(group)
        m = state["exp_avg"]  # = β2·m_old + (1−β2)·ḡ after the window
        if beta1 == beta2 or grad is None:
            c = m
        else:
            # c = β1·m_old + (1−β1)·ḡ = (β1/β2)·m + ((β2−β1)/β2)·ḡ; ḡ (the window mean) is not stored,
            # so the last micro-gradient stands in for it: exact for k = 1, approximate otherwise.
            c = m.mul(beta1 / beta2).add_(grad, alpha=(beta2 - beta1) / beta2)
        sign_step_(p, c, lr=group["lr"], weight_decay=group["weight_decay"])


class Lion(_SignMomentum):
    r"""Lion: sign of an interpolated momentum, with decoupled weight decay.

    For each parameter θ with gradient g_t (t ≥ 1, m_0 = 0)::

        c_t = β1·m_{t−1} + (1 − β1)·g_t          # interpolation with the OLD momentum
        θ_t = θ_{t−1} − η·(sign(c_t) + λ·θ_{t−1})  # decay ×lr on the pre-update θ
        m_t = β2·m_{t−1} + (1 − β2)·g_t          # momentum updated after the step

    Every coordinate with c ≠ 0 moves by exactly η (plus the decay), so the update has unit RMS per
    coordinate and η is a per-coordinate step size. State: one buffer ``exp_avg`` (m) in the
    parameter's dtype; no step counter, no bias correction, no ε.

    Args:
        params: parameters or param groups.
        lr: η (default 1e-4). Lion wants an lr 3–10× smaller than AdamW's (the paper; Su says ≥10×);
            see :func:`danlu.lion_from_adamw`.
        betas: (β1, β2) (default (0.9, 0.99)); the paper uses (0.95, 0.98) for language models.
        weight_decay: λ, decoupled and multiplied by lr (default 0).
        accum_steps: k ≥ 1 micro-batches per update, folded into m (default 1 = plain Lion). Each
            micro-gradient enters m with weight (1−β2)/k and m decays by β2 once per window; on the k-th
            micro-step c = (β1/β2)·m + ((β2−β1)/β2)·g_k. This is exact for k = 1 and for β1 = β2 (Tiger),
            and **approximate** otherwise: the exact c needs the window-mean gradient ḡ, which is not
            stored, so the last micro-gradient g_k stands in for it (requires β2 > 0).
        fused: run the step as one ``torch.compile``-d single pass per bucket of tensors (same
            device, dtype and state dtypes; see ``danlu._core.fused``) instead of the per-tensor loop
            (default False). The first step compiles (seconds; cached in the optimizer); lr, betas and
            weight decay enter as 0-d tensors, so schedulers do not recompile. Same math as the loop,
            to rounding. Not with ``accum_steps`` > 1.
        state_dtype: store m (``exp_avg``) in this dtype instead of the parameter's (default None).
            bfloat16 halves its memory on float32 parameters: computed in float32, rounded
            stochastically on store with counter-based noise (unbiased, reproducible, identical across
            DDP replicas), on the per-tensor and the fused path (not with ``accum_steps`` > 1). float32 keeps full-precision state for bfloat16 parameters.
        sync_window: for DDP with ``no_sync()`` on the window's micro-batches (default False): their
            gradients are then rank-local, and the momentum a window folded is averaged over the ranks
            (one bucketed all-reduce per window) before θ moves, which equals folding the averaged
            gradients (the momentum is linear in them). Needs an initialized process group and
            ``accum_steps`` > 1; not for FSDP2. Mid-window the ranks' momenta differ: checkpoint at
            window ends.

    References:
        Chen et al., "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675 (2023);
        google/automl ``lion/lion_pytorch.py``; Su Jianlin, kexue.fm/archives/9473.

    Deviations:
        None from google/automl. lion-pytorch's optional "fully decoupled" decay (λ/η_0) is not offered;
        optax's default λ = 1e-3 is not ours (we default to 0). Non-finite gradients: ``torch.sign``
        maps NaN to 0 and ±inf to ±1, which would hide a bad gradient; danlu instead makes every
        parameter entry whose c_t is NaN or ±inf NaN, so the failure shows in the loss.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        accum_steps: int = 1,
        *,
        fused: bool = False,
        state_dtype: torch.dtype | None = None,
        sync_window: bool = False,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, fused=fused,
                                      state_dtype=state_dtype), accum_steps, sync_window)

    _step_scalars = ("lr", "betas", "weight_decay")

    def _validate_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        self._check_fused(group, params)
        self._check_state_dtype(group, params)
        group["lr"] = check_lr(group["lr"])
        beta1, beta2 = group["betas"] = check_betas("betas", group["betas"])
        if self.accum_steps > 1 and beta2 == 0.0 and beta1 != beta2:
            raise ValueError(
                f"Invalid betas: {group['betas']!r} (expected betas[1] > 0 with accum_steps > 1: the momentum "
                "must carry the window's gradients)"
            )
        check_number("weight_decay", group["weight_decay"], low=0.0)

    def _betas(self, group: dict[str, Any]) -> tuple[float, float]:
        return group["betas"]


class Tiger(_SignMomentum):
    r"""Tiger (Tight-fisted optimizer): Lion with β1 = β2 = β, i.e. the sign of an EMA of gradients.

    For each parameter (m_0 = 0)::

        m_t = β·m_{t−1} + (1 − β)·g_t
        θ_t = θ_{t−1}·(1 − η·λ) − η·sign(m_t)

    This is exactly :class:`Lion` with ``betas=(β, β)`` (the interpolation c_t equals the new m_t),
    and, because θ depends on the gradients only through the EMA, it is the optimizer for which
    gradient accumulation inside the momentum is exact. State: ``exp_avg`` only.

    Args:
        params: parameters or param groups.
        lr: η (default 1e-4, Lion's: the update is the same sign step; Su's scale-aware recipe,
            :func:`danlu.scale_aware_groups`, sets it per tensor).
        beta: β (default 0.965).
        weight_decay: λ, decoupled and multiplied by lr (default 0).
        accum_steps: k ≥ 1 micro-batches per update, folded into m (default 1). m decays by β once per
            window and absorbs each micro-gradient with weight (1−β)/k; θ moves on the k-th call. This is
            **exact**: k micro-batches equal one step on the k-times-larger batch, to rounding (equal
            micro-batch sizes, mean-reduced loss, no batch-coupled layers). Cost: no gradient buffer;
            :meth:`fuse_into_backward` also frees each ``.grad`` as soon as it is folded in.
        fused, state_dtype: as in :class:`Lion` (``beta`` is the scalar that enters as a 0-d tensor).
        sync_window: as in :class:`Lion`.

    References:
        Su Jianlin, "Tiger: an extremely tight-fisted optimizer", kexue.fm/archives/9512 (2023);
        bojone/tiger. Lion: arXiv:2302.06675.

    Deviations:
        Su's reference adds its own lr schedule and per-parameter lr scaling; here those are the job of
        :func:`danlu.scale_aware_groups` and ``torch.optim.lr_scheduler``. Non-finite gradients make the
        affected parameter entries NaN (see :class:`Lion`).
    """

    def __init__(
        self, params: ParamsT, lr: float = 1e-4, beta: float = 0.965, weight_decay: float = 0.0, accum_steps: int = 1,
        *, fused: bool = False, state_dtype: torch.dtype | None = None, sync_window: bool = False,
    ) -> None:
        super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay, fused=fused,
                                      state_dtype=state_dtype), accum_steps, sync_window)

    _step_scalars = ("lr", "beta", "weight_decay")

    def _validate_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        self._check_fused(group, params)
        self._check_state_dtype(group, params)
        group["lr"] = check_lr(group["lr"])
        check_number("beta", group["beta"], low=0.0, high=1.0, high_open=True)
        check_number("weight_decay", group["weight_decay"], low=0.0)

    def _betas(self, group: dict[str, Any]) -> tuple[float, float]:
        return group["beta"], group["beta"]
