r"""The sampling view of optimization, and MLE-guided parameter search (MGS) for non-differentiable losses.

Su (kexue.fm/archives/7521) reads an update Δ as the mean of a distribution over steps,

    p(Δ | θ) = exp(−[l(θ + Δ) − l(θ)] / α) / Z(θ),        Δ* = E_p[Δ],

which needs no derivative of l. α → 0 puts the mass on the minimiser (fastest descent), α → ∞ spreads it
evenly (Δ* → 0, most stable); on a quadratic l = gᵀΔ + ½ΔᵀAΔ, p = N(−A⁻¹g, αA⁻¹) and Δ* is the Newton step,
and in a small ball it is the gradient-descent direction. :func:`sampling_step` estimates Δ* by
self-normalised importance sampling from any proposal q: the unified view, usable on small problems.
With the steps Δ_i = σu_i of a Gaussian proposal taken as the support (``log_q=None``), the α → ∞ end is
zeroth-order search: w_i = 1/N − (l_i − l̄)/(Nα) + O(α⁻²), so α·(Δ* − mean Δ_i) → −σ²·ĝ, ĝ the
zeroth-order (ES) gradient estimate on the same samples (two-sided for ± pairs, one-sided with the mean
baseline otherwise), and Su's Δ* → 0 is this step of size σ²/α.

:class:`MGS` (Welleck & Cho) is that estimator for a model whose task loss l is not differentiable (a 0-1
error, an edit distance of decoded text) but has a differentiable surrogate l̃ (cross-entropy, MLE). Its
proposal mixes a Gaussian around 0 with one around the surrogate step −∇l̃, so that a handful of candidates
(4 in the paper) suffices.
"""

from __future__ import annotations

import math
from collections import defaultdict
from fractions import Fraction
from numbers import Real
from typing import Any, Callable, Iterable, cast

import torch

from .._core.validate import check_choice, check_number, check_optional
from .._core.optimizer import is_state_init_step
from .._core.wrapper import OptimizerWrapper
from ..wrappers.gradient_penalty import closure_gradient
from .._core.distributed import (average_values, check_regathered, check_same_seeds, is_dtensor, layout_of,
                                 loss_group, sum_partials)
from ._perturb import Directions, restore_, snapshot_low_precision

__all__ = ["MGS", "sampling_step"]

_NOISE_SCALES = ("uniform", "constant")
_ASSIGNMENTS = ("alternate", "random")
_Q_DENSITIES = ("reference", "none", "exact")
_RESTORES = ("snapshot", "replay")

# One validator per hyperparameter: used at construction, by the setters and on load_state_dict.
_CHECKS: dict[str, Callable[[Any], Any]] = {
    "candidates": lambda v: int(check_number("candidates", v, low=1, integer=True)),
    "noise": lambda v: check_number("noise", v, low=0.0, low_open=True),
    "beta": lambda v: check_number("beta", v, low=0.0),
    "mix": lambda v: check_number("mix", v, low=0.0, high=1.0),
    "noise_scale": lambda v: check_choice("noise_scale", v, _NOISE_SCALES),
    "assignment": lambda v: check_choice("assignment", v, _ASSIGNMENTS),
    "q_density": lambda v: check_choice("q_density", v, _Q_DENSITIES),
    "max_grad_norm": lambda v: check_optional("max_grad_norm", v, low=0.0, low_open=True),
    "restore": lambda v: check_choice("restore", v, _RESTORES),
}


def _log_weights(gains: torch.Tensor, log_q: torch.Tensor | None) -> torch.Tensor:
    """log w_i = log_softmax_i(gain_i − log q_i), in float64: Σ w = 1 and nothing underflows."""
    z = gains.double()
    if log_q is not None:
        z = z - log_q.double()
    return torch.log_softmax(z, dim=0)


