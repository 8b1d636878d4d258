"""The base class every danlu optimizer derives from.

It adds to :class:`torch.optim.Optimizer`:

* validation of every param group (constructor and :meth:`add_param_group`) through
  :meth:`_validate_group`, so a bad group is refused before it is added;
* lazy state: :meth:`_init_state` runs the first time a parameter has a gradient;
* a :meth:`step` that checks every gradient (sparse, complex) before touching any parameter, then
  calls the per-tensor kernel :meth:`_update` for each parameter with a gradient;
* a ``state_dict`` tagged with the optimizer's class and a ``load_state_dict`` that runs torch's load
  pre-hooks first, converts state dicts of earlier danlu releases, and then refuses, before changing
  anything, a state dict from another optimizer or another parameter layout.

Everything a checkpoint must carry lives in ``state`` and ``param_groups``, the two entries that
torch's own tools keep (``torch.distributed.checkpoint``'s ``get_optimizer_state_dict`` and
``set_optimizer_state_dict``, ``ZeroRedundancyOptimizer``); top-level entries beside them are only
checks and descriptions that such a tool may drop.
"""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, cast

import torch

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["DanluOptimizer", "ParamsT", "init_moments", "new_step", "STEP_DTYPE", "is_state_init_step",
           "run_load_pre_hooks", "run_state_dict_post_hooks", "run_load_post_hooks", "hooks_suspended"]

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]

_TAG = "danlu_optimizer"
# Keys that torch itself may add to a group or to ``defaults`` (lr schedulers, named parameters,
# and ``differentiable``, which Optimizer.__setstate__ adds to ``defaults`` on unpickling/deepcopy).
_GROUP_BOOKKEEPING = frozenset({"initial_lr", "param_names", "differentiable"})
# Options added after danlu 0.1: a saved group without them takes the optimizer's default.
_LATER_OPTIONS = frozenset({"fused", "state_dtype", "shard_statistics", "lr_scale", "on_nan", "shrink",
                            "shrink_center"})
_STATE_DTYPES = (torch.bfloat16, torch.float32, torch.float64)
_SR_KEY = "sr_key"  # the fused path's precomputed rounding key, in ``derived``

# The update counter's dtype: float32, as torch.optim's own (exact up to 2**24 ≈ 16.7M steps). An
# in-place add on a 0-d float64 CPU tensor is lost under torch.compile (aot_eager and inductor, torch
# 2.13): the counter would stay at 1. Kernels cast it to float64 for the math that needs it.
STEP_DTYPE = torch.float32


def new_step() -> torch.Tensor:
    """A fresh 0-d update counter (``state["step"]``)."""
    return torch.zeros((), dtype=STEP_DTYPE)


def _known_hyperparameters() -> frozenset[str]:
    """Hyperparameter names of torch.optim's optimizers (constructor keywords): a saved param group
    that has one this optimizer lacks was saved by another optimizer. Keys that lr schedulers and
    wrappers add (``max_lr``, ``initial_lr``, ``swa_lr``, ``lookahead_k``, ...) are not among them."""
    names: set[str] = set()
    for obj in vars(torch.optim).values():
        if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer:
            names.update(inspect.signature(obj.__init__).parameters)
    return frozenset(names - {"self", "params", "defaults", "differentiable"})


_TORCH_HYPERPARAMETERS = _known_hyperparameters()


