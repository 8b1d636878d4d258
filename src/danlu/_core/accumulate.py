"""Gradient accumulation folded into the optimizer state (Su, kexue.fm/archives/8634).

Accumulating k micro-batches for a momentum optimizer m ← β·m + (1−β)·g needs no gradient buffer:
split the window's update over its micro-steps,

    m_t = [(β − 1)·χ_{(t−1)/k} + 1]·m_{t−1} + ((1 − β)/k)·g_t      # decay by β on the window's first
    θ_t = θ_{t−1} − χ_{t/k}·α·m_t                                  # micro-step only; move on the k-th

(χ_{x} = 1 when x is an integer). After k micro-steps m equals one EMA step on the mean gradient of
the k micro-batches, so for optimizers whose update depends on the gradients only through m (SGDM,
Tiger) this is exactly the k-times-larger batch.

:class:`AccumulatingOptimizer` implements the bookkeeping once: the window position, which parameters
have absorbed gradients in the current window, the update-count-based state, ``is_update_step``, and
the opt-in backward hooks that fold each gradient into the state as soon as it is produced and free
``.grad``. The window position is the param-group key ``accum_micro_step`` (micro-steps taken in the
current window, 0 ≤ · < k) and each parameter's ``accum_pending`` state entry says whether it absorbed
a gradient in the current window: both live where ``torch.distributed.checkpoint``'s state-dict helpers
and ``ZeroRedundancyOptimizer`` keep what they save, so a run resumed mid-window continues exactly.
Subclasses provide ``_absorb`` (fold one micro-gradient) and ``_apply`` (move θ at the end of a window);
``_update`` is the plain one-step kernel used when ``accum_steps=1``.
"""

from __future__ import annotations

from typing import Any, Callable, cast

import torch

from .optimizer import DanluOptimizer, ParamsT, is_state_init_step
from .validate import check_number

__all__ = ["AccumulatingOptimizer", "FusedBackwardHandle"]

_ACCUM = "danlu_accumulation"
MICRO_STEP = "accum_micro_step"  # param-group key: micro-steps taken in the current window
PENDING = "accum_pending"  # per-parameter state: absorbed a micro-gradient in the current window


class FusedBackwardHandle:
    """Returned by :meth:`AccumulatingOptimizer.fuse_into_backward`; ``remove()`` takes the hooks off."""

    def __init__(self, optimizer: AccumulatingOptimizer, handles: list[Any]) -> None:
        self._optimizer = optimizer
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._optimizer._fused = False

    def __enter__(self) -> FusedBackwardHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


