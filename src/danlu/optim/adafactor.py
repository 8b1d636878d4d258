"""Adafactor: factored second moments and relative step sizes, per-tensor kernel and optimizer class."""

from __future__ import annotations

from typing import Any

import torch

from .._core.distributed import check_shard_statistics, global_shape, mean_over, rms
from .._core.numerics import add_scaled_, factored_dims, factored_rsqrt, sum_along
from .._core.optimizer import DanluOptimizer, ParamsT, new_step
from .._core.validate import check_bool, check_lr, check_number, check_optional

__all__ = ["Adafactor", "adafactor_update", "adafactor_scalars"]


def adafactor_scalars(step: torch.Tensor, *, lr: float | torch.Tensor, relative_step: bool,
                      decay_rate: float) -> dict[str, torch.Tensor]:
    """Increment the 0-d counter ``step`` and return this step's scalars (0-d float64): 1 − β̂_t = t^(−c),
    β̂_t, and ρ_t = min(lr, 1/√t) (relative) or lr."""
    step.add_(1)
    t = step.to(torch.float64)
    one_minus_beta2 = t.pow(-decay_rate)  # 1 − β̂_t, exactly 1 at t = 1
    lr64 = torch.as_tensor(lr, dtype=torch.float64)
    rho = torch.minimum(t.rsqrt(), lr64) if relative_step else lr64
    return {"one_minus_beta2": one_minus_beta2, "beta2_hat": 1.0 - one_minus_beta2, "rho": rho}


def _mean_along(x: torch.Tensor, dim: int, compiled: bool) -> torch.Tensor:
    """``x.mean(dim, keepdim=True)``; compiled, as :func:`sum_along` (blocked along a strided dim) over n;
    on an FSDP2 shard, over the whole parameter (``danlu._core.distributed``)."""
    return sum_along(x, dim).div_(x.shape[dim]) if compiled else mean_over(x, dim, keepdim=True)


def adafactor_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, torch.Tensor],
    *,
    lr: float | torch.Tensor,
    relative_step: bool,
    eps1: float,
    eps2: float,
    clip_threshold: float,
    decay_rate: float,
    beta1: float | None,
    weight_decay: float,
    scale_parameter: bool,
    dims: tuple[int, int] | None,
    scalars: dict[str, torch.Tensor] | None = None,
) -> None:
    """One Adafactor step for one tensor, in place; ``state["step"]`` (the 0-d counter) is incremented
    here, unless this step's ``scalars`` (:func:`adafactor_scalars`) are given.

    β̂_t = 1 − t^(−c);  G2 = g² + ε1;  factored: R ← β̂R + (1−β̂)·mean_{d0}G2, C ← β̂C + (1−β̂)·mean_{d1}G2,
    V̂ = R·C/mean(R);  unfactored: V̂ ← β̂V̂ + (1−β̂)G2;  U = g/√V̂;  Û = U/max(1, RMS(U)/d);
    [m ← β1·m + (1−β1)·Û];  ρ_t = min(lr, 1/√t) (relative) or lr;  α_t = ρ_t·max(ε2, RMS(θ)) (or ρ_t);
    θ ← θ·(1 − ρ_t·λ) − α_t·Û (or m).
    """
    if scalars is None:
        scalars = adafactor_scalars(state["step"], lr=lr, relative_step=relative_step, decay_rate=decay_rate)
    one_minus_beta2, beta2_hat, rho = scalars["one_minus_beta2"], scalars["beta2_hat"], scalars["rho"]
    compiled = dims is not None and torch.compiler.is_compiling()
    ms = None
    g2 = grad.square().add_(eps1)
    if dims is not None:
        d0, d1 = dims
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row.mul_(beta2_hat).add_(_mean_along(g2, d0, compiled).mul_(one_minus_beta2))
        col.mul_(beta2_hat).add_(_mean_along(g2, d1, compiled).mul_(one_minus_beta2))
        # R keeps the parameter's dim 0 (sharded with it under FSDP2) unless it was averaged over it.
        row_mean = None if compiled else mean_over(row, d1, keepdim=True, aligned=d0 != 0)
        update = factored_rsqrt(row, col, d1, row_mean).mul_(grad)
        if compiled:
            # RMS(U)² = mean(g²/V̂) with 1/V̂ = mean_{d1}(R)/(R·C): a sum along d1 (the reduction that
            # made C) of g²/R, then over C's entries. Inductor folds it into the pass that reduces g
            # along d1 instead of reading U once more; eagerly the direct RMS(U) is the cheaper one.
            row_mean = row.mean(dim=d1, keepdim=True)
            ms = sum_along(grad.square().div_(row), d1).mul_(row_mean).div_(col).sum() / max(grad.numel(), 1)
    else:
        v = state["exp_avg_sq"]
        v.mul_(beta2_hat).add_(g2.mul_(one_minus_beta2))
        update = v.rsqrt().mul_(grad)
    update_rms = rms(update) if ms is None else ms.sqrt()
    update.div_(torch.clamp(update_rms / clip_threshold, min=1.0))
    if beta1 is not None:
        exp_avg = state["exp_avg"]
        add_scaled_(exp_avg.mul_(beta1), update, 1.0 - beta1)
        update = exp_avg
    if scale_parameter:
        # Compiled, along d1 as the statistics above, in the same pass as g: inductor fuses reductions
        # that read a common tensor, so θ² + (g − g) (= θ² for a finite g) joins the pass over g
        # (`danlu speed --optimizers adafactor-fused`: 1.94× fused AdamW, from 2.04–2.32× with a pass
        # of its own). A non-finite g makes it NaN, as it makes every entry of the update NaN anyway.
        if compiled:
            assert dims is not None  # compiled is only set for factored dims
            p_rms = (sum_along(param.square() + (grad - grad), dims[1]).sum() / max(param.numel(), 1)).sqrt()
        else:
            p_rms = rms(param)
    alpha = rho * torch.clamp(p_rms, min=eps2) if scale_parameter else rho
    if isinstance(weight_decay, torch.Tensor) or weight_decay != 0.0:
        param.mul_(1.0 - rho * weight_decay)
    param.sub_(update * alpha)


