"""Su's Amos-derived lr rule in its general form: any optimizer's update, normalised and scaled per tensor."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, cast

import torch
from torch import nn

from .._core.distributed import layout_of, sum_partials
from .._core.modules import classify_parameters
from .._core.numerics import acc_dtype
from .._core.optimizer import DanluOptimizer
from .._core.validate import check_number
from .._core.wrapper import OptimizerWrapper

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["ScaleAwareStep"]


def _init_distance(name: str, p: torch.Tensor, kind: str, sigma: float | None, bias_sigma: float,
                   norm_sigma: float) -> float:
    """‖ε0‖ = √k·σ of parameter ``p`` (σ given, or by the rule of :func:`danlu.scale_aware_groups`), read
    off the whole parameter (an FSDP2 DTensor is gathered)."""
    from ..recipes import _init_scale  # noqa: PLC0415 (recipes imports nothing of the wrappers)

    full = cast("DTensor", p).full_tensor() if layout_of(p) is not None else p
    if sigma is None:
        sigma = _init_scale(name, full, kind, bias_sigma, norm_sigma)
    sigma = check_number(f"sigma of {name}", sigma, low=0.0, low_open=True)
    return math.sqrt(max(full.numel(), 1)) * sigma


class ScaleAwareStep(OptimizerWrapper):
    r"""Step each tensor by α_t·‖ε0‖ along its optimizer's update direction, with weight decay ρ_t.

    Su's "alchemy strategies" derived from Amos (kexue.fm/archives/9344) write an optimizer's step as
    θ_{t+1} = θ_t − (α_t·u_t + ρ_t·θ_t), ask that the decay be one order higher than the update
    (ρ_t = O(α_t²)) and that the step of a tensor be proportional to the scale ‖ε0‖ = ‖θ0 − θ*‖ ≈ √k·σ
    it must travel (k entries, init scale σ). That gives, per tensor::

        α_t = α0·‖ε0‖ / ‖u_t‖ · f(t),       ρ_t = α0²/(2q) · f(t)

    i.e. the tensor moves by α0·√k·σ·f(t) (a relative change α0·f(t) of its scale) in the direction
    of u_t, whatever the optimizer that proposed u_t. This wrapper applies that rule to any torch
    optimizer: the inner optimizer steps, its update Δ = θ' − θ is measured per tensor, and θ is set to::

        θ_{t+1} = θ_t + α_t^group·√k·σ · Δ/‖Δ‖ − (α0·α_t^group/(2q))·θ_t

    where α_t^group is the param group's ``lr`` (set it to α0, ≈ 1e-3, up to 1e-2 on easy tasks; an lr
    scheduler's factor is f(t): :func:`danlu.scale_aware_lr_lambda` gives Su's inverse-time and
    inverse-square decays) and α0 is that lr when the group was first seen. The inner lr cancels in
    Δ/‖Δ‖ (for optimizers whose step is lr × a direction: SGD, SGDM, AdamW, AdaX, Lion, Tiger), so its
    value only sets α_t. The inner optimizer's own weight decay must be 0 (the decay is ρ_t here).

    **Relation to** :func:`danlu.scale_aware_groups`. For a sign update (Lion, Tiger) with no zero
    entry, ‖u_t‖ = √k, so α_t = α0·σ·f(t) and ρ_t = α_t·λ with λ = α0/(2qσ): exactly the static lr and
    weight decay that :func:`~danlu.scale_aware_groups` sets, which is therefore this rule's special
    case for updates of unit RMS. For AdamW, SGDM or AdaX, whose update RMS drifts during training, only
    this wrapper keeps the step at α0·√k·σ·f(t).

    σ, per tensor, is read off the parameters when the wrapper is built, with the rule of
    :func:`~danlu.scale_aware_groups`: a matrix's or embedding's standard deviation (a zero matrix:
    √(1/fan_in)), ``bias_sigma`` (0.5) for biases and constant vectors, ``norm_sigma`` (0.5) for norm
    gains (with ``model``, which also tells biases and norm gains apart by their module), or
    ``sigma_fn(name, param)`` where it returns a number (at construction; a group added later takes the
    rule with ``bias_sigma`` and ``norm_sigma``, its tensors' roles unknown). Build the wrapper before
    training: the scale ‖ε0‖ = √k·σ of every tensor is kept in the state (``sas_scale``) from its first
    step on, so a resumed run keeps its initial scales.

    Args:
        optimizer: the inner optimizer (any ``torch.optim.Optimizer`` with weight decay 0).
        q: Su's q ≈ 1 (default): θ_t·ε_t ≈ q‖ε_t‖².
        model: the module whose parameters the inner optimizer holds (optional; names and roles for σ).
        bias_sigma, norm_sigma, sigma_fn: as in :func:`danlu.scale_aware_groups`.
        decay: apply ρ_t (default True).

    Cost: one copy of the stepped parameters during the step, two reductions per tensor (under FSDP2
    one all-reduce per step for all of them); no persistent memory beyond one scalar per tensor.

    References:
        Su Jianlin, kexue.fm/archives/9344 (the rule), /9473 (its use for Lion); Tian & Parikh, "Amos",
        arXiv:2210.11693. Replacing ‖ε0‖ by ‖θ_t‖ gives LAMB's trust ratio, which Su notes fails for
        tensors not centred at 0 (norm gains).
    """

    _hyper_keys = ("q", "decay")
    _prefix = "sas_"
    _entry = "danlu_scale_aware_step"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        q: float = 1.0,
        *,
        model: nn.Module | None = None,
        bias_sigma: float = 0.5,
        norm_sigma: float = 0.5,
        sigma_fn: Callable[[str, torch.Tensor], float | None] | None = None,
        decay: bool = True,
    ) -> None:
        super().__init__(optimizer)
        self.q = check_number("q", q, low=0.0, low_open=True)
        self._bias_sigma = check_number("bias_sigma", bias_sigma, low=0.0, low_open=True)
        self._norm_sigma = check_number("norm_sigma", norm_sigma, low=0.0, low_open=True)
        if not isinstance(decay, bool):
            raise TypeError(f"Invalid decay: {decay!r} (expected a bool)")
        self.decay = decay
        for i, group in enumerate(self.param_groups):
            self._check_group(i, group)
        roles: dict[int, tuple[str, str]] = {}
        if model is not None:
            if not isinstance(model, nn.Module):
                raise TypeError(f"Invalid model: {type(model).__name__} (expected an nn.Module or None)")
            roles = {id(p): (name, kind) for name, p, kind in classify_parameters(model)}
        scales: list[list[float]] = []  # by position (group, index): survives deepcopy and pickling
        for gi, group in enumerate(self.param_groups):
            scales.append([])
            for j, p in enumerate(group["params"]):
                name, kind = roles.get(id(p), (f"param_groups[{gi}][{j}]", "other"))
                sigma = sigma_fn(name, p) if sigma_fn is not None else None
                scales[gi].append(_init_distance(name, p, kind, sigma, bias_sigma, norm_sigma))
        self._scales = scales
        for group in self.param_groups:
            group.setdefault("sas_alpha0", float(group["lr"]))

    def _check_group(self, i: int, group: dict[str, Any], stepping: bool = False) -> None:
        lr = group.get("lr")
        if isinstance(lr, torch.Tensor):
            lr = float(lr)
        # α0 (the lr when the group is first seen) must be > 0; a scheduler may take the lr to 0 later.
        check_number(f"lr of param group {i}", lr, low=0.0, low_open=not stepping)
        wd = group.get("weight_decay", 0.0)
        if isinstance(wd, torch.Tensor):
            wd = float(wd)
        if wd:
            raise ValueError(f"Invalid weight_decay of param group {i}: {wd!r} (expected 0: ScaleAwareStep applies "
                             "the decay ρ_t = α0·lr/(2q) itself; build the inner optimizer with weight_decay=0)")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(len(self.param_groups) - 1, group)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        group.setdefault("sas_alpha0", float(group["lr"]))
        gi = len(self.param_groups) - 1
        self._scales.append([_init_distance(f"param_groups[{gi}][{j}]", p, "other", None, self._bias_sigma,
                                            self._norm_sigma) for j, p in enumerate(group["params"])])

    def _scale_of(self, p: torch.Tensor, gi: int, j: int) -> torch.Tensor:
        state = self.state[p]
        if "sas_scale" not in state:
            if gi >= len(self._scales) or j >= len(self._scales[gi]):
                raise RuntimeError("ScaleAwareStep: a parameter without a recorded init scale (added to the inner "
                                   "optimizer behind the wrapper's back); add param groups through the wrapper")
            local = cast("DTensor", p).to_local() if layout_of(p) is not None else p
            state["sas_scale"] = torch.tensor(self._scales[gi][j], dtype=acc_dtype(local), device=local.device)
        return state["sas_scale"]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run the closure (if given), step the inner optimizer, rescale each tensor's update and decay."""
        loss = DanluOptimizer._run_closure(closure)
        work = []
        for gi, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ScaleAwareStep does not support sparse gradients")
                if p.grad.is_complex():
                    raise TypeError("ScaleAwareStep does not support complex gradients")
                shard = layout_of(p)
                work.append((p, group, shard, p if shard is None else shard.local, gi, j))
        for i, group in enumerate(self.param_groups):
            self._check_group(i, group, stepping=True)
        old = [w[3].detach().clone() for w in work]
        self.optimizer.step()
        for p, _, _, _, gi, j in work:  # the scales enter the state with the inner's first state (also on
            self._scale_of(p, gi, j)    # torch.distributed.checkpoint's init step, so that DCP loads them)
        if not getattr(self.optimizer, "is_update_step", True):
            return loss  # accumulation inside the momentum, mid-window: θ did not move
        bases = [p0.to(acc_dtype(p0)) for p0 in old]
        deltas = [w[3].detach().to(base.dtype) - base for w, base in zip(work, bases)]
        parts = [[d.square().sum()] for d in deltas]
        if any(w[2] is not None for w in work):
            parts = sum_partials(parts, [w[2] for w in work])
        for (p, group, _, loc, gi, j), base, delta, (ss,) in zip(work, bases, deltas, parts):
            lr = float(group["lr"])
            alpha0 = float(group.setdefault("sas_alpha0", lr))
            dt = base.dtype
            norm = ss.to(torch.float64).sqrt()
            scale = self._scale_of(p, gi, j).to(norm.device)
            # Δ = 0 → no step; a non-finite Δ stays non-finite (the failure shows in θ).
            factor = torch.where(norm == 0, torch.zeros_like(norm), lr * scale / norm).to(dt)
            new = base + delta * factor
            if self.decay:
                new = new - base * (alpha0 * lr / (2.0 * self.q))
            loc.copy_(new)
        return loss

    def _check_own(self, entry: dict[str, Any] | None, own_state: dict[int, dict[str, Any]],
                   own_groups: dict[int, dict[str, Any]], with_state: dict[int, dict[str, Any]]) -> None:
        me = type(self).__name__
        lacking = sorted(i for i in with_state if "scale" not in own_state.get(i, {}))
        if lacking:
            raise ValueError(f"{me}.load_state_dict: parameters {lacking} have optimizer state but no sas_scale: the "
                             f"state dict was saved without {me} (its init scales cannot be read off trained weights)")
        for i, st in own_state.items():
            v = st.get("scale")
            if v is not None and not (isinstance(v, torch.Tensor) and v.numel() == 1 and bool(v > 0)):
                raise ValueError(f"{me}.load_state_dict: sas_scale of parameter {i} is {v!r} (expected a positive "
                                 "0-d tensor)")
        for gi, g in own_groups.items():
            a = g.get("alpha0")
            if a is not None:
                check_number(f"{me}.load_state_dict: sas_alpha0 of param group {gi}", a, low=0.0, low_open=True)
        if entry is not None:
            hyper = entry.get("hyper", {})
            if "q" in hyper:
                check_number("q", hyper["q"], low=0.0, low_open=True)
            if "decay" in hyper and not isinstance(hyper["decay"], bool):
                raise ValueError(f"{me}.load_state_dict: decay is {hyper['decay']!r} (expected a bool)")
