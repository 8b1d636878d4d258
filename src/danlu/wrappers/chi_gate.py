"""Su's accumulation recipe for an unmodified momentum optimizer: β → β̃ and the lr gated by χ_{t/k}."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .._core.optimizer import DanluOptimizer, is_state_init_step
from .._core.validate import check_bool, check_number
from .._core.wrapper import OptimizerWrapper

__all__ = ["ChiGated"]

_MICRO = "chi_micro_step"  # param-group key: micro-steps taken in the current window, 0 ≤ · < k
_BASE = "chi_base_"        # + coefficient key: the value before the rescale (the user's or a scheduler's)
_SET = "chi_set_"          # + coefficient key: the value the wrapper wrote (β̃)


def _momentum_keys(optimizer: torch.optim.Optimizer) -> tuple[str, ...] | None:
    """The param-group keys of ``optimizer`` that hold EMA-style coefficients the rescale applies to
    (each float, or every entry of a tuple), or None for an optimizer the wrapper does not know."""
    from ..optim.adamw import AdamW  # noqa: PLC0415  (the wrappers are imported by danlu/__init__)
    from ..optim.lion import Lion, Tiger  # noqa: PLC0415
    from ..optim.sgdm import SGDM  # noqa: PLC0415

    table: tuple[tuple[type, tuple[str, ...]], ...] = (
        (Tiger, ("beta",)),
        (Lion, ("betas",)),
        (AdamW, ("betas",)),
        (SGDM, ("momentum",)),
        (torch.optim.SGD, ("momentum", "dampening")),
        (torch.optim.Adam, ("betas",)),
        (torch.optim.AdamW, ("betas",)),
        (torch.optim.Adamax, ("betas",)),
    )
    for cls, keys in table:
        if isinstance(optimizer, cls):
            return keys
    return None


def _innermost(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    while isinstance(optimizer, OptimizerWrapper):
        optimizer = optimizer.optimizer
    return optimizer


def _rescaled(beta: float, k: int) -> float:
    """β̃ = 1 − (1 − β)/k (β itself, bitwise, for k = 1)."""
    return beta if k == 1 else 1.0 - (1.0 - beta) / k


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return False
    return type(a) is type(b) and a == b


def _check_coefficient(name: str, value: Any) -> Any:
    """A float in [0, 1), or a tuple/list of them (``betas``); tensors are refused."""
    if isinstance(value, (tuple, list)):
        return type(value)(_check_coefficient(f"{name}[{i}]", v) for i, v in enumerate(value))
    return check_number(name, value, low=0.0, high=1.0, high_open=True)


def _apply_rescale(value: Any, k: int) -> Any:
    if isinstance(value, (tuple, list)):
        return type(value)(_apply_rescale(v, k) for v in value)
    return _rescaled(float(value), k)


def _zero_like(lr: Any) -> Any:
    return torch.zeros_like(lr) if isinstance(lr, torch.Tensor) else 0.0


def _no_loss() -> None:
    return None


class ChiGated(OptimizerWrapper):
    r"""Su's "no code change" gradient accumulation for any momentum optimizer: β → β̃, lr × χ_{t/k}.

    Call :meth:`step` after every micro-batch (``zero_grad``, forward, backward, ``step``). With t the
    micro-step (1-based, counted by the wrapper) and χ_{t/k} = 1 when k divides t, else 0, the wrapper
    runs the unmodified inner optimizer on *every* micro-batch, so its momentum absorbs each
    micro-gradient, but with the learning rate α_t·χ_{t/k}: θ moves only on the k-th, 2k-th, ... call.
    Optionally (``rescale_betas``, default) every momentum coefficient is replaced, once, by::

        β̃ = 1 − (1 − β)/k

    For EMA momentum m ← β̃·m + (1 − β̃)·g, k micro-steps unroll to
    m_{kt} = β̃^k·m_{k(t−1)} + (1 − β̃)·Σ_{i=1}^{k} β̃^{i−1}·g_{kt−i+1}; with β̃^{i−1} ≈ 1 and
    β̃^k ≈ 1 − k(1 − β̃) = β this is β·m_{k(t−1)} + (1 − β)·(1/k)Σ g, the EMA step on the window's mean
    gradient, i.e. accumulation over k micro-batches. (β = 0.9: β̃^k = 0.9025, 0.9037, 0.9043 for
    k = 2, 4, 8, tending to e^{−(1−β)} = 0.9048; the approximation is good only for β near 1: β = 0
    becomes β̃ = 1 − 1/k, an EMA whose β̃^k ≈ e^{−1}, where accumulation would keep no memory.)

    **What the essay says** (Su, kexue.fm/archives/8634, "结论反思"): for small-batch training without
    writing accumulation or changing the optimizer, (1) change every β to 1 − (1 − β)/k and (2) multiply
    the learning rate by χ_{t/k}, so that the parameters are updated once every k steps; and Su found
    point (2) matters more than point (1): even with β unchanged, updating θ only every k steps improved
    results when the small batch was the bottleneck ("fewer updates, better"; no numbers published).
    The lr on the k-th micro-step is α_t, **not** k·α_t (the essay multiplies by χ only), and t counts
    micro-steps (the essay's α_t is indexed by them). Choices made here where the essay is silent:

    - **The lr is read every step.** Between micro-steps ``group["lr"]`` is always the scheduled
      value: on the k−1 gated-off calls the wrapper sets it to 0 (a zero tensor for a tensor lr) for
      the inner step only and puts the original object back afterwards (also when the step raises).
      An lr scheduler therefore works unchanged. Stepping it after every micro-step gives the essay's
      α_t (indexed by micro-steps; the update uses α_{kt}); stepping it only when
      :attr:`is_update_step` (e.g. through :class:`danlu.StepOnUpdate`) counts updates.
    - **Weight decay.** Decoupled decay θ ← θ(1 − αλ) is multiplied by the gated lr, so it is applied
      on the k-th micro-step only, once per window at α, as for one step of the k-times-larger batch
      (deliberate: decaying every micro-step would be a k-fold stronger decay). Coupled L2 (torch's
      ``SGD``/``Adam`` ``weight_decay``, added to g) enters the momentum every micro-step, like the
      mean gradient of the big batch.
    - **Counters run per micro-step.** The inner optimizer is unmodified: Adam's ``state["step"]``
      advances on every call, so its bias corrections are 1 − β^t with t in micro-steps, where Su's
      modified Adam uses 1 − β^{t/k} (updates). With the rescale, 1 − β̃^t ≈ 1 − β^{t/k}, so the two
      agree approximately; without it (χ only) the correction fades k× sooner.
    - **Which keys are momentum coefficients** (``rescale_betas=True``; the essay says "all β"):
      ``torch.optim.SGD``: ``momentum`` μ *and* ``dampening`` d. Its buffer b ← μ·b + (1 − d)·g is
      not an EMA unless d = μ; accumulating the mean gradient is b ← μ·b + (1 − d)·ḡ, which the same
      map applied to both (μ̃ = 1 − (1 − μ)/k, d̃ = 1 − (1 − d)/k, i.e. the gradient's weight 1 − d
      divided by k) reproduces to the same approximation; rescaling μ alone would make b ≈ k× the
      accumulated buffer, i.e. k× the step. (torch's first step sets b = g regardless of d, so the first
      window's first micro-gradient weighs 1 instead of 1/k; ``nesterov=True`` needs d = 0 and is
      refused with the rescale.) danlu :class:`~danlu.SGDM`: ``momentum`` (EMA form). ``torch.optim``
      ``Adam``/``AdamW``/``Adamax`` and danlu :class:`~danlu.AdamW`: both ``betas`` (β2 as in Su's
      modified v). danlu :class:`~danlu.Lion`: both ``betas`` (β1 is the EMA weight of the
      interpolation, β2 the momentum's; with β1 ≠ β2 the result is only loosely accumulation-like).
      danlu :class:`~danlu.Tiger`: ``beta``. Any other optimizer with the rescale on raises
      ``TypeError``; pass ``rescale_betas=False`` for the χ gate alone.
    - **Rescaled once, kept consistent.** β̃ is written into the shared param groups, and the value it
      came from is kept next to it (``chi_base_<key>``, with ``chi_set_<key>`` = the written β̃). A state
      dict therefore carries β̃ and is loaded as is (never rescaled twice); a dict with plain β and no
      ``chi_`` keys (saved by a bare ``torch.optim`` optimizer, or reduced to ``state`` and
      ``param_groups`` by a tool) is rescaled on load; and a coefficient changed since
      the wrapper wrote it (a momentum schedule such as ``OneCycleLR(cycle_momentum=True)``, or the
      user) is taken as the new β and rescaled before the next step. ``rescale_betas=False`` (or
      switching it off) restores the saved β.

    The window position is the param-group key ``chi_micro_step`` (micro-steps taken in the current
    window), so a checkpoint taken mid-window resumes exactly. The top-level state-dict entry
    ``danlu_chi_gate`` holds ``k`` and ``rescale_betas``.

    **How this differs from the exact rule** (``accum_steps=k`` of :class:`~danlu.SGDM`,
    :class:`~danlu.AdamW`, :class:`~danlu.Lion`, :class:`~danlu.Tiger`): there the state decays by β
    once per window and absorbs each micro-gradient with weight (1 − β)/k, so after k micro-steps the
    momentum *is* the EMA step on the window's mean gradient (exactly the k-times-larger batch for SGDM
    and Tiger), and bias corrections and schedules count updates. Here the inner optimizer decays its
    state every micro-step: with β̃ the window's gradients get weights β̃^{i−1} (the last micro-batch
    counts most) and the window decay is β̃^k ≈ β rather than exactly β; without the rescale the state decays by β^k per
    window and the update is dominated by the window's last micro-gradients, so θ moves by about α·m
    once per k micro-steps, an effective lr of about α/k per micro-batch (the confound that
    ``danlu compare --experiment fewer-updates`` controls for). In exchange it needs no change to the
    optimizer. Measured there (digits, batch 4, k = 4, 8 seeds, SGDM and AdamW): the exact rule, χ only
    and β̃ + χ ended within 0.0005 of each other and of the plain small batch at lr α/k, i.e. the gate
    acted as the lr cut, and for AdamW all four were clearly worse than the small batch at α.

    Requirements: the inner update must be proportional to ``group["lr"]`` (so that lr 0 leaves θ
    unchanged: true of torch's and danlu's first-order optimizers; ``LBFGS``, ``Rprop`` and danlu
    :class:`~danlu.Amos`, whose ``extra_l2`` moves θ at lr 0, are refused), every group needs a numeric
    ``lr``, and a danlu inner optimizer must have ``accum_steps=1`` and no active
    ``fuse_into_backward`` hooks. ``k=1`` is bitwise the inner optimizer.

    Args:
        optimizer: the inner ``torch.optim.Optimizer`` (param groups and state shared with it, as for
            every danlu wrapper: an lr scheduler may be attached to either).
        k: micro-batches per update (an int ≥ 1).
        rescale_betas: replace the momentum coefficients by β̃ (default True); False is Su's
            "χ only" variant.

    References:
        Su Jianlin, "隐藏在动量中的梯度累积：少更新几步，效果反而更好？", kexue.fm/archives/8634 (2021).

    Deviations:
        Schedules and Adam's counters see micro-steps unless the user steps the scheduler on updates
        (see above); torch SGD's ``dampening`` is rescaled along with ``momentum`` (a choice the essay,
        written for EMA momentum, does not face).
    """

    _hyper_keys = ("k", "rescale_betas")
    _prefix = "chi_"
    _entry = "danlu_chi_gate"
    _transient = ("_grads_left", "_loading")

    def __init__(self, optimizer: torch.optim.Optimizer, k: int, *, rescale_betas: bool = True) -> None:
        k = int(check_number("k", k, low=1, integer=True))
        rescale_betas = check_bool("rescale_betas", rescale_betas)
        super().__init__(optimizer)
        inner = _innermost(optimizer)
        me = type(self).__name__
        if isinstance(inner, (torch.optim.LBFGS, torch.optim.Rprop)):
            raise TypeError(f"{me} gates the inner optimizer's lr; {type(inner).__name__} does not step in "
                            "proportion to its lr (LBFGS re-evaluates a closure, Rprop's lr only sets the initial "
                            "step sizes), so lr 0 would not hold θ")
        from ..optim.amos import Amos  # noqa: PLC0415

        if isinstance(inner, Amos):
            raise TypeError(f"{me} gates the inner optimizer's lr; Amos's extra_l2 term moves θ even at lr 0")
        if any(isinstance(o, ChiGated) for o in self._chain(optimizer)):
            raise TypeError(f"{me} wraps an optimizer that is already a {me}")
        accum_steps = getattr(inner, "accum_steps", 1)
        if int(accum_steps) != 1:
            raise ValueError(f"{me} wraps an optimizer without accumulation of its own; {type(inner).__name__} has "
                             f"accum_steps={accum_steps} (use one or the other: accum_steps is the exact rule)")
        for i, group in enumerate(self.param_groups):
            self._check_lr(i, group)
        self._keys = _momentum_keys(inner)
        self._k = k
        self._rescale = rescale_betas
        self._is_update = False
        self._sync()  # raises before anything is written when a coefficient is bad or unknown
        self._micro_step = 0

    @staticmethod
    def _chain(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
        out = [optimizer]
        while isinstance(out[-1], OptimizerWrapper):
            out.append(out[-1].optimizer)
        return out

    def _check_lr(self, i: int, group: dict[str, Any]) -> None:
        lr = group.get("lr")
        if isinstance(lr, bool) or not isinstance(lr, (int, float, torch.Tensor)):
            raise TypeError(f"{type(self).__name__} gates group['lr']; param group {i} has lr={lr!r} "
                            "(expected a number or a tensor)")

    # --- hyperparameters --------------------------------------------------------------------------
    @property
    def k(self) -> int:
        """Micro-batches per update."""
        return self._k

    @k.setter
    def k(self, value: int) -> None:
        value = int(check_number("k", value, low=1, integer=True))
        if self._micro_step >= value:
            raise ValueError(f"Invalid k: {value!r} (expected more than the {self._micro_step} micro-steps already "
                             "taken in the current window)")
        old, self._k = self._k, value
        try:
            self._sync()
        except (TypeError, ValueError):
            self._k = old
            raise

    @property
    def rescale_betas(self) -> bool:
        """Whether the momentum coefficients are replaced by β̃ = 1 − (1 − β)/k."""
        return self._rescale

    @rescale_betas.setter
    def rescale_betas(self, value: bool) -> None:
        value = check_bool("rescale_betas", value)
        old, self._rescale = self._rescale, value
        try:
            self._sync()
        except (TypeError, ValueError):
            self._rescale = old
            raise

    @property
    def is_update_step(self) -> bool:
        """Whether the last :meth:`step` moved θ (it was the k-th micro-step of a window)."""
        return self._is_update

    # --- the window position ----------------------------------------------------------------------
    @property
    def _micro_step(self) -> int:
        return int(self.param_groups[0].get(_MICRO, 0)) if self.param_groups else 0

    @_micro_step.setter
    def _micro_step(self, value: int) -> None:
        for group in self.param_groups:
            group[_MICRO] = value

    # --- the rescale ------------------------------------------------------------------------------
    def _plan(self, group: dict[str, Any], gi: int, k: int | None = None,
              rescale: bool | None = None) -> dict[str, Any]:
        """The group entries to write so that its coefficients are consistent with ``k`` and
        ``rescale`` (default: the wrapper's); the group is not changed. Raises ``TypeError``/``ValueError``
        for a bad or unknown coefficient."""
        me = type(self).__name__
        k = self._k if k is None else k
        rescale = self._rescale if rescale is None else rescale
        inner = _innermost(self.optimizer)
        keys = self._keys or ()
        had = [key for key in keys if _SET + key in group]
        if not rescale:
            # Put the saved β back where the wrapper's β̃ still stands; drop the bookkeeping.
            return {key: (group[_BASE + key] if _same(group.get(key), group[_SET + key]) else group.get(key))
                    for key in had}
        if self._keys is None:
            raise TypeError(f"{me}(rescale_betas=True) does not know which hyperparameters of {type(inner).__name__} "
                            "are momentum coefficients; pass rescale_betas=False (the χ gate alone) or set β̃ = "
                            "1 − (1 − β)/k yourself")
        if isinstance(inner, torch.optim.SGD) and group.get("nesterov"):
            raise ValueError(f"{me}(rescale_betas=True) rescales torch.optim.SGD's dampening, which nesterov=True "
                             f"requires to be 0 (param group {gi}); pass rescale_betas=False")
        writes: dict[str, Any] = {}
        for key in keys:
            if key not in group:
                raise ValueError(f"{me}: param group {gi} of {type(inner).__name__} lacks its {key!r}")
            cur = group[key]
            if isinstance(cur, torch.Tensor) or (isinstance(cur, (tuple, list)) and
                                                 any(isinstance(v, torch.Tensor) for v in cur)):
                raise TypeError(f"{me}(rescale_betas=True) rescales Python numbers; param group {gi} has a tensor "
                                f"{key}={cur!r}")
            written = group.get(_SET + key)
            if written is not None and _same(cur, written):
                base = group[_BASE + key]  # unchanged since the wrapper wrote it
            else:
                base = cur  # new: the inner optimizer's own value, a scheduler's or the user's
            base = _check_coefficient(f"{key} (param group {gi})", base)
            target = _apply_rescale(base, k)
            writes[key] = target
            writes[_BASE + key] = base
            writes[_SET + key] = target
        return writes

    def _sync(self) -> None:
        """Make every group's coefficients β̃ of their current base β (or β itself when the rescale is
        off): all groups are checked before any is written."""
        plans = [self._plan(group, gi) for gi, group in enumerate(self.param_groups)]
        for group, writes in zip(self.param_groups, plans):
            if not self._rescale:
                for key in writes:
                    group.pop(_SET + key, None)
                    group.pop(_BASE + key, None)
            group.update(writes)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        n = len(self.param_groups)
        self.optimizer.add_param_group(param_group)
        try:
            self._check_lr(n, self.param_groups[n])
            self._sync()
        except (TypeError, ValueError):
            del self.param_groups[n:]
            raise
        self.param_groups[n][_MICRO] = self.param_groups[0].get(_MICRO, 0)  # it joins the current window

    # --- the step ---------------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One micro-step: the inner optimizer steps on this micro-batch, with its lr set to 0 unless
        this is the k-th micro-step of the window. Returns the closure's loss (if a closure is given,
        it is passed to the inner step)."""
        if closure is None and is_state_init_step(self):
            # torch.distributed.checkpoint's state initialisation (every lr 0, zero gradients): the inner
            # optimizer creates its state; the window does not advance.
            return self.optimizer.step()
        if getattr(self.optimizer, "_fused", False):
            raise RuntimeError(f"{type(self).__name__} cannot gate an optimizer whose fuse_into_backward() hooks "
                               "are active (they step during backward, at the ungated lr); remove them first")
        self._sync()
        t = self._micro_step + 1
        update = t == self._k
        if update:
            loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        else:
            saved = [group["lr"] for group in self.param_groups]
            for group in self.param_groups:
                group["lr"] = _zero_like(group["lr"])
            if closure is None and isinstance(self.optimizer, DanluOptimizer):
                # A step at lr 0 with all-zero gradients and no closure is, to a danlu optimizer, the
                # distributed checkpoint's state initialisation, which would skip the absorption.
                closure = _no_loss
            try:
                loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
            finally:
                for group, lr in zip(self.param_groups, saved):
                    group["lr"] = lr
        self._micro_step = 0 if update else t
        self._is_update = update
        return loss

    # --- state dict -------------------------------------------------------------------------------
    def _migrate(self, state_dict: Any) -> Any:
        sd = super()._migrate(state_dict)
        # Kept for _check_own, which checks the saved groups' coefficients before anything is loaded.
        self._loading = sd.get("param_groups") if isinstance(sd, dict) else None
        return sd

    def _check_own(self, entry: dict[str, Any] | None, own_state: dict[int, dict[str, Any]],
                   own_groups: dict[int, dict[str, Any]], with_state: dict[int, dict[str, Any]]) -> None:
        me = type(self).__name__
        hyper = (entry or {}).get("hyper") or {}
        try:
            k = int(check_number("k", hyper["k"], low=1, integer=True)) if "k" in hyper else self._k
            if "rescale_betas" in hyper:
                check_bool("rescale_betas", hyper["rescale_betas"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{me}.load_state_dict: {err}") from err
        if own_state:
            raise ValueError(f"{me}.load_state_dict: {me} keeps no per-parameter state, but parameters "
                             f"{sorted(own_state)[:4]} have {self._prefix}* entries")
        micro = []
        for gi in range(len(self.param_groups)):
            s = own_groups.get(gi, {})
            m = s.get(_MICRO[len(self._prefix):], 0)
            if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < k:
                raise ValueError(f"{me}.load_state_dict: {_MICRO}={m!r} in param group {gi} is not a position in "
                                 f"a window of k={k} (expected an int in [0, {k}))")
            micro.append(m)
            for name, v in s.items():
                if name.startswith(_BASE[len(self._prefix):]):
                    try:
                        _check_coefficient(name, v)
                    except (TypeError, ValueError) as err:
                        raise ValueError(f"{me}.load_state_dict: param group {gi}: {err}") from err
        if len(set(micro)) > 1:
            raise ValueError(f"{me}.load_state_dict: the param groups are at different {_MICRO} {micro}")
        saved, self._loading = getattr(self, "_loading", None), None
        rescale = hyper.get("rescale_betas", self._rescale)
        for gi, group in enumerate(saved or []):
            try:
                self._check_lr(gi, group)
                self._plan(group, gi, k, rescale)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{me}.load_state_dict: {err}") from err

    def _load_own(self, entry: dict[str, Any] | None) -> None:
        self._micro_step = self._micro_step  # a group saved without the key starts a window
        self._sync()
        self._is_update = False