def sampling_step(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    proposal_sampler: Callable[[int, torch.Generator | None], torch.Tensor],
    log_q: Callable[[torch.Tensor], torch.Tensor] | None,
    alpha: float,
    n: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Δ* = E_p[Δ] for p(Δ) ∝ exp(−l(θ + Δ)/α), by self-normalised importance sampling (Su's unified view).

    With Δ_1..Δ_n ~ q::

        log w_i = log_softmax_i(−l(θ + Δ_i)/α − log q(Δ_i)),        Δ* ≈ Σ_i w_i Δ_i

    (l(θ) and the normalisers of p and q cancel in the softmax). This is the update :class:`MGS` takes,
    with α = 1/β and the task loss as l; here on an explicit batch of steps, for small problems and tests.
    On a quadratic l = gᵀΔ + ½ΔᵀAΔ it recovers the Newton step −A⁻¹g for every α (p = N(−A⁻¹g, αA⁻¹)).

    Args:
        loss_fn: maps the steps, a tensor of shape ``(n, ...)``, to their losses l(θ + Δ_i), shape ``(n,)``.
        proposal_sampler: ``proposal_sampler(n, generator)`` draws the ``(n, ...)`` steps from q.
        log_q: ``log_q(steps)`` → ``(n,)``, log q up to a constant; ``None`` for a flat proposal
            (uniform on a ball, or q = p's support where only the losses matter).
        alpha: the temperature α > 0.
        n: the number of samples, ≥ 1.
        generator: passed to ``proposal_sampler`` (the global RNG is used only if the sampler does).

    Returns:
        Δ*, shape ``steps.shape[1:]``, in the steps' dtype (weights and sum in float64).
    """
    alpha = check_number("alpha", alpha, low=0.0, low_open=True)
    n = int(check_number("n", n, low=1, integer=True))
    steps = proposal_sampler(n, generator)
    losses = loss_fn(steps)
    log_w = _log_weights(-losses.double() / alpha, None if log_q is None else log_q(steps))
    return torch.tensordot(log_w.exp(), steps.double(), dims=1).to(steps.dtype)


def _hyper(name: str) -> property:
    def get(self: "MGS") -> Any:
        return self._hp[name]

    def set_(self: "MGS", value: Any) -> None:
        self._hp[name] = _CHECKS[name](value)

    return property(get, set_, doc=f"``{name}`` (validated on assignment; see the class docstring).")


def _is_mle(i: int, mix: float) -> bool:
    """'alternate': candidate i is an MLE-component one iff ⌈(i+1)·π⌉ > ⌈i·π⌉, so the first k candidates
    hold ⌈k·π⌉ of them (π = ½: even i, as in the reference). Exact rational arithmetic on repr(π)."""
    pi = Fraction(repr(mix))
    return math.ceil((i + 1) * pi) > math.ceil(i * pi)


def _total(terms: list[torch.Tensor]) -> float:
    """Σ of 0-d tensors, with one host sync per device."""
    by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for t in terms:
        by_device[t.device].append(t)
    return sum(float(torch.stack(ts).sum()) for ts in by_device.values())


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """⟨x, y⟩ in float64 (for the local shards of an FSDP2 parameter: the local part, see :func:`_summed`)."""
    return torch.dot(x.reshape(-1).double(), y.reshape(-1).double())


def _summed(values: list[torch.Tensor], shards: list[Any]) -> list[torch.Tensor]:
    """Per-tensor local sums, summed over the ranks for FSDP2 shards: one all-reduce for all of them."""
    if all(sh is None for sh in shards):
        return values
    return [row[0] for row in sum_partials([[v] for v in values], shards)]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


def _clip_(grads: list[torch.Tensor], max_norm: float, total: torch.Tensor) -> None:
    """Scale ``grads`` (tensors, e.g. local shards) by min(1, max_norm/(total + 1e-6)), as
    ``torch.nn.utils.clip_grads_with_norm_`` scales the gradients of the parameters it is given."""
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device))


def _grad_norm(params: list[torch.Tensor], shards: list[Any]) -> torch.Tensor:
    """The global 2-norm of the gradients (torch's ``get_total_norm``; for FSDP2 shards, each parameter's
    squared norm summed over its shards, then over the parameters). Every one of ``params`` has a gradient."""
    grads = [cast(torch.Tensor, p.grad) for p in params]
    if all(sh is None for sh in shards):
        return torch.nn.utils.get_total_norm(grads)
    sq = _summed([torch.linalg.vector_norm(_local(g), dtype=torch.float32).square() for g in grads], shards)
    return torch.stack(sq).sum().sqrt() if sq else torch.zeros(())


class MGS(OptimizerWrapper):
    r"""MLE-guided parameter search: a weighted random search on a task loss, guided by a surrogate gradient.

    One step, with c(θ) = ``task_loss()`` (any metric, not differentiated) and l̃ the surrogate whose
    gradient ``surrogate_closure`` computes::

        1. ∇l̃ ← surrogate_closure()        (clipped to global norm max_grad_norm);  a = −∇l̃
        2. c₀ = c(θ)
        3. for i = 1..K:  ε_i = a + n_i  (MLE component, probability π = mix)
                          ε_i = n_i      (zero component)
           n_i = σ·s_T·z_i per tensor T, z_i ~ N(0, I), s_T = mean|a_T| ('uniform') or 1 ('constant')
           c_i = c(θ + ε_i)
        4. log w_i = log_softmax_i(β·(c₀ − c_i) − log q(ε_i))
        5. Δ = Σ_i w_i ε_i;  .grad = −Δ (clipped to max_grad_norm);  inner.step()

    This is Su's sampling estimate Δ* = E_p[Δ], p ∝ exp(−β·[c(θ+Δ) − c(θ)]) (α = 1/β), with the proposal
    q = π·N(a, ·) + (1 − π)·N(0, ·): β → ∞ moves to the best candidate, β = 0 (with ``q_density='none'``)
    to the plain mean of the candidates. With SGD at lr 1 the update is θ + Δ; AdamW (the reference's
    choice) or any other inner optimizer treats −Δ as a gradient.

    **Seed replay: no model copies, at most one copy of the parameters.** Each candidate is a seed of a
    generator the wrapper owns: θ += ε_i in place, c_i = task_loss(), θ restored; once the weights are
    known the ε_i are drawn again from their seeds, tensor by tensor and all candidates in lockstep, to
    form −Δ. The surrogate gradient a is kept in the ``.grad`` tensors the closure produced (held apart
    from the parameters while the candidates are scored) and −Δ is formed in place in them: neither a
    nor Δ takes a buffer of its own. Memory beyond the parameters and their ``.grad``, with n the
    searched parameters' size:

    * ``restore='replay'`` (default, no model copy): θ −= ε_i with ε_i drawn once more from its seed
      (MeZO). 32/64-bit parameters then carry the rounding of θ + ε − ε, a few ulp per candidate, as
      a random walk (16-bit ones are restored from copies of those tensors, where that rounding is
      large).
    * ``restore='snapshot'``: one exact copy of the searched parameters (1×n), which θ is restored
      from after each candidate, bitwise in every dtype (a group at lr 0 stays put).

    Either way a few temporaries of the largest parameter's size (the noise being drawn, Σ w_i z_i).
    The reference keeps K + 1 deep copies of the model; the spec's lean form, a buffer for a and
    one for Δ (2×n).

    **Cost per step:** 1 forward + backward of the surrogate, K + 1 calls of ``task_loss``, and 2K
    (``'replay'``: 3K) passes of noise generation over the searched parameters.

    **Step contract.** ``step(surrogate_closure, task_loss)``, both required (``TypeError`` otherwise,
    before anything changes):

    * ``surrogate_closure()`` evaluates the differentiable loss at θ; it may call backward itself (the
      usual torch closure) or return the loss and let the wrapper backpropagate it (as
      :class:`~danlu.GradientPenalty`). It runs once per step, with gradients enabled, and the
      wrapper clears the grads of the inner optimizer's parameters first.
    * ``task_loss()`` returns the metric at the current parameters as a Python number or a
      one-element tensor, lower is better. It runs K + 1 times per step under ``torch.no_grad()``, on
      the same data each time (fix the batch, and put the model in eval mode inside it if dropout
      must be off: the reference decodes with ``model.eval()``). A non-finite value raises
      ``RuntimeError`` after the parameters are restored.

    ``step`` returns the surrogate closure's loss (torch's convention); ``last_step`` holds the step's
    numbers: ``{"task_loss": c₀, "candidate_losses": [c_i], "weights": [w_i], "mle": [bool]}`` (floats).

    If ``task_loss`` raises or returns a non-finite value, or the surrogate gradient is not finite, the
    step raises with every parameter back at θ (bitwise; with ``restore='replay'``, 32/64-bit ones to
    the few ulp above), the inner optimizer and the generator untouched, and ``.grad`` holding the
    (clipped) surrogate gradient.

    **Ties.** On a piecewise-constant task loss (a 0-1 error, an edit distance of greedy decodes) a
    candidate that changes no prediction scores exactly c₀. When all K do, the weights come from the
    proposal density alone (uniform for ``q_density='none'``) and the step is (Σ_MLE w_i)·(−∇l̃) plus
    noise: through a scale-invariant inner optimizer such as AdamW, the surrogate step itself; the search
    has seen nothing. ``last_step`` shows it (every ``candidate_losses`` entry equal to ``task_loss``).
    The defaults are the reference's, and 'uniform' noise shrinks with the surrogate gradient, so after MLE
    pre-training it can be far too small: on danlu's ``zero-one`` task (logistic regression, 455 rows) the
    default ties in 96% of updates from a CE-pretrained start and 31% from scratch, while 'uniform' σ = 30
    or 'constant' σ = 0.1 ties in under 1% at both (``danlu compare --experiment sampling-view``). Raise σ
    until candidates stop tying; the right value is the task's (its metric's resolution in parameter space).

    Parameters searched: those in ``params`` (or all of the inner optimizer's, ``params=None``) that
    have a surrogate gradient in this step; one whose ``.grad`` is None is neither perturbed nor
    stepped. Parameters of the inner optimizer outside ``params`` are stepped on their (clipped)
    surrogate gradient, unperturbed: MGS on a head, maximum likelihood on the body (Su's advice to
    use derivative-free search on small parameter subsets).

    Args:
        params: the parameters to search over, an iterable of tensors (or of param-group dicts) that
            the inner optimizer holds, or ``None`` for all of its parameters (also those of groups added
            later).
        optimizer: the inner ``torch.optim.Optimizer``; the wrapper shares its param groups (an lr
            scheduler on the wrapper changes the inner lr) and its state (the wrapper's own entries
            in it are prefixed), so the wrapper's state dict is the inner one's in torch's layout.
        candidates: K ≥ 1, the number of candidates per step (reference ``ggs_num_samples``: 4).
        noise: σ > 0, the noise scale (reference ``ggs_noise``: 1.0, the default; too small to be seen by
            a piecewise-constant metric near an MLE optimum, see Ties).
        beta: β ≥ 0, the inverse temperature 1/α (reference ``ggs_beta``: 100).
        mix: π ∈ [0, 1], the probability of the MLE component (reference: ½; 1 is its ``mle_dist_only``
            ablation, 0 its ``zero_dist_only``).
        noise_scale: ``'uniform'`` (reference default: per tensor, σ·mean|a_T|) or ``'constant'`` (σ).
            'uniform' vanishes where a does (a CE optimum): use 'constant' to search there.
        assignment: ``'alternate'`` (deterministic: the first k candidates hold ⌈k·π⌉ MLE-component
            ones; π = ½ gives the reference's even/odd) or ``'random'`` (each MLE with probability π,
            from the wrapper's generator).
        q_density: log q(ε) in the weights. ``'reference'``: the reference's unit-variance mixture
            log[π·e^{−½‖ε−a‖²} + (1−π)·e^{−½‖ε‖²}] whatever σ and s_T are; ``'none'``: log q = 0;
            ``'exact'``: the density of the proposal actually sampled (per-tensor variances (σ·s_T)²,
            tensors with s_T = 0 left out). In high dimension 'exact' is dominated by the χ²
            fluctuation of ‖z‖² (≈ 2e3 nats at d = 1e6, spec §5.2) and 'reference' is nearly constant,
            so w ≈ softmax(β(c₀ − c_i)); use 'exact' for d ≲ 100 only.
        max_grad_norm: clip the surrogate gradient (over all the inner optimizer's parameters) and
            the final −Δ (over the searched ones) to this global norm (reference: 1.0); ``None``
            disables both.
        restore: ``'snapshot'`` (exact, one copy of the searched parameters) or ``'replay'`` (no
            copy, a few ulp of drift per candidate); see above.
        seed: seeds the wrapper's ``torch.Generator`` (saved in ``state_dict``; the global RNG is
            neither used nor disturbed). Runs with the same seed take the same steps.

    References:
        Welleck & Cho, "MLE-guided parameter search for task loss minimization in neural sequence
        modeling", AAAI 2021, arXiv:2006.03158 (code: github.com/wellecks/mgs, ``seq_level/gpt2/guided``);
        Su Jianlin, kexue.fm/archives/7521 (the sampling view).

    Deviations from the reference code:
        * Weights in log space from β·(c₀ − c_i) directly; the reference forms log(exp(−c)) with
          ``np.exp``, which underflows to 0 once c ≳ 745 (log → −inf, NaN weights), and clamps at 1e16.
          log q by ``logaddexp``: the reference's float32 ``log(½e^{−½ε·ε} + …)`` is −inf once
          ½‖ε‖² ≳ 104.
        * Seed replay instead of K + 1 deep copies, and the surrogate gradient on the model itself.
        * π is a hyperparameter (reference: ½, hard-coded in the density too); 'random' assignment and
          'exact'/'none' densities are additions. The noise is drawn from per-seed generators, so
          the random stream differs from ``torch.randn_like``.
        * With a ``params`` subset the surrogate clip runs over all the inner optimizer's parameters
          (the reference: all the model's, which are all searched) and the final clip over the
          searched ones. Parameters without a surrogate gradient are skipped (the reference has none).
        * A non-finite task loss or surrogate gradient is an error (the reference propagates NaN).
    """

    _hyper_keys = tuple(_CHECKS)
    _prefix = "mgs_"
    _entry = "danlu_mgs"

    candidates = _hyper("candidates")
    noise = _hyper("noise")
    beta = _hyper("beta")
    mix = _hyper("mix")
    noise_scale = _hyper("noise_scale")
    assignment = _hyper("assignment")
    q_density = _hyper("q_density")
    max_grad_norm = _hyper("max_grad_norm")
    restore = _hyper("restore")

    def __init__(
        self,
        params: Iterable[Any] | None,
        optimizer: torch.optim.Optimizer,
        candidates: int = 4,
        noise: float = 1.0,
        beta: float = 100.0,
        mix: float = 0.5,
        *,
        noise_scale: str = "uniform",
        assignment: str = "alternate",
        q_density: str = "reference",
        max_grad_norm: float | None = 1.0,
        restore: str = "replay",
        seed: int = 0,
    ) -> None:
        given = dict(candidates=candidates, noise=noise, beta=beta, mix=mix, noise_scale=noise_scale,
                     assignment=assignment, q_density=q_density, max_grad_norm=max_grad_norm,
                     restore=restore)
        hyper = {k: _CHECKS[k](v) for k, v in given.items()}
        seed = int(check_number("seed", seed, low=0, high=2**64 - 1, integer=True))
        super().__init__(optimizer)
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError("MGS steps its inner optimizer from .grad without a closure; "
                            "LBFGS re-evaluates a closure and is not supported")
        self._hp = hyper
        self._search = self._resolve_params(params)
        self._generator = torch.Generator().manual_seed(seed)
        self.last_step: dict[str, Any] | None = None
        self._sync_group_rng()  # present from the start: DCP's flattened load reads the groups' own keys

    def _resolve_params(self, params: Iterable[Any] | None) -> list[torch.Tensor] | None:
        if params is None:
            return None
        if isinstance(params, torch.Tensor):
            raise TypeError("MGS params must be an iterable of tensors (or of param-group dicts) or None, "
                            f"got a single {type(params).__name__}; wrap it in a list")
        flat: list[Any] = []
        for item in params:
            if isinstance(item, dict):
                group = item["params"]
                flat.extend([group] if isinstance(group, torch.Tensor) else group)
            else:
                flat.append(item)
        if not flat:
            raise ValueError("MGS got an empty params list (an iterator the inner optimizer already "
                             "consumed?); pass None to search all of the inner optimizer's parameters")
        inner = {id(p) for p in self._params()}
        seen: set[int] = set()
        for i, p in enumerate(flat):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"MGS params[{i}] is a {type(p).__name__}, expected a tensor")
            if id(p) not in inner:
                raise ValueError(f"MGS params[{i}] (shape {tuple(p.shape)}) is not a parameter of the inner "
                                 "optimizer; search over (a subset of) the parameters it steps")
            if id(p) in seen:
                raise ValueError(f"MGS params[{i}] (shape {tuple(p.shape)}) appears more than once")
            seen.add(id(p))
        return flat

    # --- state -------------------------------------------------------------------------------------

    def _entry_value(self) -> dict[str, Any]:
        return {**super()._entry_value(), "rng": self._generator.get_state()}

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict and MGS's entry (class, hyperparameters, generator). The
        generator state is also the first param group's ``mgs_rng`` (refreshed here), where tools that
        keep only ``state`` and ``param_groups`` (``torch.distributed.checkpoint``) keep it too."""
        self._sync_group_rng()
        return super().state_dict()

    def _sync_group_rng(self) -> None:
        if self.param_groups:
            self.param_groups[0][self._prefix + "rng"] = self._generator.get_state()

    def _check_own(self, entry: dict[str, Any] | None, own_state: dict[int, dict[str, Any]],
                   own_groups: dict[int, dict[str, Any]], with_state: dict[int, dict[str, Any]]) -> None:
        """Saved hyperparameters and generator state are checked before anything changes. A dict
        without MGS's entry (a tool that keeps only state and param_groups) keeps the generator."""
        mine = self._generator.get_state()
        for gi, own in own_groups.items():
            rng = own.get("rng")
            if set(own) != {"rng"} or gi != 0 or not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8
                                                     and rng.shape == mine.shape):
                raise ValueError(f"MGS.load_state_dict: param group {gi} has MGS entries {sorted(own)}; expected only "
                                 f"'mgs_rng' (the uint8 generator state of shape {tuple(mine.shape)}) in group 0")
        if entry is None:
            return
        try:
            for k, v in (entry.get("hyper") or {}).items():
                if k in _CHECKS:
                    _CHECKS[k](v)
        except (TypeError, ValueError) as err:
            raise ValueError(f"MGS.load_state_dict: {err}") from err
        rng = entry.get("rng")
        mine = self._generator.get_state()
        if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.shape == mine.shape):
            raise ValueError("MGS.load_state_dict: 'rng' must be the uint8 generator state "
                             f"of shape {tuple(mine.shape)} that MGS.state_dict() saves")

    def _load_own(self, entry: dict[str, Any] | None) -> None:
        rng = self.param_groups[0].get(self._prefix + "rng") if self.param_groups else None
        if entry is not None:
            self._generator.set_state(entry["rng"].cpu())
        elif rng is not None:  # a tool kept only state and param_groups: the generator from the group
            self._generator.set_state(rng.cpu())
        self._sync_group_rng()

    # --- the step ----------------------------------------------------------------------------------

    def _noise(self, dirs: Directions, seed: int, scales: list[torch.Tensor]):
        """(param, n_T) for candidate ``seed``: n_T = σ·s_T·z_T, one tensor at a time."""
        for (p, z), s in zip(dirs.tensors(seed), scales):
            yield p, z.mul_(s)

    def _epsilons(self, dirs: Directions, seed: int, mle: bool, grads: list[torch.Tensor],
                  scales: list[torch.Tensor]):
        """(param, ε_T, n_T, ∇_T) with ε = a + n (MLE) or n, a = −∇."""
        for (p, n), g in zip(self._noise(dirs, seed, scales), grads):
            yield p, (n.sub(g) if mle else n), n, g

    def _score(self, task_loss: Callable[[], Any], what: str, check_finite: bool = True) -> float:
        value = task_loss()
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise TypeError(f"MGS: task_loss() must return a number or a one-element tensor, got a tensor "
                                f"of shape {tuple(value.shape)} at {what}")
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"MGS: task_loss() must return a number, got {type(value).__name__} at {what}")
        value = float(value)
        if check_finite and not math.isfinite(value):
            raise RuntimeError(f"MGS: task_loss() returned {value} at {what}; the parameters are restored "
                               "and nothing was stepped")
        return value

    def _score_candidate(self, task_loss, dirs, seed, mle, grads, scales, omegas, snapshot, shards, synced):
        """c(θ + ε) by perturbing in place and restoring; also Σω n·n and Σω n·∇ for log q."""
        dots: list[tuple[torch.Tensor, torch.Tensor, Any, Any]] = []  # (n·n, n·∇, ω, shard), local parts
        done = 0
        try:
            for (p, eps, n, g), w, sh in zip(self._epsilons(dirs, seed, mle, grads, scales), omegas, shards):
                p.add_(eps)
                done += 1
                if w is not None:
                    dots.append((_dot(n, n), _dot(n, g), w, sh))
            value = self._score(task_loss, f"candidate seed {seed}", check_finite=not synced)
            sh_ = [d[3] for d in dots]
            nn_ = _summed([d[0] for d in dots], sh_)
            ng_ = _summed([d[1] for d in dots], sh_)
            return value, _total([d[2] * v for d, v in zip(dots, nn_)]), _total([d[2] * v for d, v in zip(dots, ng_)])
        finally:
            if any(snap is None for snap in snapshot[:done]):
                replay = self._epsilons(dirs, seed, mle, grads, scales)
                for (p, eps, _, _), snap in zip(replay, snapshot[:done]):
                    if snap is None:
                        p.sub_(eps)
            restore_(dirs.targets[:done], snapshot[:done])

    def _log_q(self, mle: list[bool], nn: list[float], ng: list[float], aa: float) -> torch.Tensor | None:
        """log q(ε_i) up to a constant: log[π·e^{−½‖ε−a‖²} + (1−π)·e^{−½‖ε‖²}] with ω-weighted norms."""
        if self.q_density == "none":
            return None
        pi = self.mix
        log_pi = math.log(pi) if pi > 0 else -math.inf
        log_1mpi = math.log1p(-pi) if pi < 1 else -math.inf
        # a = −∇. MLE candidate ε = a + n: ‖ε − a‖² = ‖n‖², ‖ε‖² = ‖a‖² − 2n·∇ + ‖n‖².
        # Zero candidate ε = n:           ‖ε − a‖² = ‖a‖² + 2n·∇ + ‖n‖², ‖ε‖² = ‖n‖².
        to_mle = torch.tensor([n2 if m else aa + 2 * g + n2 for m, n2, g in zip(mle, nn, ng)], dtype=torch.float64)
        to_zero = torch.tensor([aa - 2 * g + n2 if m else n2 for m, n2, g in zip(mle, nn, ng)], dtype=torch.float64)
        return torch.logaddexp(log_pi - 0.5 * to_mle, log_1mpi - 0.5 * to_zero)

    @torch.no_grad()
    def step(self, surrogate_closure: Callable[[], Any] | None = None,  # type: ignore[override]
             task_loss: Callable[[], Any] | None = None, *, closure: Callable[[], Any] | None = None) -> Any:
        """One MGS step; returns the surrogate closure's loss (see the class docstring).

        Args:
            surrogate_closure: required; evaluates the differentiable surrogate loss at θ (with or
                without calling backward itself). ``closure=`` (torch's keyword) is the same argument.
            task_loss: required; returns the task metric at the current parameters (no gradient).
        """
        if closure is not None:  # torch's keyword (``opt.step(closure=...)``) for the surrogate closure
            if surrogate_closure is not None:
                raise TypeError("MGS.step got both surrogate_closure and closure (the same argument)")
            surrogate_closure = closure
        if surrogate_closure is None and task_loss is None and is_state_init_step(self):
            self.optimizer.step()  # torch.distributed.checkpoint's state initialisation
            return None
        if surrogate_closure is None or not callable(surrogate_closure):
            raise TypeError("MGS.step needs a surrogate closure that evaluates the differentiable loss "
                            "(and may call backward), and task_loss: "
                            f"opt.step(surrogate_closure, task_loss); got closure {surrogate_closure!r}")
        if task_loss is None or not callable(task_loss):
            raise TypeError("MGS.step needs task_loss, a callable returning the task metric at the current "
                            f"parameters: opt.step(surrogate_closure, task_loss); got {task_loss!r}")
        if getattr(self.optimizer, "_fused", False):
            raise RuntimeError("MGS cannot wrap an optimizer whose fuse_into_backward() hooks are active; "
                               "remove them (handle.remove()) first")
        trainable = [p for p in self._params() if p.requires_grad]
        searched = trainable if self._search is None else [p for p in self._search if p.requires_grad]
        if any(p.is_complex() for p in searched):
            raise TypeError("MGS does not support complex parameters (real Gaussian perturbations)")

        self._refuse_outside_grads(trainable)
        try:
            return self._step(surrogate_closure, task_loss, trainable, searched)
        finally:
            self._note_grads_left(trainable)

    def _step(self, surrogate_closure: Callable[[], Any], task_loss: Callable[[], Any],
              trainable: list[torch.Tensor], searched: list[torch.Tensor]) -> Any:
        loss = closure_gradient(surrogate_closure, trainable)
        with_grad = [p for p in trainable if p.grad is not None]
        if any(cast(torch.Tensor, p.grad).is_sparse for p in with_grad):
            raise RuntimeError("MGS does not support sparse gradients (it perturbs parameters densely)")
        # FSDP2 parameters: every vector operation below is on the local shards; norms and inner products
        # sum over the shards (danlu._core.distributed), the task losses are averaged over the ranks.
        shard_of = {id(p): layout_of(p) for p in with_grad}
        total = _grad_norm(with_grad, [shard_of[id(p)] for p in with_grad])
        if not math.isfinite(float(total)):
            raise RuntimeError(f"MGS: the surrogate gradient is not finite (norm {float(total)}); "
                               "nothing was changed")
        if self.max_grad_norm is not None and with_grad:
            _clip_([_local(cast(torch.Tensor, p.grad)) for p in with_grad], self.max_grad_norm, total)

        active = [p for p in searched if p.grad is not None]
        if not active:
            self.last_step = None
            self.optimizer.step()
            return loss
        grads = [_local(cast(torch.Tensor, p.grad)) for p in active]
        shards = [shard_of[id(p)] for p in active]
        # The surrogate gradients (a = −∇ for the searched params) are held here while the candidates
        # are scored, out of reach of a task_loss that zeroes or accumulates .grad.
        held = [(p, p.grad) for p in with_grad]
        rng_state = self._generator.get_state()
        for p in with_grad:
            p.grad = None
        try:
            log_w, mle, seeds, scales, info = self._search_step(task_loss, active, grads, shards)
        except BaseException:
            self._generator.set_state(rng_state)
            raise
        finally:
            for p, g in held:
                p.grad = g

        # −Δ = −Σ w_i ε_i = (Σ_{MLE} w_i)·∇ − Σ_i w_i n_i, formed in place in the gradient buffers.
        w = log_w.exp().tolist()
        w_mle = sum(wi for wi, m in zip(w, mle) if m)
        dirs = Directions(active)
        streams = [self._noise(dirs, s, scales) for s in seeds]
        for _p, g, draws in zip(active, grads, zip(*streams)):
            acc = draws[0][1].mul_(w[0])
            for (_, n), wi in zip(draws[1:], w[1:]):
                acc.add_(n, alpha=wi)
            g.mul_(w_mle).sub_(acc)
        if self.max_grad_norm is not None:
            norm = _grad_norm(active, shards)
            _clip_(grads, self.max_grad_norm, norm)
        self.optimizer.step()
        self.last_step = {**info, "weights": w, "mle": mle}
        return loss

    def _search_step(self, task_loss, active, grads, shards):
        """Score c₀ and the K candidates; return (log w, mle flags, seeds, per-tensor noise scales, info)."""
        sigma = self.noise
        if self.noise_scale == "uniform":
            sums = _summed([torch.sum(g.abs(), dtype=torch.float64 if g.dtype == torch.float64 else torch.float32)
                            for g in grads], shards)
            scales = [sigma * t / max(p.numel(), 1) for p, t in zip(active, sums)]
        else:
            scales = [torch.tensor(sigma, dtype=torch.float64 if g.dtype == torch.float64 else torch.float32,
                                   device=g.device) for g in grads]
        if self.q_density == "none":
            omegas: list[Any] = [None] * len(active)
        elif self.q_density == "reference":
            omegas = [1.0] * len(active)
        else:  # 'exact': ‖·‖² in units of each tensor's noise variance; noise-free tensors drop out
            omegas = [torch.where(s > 0, 1.0 / s.double().square(), 0.0) for s in scales]
        kept = [(g, w, sh) for g, w, sh in zip(grads, omegas, shards) if w is not None]
        gg = _summed([_dot(g, g) for g, _, _ in kept], [sh for _, _, sh in kept])
        aa = _total([w * v for (_, w, _), v in zip(kept, gg)])

        dirs = Directions(active)
        if self.restore == "snapshot":
            snapshot: list[torch.Tensor | None] = [t.detach().clone() for t in dirs.targets]
        else:
            snapshot = snapshot_low_precision(dirs.targets)
        group = loss_group(type(self).__name__, active, None)  # task losses averaged over these ranks
        c0 = self._score(task_loss, "θ (c₀)", check_finite=group is None)
        check_regathered("MGS", active)  # after a forward: FSDP2's state exists by then; nothing moved yet
        k = self.candidates
        # Below 2³²: the CPU generator (mt19937) keeps only the low 32 bits of a seed, so wider seeds
        # would only add collisions between candidates that differ above bit 32.
        seeds = torch.randint(0, 2**32, (k,), generator=self._generator).tolist()
        if group is not None:
            check_same_seeds(type(self).__name__, seeds, group)
        if self.assignment == "alternate":
            mle = [_is_mle(i, self.mix) for i in range(k)]
        else:
            mle = (torch.rand(k, generator=self._generator, dtype=torch.float64) < self.mix).tolist()
        costs, nn, ng = [], [], []
        for seed, m in zip(seeds, mle):
            c, n2, ng_ = self._score_candidate(task_loss, dirs, seed, m, grads, scales, omegas, snapshot, shards,
                                               group is not None)
            costs.append(c)
            nn.append(n2)
            ng.append(ng_)
        if group is not None:  # every rank scored its own data: the step uses the mean over the ranks
            local = [c0, *costs]
            c0, *costs = average_values(local, group)
            bad = next((v for v in [c0, *costs] if not math.isfinite(v)), None)
            if bad is not None:
                raise RuntimeError(f"MGS: task_loss() was not finite on some rank (mean over the ranks {bad}; this "
                                   f"rank's values {local}); the parameters are restored and nothing was stepped")
        # β·(c₀ − c_i) in float64; a product beyond the float64 range saturates (ties stay ties).
        big = torch.finfo(torch.float64).max
        gains = (self.beta * (c0 - torch.tensor(costs, dtype=torch.float64))).clamp(-big, big)
        log_w = _log_weights(gains, self._log_q(mle, nn, ng, aa))
        return log_w, mle, seeds, scales, {"task_loss": c0, "candidate_losses": costs}
