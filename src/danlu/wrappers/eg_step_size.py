"""Step sizes learned by exponentiated gradient, for any torch optimizer (Su's rule and the paper's form)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence, cast

import torch

from .._core.distributed import layout_of, local_state, sum_partials
from .._core.numerics import acc_dtype, propagate_nonfinite_
from .._core.optimizer import DanluOptimizer
from .._core.validate import check_choice, check_number, check_optional
from .._core.wrapper import OptimizerWrapper

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["EGStepSize"]

_FORMS = ("su", "paper")
_GRANULARITIES = ("coordinate", "tensor", "group")
_NORMALIZE = (None, "cosine")


def _check_bounds(lo_name: str, lo: Any, hi_name: str, hi: Any) -> tuple[float, float]:
    return (
        check_number(lo_name, lo, low=0.0, low_open=True, high=1.0),
        check_number(hi_name, hi, low=1.0),
    )


def _resolve(cfg: dict[str, Any]) -> dict[str, Any]:
    """Validate a full configuration and fill the form-dependent defaults (β, γ_s)."""
    out = dict(cfg)
    out["meta_lr"] = check_number("meta_lr", cfg["meta_lr"], low=0.0)
    out["form"] = form = check_choice("form", cfg["form"], _FORMS)
    out["granularity"] = check_choice("granularity", cfg["granularity"], _GRANULARITIES)
    out["normalize"] = check_choice("normalize", cfg["normalize"], _NORMALIZE)
    out["max_exponent"] = check_number("max_exponent", cfg["max_exponent"], low=0.0, low_open=True)
    out["nu_min"], out["nu_max"] = _check_bounds("nu_min", cfg["nu_min"], "nu_max", cfg["nu_max"])
    out["scale_min"], out["scale_max"] = _check_bounds("scale_min", cfg["scale_min"], "scale_max", cfg["scale_max"])
    beta = check_optional("beta", cfg["beta"], low=0.0, high=1.0, high_open=True)
    gamma_s = check_optional("scale_meta_lr", cfg["scale_meta_lr"], low=0.0)
    if form == "su":
        # Su's rule has neither an EMA nor a global scale; the resolved zeros are what a saved
        # configuration of form 'su' holds.
        if beta not in (None, 0.0):
            raise ValueError(
                f"Invalid beta: {cfg['beta']!r} (expected None with form='su', which uses the previous "
                "gradient; form='paper' uses an EMA of gradients)"
            )
        if gamma_s not in (None, 0.0):
            raise ValueError(
                f"Invalid scale_meta_lr: {cfg['scale_meta_lr']!r} (expected None with form='su', which has "
                "no global scale; use form='paper')"
            )
        beta, gamma_s = 0.0, 0.0
    else:
        beta = 0.9 if beta is None else beta
        gamma_s = out["meta_lr"] if gamma_s is None else gamma_s
    out["beta"], out["scale_meta_lr"] = beta, gamma_s
    return out


class EGStepSize(OptimizerWrapper):
    r"""Learn the step sizes of any torch optimizer multiplicatively, by exponentiated gradient.

    The inner optimizer (``torch.optim.SGD``, ``AdamW``, :class:`danlu.Lion`, ...) proposes its update
    u_t; the wrapper applies a learned multiple of it::

        θ_t = θ_{t−1} + S_t ⊙ u_t,      S_t = s_t · ν_t

    where ν (one factor per coordinate, per tensor or per param group: ``granularity``) and, in the
    paper's form, a global scale s (one per param group) are learned by EGU on the loss.

    **Su's rule** (``form="su"``, default). With an SGD inner optimizer, θ_{t+1} = θ_t − η ν_{t+1}⊙g_t
    and, since θ_t = θ_{t−1} − η ν_t⊙g_{t−1}, the hypergradient is exactly ∂L(θ_t)/∂ν_t =
    −η g_{t−1}⊙g_t. EGU on ν with γη merged into γ (``meta_lr``) gives, with ν_1 = 1 and g_0 = 0::

        ν_{t+1} = ν_t ⊙ exp(γ·g_{t−1}⊙g_t)          ⇒   ν_{T+1} = exp(γ·Σ_{k≤T} g_{k−1}⊙g_k)

    Coordinates whose successive gradients agree in sign get a larger step, sign flips shrink it (a
    different principle from Adam's, which enlarges steps where gradients are persistently small).
    At ``tensor``/``group`` granularity the product g_{t−1}⊙g_t is summed over the tensor/group.

    **Paper form** (``form="paper"``; Amid, Anil, Fifty & Warmuth): per-unit gains ν (the paper's p) and
    a global scale s (one per param group), both moved by EGU::

        ν_t = ν_{t−1} ⊙ exp(γ·m_{t−1}⊙g_t),          m_t = β·m_{t−1} + (1 − β)·g_t
        s_t = s_{t−1} · exp(−γ_s·⟨g_t, d_{t−1}⟩),    d_t = ν_t⊙u_t   (so θ_t − θ_{t−1} = s_t·d_t)

    −⟨g_t, d_{t−1}⟩ is the exact one-step hypergradient −∂L(θ_{t−1})/∂s_{t−1} for any inner optimizer;
    the averaged gradient m_{t−1} stands in for g_{t−1} in the gains. With ``torch.optim.SGD(lr=η,
    momentum=μ)`` (no dampening) inside, −d_{t−1} = η·ν_{t−1}⊙b_{t−1} is the momentum buffer b, so the
    scale follows the alignment of the momentum with the current gradient, as in the paper's SGDM form::

        p_t = p_{t−1}⊙exp(γ_p·m_{t−1}⊙g_t),   s_t = s_{t−1}·exp(γ_s·⟨h_{t−1}, g_t⟩),
        h_t = μ·h_{t−1} + η·p_t⊙g_t,           θ_t = θ_{t−1} − s_t·h_t

    The two are equal (to float rounding) when μ = 0 or when the gains are frozen (``meta_lr=0`` with
    ``scale_meta_lr`` set); otherwise they differ in where the gains sit (Deviations). With an inner
    optimizer without momentum, d_{t−1} is just the previous step (plain SGD: −η·ν⊙g_{t−1}), not an
    average, and s follows the alignment of successive gradients (a multiplicative hypergradient
    descent, Baydin et al.); with Adam or Lion it is their preconditioned step, decoupled weight decay
    included. The two hypergradients have different natural scales (H of s sums over the group and
    carries the lr; H of ν is per coordinate), so the default γ_s = γ rarely suits both: at a γ that
    moves s, raw per-coordinate gains of a small MLP hardly move.

    Sources: the paper's full text (its algorithm box, experiments, any normalisation or bounds) was not
    available when this was written. The form above was checked against its abstract (a global scale
    following the alignment of the average and the current gradient, gains updated similarly, both by
    EG), Su's essay (which derives the simplified per-coordinate rule and calls the paper's form more
    elaborate but the same idea) and a secondary summary of the paper's SGDM form (the equations above).

    Every exponent is clamped, exp(clamp(γH, ±κ)), and the factors are clipped to their bounds:
    ν ∈ [nu_min, nu_max], s ∈ [scale_min, scale_max]. ``normalize="cosine"`` replaces H by
    H/(‖g‖·‖a‖) over the same unit (a = g_{t−1}, m_{t−1} or d_{t−1}): at coordinate granularity that is
    the sign agreement of the two, making γ independent of the gradient scale (the raw H scales like
    |g|², so γ must be tuned to it — spec §1.1's scale caveat).

    **Mechanism** (works for any inner optimizer, no extra forward/backward): θ_old = θ (a copy);
    ``inner.step()``; u = θ − θ_old; θ ← θ + (S − 1)⊙u. With ``meta_lr=0`` (and ``scale_meta_lr``
    left at its default) S stays exactly 1, so (S − 1)⊙u is exactly 0 and every step is *bitwise* the
    inner optimizer's step.

    Each step: the closure (if given) runs first; gradients g_t are taken from ``.grad``; the inner
    optimizer steps; the factors are updated from g_t and the stored direction; the update is
    rescaled; the direction is stored. Only parameters with a gradient are rescaled and have state.

    Cost per step: one transient copy of the parameters that have a gradient (θ_old). State: Su,
    coordinate: ``prev_grad`` and ``nu`` (2× the parameters); tensor/group: ``prev_grad`` and
    scalars. Paper, coordinate: ``exp_avg``, ``nu``, ``prev_dir`` (3×); tensor/group: ``exp_avg``,
    ``prev_dir`` and scalars. ``nu`` and the per-group scalars are kept in float32 for 16-bit
    parameters. Each is stored with the prefix ``egs_`` (``egs_nu``, ...): per parameter in the inner
    optimizer's state, per group (``egs_nu``, ``egs_scale``, 0-d) in the shared param group. About 5
    elementwise passes over the parameters beyond the inner step. Exactness: the closed form above
    holds to float rounding while no clamp or bound is active; with ``meta_lr=0`` the wrapper is
    bitwise its inner optimizer.

    Args:
        optimizer: the inner ``torch.optim.Optimizer``; the wrapper shares its param groups (an lr
            scheduler on the wrapper changes the inner lr) and its state (the wrapper's own entries
            in it are prefixed), so the wrapper's state dict is the inner one's in torch's layout.
        meta_lr: γ ≥ 0, the hyper learning rate of ν (required; its natural scale is 1/|g|² unless
            ``normalize="cosine"``).
        form: ``"su"`` (default) or ``"paper"``.
        granularity: one ν per ``"coordinate"`` (default), per ``"tensor"`` or per param ``"group"``.
        max_exponent: κ > 0, the clamp on every exponent (default 0.5: a factor changes by at most
            e^{±0.5} per step).
        nu_min, nu_max: bounds of ν, 0 < nu_min ≤ 1 ≤ nu_max (default 1e-2, 1e2).
        beta: β of the EMA m (paper form only; default None → 0.9).
        scale_meta_lr: γ_s ≥ 0 of the global scale (paper form only; default None → ``meta_lr``; its
            natural scale is not γ's, see the paper form).
        scale_min, scale_max: bounds of s, 0 < scale_min ≤ 1 ≤ scale_max (default 1e-3, 1e3).
        normalize: None (default, the faithful rules) or ``"cosine"``.

    References:
        Su Jianlin, "Using exponentiated gradient to learn the learning rate", kexue.fm/archives/8968;
        Amid, Anil, Fifty & Warmuth, "Step-size Adaptation Using Exponentiated Gradient Updates",
        arXiv:2202.00145 (2022); Kivinen & Warmuth, Information and Computation 132(1), 1997 (EGU).
        Lineage: Jacobs' delta-bar-delta, Sutton's IDBD, Baydin et al.'s hypergradient descent.

    Deviations:
        In the paper's SGDM the gains sit inside the momentum (h_t sums each step's p_k⊙g_k); this
        wrapper scales the inner optimizer's finished update, so the inner momentum sees raw gradients
        and the current ν multiplies the whole buffer. The clamp κ and the bounds on ν and s are danlu's
        safety rails (Su's essay has neither; whether the paper clips or bounds was not verified). There
        is no granularity across param groups and no normalisation besides ``"cosine"`` (danlu's option,
        not the paper's). Parameters the inner optimizer moves without a gradient are not rescaled.
        Sparse and complex gradients are refused; the inner optimizer must step from ``.grad`` alone (no
        LBFGS). A NaN or ±inf in g_t makes the affected factors NaN (the clamp would otherwise hide it),
        which then shows in the parameters.
    """

    _prefix = "egs_"
    _entry = "danlu_eg_step_size"
    _hyper_keys = (
        "meta_lr",
        "form",
        "granularity",
        "max_exponent",
        "nu_min",
        "nu_max",
        "beta",
        "scale_meta_lr",
        "scale_min",
        "scale_max",
        "normalize",
    )
    # The resolved hyperparameters (``_resolve``), set as attributes in __init__ and on load.
    meta_lr: float
    form: str
    granularity: str
    max_exponent: float
    nu_min: float
    nu_max: float
    beta: float
    scale_meta_lr: float
    scale_min: float
    scale_max: float
    normalize: str | None

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        meta_lr: float,
        *,
        form: str = "su",
        granularity: str = "coordinate",
        max_exponent: float = 0.5,
        nu_min: float = 1e-2,
        nu_max: float = 1e2,
        beta: float | None = None,
        scale_meta_lr: float | None = None,
        scale_min: float = 1e-3,
        scale_max: float = 1e3,
        normalize: str | None = None,
    ) -> None:
        cfg = _resolve(dict(
            meta_lr=meta_lr, form=form, granularity=granularity, max_exponent=max_exponent, nu_min=nu_min,
            nu_max=nu_max, beta=beta, scale_meta_lr=scale_meta_lr, scale_min=scale_min, scale_max=scale_max,
            normalize=normalize,
        ))
        super().__init__(optimizer)
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError("EGStepSize steps its inner optimizer from .grad without a closure; LBFGS is not supported")
        for k, v in cfg.items():
            setattr(self, k, v)

    # --- state dict -------------------------------------------------------------------------------
    # Per parameter (in the inner optimizer's state): egs_prev_grad (Su) or egs_exp_avg and egs_prev_dir
    # (paper), and egs_nu (per coordinate or 0-d per tensor). Per param group (in the group): 0-d egs_nu
    # (granularity "group") and egs_scale (paper).

    def _config(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._hyper_keys}

    def _expected_state(self, p: torch.Tensor, cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        shapes = {}
        if cfg["form"] == "su":
            shapes["prev_grad"] = tuple(p.shape)
        else:
            shapes["exp_avg"] = tuple(p.shape)
            shapes["prev_dir"] = tuple(p.shape)
        if cfg["granularity"] == "coordinate":
            shapes["nu"] = tuple(p.shape)
        elif cfg["granularity"] == "tensor":
            shapes["nu"] = ()
        return shapes

    def _expected_group_state(self, cfg: dict[str, Any]) -> set[str]:
        keys = set()
        if cfg["granularity"] == "group":
            keys.add("nu")
        if cfg["form"] == "paper":
            keys.add("scale")
        return keys

    def _check_own(self, entry: dict[str, Any] | None, own_state: dict[int, dict[str, Any]],
                   own_groups: dict[int, dict[str, Any]], with_state: dict[int, dict[str, Any]]) -> None:
        me = type(self).__name__
        try:
            cfg = _resolve({**self._config(), **((entry or {}).get("hyper") or {})})
        except (TypeError, ValueError) as err:
            raise ValueError(f"{me}.load_state_dict: {err}") from err
        params = self._params()
        for i in sorted(set(with_state) - set(own_state)):
            raise ValueError(
                f"{me}.load_state_dict: parameter {i} has state {sorted(with_state[i])} but no {me} entries "
                f"({self._prefix}*): the state dict was saved by another optimizer (the inner one alone?)"
            )
        for i, s in own_state.items():
            expected = self._expected_state(params[i], cfg)
            if set(s) != set(expected):
                raise ValueError(
                    f"{me}.load_state_dict: parameter {i} has state {sorted(s)}, expected {sorted(expected)} "
                    f"for form={cfg['form']!r}, granularity={cfg['granularity']!r}"
                )
            for key, shape in expected.items():
                if not isinstance(s[key], torch.Tensor) or tuple(s[key].shape) != shape:
                    raise ValueError(f"{me}.load_state_dict: state {key!r} of parameter {i} is not a tensor of "
                                     f"shape {shape}")
        want = self._expected_group_state(cfg)
        start = 0
        for gi, group in enumerate(self.param_groups):
            indices = range(start, start + len(group["params"]))
            start += len(group["params"])
            if want and gi not in own_groups and any(i in own_state for i in indices):
                raise ValueError(f"{me}.load_state_dict: param group {gi} lacks its 0-d {sorted(want)} "
                                 f"({self._prefix}*), which its parameters' state needs")
        for i, s in own_groups.items():
            if set(s) != want or not all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in s.values()):
                raise ValueError(f"{me}.load_state_dict: param group {i} has state {sorted(s)}, expected 0-d "
                                 f"{sorted(want)}")

    # --- the step ---------------------------------------------------------------------------------

    def _work(self) -> list[tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]]:
        """(group index, [(param, grad)]) for every param with a gradient; refuses bad gradients first."""
        work = []
        for gi, group in enumerate(self.param_groups):
            items = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if p.grad.is_complex():
                    raise TypeError(f"{type(self).__name__} does not support complex gradients")
                items.append((p, p.grad))
            work.append((gi, items))
        return work

    def _init_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        if self.form == "su":
            state["egs_prev_grad"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        else:
            state["egs_exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["egs_prev_dir"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if self.granularity == "coordinate":
            state["egs_nu"] = torch.ones_like(p, dtype=acc_dtype(p), memory_format=torch.preserve_format)
        elif self.granularity == "tensor":
            state["egs_nu"] = torch.ones((), dtype=acc_dtype(p), device=p.device)

    def _group_scalars(self, gi: int, items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The group's 0-d factors (``nu`` at group granularity, ``scale`` in the paper form), kept in
        the param group as ``egs_nu``/``egs_scale``."""
        group = self.param_groups[gi]
        want = self._expected_group_state(self._config())
        missing = [k for k in want if "egs_" + k not in group]
        if missing:
            dtype = torch.float64 if any(p.dtype == torch.float64 for p, _ in items) else torch.float32
            for k in missing:
                group["egs_" + k] = torch.ones((), dtype=dtype, device=items[0][0].device)
        return {k: group["egs_" + k] for k in want}

    def _exponent(self, h: torch.Tensor, gamma: float) -> torch.Tensor:
        """exp(clamp(γ·H, ±κ)), NaN wherever H is NaN or ±inf."""
        e = (h * gamma).clamp_(-self.max_exponent, self.max_exponent)
        return propagate_nonfinite_(e, h).exp_()

    def _hyper(self, g: torch.Tensor, a: torch.Tensor, reduce: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """H = g⊙a (summed if ``reduce``) in the accumulation dtype, and ‖g‖², ‖a‖² for the cosine; for an
        FSDP2 shard the sums are local (see :meth:`_hypers`)."""
        dt = acc_dtype(g)
        h = g.to(dt) * a.to(dt)
        one = h.new_ones(())
        if not reduce:
            return h, one, one
        if self.normalize is None:
            return h.sum(), one, one
        return h.sum(), g.to(dt).square().sum(), a.to(dt).square().sum()

    def _hypers(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], reduce: bool,
                shards: list[Any]) -> list[tuple[torch.Tensor, ...]]:
        """:meth:`_hyper` of every (g, a); the sums of FSDP2 shards over the whole parameter, all of them in
        one all-reduce (``danlu._core.distributed.sum_partials``)."""
        parts: list[tuple[torch.Tensor, ...]] = [self._hyper(g, a, reduce) for g, a in pairs]
        if not reduce or all(sh is None for sh in shards):
            return parts
        return [tuple(row) for row in sum_partials(parts, shards)]

    def _normalized(self, h: torch.Tensor, gg: torch.Tensor, aa: torch.Tensor, reduce: bool) -> torch.Tensor:
        if self.normalize is None:
            return h
        # Per coordinate |g|·|a| = |H|, so the cosine is the sign agreement of g_t and a_{t−1}.
        denom = (gg * aa).sqrt() if reduce else h.abs()
        return h / (denom + torch.finfo(h.dtype).tiny)

    @staticmethod
    def _sum(parts: Sequence[tuple[torch.Tensor, ...]], like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Sum per-tensor (H, ‖g‖², ‖a‖²) over a group, on ``like``'s device in the widest dtype."""
        dtype = torch.float64 if any(t[0].dtype == torch.float64 for t in parts) else torch.float32
        return tuple(torch.stack([t[j].to(like.device, dtype) for t in parts]).sum() for j in range(3))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run the closure (if given), step the inner optimizer, rescale its update.

        Args:
            closure: optional callable that re-evaluates the model, calls backward and returns the
                loss; it runs with gradients enabled before anything else. The inner optimizer is
                stepped without it.
        """
        loss = DanluOptimizer._run_closure(closure)
        work = self._work()
        # FSDP2 parameters are stepped on their local shards (plain tensors): (param, local θ, local g, shard).
        local_work = []
        for gi, items in work:
            rows = []
            for p, g in items:
                shard = layout_of(p)
                # a DTensor p has a DTensor gradient placed like it
                rows.append((p, g, None) if shard is None else (p, cast("DTensor", g).to_local(), shard))
            local_work.append((gi, rows))
        saved = [[(p if sh is None else sh.local).detach().clone() for p, _, sh in rows] for _, rows in local_work]
        self.optimizer.step()

        su = self.form == "su"
        gran = self.granularity
        gamma, gamma_s = self.meta_lr, self.scale_meta_lr
        for (gi, rows), olds in zip(local_work, saved):
            if not rows:
                continue
            states, shards = [], []
            for p, _, shard in rows:
                state = self.state[p]
                if ("egs_prev_grad" if su else "egs_prev_dir") not in state:
                    self._init_state(p, state)  # from a DTensor p: DTensors placed like it (0-d: plain)
                states.append(state if shard is None else local_state(state))
                shards.append(shard)
            items = [(p if sh is None else sh.local, g) for p, g, sh in rows]
            gs = self._group_scalars(gi, items)

            # 1. the factors, from g_t and the stored direction a_{t−1}
            group_h = []
            hypers = self._hypers([(g, state["egs_prev_grad"] if su else state["egs_exp_avg"])
                                   for (_, g), state in zip(items, states)], gran != "coordinate", shards)
            for state, (h, gg, aa) in zip(states, hypers):
                if gran == "group":
                    group_h.append((h, gg, aa))
                else:
                    nu = state["egs_nu"]
                    nu.mul_(self._exponent(self._normalized(h, gg, aa, gran == "tensor"), gamma))
                    nu.clamp_(self.nu_min, self.nu_max)
            if gran == "group":
                h, gg, aa = self._sum(group_h, gs["nu"])
                gs["nu"].mul_(self._exponent(self._normalized(h, gg, aa, True), gamma).to(gs["nu"].dtype))
                gs["nu"].clamp_(self.nu_min, self.nu_max)
            if not su:
                s = gs["scale"]
                parts = self._hypers([(g, state["egs_prev_dir"]) for (_, g), state in zip(items, states)], True,
                                     shards)
                h, gg, aa = self._sum(parts, s)
                s.mul_(self._exponent(-self._normalized(h, gg, aa, True), gamma_s).to(s.dtype))
                s.clamp_(self.scale_min, self.scale_max)

            # 2. rescale the inner update: θ ← θ + (S − 1)⊙u with u = θ − θ_old (exact when S = 1)
            for (p, g), state, old in zip(items, states, olds):
                nu = gs["nu"].to(p.device) if gran == "group" else state["egs_nu"]
                scale = nu if su else nu * gs["scale"].to(p.device)
                dt = acc_dtype(p)
                u = old.to(dt).neg_().add_(p.to(dt)) if old.dtype != dt else old.neg_().add_(p)
                p.add_(u * (scale - 1.0))
                if su:
                    state["egs_prev_grad"].copy_(g)
                else:
                    state["egs_prev_dir"].copy_(u.mul_(nu))
                    state["egs_exp_avg"].mul_(self.beta).add_(g, alpha=1.0 - self.beta)
        return loss