class Adafactor(DanluOptimizer):
    r"""Adafactor: Adam-like steps with factored second moments and parameter-relative step sizes.

    For a parameter θ with gradient g at step t ≥ 1::

        β̂_t = 1 − t^(−c)                           # c = decay_rate; β̂_1 = 0, so no bias correction
        G²  = g² + ε1
        if factored (two largest dims n, m both ≥ min_dim_size_to_factor):
            R_t = β̂_t·R_{t−1} + (1 − β̂_t)·mean over the largest dim of G²      # n numbers for n×m
            C_t = β̂_t·C_{t−1} + (1 − β̂_t)·mean over the 2nd-largest dim of G²  # m numbers
            V̂_t = R_t·C_t / mean(R_t)
        else:
            V̂_t = β̂_t·V̂_{t−1} + (1 − β̂_t)·G²
        U_t = g / √V̂_t;   Û_t = U_t / max(1, RMS(U_t)/d)               # d = clip_threshold
        [m_t = β1·m_{t−1} + (1 − β1)·Û_t; use m_t below]               # optional momentum
        ρ_t = min(lr, 1/√t) if relative_step else lr          # default: min(1e-2, 1/√t)
        α_t = ρ_t·max(ε2, RMS(θ_{t−1})) if scale_parameter else ρ_t
        θ_t = θ_{t−1}·(1 − ρ_t·λ) − α_t·Û_t

    The rank-1 factorisation is the closed-form minimiser of the generalised KL divergence to G²
    (Su's derivation), so a rank-1 G² is recovered exactly at step 1. State for an n×m matrix is
    n + m numbers (``exp_avg_sq_row``, ``exp_avg_sq_col``); ≥3-D tensors are factored over their two
    largest dims; tensors below the threshold keep a full ``exp_avg_sq``. Plus ``step`` (0-d float64)
    and ``exp_avg`` when ``beta1`` is set.

    Args:
        params: parameters or param groups.
        lr: with ``relative_step`` the cap of the relative step, ρ_t = min(lr, 1/√t) (the paper's
            min(1e-2, 1/√t) at the default lr = 1e-2, as ``torch.optim.Adafactor``); without it the
            absolute ρ. Either way a number (or a 0-d tensor) that ``torch.optim.lr_scheduler``
            scales: a schedule on the cap acts once it falls below 1/√t (after step 10⁴ at 1e-2, or
            wherever it decays the cap below the relative step). Leaving ``lr`` unset (``None``)
            means 1e-2.
        relative_step: use the relative step min(lr, 1/√t) (``True``) or the absolute ρ = lr
            (``False``). Default ``None``: relative when ``lr`` is not given, absolute when it is (as
            danlu ≤ 0.1, where a float lr was the absolute ρ).
        eps: (ε1, ε2) = (1e-30, 1e-3): ε1 regularises G², ε2 floors the parameter scale.
        clip_threshold: d, the bound on RMS(Û) (default 1.0).
        decay_rate: c in β̂_t = 1 − t^(−c), 0 < c < 1 (default 0.8). β̂_1 = 0 and β̂_t → 1 for any c > 0;
            c = 1 makes V̂ the plain mean of every past g² and c > 1 would weight old gradients above
            recent ones, so c < 1 is required (Su's reading of the paper's condition; ``ValueError``
            otherwise).
        beta1: momentum on Û (default ``None``: no momentum, no first-moment memory).
        weight_decay: λ, decoupled, multiplied by ρ_t (not by α_t) (default 0).
        scale_parameter: multiply ρ_t by max(ε2, RMS(θ)) (default ``True``).
        min_dim_size_to_factor: factor only when both of the two largest dims reach it (default 128).
        fused: run the step as one ``torch.compile``-d single pass per bucket of tensors (same
            device, dtype and state dtypes; see ``danlu._core.fused``) instead of the per-tensor loop
            (default False). The first step compiles (seconds; cached in the optimizer); lr, beta1 and weight decay
            enter as 0-d tensors, so schedulers do not recompile. Same math as the loop, to rounding.
        state_dtype: store the momentum ``exp_avg`` (with ``beta1``) in this dtype instead of the
            parameter's (default None): bfloat16 halves their memory on float32 parameters (computed in
            float32, rounded stochastically on store with counter-based noise: unbiased, reproducible,
            identical across DDP replicas; on the per-tensor and the fused path);
            float32 keeps full-precision state for bfloat16 parameters.
        shard_statistics: under FSDP2, how the quantities that span the sharded dim 0 are computed:
            ``"exact"`` (default) over the whole parameter, with explicit all-reduces (the result equals
            one process); ``"local"`` over each rank's own rows, with no communication: the statistics
            reduced over dim 0 are then one per rank (saved as such: a checkpoint resumes on the same
            number of ranks only) and the trajectory depends on the number of ranks. No effect without
            sharding (one process, DDP).

    References:
        Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost",
        arXiv:1804.04235 (2018); Su Jianlin, kexue.fm/archives/7302 and bojone/adafactor; optax
        ``adafactor``; mesh-tf.

    Deviations:
        Follows the paper as Su, optax and mesh-tf implement it, which differs from
        ``torch.optim.Adafactor`` (its step is always relative and param-scaled, its ``lr`` the cap of
        ρ_t, as here with ``relative_step``; it factors the last two dims of any ≥2-D tensor; ε1 clamps
        V̂ instead of being added to G²) and from HF transformers (momentum on the scaled update, decay
        ×α_t). The defaults agree with torch on vectors and on matrices whose two dims are ≥ 128. The
        mesh-tf rule that scales the relative step by 0.05 when ``scale_parameter=False`` is not
        applied. Momentum is an EMA of Û before scaling (Su, bert4keras). Weight decay multiplies ρ_t.
        State is kept in the parameter's dtype.
    """

    # ``beta1`` may be switched on between steps (or by a scheduler): ``exp_avg`` then starts at 0.
    _optional_state = frozenset({"exp_avg"})

    def __init__(
        self,
        params: ParamsT,
        lr: float | None = None,
        relative_step: bool | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = 0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        min_dim_size_to_factor: int = 128,
        *,
        fused: bool = False,
        state_dtype: torch.dtype | None = None,
        shard_statistics: str = "exact",
    ) -> None:
        if relative_step is None:
            relative_step = lr is None
        defaults = dict(
            lr=1e-2 if lr is None else lr,
            relative_step=relative_step,
            eps=eps,
            clip_threshold=clip_threshold,
            decay_rate=decay_rate,
            beta1=beta1,
            weight_decay=weight_decay,
            scale_parameter=scale_parameter,
            min_dim_size_to_factor=min_dim_size_to_factor,
            fused=fused,
            state_dtype=state_dtype,
            shard_statistics=shard_statistics,
        )
        super().__init__(params, defaults)

    _step_scalars = ("lr", "beta1", "weight_decay")
    _low_precision_state = frozenset({"exp_avg"})

    def _validate_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        self._check_fused(group, params)
        self._check_state_dtype(group, params)
        check_shard_statistics(group)
        group["lr"] = check_lr(group["lr"])
        check_bool("relative_step", group["relative_step"])
        eps = group["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise TypeError(f"Invalid eps: {eps!r} (expected a pair (eps1, eps2))")
        group["eps"] = (check_number("eps[0]", eps[0], low=0.0), check_number("eps[1]", eps[1], low=0.0))
        check_number("clip_threshold", group["clip_threshold"], low=0.0, low_open=True)
        # 0 < c < 1 (Su, kexue.fm/archives/7302): c = 1 is the plain mean of all past g², equal weights;
        # c > 1 would weight old gradients above recent ones. c ≤ 0 never forgets (β̂ ≤ 0).
        check_number("decay_rate", group["decay_rate"], low=0.0, low_open=True, high=1.0, high_open=True)
        check_optional("beta1", group["beta1"], low=0.0, high=1.0, high_open=True)
        check_number("weight_decay", group["weight_decay"], low=0.0)
        check_bool("scale_parameter", group["scale_parameter"])
        check_number("min_dim_size_to_factor", group["min_dim_size_to_factor"], low=1, integer=True)

    def _init_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        state["step"] = new_step()
        dims = factored_dims(p.shape, group["min_dim_size_to_factor"])
        if dims is None:
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        else:
            d0, d1 = dims
            row_shape = list(p.shape)
            row_shape[d0] = 1
            col_shape = list(p.shape)
            col_shape[d1] = 1
            state["exp_avg_sq_row"] = p.new_zeros(row_shape)
            state["exp_avg_sq_col"] = p.new_zeros(col_shape)
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _reduces_across_rows(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        return True  # RMS(U) for the update clip spans the whole tensor (and the statistics, RMS(θ))

    def _state_placement(self, key: str, shape: torch.Size, group: dict[str, Any]) -> str:
        dims = factored_dims(shape, group["min_dim_size_to_factor"])
        if dims is not None and key in ("exp_avg_sq_row", "exp_avg_sq_col"):
            reduced = dims[0] if key == "exp_avg_sq_row" else dims[1]
            return "replicate" if reduced == 0 else "shard"
        return "shard"

    def _migrate(self, state_dict: Any) -> Any:
        """danlu ≤ 0.1 had no ``relative_step``: ``lr=None`` meant the relative step min(1e-2, 1/√t)
        and a float lr the absolute ρ."""
        state_dict = super()._migrate(state_dict)
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list) or all(not isinstance(g, dict) or "relative_step" in g for g in groups):
            return state_dict
        converted = []
        for g in groups:
            if isinstance(g, dict) and "relative_step" not in g and "lr" in g:
                g = {**g, "relative_step": g["lr"] is None, "lr": 1e-2 if g["lr"] is None else g["lr"]}
            converted.append(g)
        return {**state_dict, "param_groups": converted}

    def _derive(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
        return adafactor_scalars(state["step"], lr=group["lr"], relative_step=group["relative_step"],
                                 decay_rate=group["decay_rate"])

    def _update(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                derived: dict[str, Any] | None = None) -> None:
        eps1, eps2 = group["eps"]
        if group["beta1"] is not None and "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)  # switched on mid-run
        adafactor_update(
            p,
            grad,
            state,
            lr=group["lr"],
            relative_step=group["relative_step"],
            eps1=eps1,
            eps2=eps2,
            clip_threshold=group["clip_threshold"],
            decay_rate=group["decay_rate"],
            beta1=group["beta1"],
            weight_decay=group["weight_decay"],
            scale_parameter=group["scale_parameter"],
            dims=factored_dims(global_shape(p), group["min_dim_size_to_factor"]),
            scalars=derived,
        )
