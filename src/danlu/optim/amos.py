"""Amos: adaptive weight decay toward a model-oriented target scale, with factored state."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from .._core.distributed import check_shard_statistics, global_shape, mean_over
from .._core.modules import classify_parameters
from .._core.numerics import add_scaled_, propagate_nonfinite_, scalar_sqrt
from .._core.optimizer import DanluOptimizer, ParamsT, new_step
from .._core.validate import check_lr, check_number, check_optional

__all__ = ["Amos", "amos_update", "amos_scalars", "amos_groups", "amos_layout"]


def amos_layout(p: torch.Tensor, eta: float | None, reduce_dims: Sequence[int] | None) -> tuple[float, tuple[int, ...]]:
    """Resolve a parameter's target scale η̃ and the (non-negative, sorted) dims its v is averaged over.

    Inferred from the shape when not given: ≥2-D tensors average over every dim but 0 (one v per
    output unit / row) with η̃ = √(1/fan_in), fan_in = numel/shape[0]; 1-D tensors one scalar and η̃ = 0.5;
    0-d tensors are their own scalar, η̃ = 0.5.
    """
    shape = global_shape(p)  # an FSDP2 shard's parameter's (danlu._core.distributed)
    nd, numel = len(shape), math.prod(shape)
    if reduce_dims is None:
        dims = tuple(range(1, nd)) if nd >= 2 else tuple(range(nd))
    else:
        dims = tuple(sorted(d % nd for d in reduce_dims)) if nd else ()
    if eta is None:
        eta = math.sqrt(shape[0] / max(numel, 1)) if nd >= 2 and numel else 0.5
    return float(eta), dims


def amos_scalars(step: torch.Tensor, *, lr: float | torch.Tensor, eta: float, beta: float, c_coef: float,
                 d_coef: float) -> dict[str, Any]:
    """Increment the 0-d counter ``step`` and return this step's scalars: the bias correction 1 − β^t
    (0-d float64), ξ², c·√ξ, d·√(ξη̃) and the initial lr ξη̃ (numbers, or 0-d tensors for a tensor ξ)."""
    step.add_(1)
    xi = lr
    init_lr = xi * eta
    return {"bias_correction": 1.0 - torch.pow(beta, step.to(torch.float64)), "xi_sq": xi * xi,
            "c_sqrt_xi": c_coef * scalar_sqrt(xi), "d_sqrt_init_lr": d_coef * scalar_sqrt(init_lr),
            "init_lr": init_lr}


def amos_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, torch.Tensor],
    *,
    lr: float | torch.Tensor,
    eta: float,
    reduce_dims: tuple[int, ...],
    beta: float,
    momentum: float | None,
    clip_value: float | None,
    c_coef: float,
    d_coef: float,
    extra_l2: float,
    eps: float,
    scalars: dict[str, Any] | None = None,
) -> None:
    """One Amos step for one tensor, in place (google-research/jestimator semantics). The 0-d counter
    ``state["step"]`` is incremented here, unless this step's ``scalars`` (:func:`amos_scalars`) are given.

    ĝ² = mean of g² over ``reduce_dims``;  v ← β·v + (1−β)·ĝ²;  r = (1−β^t)/max(v, ε);
    γ = ξ²·r·ĝ² / √(1 + c·√ξ·b);  Δ = −(ξη̃·√r·g + (γ/2 + l2)·θ) / (1 + d·√(ξη̃)·b);
    b ← b + γ·(1 + b);  [m ← μ·m + (1−μ)·Δ; Δ = m];  θ ← θ + Δ
    """
    v, b = state["v"], state["b"]
    if scalars is None:
        scalars = amos_scalars(state["step"], lr=lr, eta=eta, beta=beta, c_coef=c_coef, d_coef=d_coef)
    if clip_value is not None:
        # clamp maps ±inf to ±clip_value; keep a non-finite gradient visible (NaN) instead.
        grad = propagate_nonfinite_(grad.clamp(-clip_value, clip_value), grad)
    g2 = grad.square()
    if reduce_dims:
        g2 = mean_over(g2, reduce_dims, keepdim=True)  # over the whole parameter for an FSDP2 shard
    v.mul_(beta).add_(g2, alpha=1.0 - beta)
    # ε = 2^-125 is below float16's range; floor it at the dtype's smallest normal.
    r = scalars["bias_correction"] / v.clamp(min=max(eps, torch.finfo(v.dtype).tiny))
    gamma = r.mul(g2).mul_(scalars["xi_sq"]).div_(b.mul(scalars["c_sqrt_xi"]).add_(1.0).sqrt_())
    dfac = b.mul(scalars["d_sqrt_init_lr"]).add_(1.0).reciprocal_()
    delta = torch.mul(grad, r.sqrt_().mul_(scalars["init_lr"]))
    delta.addcmul_(param, gamma.mul(0.5).add_(extra_l2)).mul_(dfac).neg_()
    b.add_(gamma * (1.0 + b))
    if momentum is not None:
        exp_avg = state["exp_avg"]
        add_scaled_(exp_avg.mul_(momentum), delta, 1.0 - momentum)
        delta = exp_avg
    param.add_(delta)


class Amos(DanluOptimizer):
    r"""Amos: Adam-like scaling, adaptive weight decay toward a target scale η̃, and derived lr decay.

    For a parameter θ with target scale η̃ (param-group key ``eta``) and second-moment shape S (the
    dims in ``reduce_dims`` averaged out), at step t ≥ 1 with v_0 = b_0 = 0::

        ĝ²_t = mean_{reduce_dims}(g_t²)                    # shape S
        v_t  = β·v_{t−1} + (1 − β)·ĝ²_t
        r_t  = (1 − β^t) / max(v_t, ε)                      # 1/v̂_t
        γ_t  = ξ²·r_t·ĝ²_t / √(1 + c·√ξ·b_{t−1})            # weight-decay rate, ≈ ξ² per step
        Δθ_t = −(ξ·η̃·√r_t·g_t + (γ_t/2 + ℓ2)·θ_{t−1}) / (1 + d·√(ξ·η̃)·b_{t−1})
        b_t  = b_{t−1} + γ_t·(1 + b_{t−1})                  # 1 + b_t = Π(1 + γ_i)
        [m_t = μ·m_{t−1} + (1 − μ)·Δθ_t;  Δθ_t = m_t]        # optional momentum
        θ_t  = θ_{t−1} + Δθ_t

    ξ·η̃ is the initial per-coordinate step, so the lr is relative to the parameter's scale; the
    decay γ/2 pulls RMS(θ) toward η̃, and the accumulated decay b shrinks both the step (1/(1+d·…b))
    and the decay rate (1/√(1+c·…b)) on its own, with no external schedule. At step 1 with v averaged
    over the whole tensor, γ_1 = ξ², b_1 = ξ² and the gradient part of Δθ is ξ·η̃·g/RMS(g).

    State: ``step`` (0-d float32), ``v`` and ``b`` of shape S (e.g. one number per output unit of a
    Linear weight), ``exp_avg`` (full shape) only when ``momentum`` is set. ``momentum`` may be
    switched on between steps, by hand or by a scheduler: ``exp_avg`` then starts at 0. Note that
    ``OneCycleLR`` and ``CyclicLR`` with ``cycle_momentum=True`` (their default) do exactly that, as
    they do to ``torch.optim.SGD(momentum=0)``: they write a cycled ``momentum`` into every group, from
    the step they are attached on. Pass ``cycle_momentum=False`` to keep Amos without momentum.

    Args:
        params: parameters or param groups. Groups may set ``eta`` (η̃ > 0) and ``reduce_dims`` (a
            tuple of dims of every tensor in the group; ``()`` keeps v elementwise). When a group gives
            neither, they are inferred per tensor: ≥2-D tensors average over every dim but 0 with
            η̃ = √(1/fan_in), fan_in = numel/shape[0]; 1-D tensors keep one scalar with η̃ = 0.5.
            :func:`danlu.amos_groups` builds groups from a model's modules.
        lr: ξ, the global learning rate (default 1e-2, i.e. 1/√N for N = 10⁴); the paper recommends
            ≈ 1/√N for N independent batches (e.g. 1/√(60000/32) on MNIST).
        beta: β for v (default 0.999; 1 − β of the order of ξ).
        momentum: μ, an EMA of the update applied after Amos (default ``None``; BERT used 0.9).
        clip_value: elementwise gradient clipping applied first (default ``None``).
        c_coef: c, decay of the weight-decay rate (default 0.25).
        d_coef: d, decay of the learning rate (default 0.25).
        extra_l2: ℓ2, extra L2 regularisation (default 0).
        eps: ε, floor of v (default 2^−125).
        fused: run the step as one ``torch.compile``-d single pass per bucket of tensors (same
            device, dtype and state dtypes; see ``danlu._core.fused``) instead of the per-tensor loop
            (default False). The first step compiles (seconds; cached in the optimizer); lr and momentum
            enter as 0-d tensors, so schedulers do not recompile. Same math as the loop, to rounding.
        shard_statistics: as in :class:`danlu.Adafactor` (default ``"exact"``); here it concerns the
            means of g² over dim 0, i.e. tensors whose ``reduce_dims`` include it (by default the 1-D
            ones: biases, norm gains), whose ``v`` and ``b`` are then one per rank with ``"local"``.

    References:
        Tian & Parikh, "Amos: An Adam-style Optimizer with Adaptive Weight Decay towards
        Model-Oriented Scale", arXiv:2210.11693 (2022); google-research/jestimator ``amos.py``;
        Su Jianlin, kexue.fm/archives/9344.

    Deviations:
        None from jestimator's update. Its ``eta_fn``/``shape_fn`` become the per-group ``eta`` and
        ``reduce_dims``; the model helper uses PyTorch layouts (Linear weight (out, in) → one v per
        output unit). Unlike pytorch_optimizer's Amos, v may be factored over any dims, ε is a floor
        (max) rather than an addend, and ``extra_l2`` enters as −(γ/2 + ℓ2)·θ. For 16-bit parameters
        ε is floored at the dtype's smallest normal number.
    """

    _optional_state = frozenset({"exp_avg"})

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        beta: float = 0.999,
        momentum: float | None = None,
        clip_value: float | None = None,
        c_coef: float = 0.25,
        d_coef: float = 0.25,
        extra_l2: float = 0.0,
        eps: float = 2.0**-125,
        *,
        fused: bool = False,
        shard_statistics: str = "exact",
    ) -> None:
        defaults = dict(
            lr=lr,
            beta=beta,
            momentum=momentum,
            clip_value=clip_value,
            c_coef=c_coef,
            d_coef=d_coef,
            extra_l2=extra_l2,
            eps=eps,
            eta=None,
            reduce_dims=None,
            fused=fused,
            shard_statistics=shard_statistics,
        )
        super().__init__(params, defaults)

    _step_scalars = ("lr", "momentum")

    def _validate_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        self._check_fused(group, params)
        check_shard_statistics(group)
        group["lr"] = check_lr(group["lr"])
        check_number("beta", group["beta"], low=0.0, high=1.0, high_open=True)
        check_optional("momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
        check_optional("clip_value", group["clip_value"], low=0.0, low_open=True)
        check_number("c_coef", group["c_coef"], low=0.0)
        check_number("d_coef", group["d_coef"], low=0.0)
        check_number("extra_l2", group["extra_l2"], low=0.0)
        check_number("eps", group["eps"], low=0.0)
        check_optional("eta", group.get("eta"), low=0.0, low_open=True)
        dims = group.get("reduce_dims")
        if dims is None:
            return
        if isinstance(dims, int) or not isinstance(dims, (tuple, list)) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in dims
        ):
            raise TypeError(f"Invalid reduce_dims: {dims!r} (expected a tuple of ints)")
        group["reduce_dims"] = tuple(dims)
        for p in params:
            for d in dims:
                if not -p.dim() <= d < p.dim() or (p.dim() == 0):
                    raise ValueError(
                        f"Invalid reduce_dims: {tuple(dims)!r} (dim {d} does not exist in a parameter of shape "
                        f"{tuple(p.shape)})"
                    )
            if len({d % p.dim() for d in dims}) != len(dims):
                raise ValueError(f"Invalid reduce_dims: {tuple(dims)!r} (repeated dim)")

    def _init_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        _, dims = amos_layout(p, group.get("eta"), group.get("reduce_dims"))
        shape = [1 if i in dims else n for i, n in enumerate(p.shape)]
        state["step"] = new_step()
        state["v"] = p.new_zeros(shape)
        state["b"] = p.new_zeros(shape)
        if group["momentum"] is not None:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _reduces_across_rows(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        return 0 in amos_layout(p, group.get("eta"), group.get("reduce_dims"))[1]

    def _state_placement(self, key: str, shape: torch.Size, group: dict[str, Any]) -> str:
        if key in ("v", "b") and len(shape):
            dims = tuple(range(1, len(shape))) if len(shape) >= 2 else (0,)
            if group.get("reduce_dims") is not None:
                dims = tuple(d % len(shape) for d in group["reduce_dims"])
            return "replicate" if 0 in dims else "shard"
        return "shard"

    def _derive_batch_key(self, p: torch.Tensor, group: dict[str, Any]) -> Any:
        return amos_layout(p, group.get("eta"), group.get("reduce_dims"))[0]  # η̃ (from the fan-in)

    def _derive(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
        eta, _ = amos_layout(p, group.get("eta"), group.get("reduce_dims"))
        return amos_scalars(state["step"], lr=group["lr"], eta=eta, beta=group["beta"], c_coef=group["c_coef"],
                            d_coef=group["d_coef"])

    def _update(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                derived: dict[str, Any] | None = None) -> None:
        eta, dims = amos_layout(p, group.get("eta"), group.get("reduce_dims"))
        if group["momentum"] is not None and "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)  # switched on mid-run
        amos_update(
            p,
            grad,
            state,
            lr=group["lr"],
            eta=eta,
            reduce_dims=dims,
            beta=group["beta"],
            momentum=group["momentum"],
            clip_value=group["clip_value"],
            c_coef=group["c_coef"],
            d_coef=group["d_coef"],
            extra_l2=group["extra_l2"],
            eps=group["eps"],
            scalars=derived,
        )


def amos_groups(model: nn.Module, **group_options: Any) -> list[dict[str, Any]]:
    """Param groups for :class:`Amos` with η̃ and the second-moment layout read off the model's modules.

    ============================  ==========================  =====================================
    tensor                        η̃ (``eta``)                 v, b shape (``reduce_dims``)
    ============================  ==========================  =====================================
    Linear / Conv / other ≥2-D    √(1/fan_in)                 one per output unit (dims 1..n−1)
    Embedding weight (V, d)       √(1/d)                      one per row (dim 1 averaged)
    bias (any module)             0.5                         one scalar
    norm gain (LayerNorm, …)      1.0                         one scalar
    other 1-D / 0-d               0.5                         one scalar
    ============================  ==========================  =====================================

    fan_in = numel/shape[0] (``in_features`` for Linear, in·kh·kw for Conv). Tensors that share η̃
    and layout share a group; ``group_options`` (e.g. ``momentum=0.9``) are added to every group.
    Parameters with ``requires_grad=False`` are left out; shared parameters appear once.
    """
    groups: dict[tuple[float, tuple[int, ...] | None], list[torch.Tensor]] = {}
    for _, p, kind in classify_parameters(model):
        if kind == "norm_gain":
            key = (1.0, tuple(range(p.dim())))
        elif kind in ("bias", "other") and p.dim() < 2:
            key = (0.5, tuple(range(p.dim())))
        else:
            key = amos_layout(p, None, None)
        groups.setdefault(key, []).append(p)
    return [dict(params=ps, eta=eta, reduce_dims=dims, **group_options) for (eta, dims), ps in groups.items()]