def is_state_init_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a ``step()`` without a closure is the state initialisation of
    ``torch.distributed.checkpoint``'s state-dict helpers: every lr is 0 and every parameter that
    requires grad has an all-zero gradient. On it every danlu optimizer only creates its missing state
    (counters at 0): nothing moves, no counter or accumulation window advances (a real step at lr 0
    would still count, and Amos's ``extra_l2`` would still pull θ). Closure-driven optimizers
    (GradientPenalty, MGS, ZeroOrder) step their inner optimizer on it instead of refusing the
    missing closure."""
    # Checked on every step of every danlu optimizer: the lrs first, without a device sync (DCP sets a
    # tensor lr to a CPU torch.tensor(0.0)), and the gradients only when every lr is 0.
    for g in optimizer.param_groups:
        lr = g.get("lr")
        if lr is None:
            continue
        if isinstance(lr, torch.Tensor) and (lr.device.type != "cpu" or lr.numel() != 1):
            return False
        if float(lr) != 0.0:
            return False
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    if not params:
        return False
    if any(p.grad is None or p.grad.is_sparse for p in params):
        return False
    from .distributed import all_zero  # noqa: PLC0415

    return all_zero([p.grad for p in params])  # the same answer on every rank (FSDP2 shards differ)


def run_load_pre_hooks(optimizer: torch.optim.Optimizer, state_dict: Any) -> Any:
    """Run the optimizer's load-state-dict pre-hooks as torch does (a hook may return a new dict)."""
    for hook in list(optimizer._optimizer_load_state_dict_pre_hooks.values()):
        out = hook(optimizer, state_dict)
        if out is not None:
            state_dict = out
    return state_dict


def run_state_dict_post_hooks(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Run the optimizer's state-dict post-hooks as torch does (a hook may return a new dict)."""
    for hook in list(optimizer._optimizer_state_dict_post_hooks.values()):
        out = hook(optimizer, state_dict)
        if out is not None:
            state_dict = out
    return state_dict


def run_load_post_hooks(optimizer: torch.optim.Optimizer) -> None:
    """Run the optimizer's load-state-dict post-hooks as torch does."""
    for hook in list(optimizer._optimizer_load_state_dict_post_hooks.values()):
        hook(optimizer)


@contextmanager
def hooks_suspended(optimizer: torch.optim.Optimizer, *tables: str) -> Iterator[None]:
    """Empty the named hook tables (``"_optimizer_state_dict_post_hooks"``, ...) while torch's own
    ``state_dict``/``load_state_dict`` runs, so that danlu runs those hooks itself, at the right point."""
    saved = {name: getattr(optimizer, name) for name in tables}
    for name in tables:
        setattr(optimizer, name, OrderedDict())
    try:
        yield
    finally:
        for name, hooks in saved.items():
            setattr(optimizer, name, hooks)


def init_moments(p: torch.Tensor, state: dict[str, Any]) -> None:
    """Adam-style state: a 0-d float32 update counter and two moment buffers shaped like ``p``."""
    state["step"] = new_step()
    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class DanluOptimizer(torch.optim.Optimizer):
    """Base class: subclasses define ``_validate_group``, ``_init_state`` and ``_update``."""

    # State entries ``_update`` creates when a setting that needs them is switched on mid-run (e.g.
    # Amos's ``momentum``): a saved state may lack them.
    _optional_state: frozenset[str] = frozenset()
    # ``fused=True`` support (danlu._core.fused): the group entries that change between steps and
    # reach ``_update`` as 0-d tensors on the fused path. Empty: the optimizer has no fused path.
    _step_scalars: tuple[str, ...] = ()
    # ``state_dtype`` support: the state entries that may be stored in another dtype than the
    # parameter's (momenta); bfloat16 storage is rounded stochastically (danlu._core.rounding).
    _low_precision_state: frozenset[str] = frozenset()

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        self._validate_group(dict(defaults), [])
        super().__init__(params, defaults)

    # --- hooks for subclasses -------------------------------------------------------------------
    def _validate_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Raise ``ValueError``/``TypeError`` if the group's hyperparameters are bad. May normalise."""

    def _init_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Fill ``state`` for parameter ``p``; uses only ``*_like``/shape information of ``p``."""
        raise NotImplementedError

    def _update(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """The per-tensor kernel: one step for one parameter."""
        raise NotImplementedError

    # --- torch.optim.Optimizer API --------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        n_before = len(self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for p in group["params"]:
                if p.is_complex():
                    raise TypeError(
                        f"{type(self).__name__} does not support complex parameters (got {p.dtype}); "
                        "optimize torch.view_as_real(param) instead"
                    )
            self._validate_group(group, group["params"])
        except (TypeError, ValueError):
            del self.param_groups[n_before:]
            raise

    def _check_grads(self) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients; "
                        "use a dense embedding (sparse=False) or torch.optim.SparseAdam"
                    )
                if p.grad.is_complex():
                    raise TypeError(f"{type(self).__name__} does not support complex gradients")
                work.append((p, group))
        from . import distributed as dist_  # noqa: PLC0415

        if any(dist_.is_dtensor(p) for p, _ in work):
            dist_.check_layouts(type(self).__name__, work)
        return work

    @staticmethod
    def _run_closure(closure: Callable[[], Any] | None) -> Any:
        """Run the optional closure with gradients enabled (``step`` runs under ``no_grad``)."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss; it runs
                with gradients enabled before the update.
        """
        loss = self._run_closure(closure)
        work = self._check_grads()
        if closure is None and work and is_state_init_step(self):
            self._init_states(work)  # torch.distributed.checkpoint's state initialisation
            return loss
        self._update_all(work)
        return loss

    def _init_states(self, work: list[tuple[torch.Tensor, dict[str, Any]]]) -> None:
        """Create the missing state of ``work``'s parameters (as their first step would) and nothing else."""
        from . import distributed as dist_  # noqa: PLC0415

        for p, group in work:
            state = self.state[p]
            if len(state) == 0:
                self._create_state(p, group, state, dist_.layout_of(p, group=group))

    def _create_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], shard: Any) -> None:
        """A parameter's first state: ``_init_state``, placed as DTensors for an FSDP2 ``shard``
        (``distributed.place_state``), stored in ``state_dtype`` where the group sets one."""
        self._init_state(p, group, state)
        if shard is not None:
            from .distributed import place_state  # noqa: PLC0415

            place_state(self, shard, group, state)
        if group.get("state_dtype") is not None:
            self._init_stored(p, group, state)

    def _update_all(self, work: list[tuple[torch.Tensor, dict[str, Any]]]) -> None:
        """One step for every (parameter, group) of ``work``: initialise state, then the fused path for
        groups with ``fused=True`` and the per-tensor kernel for the rest. DTensor parameters (FSDP2)
        step on their local shards (``danlu._core.distributed``)."""
        from . import distributed as dist_  # noqa: PLC0415

        sharded = any(dist_.is_dtensor(p) for p, _ in work)  # layouts checked by _check_grads
        fused: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any], dict[str, Any]]] = []
        bucketed: list[tuple[Any, Callable[[], None]]] = []
        written: list[tuple[Any, dict[str, Any], dict[str, Any], dict[str, Any]]] = []
        for p, group in work:
            state = self.state[p]
            shard = dist_.layout_of(p, group=group) if sharded else None
            if len(state) == 0:
                self._create_state(p, group, state, shard)
            elif group.get("state_dtype") == torch.bfloat16 and "sr_step" not in state:
                self._init_stored(p, group, state)  # state_dtype set on the group after this state was made
            if p.numel() == 0:
                continue  # nothing to move; reductions over empty dims would write NaN into the state
            grad = cast(torch.Tensor, p.grad)  # work holds the parameters that have gradients
            if shard is None:
                if group.get("fused"):
                    fused.append((p, grad, group, state))
                else:
                    self._update_stored(p, grad, state, group)
                continue
            local = dist_.local_state(state)
            lp, lg = shard.local, cast("DTensor", grad).to_local()  # a DTensor like p (check_layouts)
            if shard.local_stats and shard.sharded and self._reduces_across_rows(p, group):
                # shard_statistics="local": the kernel on this shard alone, no collectives (an empty shard
                # only counts the update, so that every rank's counter agrees).
                if lp.numel():
                    with dist_.on_shard(shard):
                        self._update_stored(lp, lg, local, group)
                    dist_.store_local_state(self, shard, group, state, local)
                else:
                    self._count_only(lp, local, group)
                continue
            # The fused path serves a shard whose step is elementwise and, for bfloat16 state, keyed as one
            # process (the rounding noise of the shard's global offset): otherwise the per-tensor path.
            if group.get("fused") and not (shard.sharded and (self._reduces_across_rows(p, group)
                                                              or group.get("state_dtype") == torch.bfloat16)):
                if lp.numel():  # an empty shard of an elementwise step has nothing to do but count
                    fused.append((lp, lg, group, local))
                    written.append((shard, group, state, local))
                else:
                    self._count_only(lp, local, group)
                continue
            # The per-tensor kernel on the local shards; a rank with an empty shard runs it too, so that it
            # joins the kernel's collectives (bucketed over the step's kernels, below).
            bucketed.append((shard, functools.partial(self._update_stored, lp, lg, local, group)))
            written.append((shard, group, state, local))
        if bucketed:
            dist_.run_bucketed(bucketed)
        if fused:
            driver = self.__dict__.get("_fused_steps")
            if driver is None:
                from .fused import FusedSteps  # noqa: PLC0415 (imports torch.compile machinery lazily)

                driver = self.__dict__["_fused_steps"] = FusedSteps()
            driver.run(self, fused)
        for shard, group, state, local in written:
            dist_.store_local_state(self, shard, group, state, local)

    # --- sharded parameters (FSDP2; danlu._core.distributed) --------------------------------------------
    def _count_only(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Advance the update counters of an empty shard whose kernel does not run (they are plain tensors,
        which every rank must agree on), as its step would."""
        if self._derive is not None or group.get("state_dtype") == torch.bfloat16:
            self._derive_stored(p, state, group)

    def _on_local(self, p: torch.Tensor, grad: torch.Tensor | None, group: dict[str, Any], state: dict[str, Any],
                  fn: Callable[[torch.Tensor, torch.Tensor | None, dict[str, Any]], Any]) -> Any:
        """``fn(p, grad, state)``, for a DTensor ``p`` on its local shards (under its shard context), the
        entries it makes written back as DTensors."""
        from . import distributed as dist_  # noqa: PLC0415

        shard = dist_.layout_of(p, group=group)
        if shard is None:
            return fn(p, grad, state)
        local = dist_.local_state(state)
        with dist_.on_shard(shard):
            out = fn(shard.local, None if grad is None else cast("DTensor", grad).to_local(), local)
        dist_.store_local_state(self, shard, group, state, local)
        return out

    def _reduces_across_rows(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """Whether the kernel reduces over dim 0 of ``p`` (a DTensor sharded on dim 0): such tensors take
        the per-tensor path, whose reductions all-reduce; the others may take the fused path on their
        local shards. Default: elementwise (False)."""
        return False

    def _state_placement(self, key: str, shape: torch.Size, group: dict[str, Any]) -> str:
        """How state entry ``key`` of a parameter of global ``shape`` sharded on dim 0 is placed:
        ``"shard"`` (on its dim 0, which is the parameter's: entries shaped like the parameter, statistics
        that keep dim 0) or ``"replicate"`` (a statistic reduced over dim 0). Default: ``"shard"``."""
        return "shard"

    # --- state stored in another dtype ------------------------------------------------------------
    def _init_stored(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Convert the fresh low-precision entries to ``state_dtype``; bfloat16 storage also gets the
        stochastic-rounding key: ``sr_seed`` (from the parameter's place) and ``sr_step`` (0-d int64)."""
        dtype = group["state_dtype"]
        for k in self._low_precision_state & set(state):
            state[k] = state[k].to(dtype)
        if dtype == torch.bfloat16:
            from .rounding import param_seed  # noqa: PLC0415

            gi = next(i for i, g in enumerate(self.param_groups) if g is group)
            pos = next(i for i, q in enumerate(group["params"]) if q is p)
            state["sr_seed"] = param_seed(gi, pos)
            state["sr_step"] = torch.zeros((), dtype=torch.int64)

    # Per-tensor scalars of one step. A kernel whose step computes scalars from its counter (bias
    # corrections, Adafactor's β̂_t and relative step, Amos's decays) defines
    # ``_derive(p, state, group) -> dict`` (it increments the counter and returns the 0-d values) and
    # an ``_update(p, grad, state, group, derived=None)`` that calls it when ``derived`` is None. The
    # per-tensor path never passes ``derived``; the fused path computes every tensor's scalars of a
    # bucket in a small compiled graph of their own and passes them in, so the single pass over the
    # bucket's elements reads them instead of recomputing them for every element.
    _derive: Callable[..., dict[str, Any]] | None = None

    def _derive_batch_key(self, p: torch.Tensor, group: dict[str, Any]) -> Any:
        """What, besides the state's 0-d entries and the group, ``_derive`` depends on for ``p``: tensors
        with equal keys get their scalars from one batched call (on the fused path). None: nothing."""
        return None

    def _call_update(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                     derived: dict[str, Any] | None) -> None:
        if derived is None:
            self._update(p, grad, state, group)
        else:
            self._update(p, grad, state, group, derived)  # type: ignore[call-arg]

    def _derive_stored(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
        """The fused path's per-tensor scalars: the kernel's own (``_derive``) and, for bfloat16 state,
        the rounding key of this update (``sr_step`` incremented). Computed in their own small graph."""
        out = {} if self._derive is None else dict(self._derive(p, state, group))
        if group.get("state_dtype") == torch.bfloat16:
            from .rounding import rounding_key  # noqa: PLC0415

            state["sr_step"].add_(1)  # present: _update_all makes it before either path runs
            out[_SR_KEY] = rounding_key(state["sr_seed"], state["sr_step"])
        return out

    def _update_stored(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                       derived: dict[str, Any] | None = None) -> None:
        """``_update`` with the state in ``state_dtype``: float32/float64 storage is used as is (the
        kernel's ops promote); bfloat16 storage is computed in float32 and rounded stochastically
        on store, keyed by (``sr_seed``, ``sr_step``, element offset). ``derived`` is what
        :meth:`_derive_stored` returned (the fused path) or None (the per-tensor path computes it)."""
        dtype = group.get("state_dtype")
        key = None
        if derived is not None:
            key = derived.get(_SR_KEY)
            derived = None if self._derive is None else {k: v for k, v in derived.items() if k != _SR_KEY}
        if dtype is None:
            self._call_update(p, grad, state, group, derived)
            return
        if dtype != torch.bfloat16:
            self._call_update(p, grad, state, group, derived)
            for k in self._low_precision_state & set(state):  # created mid-run in the parameter's dtype
                if state[k].dtype != dtype:
                    state[k] = state[k].to(dtype)
            return
        from .rounding import round_with_key, rounding_key  # noqa: PLC0415

        low = self._low_precision_state
        work = {k: (v.float() if k in low and isinstance(v, torch.Tensor) else v) for k, v in state.items()}
        self._call_update(p, grad, work, group, derived)
        if key is None:
            state["sr_step"].add_(1)
            key = rounding_key(state["sr_seed"], state["sr_step"])
            from .distributed import current  # noqa: PLC0415

            shard = current()
            if shard is not None and shard.sharded:  # an FSDP2 shard draws its slice of the whole noise
                from .rounding import shift_key  # noqa: PLC0415

                key = shift_key(key, shard.element_offset())
        for k in low & set(work):
            rounded = round_with_key(work[k].float(), key)
            if k in state:
                state[k].copy_(rounded)
            else:
                state[k] = rounded
        for k, v in work.items():  # entries the kernel made that are not low precision
            if k not in low and k not in state:
                state[k] = v

    def _check_state_dtype(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Validate ``state_dtype`` (call from ``_validate_group`` of an optimizer that supports it)."""
        dtype = group.get("state_dtype")
        if dtype is None:
            return
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"Invalid state_dtype: {dtype!r} (expected None or a floating torch.dtype)")
        if dtype not in _STATE_DTYPES:
            raise ValueError(f"Invalid state_dtype: {dtype!r} (expected None, torch.bfloat16, torch.float32 or "
                             "torch.float64; float16's range is too narrow for second moments, use bfloat16)")

    def _check_fused(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Validate ``fused`` (call from ``_validate_group`` of an optimizer with a fused path)."""
        fused = group.get("fused", False)
        if not isinstance(fused, bool):
            raise TypeError(f"Invalid fused: {fused!r} (expected a bool)")
        layout = next((p.layout for p in params if p.layout != torch.strided), None)
        if fused and layout is not None:
            raise ValueError(f"Invalid fused: True (expected False for parameters with layout {layout}: the fused "
                             "path compiles dense (strided) tensors only)")

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict (pre-hooks, ``state``, ``param_groups``) with danlu's entries added
        (:meth:`_state_dict_entries`), then the post-hooks, which see and may replace the whole dict."""
        with hooks_suspended(self, "_optimizer_state_dict_post_hooks"):
            sd = super().state_dict()
        self._state_dict_entries(sd)
        return run_state_dict_post_hooks(self, sd)

    def _state_dict_entries(self, sd: dict[str, Any]) -> None:
        """Add danlu's top-level entries (the class tag; subclasses add theirs) to ``sd`` in place."""
        sd[_TAG] = type(self).__name__

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by the same optimizer class over the same parameter layout.

        Order: torch's load-state-dict pre-hooks (so a migration hook sees the dict first), then the
        conversion of state dicts saved by earlier danlu releases (:meth:`_migrate`), then the checks,
        then torch's load and its post-hooks. Refuses (``ValueError``), before changing anything, a
        state dict from another optimizer class (tagged by :meth:`state_dict`; an untagged one, e.g.
        rebuilt by ``torch.distributed.checkpoint``, must not carry hyperparameters of another torch
        or danlu optimizer that this one lacks), with missing hyperparameter keys, another number of
        groups or parameters per group, missing state entries or state whose shapes do not fit the
        parameters. Group keys that lr schedulers or wrappers add (``max_lr``, ``swa_lr``, timm
        Lookahead's ``lookahead_*``) and extra per-parameter state (``lookahead_slow_buff``) are kept,
        as torch.optim keeps them. A ``step`` saved as a Python number or as a float64 tensor (danlu
        ≤ 0.1) is loaded as the float32 counter.
        """
        state_dict = self._migrate(run_load_pre_hooks(self, state_dict))
        self._check_state_dict(state_dict)
        self._load_extra(state_dict)
        # The pre-hooks ran above; the post-hooks run below, once the state is what it will be.
        with hooks_suspended(self, "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
            super().load_state_dict(state_dict)
        self._keep_saved_dtypes(state_dict)
        self._after_load()
        run_load_post_hooks(self)

    def _keep_saved_dtypes(self, state_dict: dict[str, Any]) -> None:
        """torch's load casts every state tensor to its floating parameter's dtype: put back, without
        that rounding, the entries saved in another dtype (``state_dtype`` storage: bfloat16 state on
        float32 parameters, float32 state on bfloat16 ones; the int64 rounding key)."""
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            mine = self.state.get(p)
            if not isinstance(saved, dict) or not isinstance(mine, dict):
                continue
            for k, v in saved.items():
                if (isinstance(v, torch.Tensor) and isinstance(mine.get(k), torch.Tensor)
                        and mine[k].dtype != v.dtype and k != "step"):
                    mine[k] = v.to(device=p.device, copy=True)

    def _after_load(self) -> None:
        """Normalise the loaded state (before the post-hooks): the float32 step counter."""
        for _p, st in self.state.items():
            step = st.get("step") if isinstance(st, dict) else None
            if step is not None and not (isinstance(step, torch.Tensor) and step.dtype == STEP_DTYPE):
                st["step"] = torch.tensor(float(step), dtype=STEP_DTYPE)

    def _migrate(self, state_dict: Any) -> Any:
        """Convert a state dict of an earlier danlu release to the current layout (a new dict): groups
        saved before an option existed take the optimizer's default for it."""
        later = {k: self.defaults[k] for k in _LATER_OPTIONS if k in self.defaults}
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not later or not isinstance(groups, list) or all(not isinstance(g, dict) or set(later) <= set(g)
                                                              for g in groups):
            return state_dict
        return {**state_dict, "param_groups": [{**later, **g} if isinstance(g, dict) else g for g in groups]}

    def _load_extra(self, state_dict: dict[str, Any]) -> None:
        """Restore what a subclass's ``state_dict`` adds beside ``state``/``param_groups`` (checked)."""

    def _check_state_dict(self, sd: Any) -> None:
        me = type(self).__name__
        if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
            raise ValueError(f"{me}.load_state_dict expects a dict with 'state' and 'param_groups'")
        tag = sd.get(_TAG)
        if tag is not None and tag != me:
            raise ValueError(f"{me}.load_state_dict got a state dict saved by {tag}")
        wrapped = [v["type"] for k, v in sd.items() if k.startswith("danlu_") and isinstance(v, dict) and "type" in v]
        if wrapped:
            raise ValueError(f"{me}.load_state_dict got a state dict saved by {wrapped[0]} (a wrapper around {me}): "
                             f"load it into the wrapper, or pass its inner part without the 'danlu_' entries")
        saved_groups = sd["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{me}.load_state_dict: the state dict has {len(saved_groups)} param groups, "
                f"the optimizer {len(self.param_groups)}"
            )
        index: dict[Any, tuple[torch.Tensor, dict[str, Any]]] = {}
        others = self._foreign_hyperparameters()
        for i, (mine, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(mine["params"]) != len(saved["params"]):
                raise ValueError(
                    f"{me}.load_state_dict: param group {i} holds {len(saved['params'])} parameters in the "
                    f"state dict and {len(mine['params'])} in the optimizer"
                )
            missing = sorted(set(self.defaults) - set(saved) - _GROUP_BOOKKEEPING)
            if missing:
                raise ValueError(
                    f"{me}.load_state_dict: param group {i} lacks hyperparameters {missing}; "
                    "the state dict was saved by a different optimizer"
                )
            foreign = sorted((set(saved) & others) - set(mine))
            if tag is None and foreign:
                raise ValueError(
                    f"{me}.load_state_dict: param group {i} has hyperparameters {foreign} of another optimizer "
                    f"that {me} does not have; the state dict was saved by a different optimizer"
                )
            merged = {**mine, **{k: v for k, v in saved.items() if k != "params"}}
            try:
                self._validate_group(dict(merged), mine["params"])
            except (TypeError, ValueError) as err:
                raise ValueError(f"{me}.load_state_dict: param group {i} is invalid: {err}") from err
            for pid, p in zip(saved["params"], mine["params"]):
                index[pid] = (p, merged)
        for pid, st in sd["state"].items():
            if pid not in index:
                raise ValueError(f"{me}.load_state_dict: state for unknown parameter id {pid!r}")
            self._check_param_state(pid, st, *index[pid])

    def _foreign_hyperparameters(self) -> frozenset[str]:
        """Names that mark a param group as another optimizer's: torch.optim's and danlu's own."""
        from .. import registry  # noqa: PLC0415 (the registry imports every optimizer)

        return _TORCH_HYPERPARAMETERS | registry.hyperparameter_names()

    def _check_param_state(self, pid: Any, st: Any, p: torch.Tensor, group: dict[str, Any]) -> None:
        me = type(self).__name__
        if not isinstance(st, dict):
            raise ValueError(f"{me}.load_state_dict: the state of parameter {pid!r} is not a dict")
        expected: dict[str, Any] = {}
        self._init_state(torch.empty_like(p, device="meta"), group, expected)
        if getattr(p, "device_mesh", None) is not None:  # FSDP2: per-rank statistics (shard_statistics="local")
            from .distributed import per_rank_shape  # noqa: PLC0415

            for key, ref in list(expected.items()):
                if isinstance(ref, torch.Tensor):
                    shape = per_rank_shape(self, key, p, group, ref.shape)
                    if shape != ref.shape:
                        expected[key] = torch.empty(shape, device="meta")
        missing = sorted(set(expected) - set(st) - self._optional_state)
        if missing:
            raise ValueError(
                f"{me}.load_state_dict: parameter {pid!r} has state {sorted(st)}, which lacks {missing}; "
                "the state dict was saved by a different optimizer or with different settings"
            )
        for key, ref in expected.items():
            if key not in st:
                continue
            val = st[key]
            if key == "step" and isinstance(val, (int, float)) and not isinstance(val, bool):
                continue  # a Python-number step, as torch.optim accepts
            if isinstance(ref, torch.Tensor):
                if not isinstance(val, torch.Tensor) or tuple(val.shape) != tuple(ref.shape):
                    got = tuple(val.shape) if isinstance(val, torch.Tensor) else type(val).__name__
                    raise ValueError(
                        f"{me}.load_state_dict: state {key!r} of parameter {pid!r} has shape {got}, "
                        f"expected {tuple(ref.shape)} for a parameter of shape {tuple(p.shape)}"
                    )
