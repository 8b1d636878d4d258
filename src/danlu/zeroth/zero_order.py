r"""Zeroth-order optimization, which is policy gradient over a Gaussian search distribution (MeZO-style).

For a loss f(θ) that is evaluated but never differentiated, Gaussian smoothing
f_σ(θ) = E_u f(θ + σu), u ~ N(0, I), has the exact gradient

    ∇f_σ(θ) = E_u[(f(θ + σu) − b)·u]/σ = E_u[(f(θ + σu) − f(θ − σu))·u]/(2σ)

for any baseline b that does not depend on u (E u = 0). This is also the REINFORCE gradient of
J(μ) = E_{x∼N(μ,σ²I)} f(x), because the score of x = μ + σu is (x − μ)/σ² = u/σ (Su,
kexue.fm/archives/7737). :class:`ZeroOrder` estimates it from ``samples`` directions per step and moves θ.
:func:`reinforce_loss` is the same estimator on the policy-gradient side, for discrete outputs.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence, cast

import torch

from .._core.distributed import check_regathered
from .._core.numerics import acc_dtype
from .._core.optimizer import DanluOptimizer, ParamsT, is_state_init_step
from .._core.validate import check_choice, check_lr, check_number
from ._perturb import DISTRIBUTIONS, Directions, snapshot_low_precision

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["ZeroOrder", "ZOStep", "reinforce_loss", "score_sq_norms", "Alternating"]

_ENTRY = "danlu_zero_order"
_GROUP_RNG, _GROUP_SIGMA = "zo_generator", "zo_sigma"  # the same, in param group 0 (see ZeroOrder.state_dict)
_ESTIMATORS = ("two_sided", "one_sided")
_BASELINES = ("f0", "mean", "leave_one_out", "optimal")
_SHAPINGS = (None, "centered_rank")
# The CPU generator keeps only the low 32 bits of a seed (mt19937), so draw seeds in [0, 2^32): seeds
# that differed only above bit 32 would otherwise give the same direction.
_SEED_BOUND = 2**32
# ZeroOrder's own attributes that deepcopy/pickle carry (the generator travels as its state tensor).
_PICKLED = ("_inner", "_sigma", "_settings", "last_step")


class ZOStep(NamedTuple):
    """What one :meth:`ZeroOrder.step` used: ĝ = mean_i ``coefficients[i]``·u(``seeds[i]``).

    ``losses`` are the closure's values in the order evaluated: f(θ) first when it was computed
    (one-sided with baseline ``'f0'``), then f(θ + σu_i) (and f(θ − σu_i) for two-sided) for each i.
    With the seeds this is enough to replay the step elsewhere (workers exchange scalars only).
    """

    seeds: tuple[int, ...]
    coefficients: tuple[float, ...]
    losses: tuple[float, ...]


def _fail(name: str, value: Any, expected: str, exc: type[Exception] = ValueError) -> None:
    raise exc(f"Invalid {name}: {value!r} (expected {expected})")


def _check_sigma(value: Any) -> float:
    return check_number("sigma", value, low=0.0, low_open=True)


def _check_baseline(baseline: Any, estimator: str, samples: int, shaping: str | None) -> Any:
    if isinstance(baseline, (str, type(None))):
        if baseline not in _BASELINES and baseline is not None:
            _fail("baseline", baseline, "one of 'f0', 'mean', 'leave_one_out', 'optimal', None or a real number")
    else:
        baseline = check_number("baseline", baseline)
    if estimator == "two_sided" and baseline != "f0":
        _fail("baseline", baseline, "the default 'f0' with estimator='two_sided', whose antithetic "
              "difference cancels any baseline; use estimator='one_sided' to choose one")
    if baseline in ("mean", "leave_one_out", "optimal") and samples < 2:
        _fail("baseline", baseline, f"'f0', None or a number with samples={samples}: a baseline made of "
              "the other samples needs samples >= 2")
    if shaping is not None and isinstance(baseline, float):
        _fail("baseline", baseline, f"'f0', 'mean', 'leave_one_out' or None with fitness_shaping="
              f"{shaping!r}: a constant in loss units means nothing on ranks")
    return baseline


def centered_ranks(values: Sequence[float]) -> list[float]:
    """Map values to their ranks scaled into [−0.5, 0.5] (ties share their mean rank; one value → 0)."""
    m = len(values)
    if m < 2:
        return [0.0] * m
    order = sorted(range(m), key=lambda i: values[i])
    ranks = [0.0] * m
    start = 0
    while start < m:
        end = start
        while end + 1 < m and values[order[end + 1]] == values[order[start]]:
            end += 1
        for j in range(start, end + 1):
            ranks[order[j]] = (start + end) / 2.0
        start = end + 1
    return [r / (m - 1) - 0.5 for r in ranks]


def zo_coefficients(
    plus: Sequence[float],
    minus: Sequence[float] | None,
    f0: float | None,
    *,
    sigma: float,
    baseline: Any = "f0",
    fitness_shaping: str | None = None,
    sq_norms: Sequence[float] | None = None,
) -> list[float]:
    """The scalars c_i of ĝ = (1/n)·Σ c_i·u_i from the loss values (the estimator without tensors).

    Two-sided (``minus`` given): c_i = (f⁺_i − f⁻_i)/(2σ). One-sided: c_i = (f_i − b_i)/σ with b_i = f0
    (``'f0'``), the mean of all f_j (``'mean'``), the mean of the other f_j (``'leave_one_out'``), the
    variance-optimal b* = E[f(θ+σu)‖u‖²]/E[‖u‖²] (``'optimal'``, Su, kexue.fm/archives/7737) estimated
    from the other samples, b_i = Σ_{j≠i} f_j‖u_j‖² / Σ_{j≠i} ‖u_j‖² (``sq_norms`` = the ‖u_j‖²; leaving
    sample i out keeps b_i independent of u_i, so the estimate stays unbiased), 0 (``None``) or a
    constant. ``fitness_shaping='centered_rank'`` first replaces every value (f0 included) by its
    centered rank among all values of the step.
    """
    n = len(plus)
    if fitness_shaping == "centered_rank":
        raw = ([f0] if f0 is not None else []) + list(plus) + (list(minus) if minus is not None else [])
        shaped = centered_ranks(raw)
        k = 1 if f0 is not None else 0
        f0 = shaped[0] if f0 is not None else None
        plus, minus = shaped[k:k + n], (shaped[k + n:] if minus is not None else None)
    if minus is not None:
        return [(a - b) / (2.0 * sigma) for a, b in zip(plus, minus)]
    if baseline == "f0":
        assert f0 is not None
        bases = [f0] * n
    elif baseline == "mean":
        bases = [math.fsum(plus) / n] * n
    elif baseline == "leave_one_out":
        total = math.fsum(plus)
        bases = [(total - f) / (n - 1) for f in plus]
    elif baseline == "optimal":
        if sq_norms is None or len(sq_norms) != n:
            raise ValueError("zo_coefficients: baseline='optimal' needs sq_norms, one ‖u_i‖² per sample")
        bases = []
        for i in range(n):
            w = [sq_norms[j] for j in range(n) if j != i]
            bases.append(math.fsum(plus[j] * sq_norms[j] for j in range(n) if j != i) / math.fsum(w))
    else:
        bases = [0.0 if baseline is None else float(baseline)] * n
    return [(f - b) / sigma for f, b in zip(plus, bases)]


def _loss_value(loss: Any, where: str, check_finite: bool = True) -> float:
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"ZeroOrder: the closure must return a scalar loss (a number or a one-element tensor); "
                f"got a tensor of shape {tuple(loss.shape)} at {where}. The parameters are restored"
            )
        if loss.is_complex():
            raise ValueError(f"ZeroOrder: the closure returned a complex loss at {where}. The parameters are restored")
        value = float(loss.detach())  # one host sync per forward: the step's arithmetic is on Python scalars
    elif isinstance(loss, Real) and not isinstance(loss, bool):
        value = float(loss)
    else:
        raise TypeError(
            f"ZeroOrder: the closure must return the loss (a real number or a one-element tensor), got "
            f"{type(loss).__name__} at {where}. The parameters are restored"
        )
    if check_finite and not math.isfinite(value):
        raise ValueError(
            f"ZeroOrder: the closure returned a non-finite loss ({value}) at {where}; the parameters are "
            "restored and the optimizer is unchanged"
        )
    return value


_BACKWARD_HINT = (
    "A zeroth-order closure re-evaluates the model and returns the loss WITHOUT calling backward(); "
    "ZeroOrder runs it under torch.no_grad(). Remove loss.backward() from the closure"
)


class ZeroOrder(DanluOptimizer):
    r"""Zeroth-order optimizer: estimates ∇f from loss values at seeded in-place perturbations (MeZO/ES).

    Each step draws n = ``samples`` seeds s_i from the optimizer's own generator, each naming a
    direction u_i over all parameters jointly (never stored: drawn again from s_i when needed), and
    evaluates the closure around θ::

        two_sided:  c_i = [f(θ + σu_i) − f(θ − σu_i)] / (2σ)                 (antithetic; 2n forwards)
        one_sided:  c_i = [f(θ + σu_i) − b_i] / σ                           (n forwards, +1 for 'f0')
        ĝ = (1/n)·Σ_i c_i·u_i

    then, with ``optimizer=None``, per param group (lr η, weight decay λ, decoupled as in MeZO)::

        θ ← θ·(1 − ηλ) − η·ĝ              (by replaying each seed: θ −= η·c_i/n·u_i)

    or, given an inner optimizer, writes ĝ into ``.grad`` and calls ``optimizer.step()`` (Adam on ZO
    estimates, as OpenAI ES does).

    **Estimators.** For Gaussian u, E ĝ = ∇f_σ(θ) exactly, f_σ(θ) = E f(θ + σu) (Gaussian smoothing;
    any integrable f, e.g. ∂_i of Σ|x| smoothed is erf(x_i/(σ√2))), for both estimators and baselines
    ``'f0'``, ``'leave_one_out'``, ``None`` and constants. ``baseline='mean'`` (b = the mean of the
    step's n values, no extra forward) shrinks the estimate: E ĝ = (1 − 1/n)·∇f_σ; it is the usual
    policy-gradient baseline and equals ``'leave_one_out'`` times (n − 1)/n. Rademacher (u_i = ±1) and
    sphere (u = √d·z/‖z‖) directions also have E u = 0, Cov u = I: the estimate is exact for quadratic
    f and O(σ²)-close to ∇f for smooth f, but it is not the gradient of a Gaussian smoothing.
    Two-sided cancels the even-order terms of f and its variance stays bounded as σ → 0; one-sided
    without baseline has variance ∝ f²/σ² (always subtract one). ``fitness_shaping='centered_rank'``
    (evolution strategies) replaces every value of the step by its rank scaled into [−0.5, 0.5]
    before the formulas above: invariant to monotone transforms of f and robust to outliers, but ĝ
    then has the units of rank/σ, not of ∇f, so retune lr. Variance grows with the dimension d
    (linear f, Gaussian u: E‖(uᵀg)u‖² = (d + 2)‖g‖²): the stable lr shrinks like n/d.

    **Memory and cost per step.** θ is perturbed in place and every direction is regenerated from
    its seed, tensor by tensor, so the step's temporaries are one parameter's worth at a time: the
    drawn sample (float32 for 16-bit and float32 parameters, float64 for float64), a float32 result
    when a 16-bit parameter is perturbed, and for ``'sphere'`` the norm pass in float64 (at peak about
    4× the largest parameter in float32; tests/test_zero_order.py measures the peak of live
    allocations). Never a copy of the model, except that bfloat16/float16 parameters are also kept as
    one exact 16-bit copy during the step (see Precision). An inner optimizer adds its own state and
    a ``.grad`` for every parameter (the ĝ it steps on). Forward passes: 2n (two-sided), n
    (one-sided) or n + 1 (one-sided with ``'f0'``); no backward. Direction generations (passes of the
    random generator over all parameters): 4n − 1 (two-sided) or 3n − 1 (one-sided), the restore of
    the last direction being fused with the update; ``'sphere'`` adds one more pass to compute ‖z‖ for
    each seed when it is first drawn and for each replay but the last's. Each loss value costs one
    host synchronisation (it is turned into a Python float).

    **Closure contract.** ``step(closure)`` requires a closure (``TypeError`` otherwise). It
    re-evaluates the model on the *same* batch each time within a step, with no randomness of its
    own (``model.eval()``: dropout would make f(θ + σu) and f(θ − σu) different functions), and
    returns the loss as a number or a one-element tensor, WITHOUT calling backward. It runs under
    ``torch.no_grad()``. A closure that calls ``backward()`` fails there (torch's error, re-raised as a
    ``RuntimeError`` that says so); one that re-enables grad and does change a parameter's ``.grad``
    (creates it, replaces it, or modifies it in place, seen through the tensor and its version
    counter) is refused with ``RuntimeError``; ``zero_grad(set_to_none=True)`` inside the closure is
    fine. A loss that is not a number or a one-element tensor raises ``TypeError`` (``ValueError``
    for a tensor of another shape); a non-finite loss raises ``ValueError``. Whatever the closure
    raises, the step undoes the perturbation and re-raises: parameters are restored (bitwise for
    16-bit and every parameter a step never perturbed; to within rounding, a few ulp of θ + σu, for
    float32/float64, see Precision), the generator and the inner optimizer are as before the call,
    and the step has written no ``.grad``. Only parameters with ``requires_grad=True`` are perturbed
    and updated (MeZO's convention for selecting the trainable ones); gradients are never read.

    **Precision.** θ + σu − σu is not bit-exact in floating point. In float32/float64 the drift of one
    perturb/restore cycle is a rounding of θ + σu, far below the update (MeZO accepts it; the spec
    measured ≤ 1.9e−7 after 100 cycles in float32). In bfloat16/float16 it would be comparable to the
    updates, so 16-bit parameters are restored from an exact snapshot taken at the start of the step
    (extra memory: one copy of the 16-bit parameters only) and every perturbation is computed in
    float32 from that snapshot and rounded once. The update then rounds each seed's contribution to
    the parameter dtype: in 16-bit, steps below half an ulp of θ are lost, as with any optimizer
    without float32 master weights. Compute the loss in float32 (``.float()`` before the reduction):
    f(θ + σu) − f(θ − σu) is a small difference of large numbers, so keep σ ≥ 1e−3 unless the loss is
    float64.

    **Randomness** comes only from a CPU ``torch.Generator`` owned by the optimizer (seeded with
    ``seed``), saved in ``state_dict`` and carried by ``deepcopy``/``pickle``: the global RNG is never
    used or advanced, the same seed gives the same trajectory, and a reloaded optimizer continues
    identically. Each direction is drawn from per-device generators seeded with its s_i; seeds are
    drawn below 2³² because the CPU generator keeps only 32 bits of a seed.

    Args:
        params: parameters or param groups (per-group ``lr``, ``weight_decay``).
        lr: η, required when ``optimizer`` is None; must be left None with an inner optimizer (its own
            lr is the step size; put lr schedulers on the inner optimizer).
        sigma: σ > 0, the perturbation scale (default 1e−3, MeZO's ε). Settable between steps
            (``opt.sigma = ...``, e.g. SPSA's decaying c_k); saved in the state dict.
        samples: n ≥ 1 directions per step (default 1, MeZO's choice per forward-pass budget).
        estimator: ``"two_sided"`` (default, antithetic) or ``"one_sided"``.
        distribution: ``"gaussian"`` (default), ``"rademacher"`` or ``"sphere"``.
        baseline: one-sided only: ``"f0"`` (default, b = f(θ), one extra forward; Su's choice, O(σ²)
            from the variance-optimal one for smooth f), ``"mean"``, ``"leave_one_out"``, ``"optimal"``
            (the variance-optimal b* = E[f(θ+σu)‖u‖²]/E‖u‖², estimated for each sample from the others,
            see :func:`zo_coefficients`; it costs one more draw of each direction for ‖u‖², and equals
            ``"leave_one_out"`` for Rademacher and sphere directions, whose ‖u‖² is constant) (these
            three need samples ≥ 2), ``None`` (no baseline) or a constant. Two-sided needs none and
            accepts only the default.
        fitness_shaping: ``None`` (default) or ``"centered_rank"``.
        optimizer: None (default: SGD by seed replay) or an inner ``torch.optim.Optimizer`` over (at
            least) these parameters that steps from ``.grad`` alone (``LBFGS`` is refused).
        weight_decay: λ ≥ 0 (default 0), decoupled, multiplied by lr; must be 0 with an inner optimizer
            (use its weight decay).
        seed: seed of the owned generator (default 0). Under DDP/FSDP2 every rank must use the same one
            (checked at every step: different seeds raise ``ValueError`` on every rank).
        sync: average the loss values over the ranks before the estimate (one all-reduce of O(samples)
            floats per step, whatever the model size), so every rank takes the step of the union of
            their data. ``None`` (default): whenever torch.distributed is initialized with more than one
            rank (over the parameters' device mesh for FSDP2's DTensors, else the default group);
            ``True``: required (``ValueError`` without an initialized process group); ``False``: each
            rank steps on its own losses (replicas then drift apart). Under FSDP2 wrap the root with
            ``fully_shard(model, reshard_after_forward=True)``: by default FSDP2 keeps the root's own
            parameters gathered after a forward, and forward-only evaluations would miss their
            perturbation (refused with ``ValueError``).

    Returns (``step``): the loss at θ, i.e. the closure's own return value f(θ) when it was computed
    (one-sided with ``'f0'``), else the mean of the step's evaluations (an estimate of f_σ(θ); a
    tensor if the closure returns tensors). :attr:`last_step` holds the seeds, coefficients and loss
    values of the last step (:class:`ZOStep`).

    References:
        Su Jianlin, "殊途同归的策略梯度与零阶优化", kexue.fm/archives/7737; Spall, "Multivariate
        stochastic approximation using a simultaneous perturbation gradient approximation", IEEE TAC
        1992; Salimans et al., "Evolution Strategies as a Scalable Alternative to Reinforcement
        Learning", arXiv:1703.03864; Malladi et al., "Fine-Tuning Language Models with Just Forward
        Passes" (MeZO), NeurIPS 2023, arXiv:2305.17333.

    Deviations:
        MeZO draws seeds from NumPy's global RNG and reseeds torch's global RNG for each direction;
        here one owned generator draws the seeds and every direction has its own generators. MeZO
        excludes parameters named bias/LayerNorm from weight decay by name; here use a param group
        with ``weight_decay=0``. With n > 1 MeZO accumulates ĝ in ``.grad`` for a regular optimizer;
        here ``optimizer=None`` replays the seeds instead (no buffer) and ``.grad`` is used only with an
        inner optimizer. Salimans et al. rank f⁺ and f⁻ jointly, as here, but ascend a reward; here
        ranks are of losses and the step descends.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | None = None,
        sigma: float = 1e-3,
        samples: int = 1,
        estimator: str = "two_sided",
        distribution: str = "gaussian",
        baseline: str | float | None = "f0",
        fitness_shaping: str | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        weight_decay: float = 0.0,
        seed: int = 0,
        *,
        sync: bool | None = None,
    ) -> None:
        from .._core.distributed import check_sync  # noqa: PLC0415

        check_sync("ZeroOrder", sync)
        if optimizer is not None:
            if not isinstance(optimizer, torch.optim.Optimizer):
                _fail("optimizer", optimizer, "None or a torch.optim.Optimizer instance, e.g. "
                      "torch.optim.Adam(model.parameters())", TypeError)
            if isinstance(optimizer, (torch.optim.LBFGS, ZeroOrder)):
                _fail("optimizer", type(optimizer).__name__,
                      "an optimizer that steps from .grad alone; LBFGS and ZeroOrder re-evaluate a closure",
                      TypeError)
        sigma = _check_sigma(sigma)
        samples = int(check_number("samples", samples, low=1, integer=True))
        estimator = check_choice("estimator", estimator, _ESTIMATORS)
        distribution = check_choice("distribution", distribution, DISTRIBUTIONS)
        fitness_shaping = check_choice("fitness_shaping", fitness_shaping, _SHAPINGS)
        baseline = _check_baseline(baseline, estimator, samples, fitness_shaping)
        check_number("seed", seed, low=0, integer=True)
        if seed >= 2**64:
            _fail("seed", seed, "an int in [0, 2**64)")
        # Set before DanluOptimizer.__init__: _validate_group reads them.
        self._inner = optimizer
        self._sigma = sigma
        self._settings = dict(samples=samples, estimator=estimator, distribution=distribution,
                              baseline=baseline, fitness_shaping=fitness_shaping, seed=seed, sync=sync)
        self._generator = torch.Generator().manual_seed(seed)
        self.last_step: ZOStep | None = None
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self._sync_group_keys()  # present from the start: DCP's flattened load reads the groups' own keys

    # --- hyperparameters ----------------------------------------------------------------------------
    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The inner optimizer, or None."""
        return self._inner

    # Set at construction (validated together there); read-only afterwards.
    samples = property(lambda self: self._settings["samples"], doc="n, directions per step.")
    estimator = property(lambda self: self._settings["estimator"], doc="'two_sided' or 'one_sided'.")
    distribution = property(lambda self: self._settings["distribution"], doc="The law of the directions.")
    baseline = property(lambda self: self._settings["baseline"], doc="The one-sided baseline.")
    fitness_shaping = property(lambda self: self._settings["fitness_shaping"], doc="None or 'centered_rank'.")
    seed = property(lambda self: self._settings["seed"], doc="The seed the generator started from.")
    sync = property(lambda self: self._settings.get("sync"),
                    doc="Whether loss values are averaged over ranks (None: whenever torch.distributed runs).")

    @property
    def sigma(self) -> float:
        """σ, the perturbation scale (settable, validated; saved in the state dict)."""
        return self._sigma

    @sigma.setter
    def sigma(self, value: float) -> None:
        self._sigma = _check_sigma(value)

    def _validate_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, wd = group.get("lr"), group.get("weight_decay")
        if self._inner is None:
            if lr is None:
                _fail("lr", lr, "a real number: lr is required without an inner optimizer", TypeError)
            group["lr"] = check_lr(lr)
            check_number("weight_decay", wd, low=0.0)
            return
        if lr is not None:
            _fail("lr", lr, "None with an inner optimizer, whose own lr is the step size")
        check_number("weight_decay", wd, low=0.0)
        if wd != 0.0:
            _fail("weight_decay", wd, "0.0 with an inner optimizer; set the inner optimizer's weight decay")
        inner = {id(p) for g in self._inner.param_groups for p in g["params"]}
        for i, p in enumerate(params):
            if id(p) not in inner:
                _fail(f"params[{i}]", f"a parameter of shape {tuple(p.shape)}",
                      "every parameter of ZeroOrder to be a parameter of its inner optimizer")

    def _init_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """ZeroOrder keeps no per-parameter state (its only state is the generator)."""

    # --- the step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One zeroth-order step; returns the loss at θ (see the class docstring).

        Args:
            closure: required; re-evaluates the model on the same batch and returns the loss, without
                calling backward.
        """
        if closure is None and is_state_init_step(self):
            # torch.distributed.checkpoint's state initialisation: nothing to estimate, nothing moves.
            if self._inner is not None:
                self._inner.step()
            return None
        if closure is None or not callable(closure):
            raise TypeError(
                "ZeroOrder.step needs a closure that re-evaluates the model and returns the loss without "
                f"calling backward, e.g. opt.step(lambda: loss_fn(model(x), y)); got {closure!r}"
            )
        group_of = {}
        params = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    params.append(p)
                    group_of[id(p)] = group
        from .._core.distributed import check_same_seeds, loss_group  # noqa: PLC0415

        group = loss_group(type(self).__name__, params, self.sync)
        generator_state = self._generator.get_state()
        try:
            seeds = torch.randint(0, _SEED_BOUND, (self.samples,), generator=self._generator).tolist()
            if group is not None:
                check_same_seeds(type(self).__name__, seeds, group)
            run = _Run(self, closure, params, seeds, group)
            coefficients, loss = run.evaluate()
            if self._inner is None:
                run.apply_update(coefficients, group_of)
            else:
                run.write_grad(coefficients)
                self._inner.step()
        except BaseException:
            self._generator.set_state(generator_state)
            raise
        self.last_step = ZOStep(tuple(seeds), tuple(coefficients), tuple(run.values))
        return loss

    # --- persistence -------------------------------------------------------------------------------
    def _state_dict_entries(self, sd: dict[str, Any]) -> None:
        super()._state_dict_entries(sd)
        sd[_ENTRY] = {
            "generator": self._generator.get_state(),
            "sigma": self._sigma,
            "inner": None if self._inner is None else self._inner.state_dict(),
            # ZeroOrder has no per-parameter state to tell layouts apart by: record the shapes.
            "shapes": self._shapes(),
        }


    def state_dict(self) -> dict[str, Any]:
        """torch's layout plus ZeroOrder's entry (generator, σ, inner optimizer, shapes). The generator
        state and σ are also the first param group's ``zo_generator`` and ``zo_sigma`` (refreshed here),
        where tools that keep only ``state`` and ``param_groups`` (``torch.distributed.checkpoint``,
        whose flattened load reads only the keys the live groups have) keep them too."""
        self._sync_group_keys()
        return super().state_dict()

    def _sync_group_keys(self) -> None:
        if self.param_groups:
            self.param_groups[0][_GROUP_RNG] = self._generator.get_state()
            self.param_groups[0][_GROUP_SIGMA] = self._sigma

    def _shapes(self) -> list[list[list[int]]]:
        return [[list(p.shape) for p in g["params"]] for g in self.param_groups]

    def _check_state_dict(self, sd: Any) -> None:
        me = type(self).__name__
        entry = sd.get(_ENTRY) if isinstance(sd, dict) else None
        groups = sd.get("param_groups") if isinstance(sd, dict) else None
        last = groups[0] if isinstance(groups, list) and groups and isinstance(groups[0], dict) else {}
        if _GROUP_RNG in last or _GROUP_SIGMA in last:
            gen = last.get(_GROUP_RNG)
            if not (isinstance(gen, torch.Tensor) and gen.dtype == torch.uint8
                    and gen.shape == self._generator.get_state().shape):
                raise ValueError(f"{me}.load_state_dict: {_GROUP_RNG!r} in param group 0 is not the uint8 generator "
                                 f"state of shape {tuple(self._generator.get_state().shape)}")
            try:
                _check_sigma(last.get(_GROUP_SIGMA))
            except (TypeError, ValueError) as err:
                raise ValueError(f"{me}.load_state_dict: {_GROUP_SIGMA!r} in param group 0: {err}") from err
        if entry is not None:
            gen = entry.get("generator") if isinstance(entry, dict) else None
            if not (isinstance(gen, torch.Tensor) and gen.dtype == torch.uint8
                    and gen.shape == self._generator.get_state().shape):
                raise ValueError(f"{me}.load_state_dict: the generator state is missing or malformed")
            try:
                _check_sigma(entry.get("sigma"))
            except (TypeError, ValueError) as err:
                raise ValueError(f"{me}.load_state_dict: {err}") from err
            shapes = entry.get("shapes")
            if shapes is not None and shapes != self._shapes():
                raise ValueError(f"{me}.load_state_dict: the state dict was saved for parameters of shapes "
                                 f"{shapes}, this optimizer has {self._shapes()}")
            if (entry.get("inner") is None) != (self._inner is None):
                has = "has" if entry.get("inner") is not None else "has no"
                mine = "has" if self._inner is not None else "has no"
                raise ValueError(f"{me}.load_state_dict: the state dict {has} inner optimizer state, this "
                                 f"optimizer {mine} inner optimizer")
        super()._check_state_dict(sd)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (same class and parameter layout).

        Restores the generator (so the next step is the one the saved optimizer would have taken),
        ``sigma`` and the inner optimizer's state. Refuses a foreign or malformed dict before changing
        anything (the inner optimizer's own checks run before the rest is loaded). A dict without the
        ZeroOrder entry (e.g. rebuilt by ``torch.distributed.checkpoint``'s ``get_optimizer_state_dict``,
        which keeps only ``state`` and ``param_groups``) loads the groups and keeps the generator and
        the inner optimizer's state as they are: checkpoint an inner optimizer through such a tool on
        its own (``zo.optimizer``). A ``step()`` without a closure raises ``TypeError``, except the
        state initialisation those helpers perform (all-zero gradients at lr 0), which steps the inner
        optimizer, if any, and moves nothing. Load pre-hooks run first, as for every danlu optimizer.
        """
        super().load_state_dict(state_dict)

    def _load_extra(self, state_dict: dict[str, Any]) -> None:
        entry = state_dict.get(_ENTRY)
        groups = state_dict["param_groups"]
        if entry is None and groups and _GROUP_RNG in groups[0]:
            # Saved through a tool that keeps only state and param_groups: the generator and σ from there.
            self._generator.set_state(groups[0][_GROUP_RNG].clone().cpu())
            self._sigma = float(groups[0][_GROUP_SIGMA])
        if entry is not None:
            if self._inner is not None:
                # First: the inner optimizer's own checks may still refuse, with nothing changed yet.
                self._inner.load_state_dict(entry["inner"])
            self._generator.set_state(entry["generator"].clone())
            self._sigma = float(entry["sigma"])

    def _after_load(self) -> None:
        super()._after_load()
        self._sync_group_keys()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in _PICKLED})
        state["_generator_state"] = self._generator.get_state()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict also calls __setstate__ (with state and param_groups only): the
        # generator is rebuilt only when unpickling.
        state = dict(state)
        gen_state = state.pop("_generator_state", None)
        super().__setstate__(state)
        if gen_state is not None:
            self._generator = torch.Generator()
            self._generator.set_state(gen_state)


class _Run:
    """One step's evaluations: perturbs θ in place, calls the closure, restores θ on any error."""

    def __init__(self, opt: ZeroOrder, closure: Callable[[], Any], params: list[torch.Tensor],
                 seeds: list[int], group: Any = None) -> None:
        self.opt = opt
        self.closure = closure
        self.params = params
        self.seeds = seeds
        self.group = group  # the process group whose ranks' loss values are averaged (None: this rank's)
        self.sigma = opt.sigma
        self.directions = Directions(params, opt.distribution)
        self.snapshot = snapshot_low_precision(self.directions.targets)
        self.grads = [(p.grad, None if p.grad is None else p.grad._version) for p in params]
        self.current: tuple[int, float] | None = None  # (seed, scale): θ + scale·u(seed) is applied now
        self.values: list[float] = []

    def _move(self, seed: int, scale: float) -> None:
        """From the current point to θ + scale·u(seed) (scale 0: back to θ)."""
        assert self.current is None or self.current[0] == seed
        delta = scale - (self.current[1] if self.current is not None else 0.0)
        for k, (p, u) in enumerate(self.directions.tensors(seed)):
            snap = self.snapshot[k]
            if snap is None:
                p.add_(u, alpha=delta)
            elif scale == 0.0:
                p.copy_(snap)
            else:
                p.copy_(torch.add(snap, u, alpha=scale))  # in float32, rounded once
        self.current = None if scale == 0.0 else (seed, scale)

    def _call(self, where: str) -> tuple[Any, float]:
        try:
            try:
                loss = self.closure()
            except RuntimeError as err:
                if "does not require grad" in str(err):
                    raise RuntimeError(f"ZeroOrder: the closure failed at {where}: {err}. {_BACKWARD_HINT}") from err
                raise
            for p, (g, version) in zip(self.params, self.grads):
                if p.grad is not None and (p.grad is not g or p.grad._version != version):
                    raise RuntimeError(
                        f"ZeroOrder: the closure changed a parameter's .grad at {where} (did it call "
                        f"backward()?). {_BACKWARD_HINT}"
                    )
            # Across ranks a non-finite value is refused after the values are averaged, on every rank.
            value = _loss_value(loss, where, check_finite=self.group is None)
        except BaseException:
            if self.current is not None:
                self._move(self.current[0], 0.0)
            raise
        self.values.append(value)
        return loss, value

    def evaluate(self) -> tuple[list[float], Any]:
        """Evaluate the closure at every point; θ is left at the last one (fused into the update)."""
        opt, n, sigma = self.opt, len(self.seeds), self.sigma
        two_sided = opt.estimator == "two_sided"
        losses = []
        f0 = None
        if not two_sided and opt.baseline == "f0":
            loss0, f0 = self._call("θ (the baseline f0)")
        plus, minus = [], []
        for i, s in enumerate(self.seeds):
            self._move(s, sigma)
            loss, v = self._call(f"θ + σ·u_{i} (direction {i + 1} of {n})")
            losses.append(loss)
            plus.append(v)
            if two_sided:
                self._move(s, -sigma)
                loss, v = self._call(f"θ − σ·u_{i} (direction {i + 1} of {n})")
                losses.append(loss)
                minus.append(v)
            if i < n - 1:
                self._move(s, 0.0)
        try:  # FSDP2 state is initialised by the first forward: checked after the evaluations, θ restored
            check_regathered("ZeroOrder", self.params)
        except ValueError:
            if self.current is not None:
                self._move(self.current[0], 0.0)
            raise
        if self.group is not None:
            f0, plus, minus = self._average(f0, plus, minus)
        sq_norms = [self.directions.sq_norm(s) for s in self.seeds] if opt.baseline == "optimal" else None
        coefficients = zo_coefficients(plus, minus if two_sided else None, f0, sigma=sigma,
                                       baseline=opt.baseline, fitness_shaping=opt.fitness_shaping,
                                       sq_norms=sq_norms)
        if f0 is not None:
            return coefficients, loss0
        if all(isinstance(t, torch.Tensor) for t in losses):
            return coefficients, torch.stack([t.detach().reshape(()) for t in losses]).mean()
        return coefficients, math.fsum(v for v in (plus + minus)) / len(plus + minus)

    def _average(self, f0: float | None, plus: list[float], minus: list[float]) -> tuple[Any, list[float], list[float]]:
        """Every loss value averaged over the ranks (one all-reduce); a non-finite one on any rank raises
        on every rank, with θ restored."""
        from .._core.distributed import average_values  # noqa: PLC0415

        local = ([] if f0 is None else [f0]) + plus + minus
        values = average_values(local, self.group)
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            if self.current is not None:
                self._move(self.current[0], 0.0)
            raise ValueError(
                f"ZeroOrder: a rank's closure returned a non-finite loss (the average over ranks of value {bad + 1} "
                f"of this step is {values[bad]}; this rank's is {local[bad]}); the parameters are restored and the "
                "optimizer is unchanged")
        self.values = values
        k = 0 if f0 is None else 1
        return (values[0] if f0 is not None else None), values[k:k + len(plus)], values[k + len(plus):]

    def apply_update(self, coefficients: list[float], group_of: dict[int, dict[str, Any]]) -> None:
        """θ ← θ(1 − ηλ) − (η/n)·Σ c_i u_i; the last direction's pass also undoes its perturbation."""
        n = len(self.seeds)
        last_seed = self.seeds[-1]
        applied = self.current[1] if self.current is not None else 0.0
        for k, (p, u) in enumerate(self.directions.tensors(last_seed)):
            group = group_of[id(self.params[k])]
            lr, wd = float(group["lr"]), group["weight_decay"]  # a tensor lr: ZO syncs on every loss anyway
            keep = 1.0 - lr * wd
            step = -lr * coefficients[-1] / n
            snap = self.snapshot[k]
            if snap is None:
                # p = θ + a·u now: p·keep + (step − a·keep)·u = θ·keep + step·u, one pass.
                if wd != 0.0:
                    p.mul_(keep)
                p.add_(u, alpha=step - applied * keep)
            else:
                base = snap.float().mul_(keep) if wd != 0.0 else snap
                p.copy_(torch.add(base, u, alpha=step))
        self.current = None
        for s, c in zip(self.seeds[:-1], coefficients[:-1]):
            for k, (p, u) in enumerate(self.directions.tensors(s)):
                p.add_(u, alpha=-float(group_of[id(self.params[k])]["lr"]) * c / n)

    def write_grad(self, coefficients: list[float]) -> None:
        """.grad ← ĝ = (1/n)·Σ c_i u_i for every perturbed parameter; the first pass also restores θ."""
        n = len(self.seeds)
        last_seed = self.seeds[-1]
        applied = self.current[1] if self.current is not None else 0.0
        for k, (p, u) in enumerate(self.directions.tensors(last_seed)):
            snap = self.snapshot[k]
            if snap is None:
                p.add_(u, alpha=-applied)
            else:
                p.copy_(snap)
            grad = torch.mul(u, coefficients[-1] / n).to(p.dtype)
            param = self.params[k]
            if param is not p:  # an FSDP2 shard: the gradient is a DTensor placed like the parameter
                from torch.distributed.tensor import DTensor  # noqa: PLC0415

                dparam = cast(DTensor, param)
                param.grad = DTensor.from_local(grad, dparam.device_mesh, dparam.placements, run_check=False,
                                                shape=param.shape, stride=param.stride())
            else:
                param.grad = grad
        self.current = None
        for s, c in zip(self.seeds[:-1], coefficients[:-1]):
            for k, (p, u) in enumerate(self.directions.tensors(s)):
                g = self.params[k].grad
                # (a shard's gradient: the DTensor the first pass wrote)
                (g if g is not None and p is self.params[k] else cast("DTensor", g).to_local()).add_(u, alpha=c / n)


def score_sq_norms(log_probs: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖∇_θ log p_θ(y_i)‖² for every sample i of a 1-D ``log_probs`` (one backward pass per sample,
    graph retained), summed over ``params``; detached, in ``log_probs``' dtype. The weights of
    :func:`reinforce_loss`'s ``baseline="optimal"``."""
    if not isinstance(log_probs, torch.Tensor) or log_probs.dim() != 1:
        raise ValueError("score_sq_norms: log_probs must be a 1-D tensor of per-sample log-probabilities, got "
                         + (f"shape {tuple(log_probs.shape)}" if isinstance(log_probs, torch.Tensor) else
                            type(log_probs).__name__))
    params = [p for p in params if isinstance(p, torch.Tensor) and p.requires_grad]
    if not params:
        raise ValueError("score_sq_norms: params holds no tensor that requires grad")
    if not log_probs.requires_grad:
        raise ValueError("score_sq_norms: log_probs carries no graph (computed under no_grad, or detached)")
    out = []
    for i in range(log_probs.shape[0]):
        grads = torch.autograd.grad(log_probs[i], params, retain_graph=True, allow_unused=True)
        out.append(sum((g.detach().to(acc_dtype(g)).square().sum() for g in grads if g is not None),
                       torch.zeros((), dtype=acc_dtype(log_probs), device=log_probs.device)))
    return torch.stack(out).to(log_probs.dtype)


def reinforce_loss(log_probs: torch.Tensor, rewards: Any, baseline: Any = "mean", *,
                   params: Sequence[torch.Tensor] | None = None,
                   sq_norms: torch.Tensor | None = None) -> torch.Tensor:
    r"""The score-function (REINFORCE) surrogate: minimising it ascends the expected reward.

    For samples y_i ∼ p_θ with rewards r_i (dim 0 indexes the samples)::

        loss = −mean_i[(r_i − b_i)·log p_θ(y_i)]        (r − b detached)
        ∇loss = −mean_i[(r_i − b_i)·∇ log p_θ(y_i)]  ≈  −∇ E_{y∼p_θ}[r(y)]

    The baseline keeps the estimate unbiased when it does not depend on y_i: ``None`` (b = 0), a number,
    a tensor broadcastable to ``rewards`` (e.g. a value estimate; detached), or ``"leave_one_out"``
    (b_i = the mean of the other samples' rewards). ``"mean"`` (default; b = the mean reward over the
    samples, Su's practical choice) scales the expected gradient by (n − 1)/n. Both of these need
    n ≥ 2 samples and are computed along dim 0, separately for every other index.

    ``"optimal"``: the baseline that minimises the estimate's variance (its second moment
    E[(r − b)²‖∇log p‖²]; Su, kexue.fm/archives/7737), b* = E[r·‖∇log p‖²] / E[‖∇log p‖²], the reward
    weighted by each sample's squared score norm. It is estimated leave-one-out, b_i = Σ_{j≠i} r_j s_j /
    Σ_{j≠i} s_j with s_j = ‖∇_θ log p_θ(y_j)‖², so that b_i does not depend on sample i and the estimate
    stays unbiased (where the others' s_j are all 0: the leave-one-out mean). It needs 1-D
    ``log_probs`` (n ≥ 2 samples) and the weights: ``sq_norms`` (shape (n,)) or ``params``, from which
    :func:`score_sq_norms` computes them with one backward pass per sample (the cost Su names as the
    reason the plain mean is used in practice).

    For a Gaussian search distribution x = μ + σu, log p(x) = −‖x − μ‖²/(2σ²) + const, so ∇_μ log p =
    u/σ, and with rewards r = −f(x) this is exactly the one-sided estimate of :class:`ZeroOrder` with
    the matching baseline (``baseline=b`` here is ``baseline=−b`` there): evolution strategies and
    policy gradient are one estimator (Su, kexue.fm/archives/7737).

    Args:
        log_probs: log p_θ(y_i) of the sampled outputs, floating point, shape (n, ...); carries the graph.
        rewards: r_i, same shape as ``log_probs`` (tensor or sequence of numbers; detached).
        baseline: ``"mean"`` (default), ``"leave_one_out"``, ``"optimal"``, ``None``, a number or a tensor.
        params: for ``baseline="optimal"``: the parameters whose score norms weight the rewards.
        sq_norms: for ``baseline="optimal"``: the precomputed ‖∇log p(y_i)‖² (instead of ``params``).

    Returns:
        The 0-d surrogate loss (its value is not the expected reward; only its gradient means something).
    """
    if not isinstance(log_probs, torch.Tensor) or not log_probs.is_floating_point():
        raise TypeError(f"reinforce_loss: log_probs must be a floating-point tensor, got {type(log_probs).__name__}"
                        + (f" of dtype {log_probs.dtype}" if isinstance(log_probs, torch.Tensor) else ""))
    if log_probs.dim() == 0:
        raise ValueError("reinforce_loss: log_probs must have a sample dimension (dim 0); got a 0-d tensor")
    r = torch.as_tensor(rewards, device=log_probs.device)
    r = r.detach().to(log_probs.dtype)
    if r.shape != log_probs.shape:
        raise ValueError(f"reinforce_loss: rewards of shape {tuple(r.shape)} do not match log_probs of shape "
                         f"{tuple(log_probs.shape)}")
    n = r.shape[0]
    if (params is not None or sq_norms is not None) and baseline != "optimal":
        raise ValueError("reinforce_loss: params= and sq_norms= serve baseline='optimal' only")
    if baseline == "optimal":
        if log_probs.dim() != 1 or n < 2:
            _fail("baseline", baseline, "a baseline other than 'optimal' for log_probs of shape "
                  f"{tuple(log_probs.shape)} ('optimal' needs 1-D log_probs with at least 2 samples)")
        if (params is None) == (sq_norms is None):
            raise ValueError("reinforce_loss: baseline='optimal' needs exactly one of params= (to compute the score "
                             "norms) or sq_norms= (precomputed ‖∇log p(y_i)‖², shape (n,))")
        if sq_norms is None:
            s = score_sq_norms(log_probs, list(params))  # type: ignore[arg-type]
        else:
            s = torch.as_tensor(sq_norms, device=r.device).detach().to(r.dtype)
            if s.shape != r.shape or not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
                raise ValueError(f"reinforce_loss: sq_norms must be {n} finite non-negative numbers (shape "
                                 f"{tuple(r.shape)}), got shape {tuple(s.shape)}")
        rs = r * s
        den = s.sum() - s
        loo = (r.sum() - r) / (n - 1)
        b = torch.where(den > 0, (rs.sum() - rs) / den.clamp_min(torch.finfo(r.dtype).tiny), loo)
    elif isinstance(baseline, str):
        if baseline not in ("mean", "leave_one_out"):
            _fail("baseline", baseline, "one of 'mean', 'leave_one_out', 'optimal', None, a real number or a tensor")
        if n < 2:
            _fail("baseline", baseline, f"None, a number or a tensor with {n} sample(s): it is made of the "
                  "other samples' rewards")
        total = r.sum(0, keepdim=True)
        b = total / n if baseline == "mean" else (total - r) / (n - 1)
    elif baseline is None:
        b = torch.zeros((), dtype=r.dtype, device=r.device)
    elif isinstance(baseline, torch.Tensor):
        b = baseline.detach().to(device=r.device, dtype=r.dtype)
    else:
        b = torch.tensor(check_number("baseline", baseline), dtype=r.dtype, device=r.device)
    return -((r - b) * log_probs).mean()


class Alternating:
    r"""Su's hybrid: gradient steps on a differentiable surrogate alternating with zeroth-order steps on the metric.

    Zeroth-order estimates have a variance that grows with the number of parameters, so Su
    (kexue.fm/archives/7737) suggests them as an auxiliary: "differentiable objective + ordinary
    gradient + large lr" alternating with "non-differentiable objective + zeroth-order gradient + small
    lr". This helper runs ``gradient_steps`` steps of ``gradient_optimizer`` (any torch optimizer, with
    the large lr) on ``loss_closure`` (zero_grad, forward, backward, return the loss), then
    ``zero_order_steps`` steps of ``zero_order`` (a :class:`ZeroOrder`, with the small lr, on the same
    parameters or a part of them) on ``metric_closure`` (forward only, returns the metric to
    minimise, e.g. the 0-1 error), and repeats::

        phase = (t mod (G + Z));   t < G: gradient step on the surrogate;   else: ZO step on the metric

    Each :meth:`step` is one step of one of the two; it returns ``(kind, value)`` with kind
    ``"gradient"`` or ``"zero_order"`` and the closure's loss. The position in the cycle is in
    :meth:`state_dict` (with both optimizers' state dicts).
    """

    def __init__(self, gradient_optimizer: torch.optim.Optimizer, zero_order: ZeroOrder, *,
                 gradient_steps: int = 1, zero_order_steps: int = 1) -> None:
        if not isinstance(gradient_optimizer, torch.optim.Optimizer):
            raise TypeError(f"Alternating: gradient_optimizer must be a torch.optim.Optimizer, got "
                            f"{type(gradient_optimizer).__name__}")
        if not isinstance(zero_order, ZeroOrder):
            raise TypeError(f"Alternating: zero_order must be a danlu.ZeroOrder, got {type(zero_order).__name__}")
        if gradient_optimizer is zero_order:
            raise ValueError("Alternating: gradient_optimizer and zero_order must be two optimizers")
        self.gradient_steps = int(check_number("gradient_steps", gradient_steps, low=0, integer=True))
        self.zero_order_steps = int(check_number("zero_order_steps", zero_order_steps, low=0, integer=True))
        if self.gradient_steps + self.zero_order_steps == 0:
            raise ValueError("Alternating: gradient_steps + zero_order_steps must be at least 1")
        self.gradient_optimizer = gradient_optimizer
        self.zero_order = zero_order
        self.t = 0

    @property
    def next_kind(self) -> str:
        """``"gradient"`` or ``"zero_order"``: what the next :meth:`step` does."""
        return "gradient" if self.t % (self.gradient_steps + self.zero_order_steps) < self.gradient_steps \
            else "zero_order"

    def step(self, loss_closure: Callable[[], Any], metric_closure: Callable[[], Any]) -> tuple[str, Any]:
        """One step of the cycle: ``gradient_optimizer.step(loss_closure)`` or ``zero_order.step(metric_closure)``."""
        if not callable(loss_closure) or not callable(metric_closure):
            raise TypeError("Alternating.step needs two closures: loss_closure (zero_grad, forward, backward, "
                            "return the loss) and metric_closure (forward only, return the metric)")
        kind = self.next_kind
        if kind == "gradient":
            value = self.gradient_optimizer.step(loss_closure)
        else:
            value = self.zero_order.step(metric_closure)
        self.t += 1
        return kind, value

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "gradient_steps": self.gradient_steps, "zero_order_steps": self.zero_order_steps,
                "gradient_optimizer": self.gradient_optimizer.state_dict(),
                "zero_order": self.zero_order.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict from :meth:`state_dict`; the cycle lengths must match this helper's."""
        if not isinstance(state_dict, dict) or not {"t", "gradient_optimizer", "zero_order"} <= set(state_dict):
            raise ValueError("Alternating.load_state_dict expects what Alternating.state_dict() returns")
        t = state_dict["t"]
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"Alternating.load_state_dict: t={t!r} (expected an int ≥ 0)")
        saved = (state_dict.get("gradient_steps"), state_dict.get("zero_order_steps"))
        if saved != (self.gradient_steps, self.zero_order_steps):
            raise ValueError(f"Alternating.load_state_dict: saved with (gradient_steps, zero_order_steps)={saved}, "
                             f"this helper has {(self.gradient_steps, self.zero_order_steps)}")
        # Check both before changing either: a failed second load must not leave the first loaded.
        import copy  # noqa: PLC0415

        grad_before = copy.deepcopy(self.gradient_optimizer.state_dict())
        self.gradient_optimizer.load_state_dict(state_dict["gradient_optimizer"])
        try:
            self.zero_order.load_state_dict(state_dict["zero_order"])
        except Exception:
            self.gradient_optimizer.load_state_dict(grad_before)
            raise
        self.t = t

    def __repr__(self) -> str:
        return (f"Alternating(gradient_steps={self.gradient_steps}, zero_order_steps={self.zero_order_steps}, "
                f"t={self.t})")
