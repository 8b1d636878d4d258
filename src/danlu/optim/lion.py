"""Lion (EvoLved Sign Momentum) and Tiger (Lion with one β), per-tensor kernel and optimizer classes."""

from __future__ import annotations

from typing import Any

import torch

from .._core import distributed as dist_
from .._core.accumulate import PENDING, AccumulatingOptimizer
from .._core.numerics import acc_dtype, add_scaled_, decoupled_decay_, propagate_nonfinite_
from .._core.optimizer import ParamsT
from .._core.validate import check_betas, check_choice, check_lr, check_number

__all__ = ["Lion", "Tiger", "lion_update", "tiger_lr"]

LR_SCALES = (None, "rms", "row_rms")
ON_NAN = ("propagate", "skip")


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


def sign_step_(param: torch.Tensor, c: torch.Tensor, *, lr: float | torch.Tensor,
               weight_decay: float | torch.Tensor) -> None:
    """θ ← θ·(1 − η·λ) − η·sign(c), with NaN wherever c is not finite."""
    update = propagate_nonfinite_(torch.sign(c), c)
    decoupled_decay_(param, lr, weight_decay)
    add_scaled_(param, update, -lr)


def tiger_lr(param: torch.Tensor, lr: float | torch.Tensor, lr_scale: str | None) -> float | torch.Tensor:
    """Tiger's per-tensor lr (kexue.fm/archives/9512): ``lr`` as is (``None``), ``lr·RMS(θ)`` over the
    whole tensor (``"rms"``, a 0-d tensor) or ``lr·RMS`` over the last dim, one per row (``"row_rms"``, shape
    ``(..., 1)``; the whole-tensor RMS for tensors of fewer than 2 dims). θ is the pre-update parameter;
    RMS is accumulated in ≥ float32 and, under FSDP2, over the whole parameter."""
    if lr_scale is None:
        return lr
    x = param.detach()
    if lr_scale == "row_rms" and x.dim() >= 2:
        # (an empty last dim gives NaN rows of an empty tensor, which move nothing)
        return lr * dist_.mean_over(x.to(acc_dtype(x)).square(), dim=-1, keepdim=True).sqrt()
    return lr * dist_.rms(x)


def _any_nonfinite(grad: torch.Tensor) -> torch.Tensor:
    """0-d bool: does ``grad`` (under FSDP2: the whole gradient, on every rank) hold a NaN or ±inf?
    ``g − g`` is NaN exactly there (see ``numerics.propagate_nonfinite_``), so its sum is not finite."""
    return ~torch.isfinite(dist_.sum_over(grad - grad))