class AccumulatingOptimizer(DanluOptimizer):
    """A :class:`DanluOptimizer` whose state can absorb ``accum_steps`` micro-gradients per update."""

    # State entries whose window contribution is linear in the micro-gradients (m += c·g): averaging them
    # over the ranks at the window's end equals folding the ranks' averaged gradients (``sync_window``).
    _linear_window_state: tuple[str, ...] = ()
    sync_window = False  # set by the constructor (a class default for optimizers pickled before it existed)

    def __init__(self, params: ParamsT, defaults: dict[str, Any], accum_steps: int = 1,
                 sync_window: bool = False) -> None:
        check_number("accum_steps", accum_steps, low=1, integer=True)
        self.accum_steps = int(accum_steps)
        self._fused = False
        self.is_update_step = False
        self.sync_window = self._check_sync_window(sync_window)
        super().__init__(params, defaults)

    def _check_sync_window(self, sync_window: Any) -> bool:
        if not isinstance(sync_window, bool):
            raise TypeError(f"Invalid sync_window: {sync_window!r} (expected a bool)")
        if not sync_window:
            return False
        if not self._linear_window_state:
            raise ValueError(f"Invalid sync_window: True (expected False for {type(self).__name__}: its state folds "
                             "squared micro-gradients, which an average over the ranks at the window's end does "
                             "not reproduce; keep gradients synchronized on every micro-batch)")
        if self.accum_steps == 1:
            raise ValueError("Invalid sync_window: True (expected False with accum_steps=1: there is no window)")
        import torch.distributed as dist  # noqa: PLC0415

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("Invalid sync_window: True (expected an initialized torch.distributed process group: "
                             "call torch.distributed.init_process_group first)")
        return True

    # --- subclass hooks ------------------------------------------------------------------------
    def _absorb(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                first: bool) -> None:
        """Fold one micro-gradient into the state; ``first``: decay the state (window's first micro-step)."""
        raise NotImplementedError

    def _apply(self, p: torch.Tensor, grad: torch.Tensor | None, state: dict[str, Any],
               group: dict[str, Any]) -> None:
        """Move θ from the state at the end of a window; ``grad`` is the window's last micro-gradient
        for this parameter, or ``None`` if it had none at that micro-step."""
        raise NotImplementedError

    def _update(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                derived: dict[str, Any] | None = None) -> None:
        self._absorb(p, grad, state, group, True)
        if derived is None:
            self._apply(p, grad, state, group)
        else:  # the fused path computed this step's scalars (see DanluOptimizer._derive)
            self._apply(p, grad, state, group, derived)  # type: ignore[call-arg]

    def _init_accum_state(self, state: dict[str, Any]) -> None:
        """Call from ``_init_state``: whether the parameter absorbed a gradient in the current window."""
        if self.accum_steps > 1:
            state[PENDING] = False

    # --- the window position, kept in every param group ----------------------------------------
    @property
    def _micro_step(self) -> int:
        """Micro-steps taken in the current window (0 ≤ · < accum_steps)."""
        return int(self.param_groups[0].get(MICRO_STEP, 0)) if self.param_groups else 0

    @_micro_step.setter
    def _micro_step(self, value: int) -> None:
        if self.accum_steps > 1:
            for group in self.param_groups:
                group[MICRO_STEP] = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.accum_steps > 1:
            # A group added mid-window joins the window where the others are.
            param_group = {**param_group, MICRO_STEP: self._micro_step}
        super().add_param_group(param_group)

    def _check_fused(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        super()._check_fused(group, params)
        if group.get("fused") and self.accum_steps > 1:
            raise ValueError(f"Invalid fused: True (expected False with accum_steps={self.accum_steps}: the fused "
                             "path takes one plain step per call)")

    def _check_state_dtype(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        super()._check_state_dtype(group, params)
        if group.get("state_dtype") == torch.bfloat16 and self.accum_steps > 1:
            raise ValueError(f"Invalid state_dtype: torch.bfloat16 (expected None, torch.float32 or torch.float64 "
                             f"with accum_steps={self.accum_steps}: micro-steps fold into the state in place)")

    # --- the micro-step machinery --------------------------------------------------------------
    def _fold(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], t: int, apply: bool = True) -> None:
        """Absorb ``grad`` at micro-step ``t`` of the window (1-based) and, on its last, move θ (unless
        ``apply`` is False: ``sync_window`` moves θ once the window is averaged over the ranks)."""
        state = self.state[p]
        if len(state) == 0:
            from .distributed import layout_of  # noqa: PLC0415

            self._create_state(p, group, state, layout_of(p, group=group))  # placed, in state_dtype
        if p.numel() == 0:
            return
        # _on_local passes the local shard of ``grad`` (not None: a gradient was given)
        self._on_local(p, grad, group, state,
                       lambda lp, lg, st: self._fold_local(lp, cast(torch.Tensor, lg), st, group, t, apply))

    def _fold_local(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                    t: int, apply: bool = True) -> None:
        k = self.accum_steps
        if k == 1:
            self._update(p, grad, state, group)
            return
        self._absorb(p, grad, state, group, not state[PENDING])
        state[PENDING] = True
        if t == k and apply:
            self._apply(p, grad, state, group)
            state[PENDING] = False

    def _average_window(self, states: list[dict[str, Any]]) -> None:
        """``sync_window``: average the linear window state of ``states`` over the ranks (all-reduces of
        flat buckets of up to 2²⁴ elements per dtype and device, in parameter order)."""
        import torch.distributed as dist  # noqa: PLC0415

        ws = dist.get_world_size()
        tensors = [st[k] for st in states for k in self._linear_window_state if k in st]
        buckets: dict[Any, list[list[torch.Tensor]]] = {}
        for t in tensors:
            rows = buckets.setdefault((t.dtype, t.device), [[]])
            if rows[-1] and sum(x.numel() for x in rows[-1]) + t.numel() > 1 << 24:
                rows.append([])
            rows[-1].append(t)
        from .distributed import all_reduce_flat_  # noqa: PLC0415

        for rows in buckets.values():
            for row in rows:
                all_reduce_flat_(row)
                for t in row:
                    t.div_(ws)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Absorb this micro-batch's gradients; every ``accum_steps``-th call also moves θ.

        Call it after every micro-batch's backward (with ``zero_grad`` between micro-batches), and step
        an lr scheduler only when :attr:`is_update_step` is true: schedules and bias corrections count
        updates, not micro-steps. In loops that step the scheduler after every ``step()`` (HF Trainer,
        Lightning) wrap it in :class:`danlu.StepOnUpdate`, which does that check.
        """
        loss = self._run_closure(closure)
        work = self._check_grads()
        if closure is None and work and is_state_init_step(self):
            self._init_states(work)  # torch.distributed.checkpoint's state initialisation: the window stays
            return loss
        t = self._micro_step + 1
        update = t == self.accum_steps
        if self.accum_steps == 1:
            self._update_all(work)  # one plain step (the fused path where a group asks for it)
        elif self.sync_window and update:
            self._sync_and_apply(work, t)
        else:
            for p, group in work:
                self._fold(p, cast(torch.Tensor, p.grad), group, t)  # work: the parameters with gradients
        if update and self.accum_steps > 1:
            # Parameters that absorbed gradients earlier in the window but had none now still move.
            for group in self.param_groups:
                for p in group["params"]:
                    state = self.state.get(p)
                    if state and state.get(PENDING):
                        # (_on_local calls the lambda at once: ``group`` is this iteration's)
                        self._on_local(p, None, group, state, lambda lp, _, st: self._apply(lp, None, st, group))
                        state[PENDING] = False
        self._micro_step = 0 if update else t
        self.is_update_step = update
        return loss

    def _sync_and_apply(self, work: list[tuple[torch.Tensor, dict[str, Any]]], t: int) -> None:
        """The last micro-step of a ``sync_window`` window: absorb, average every absorbed parameter's window
        state over the ranks (one bucketed all-reduce), then move θ."""
        from . import distributed as dist_  # noqa: PLC0415

        if any(dist_.is_dtensor(p) for g in self.param_groups for p in g["params"]):
            raise ValueError(f"{type(self).__name__}(sync_window=True) serves DDP (replicated parameters whose "
                             "micro-gradients stay rank-local under no_sync); FSDP2 parameters were given: keep "
                             "FSDP2's gradient sync on every micro-batch and sync_window=False")
        last = {id(p): p.grad for p, _ in work}
        for p, group in work:
            self._fold(p, cast(torch.Tensor, p.grad), group, t, apply=False)  # work: the parameters with gradients
        pending = [(p, group) for group in self.param_groups for p in group["params"]
                   if self.state.get(p) and self.state[p].get(PENDING)]
        self._average_window([self.state[p] for p, _ in pending])
        for p, group in pending:
            state = self.state[p]
            self._apply(p, last.get(id(p)), state, group)
            state[PENDING] = False

    def fuse_into_backward(self) -> FusedBackwardHandle:
        """Fold each gradient into the state as soon as backward has accumulated it, then free ``.grad``.

        Registers a post-accumulate-grad hook on every parameter. During ``loss.backward()`` each
        parameter's gradient is absorbed (and, on a window's last micro-step, θ moves) the moment it is
        complete, and ``.grad`` is set to ``None``, so gradients never exist for all parameters at once:
        memory is parameters + optimizer state + one gradient. Call :meth:`step` after every backward
        as usual (it then only advances the micro-step counter); don't clip or inspect ``.grad``, which
        is gone. Returns a handle whose ``remove()`` (or ``with`` block exit) takes the hooks off; hooks
        are not carried by ``deepcopy``, ``pickle`` or ``state_dict``.
        """
        if self._fused:
            raise RuntimeError(f"{type(self).__name__}.fuse_into_backward() is already active")
        handles = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    handles.append(p.register_post_accumulate_grad_hook(self._make_hook(group)))
        self._fused = True
        return FusedBackwardHandle(self, handles)

    def _make_hook(self, group: dict[str, Any]) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if p.grad is None:
                return
            if p.grad.is_sparse or p.grad.is_complex():
                raise RuntimeError(f"{type(self).__name__} does not support sparse or complex gradients")
            with torch.no_grad():
                self._fold(p, p.grad, group, self._micro_step + 1)
            p.grad = None

        return hook

    # --- persistence ---------------------------------------------------------------------------
    def _state_dict_entries(self, sd: dict[str, Any]) -> None:
        super()._state_dict_entries(sd)
        # A check only (a tool that keeps just state and param_groups may drop it): the window
        # position itself is in the groups.
        sd[_ACCUM] = {"accum_steps": self.accum_steps}

    def _migrate(self, state_dict: Any) -> Any:
        """danlu ≤ 0.1 kept the absolute micro-step t in a top-level entry and, per parameter, the index
        of the window it last absorbed into (``window``, −1: none): convert to the group position
        t mod k and the per-parameter ``accum_pending``."""
        state_dict = super()._migrate(state_dict)
        saved = state_dict.get(_ACCUM) if isinstance(state_dict, dict) else None
        if not isinstance(saved, dict) or "micro_step" not in saved or "param_groups" not in state_dict:
            return state_dict
        k, t = saved.get("accum_steps"), saved["micro_step"]
        if not isinstance(k, int) or not isinstance(t, int) or k < 1 or t < 0:
            raise ValueError(f"{type(self).__name__}.load_state_dict: malformed {_ACCUM!r} entry {saved!r}")
        out = dict(state_dict)
        out[_ACCUM] = {"accum_steps": k}
        if k > 1:
            out["param_groups"] = [{**g, MICRO_STEP: t % k} for g in state_dict["param_groups"]]
        out["state"] = {}
        for pid, st in state_dict["state"].items():
            if isinstance(st, dict) and "window" in st:
                st = {key: v for key, v in st.items() if key != "window"}
                st[PENDING] = state_dict["state"][pid]["window"] == t // k
            out["state"][pid] = st
        return out

    def _check_state_dict(self, sd: Any) -> None:
        me = type(self).__name__
        saved = sd.get(_ACCUM) if isinstance(sd, dict) else None
        if saved is not None and saved.get("accum_steps") != self.accum_steps:
            raise ValueError(
                f"{me}.load_state_dict: the state dict was saved with accum_steps="
                f"{saved.get('accum_steps')!r}, this optimizer has accum_steps={self.accum_steps}"
            )
        super()._check_state_dict(sd)
        micro = [g.get(MICRO_STEP, 0) for g in sd["param_groups"]]
        for m in micro:
            if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < self.accum_steps:
                raise ValueError(
                    f"{me}.load_state_dict: {MICRO_STEP}={m!r} is not a position in a window of "
                    f"accum_steps={self.accum_steps} (expected an int in [0, {self.accum_steps}))"
                )
        if len(set(micro)) > 1:
            raise ValueError(f"{me}.load_state_dict: the param groups are at different {MICRO_STEP} {micro}")

    def _after_load(self) -> None:
        super()._after_load()
        if self.accum_steps > 1:
            self._micro_step = self._micro_step  # a group saved without the key starts a window
            for st in self.state.values():
                if isinstance(st, dict):
                    st.setdefault(PENDING, False)
        self.is_update_step = False

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(accum_steps=self.accum_steps, _fused=False, is_update_step=self.is_update_step,
                     sync_window=self.sync_window)
        return state