def _shrink_(param: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """Tiger's answer to a bad gradient: θ ← (θ − c)·s + c, out of place (s = ``shrink``, c = ``shrink_center``)."""
    c = group["shrink_center"]
    return param.sub(c).mul_(group["shrink"]).add_(c)


class _SignMomentum(AccumulatingOptimizer):
    """Accumulation for Lion/Tiger: the window's micro-gradients are folded into m with β2."""

    _low_precision_state = frozenset({"exp_avg"})
    _linear_window_state = ("exp_avg",)

    def _betas(self, group: dict[str, Any]) -> tuple[float, float]:
        raise NotImplementedError

    def _init_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self._init_accum_state(state)

    # No ``_derive``: called with DanluOptimizer._update's four arguments, never AccumulatingOptimizer's ``derived``.
    def _update(  # type: ignore[override]
            self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        beta1, beta2 = self._betas(group)
        lion_update(p, grad, state["exp_avg"], lr=group["lr"], beta1=beta1, beta2=beta2,
                    weight_decay=group["weight_decay"])

    def _absorb(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                first: bool) -> None:
        beta2 = self._betas(group)[1]
        m = state["exp_avg"]
        if first:
            m.mul_(beta2)
        m.add_(grad, alpha=(1.0 - beta2) / self.accum_steps)

    def _apply(self, p: torch.Tensor, grad: torch.Tensor | None, state: dict[str, Any],
               group: dict[str, Any]) -> None:
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
            DDP replicas), on the per-tensor and the fused path (not with ``accum_steps`` > 1). float32
            keeps full-precision state for bfloat16 parameters.
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
        θ_t = θ_{t−1}·(1 − η_t·λ) − η_t·sign(m_t)

    This is exactly :class:`Lion` with ``betas=(β, β)`` (the interpolation c_t equals the new m_t),
    and, because θ depends on the gradients only through the EMA, it is the optimizer for which
    gradient accumulation inside the momentum is exact. State: ``exp_avg`` only.

    **Su's recipe** (kexue.fm/archives/9512 and its reference code bojone/tiger ``tiger.py``), per param
    group, most easily set up by :func:`danlu.tiger_groups`:

    - the lr is relative: η_t = ``lr``·RMS(θ_{t−1}) for matrices (``lr_scale="rms"``), ``lr``·RMS over the
      last dim, one value per row, for embeddings (``"row_rms"``), and ``lr``·0.5 for biases and the
      normalisation β and γ (a fixed lr; :func:`danlu.tiger_groups` halves it), with zero weight decay on
      those. Su's ``lr`` (his α_t, the relative change per step) peaks at 1e-3–2e-3. The decay λ is
      multiplied by the scaled η_t, as in the reference. A tensor whose RMS is 0 (a zero-initialised
      matrix) gets η_t = 0 and never moves: give such tensors a fixed lr.
    - non-finite gradients (``on_nan="skip"``): when a tensor's gradient holds a NaN (or ±inf), that
      tensor's step is skipped (m_t = m_{t−1}) and θ shrinks toward its neutral value,
      θ_t = (θ_{t−1} − c)·s + c, with s = ``shrink`` (0.99) and c = ``shrink_center`` (1 for norm gains, 0
      otherwise). The loss rises a little and training usually recovers (Su: for mixed-precision
      NaNs of a configuration that trains in float32, not for an lr that is too large).
    - β: 0.965 for NLP (the mean of the Lion paper's (0.95, 0.98)), :attr:`BETA_CV` = 0.945 for vision
      (the mean of its (0.9, 0.99)).

    Args:
        params: parameters or param groups.
        lr: η (default 1e-4, Lion's: the update is the same sign step); with ``lr_scale``, the relative
            lr α (Su: max 1e-3–2e-3).
        beta: β (default 0.965, :attr:`BETA_NLP`; :attr:`BETA_CV` = 0.945 for vision).
        weight_decay: λ, decoupled and multiplied by the (scaled) lr (default 0; Su uses 0.01 on matrices).
        accum_steps: k ≥ 1 micro-batches per update, folded into m (default 1). m decays by β once per
            window and absorbs each micro-gradient with weight (1−β)/k; θ moves on the k-th call. This is
            **exact**: k micro-batches equal one step on the k-times-larger batch, to rounding (equal
            micro-batch sizes, mean-reduced loss, no batch-coupled layers). Cost: no gradient buffer;
            :meth:`fuse_into_backward` also frees each ``.grad`` as soon as it is folded in.
        lr_scale: None (default: η = ``lr``), ``"rms"`` or ``"row_rms"`` (see the recipe above).
        on_nan: ``"propagate"`` (default: the affected entries of θ become NaN, as in :class:`Lion`) or
            ``"skip"`` (skip the tensor's step and shrink it). With ``accum_steps`` > 1 a bad
            micro-gradient is left out of its window (θ shrinks then, and the window's other
            micro-gradients still move θ at its end).
        shrink: s in (0, 1] for ``on_nan="skip"`` (default 0.99).
        shrink_center: c for ``on_nan="skip"`` (default 0.0).
        fused, state_dtype: as in :class:`Lion` (``beta`` is the scalar that enters as a 0-d tensor); the
            recipe's options work on the fused path too.
        sync_window: as in :class:`Lion`.

    References:
        Su Jianlin, "Tiger: an extremely tight-fisted optimizer", kexue.fm/archives/9512 (2023);
        bojone/tiger. Lion: arXiv:2302.06675.

    Deviations:
        The reference's built-in piecewise-linear lr schedule is left to ``torch.optim.lr_scheduler``.
        ``on_nan="skip"`` also skips on ±inf (the reference tests NaN only; an infinite gradient would
        leave m infinite for good). With accumulation the reference skips the window's θ move when the
        bad micro-gradient is the last one and drops the window's decay when it is the first; here the
        bad micro-batch is simply left out. The check for a bad gradient costs one reduction per tensor
        (no host sync, except with ``accum_steps`` > 1).
    """

    BETA_NLP = 0.965
    BETA_CV = 0.945

    def __init__(
        self, params: ParamsT, lr: float = 1e-4, beta: float = 0.965, weight_decay: float = 0.0, accum_steps: int = 1,
        *, lr_scale: str | None = None, on_nan: str = "propagate", shrink: float = 0.99, shrink_center: float = 0.0,
        fused: bool = False, state_dtype: torch.dtype | None = None, sync_window: bool = False,
    ) -> None:
        super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay, lr_scale=lr_scale, on_nan=on_nan,
                                      shrink=shrink, shrink_center=shrink_center, fused=fused,
                                      state_dtype=state_dtype), accum_steps, sync_window)

    _step_scalars = ("lr", "beta", "weight_decay")

    def _validate_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        self._check_fused(group, params)
        self._check_state_dtype(group, params)
        group["lr"] = check_lr(group["lr"])
        check_number("beta", group["beta"], low=0.0, high=1.0, high_open=True)
        check_number("weight_decay", group["weight_decay"], low=0.0)
        check_choice("lr_scale", group.get("lr_scale"), LR_SCALES)
        if check_choice("on_nan", group.get("on_nan", "propagate"), ON_NAN) == "skip" and self.sync_window:
            raise ValueError("Invalid on_nan: 'skip' (expected 'propagate' with sync_window=True: micro-gradients are "
                             "rank-local there, so one rank would skip and shrink while the others step)")
        group["shrink"] = check_number("shrink", group.get("shrink", 0.99), low=0.0, high=1.0, low_open=True)
        group["shrink_center"] = check_number("shrink_center", group.get("shrink_center", 0.0))

    def _betas(self, group: dict[str, Any]) -> tuple[float, float]:
        return group["beta"], group["beta"]

    # No ``_derive``: called with DanluOptimizer._update's four arguments, never AccumulatingOptimizer's ``derived``.
    def _update(  # type: ignore[override]
            self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        lr = tiger_lr(p, group["lr"], group.get("lr_scale"))
        beta, m = group["beta"], state["exp_avg"]
        if group.get("on_nan", "propagate") == "propagate":
            lion_update(p, grad, m, lr=lr, beta1=beta, beta2=beta, weight_decay=group["weight_decay"])
            return
        # Branch-free (no host sync; the same graph on the fused path): both outcomes, then a select.
        bad = _any_nonfinite(grad)
        m.copy_(torch.where(bad, m, add_scaled_(m.mul(beta), grad, 1.0 - beta)))
        stepped = p.clone()
        sign_step_(stepped, m, lr=lr, weight_decay=group["weight_decay"])
        p.copy_(torch.where(bad, _shrink_(p, group), stepped))

    def _apply(self, p: torch.Tensor, grad: torch.Tensor | None, state: dict[str, Any],
               group: dict[str, Any]) -> None:
        sign_step_(p, state["exp_avg"], lr=tiger_lr(p, group["lr"], group.get("lr_scale")),
                   weight_decay=group["weight_decay"])

    def _fold_local(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                    t: int, apply: bool = True) -> None:
        if (self.accum_steps == 1 or group.get("on_nan", "propagate") == "propagate"
                or not bool(_any_nonfinite(grad))):
            super()._fold_local(p, grad, state, group, t, apply)
            return
        p.copy_(_shrink_(p, group))  # the bad micro-batch is left out of the window
        if t == self.accum_steps and apply and state[PENDING]:
            self._apply(p, None, state, group)
            state[PENDING] = False
