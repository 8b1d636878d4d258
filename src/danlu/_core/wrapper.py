"""Base class for optimizers that own an inner optimizer (EG step sizes, gradient penalty, MGS).

A wrapper *is* a :class:`torch.optim.Optimizer` (so ``torch.optim.lr_scheduler`` accepts it), but it
holds no param groups and no state of its own: ``param_groups``, ``defaults`` and ``state`` are the
inner optimizer's. A wrapper's per-parameter entries live in the inner optimizer's per-parameter state
under a prefix of its own (EGStepSize: ``egs_nu``, ...), its per-group entries in the shared param
groups under the same prefix. So its ``state_dict`` has torch's layout, the inner optimizer's dict
with the wrapper's entries in it::

    {"state": {index: {inner entries..., "egs_nu": ...}}, "param_groups": [...],
     ...the inner optimizer's own top-level entries..., "danlu_<wrapper>": {"type": ..., "hyper": {...}}}

which is what ``torch.distributed.checkpoint``'s ``get_optimizer_state_dict``/``set_optimizer_state_dict``
and ``ZeroRedundancyOptimizer`` expect. The top-level ``danlu_<wrapper>`` entry (the wrapper's class
and hyperparameters, checked and restored on load) is not needed to resume: a tool that drops it
loads the state into a wrapper built with the same settings. Parameter indices follow torch's
convention (order of ``param_groups``, then of each group's params). State-dict and load-state-dict
hooks registered on the wrapper run, as on any torch optimizer.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch

from .optimizer import run_load_post_hooks, run_load_pre_hooks, run_state_dict_post_hooks

__all__ = ["OptimizerWrapper"]


class OptimizerWrapper(torch.optim.Optimizer):
    """Share an inner optimizer's param groups and state; keep the wrapper's entries under a prefix.

    Subclasses implement ``step``, list their own scalar hyperparameters in ``_hyper_keys`` (saved in
    the top-level entry and restored on load), name their prefix in ``_prefix`` and may check their
    saved entries in :meth:`_check_own`.
    """

    _hyper_keys: tuple[str, ...] = ()
    _prefix: str = ""  # e.g. "egs_": the wrapper's keys in the inner state and groups
    _entry: str = ""  # the top-level state-dict key, e.g. "danlu_eg_step_size"

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"{type(self).__name__} wraps a torch.optim.Optimizer, got {type(optimizer).__name__}; "
                "build the optimizer first, e.g. "
                f"{type(self).__name__}(torch.optim.SGD(model.parameters(), lr=0.1), ...)"
            )
        self.optimizer = optimizer
        # torch's own unpickling path sets up the hook tables and the profiled step; nothing else of
        # Optimizer.__init__ applies, since the groups and the state belong to the inner optimizer.
        self.__setstate__({"defaults": optimizer.defaults})

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def is_update_step(self) -> bool:
        """Whether the last ``step`` moved the parameters: the inner optimizer's (accumulation inside
        the momentum, ``accum_steps`` > 1), ``True`` for an inner optimizer without accumulation."""
        return bool(getattr(self.optimizer, "is_update_step", True))

    def __getstate__(self) -> dict[str, Any]:
        # Like torch's Optimizer: hooks and instance-level patches (an lr scheduler wraps ``step``) are
        # not pickled; the inner optimizer and the wrapper's own attributes are.
        return {
            k: v
            for k, v in self.__dict__.items()
            if k not in ("param_groups", "state", "step") and not k.startswith("_optimizer_")
            and k not in self._transient
        }

    _transient: tuple[str, ...] = ("_grads_left",)  # instance attributes not pickled (rebuilt on demand)

    # --- gradients a closure-driven wrapper would discard -----------------------------------------

    def _refuse_outside_grads(self, params: list[torch.Tensor]) -> None:
        """Raise ``RuntimeError`` (before anything changes) if a parameter holds a gradient that did
        not come from this wrapper's last step: a closure-driven wrapper takes every gradient from its
        closure and would silently drop one accumulated outside it. The gradients the last step left
        (unchanged since) and all-zero gradients are fine."""
        outside = []
        for p in params:
            g = p.grad
            if g is None or self._left_by_last_step(p):
                continue
            if not g.is_sparse and not bool(g.any()):
                continue
            outside.append(tuple(p.shape))
        if outside:
            me = type(self).__name__
            raise RuntimeError(
                f"{me}.step: {len(outside)} parameter(s) (shapes {outside[:4]}{'...' if len(outside) > 4 else ''}) "
                "already hold gradients that did not come from its closure: a backward() before step, or "
                "gradient accumulation over micro-batches (Lightning's accumulate_grad_batches > 1). "
                f"{me} takes every gradient from the closure and would discard them. Zero them first "
                "(optimizer.zero_grad()), accumulate inside the closure, or accumulate in the inner optimizer's "
                "momentum (accum_steps=k, with step() after every micro-batch)"
            )

    def __deepcopy__(self, memo: dict[int, Any]) -> OptimizerWrapper:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        # deepcopy copies a leaf tensor's .grad: the copies of the gradients this wrapper's last step
        # left are the ones the copy's last step left.
        copies = [memo.get(id(p)) for p in self._params() if self._left_by_last_step(p)]
        new._note_grads_left([q for q in copies if q is not None])
        return new

    def _left_by_last_step(self, p: torch.Tensor) -> bool:
        """Whether ``p.grad`` is the gradient this wrapper's last step left, unchanged since."""
        ref = getattr(self, "_grads_left", {}).get(id(p))
        return ref is not None and p.grad is not None and ref[0]() is p.grad and ref[1] == p.grad._version

    def _note_grads_left(self, params: list[torch.Tensor]) -> None:
        self._grads_left = {id(p): (weakref.ref(p.grad), p.grad._version) for p in params if p.grad is not None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = {k: v for k, v in state.items() if k not in ("param_groups", "state")}
        # torch's Optimizer.__setstate__ adds "differentiable" to ``defaults``, which here is the inner
        # optimizer's own dict: undo it, so that wrapping leaves the inner optimizer as it was.
        defaults = state.get("defaults")
        had = not isinstance(defaults, dict) or "differentiable" in defaults
        super().__setstate__(state)
        if not had:
            self.defaults.pop("differentiable", None)

    def __repr__(self) -> str:
        hyper = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._hyper_keys)
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return f"{type(self).__name__}({hyper},\n{inner}\n)"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    # --- state dict -------------------------------------------------------------------------------

    def _entry_value(self) -> dict[str, Any]:
        """The top-level entry: the wrapper's class and hyperparameters (subclasses may add)."""
        return {"type": type(self).__name__, "hyper": {k: getattr(self, k) for k in self._hyper_keys}}

    def state_dict(self) -> dict[str, Any]:
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = dict(self.optimizer.state_dict())
        sd[self._entry] = self._entry_value()
        return run_state_dict_post_hooks(self, sd)

    def _migrate(self, state_dict: Any) -> Any:
        """danlu ≤ 0.1 saved ``{"wrapper": {...}, "inner": inner.state_dict()}``: move the wrapper's
        per-parameter and per-group entries into the inner dict under the prefix."""
        if not (isinstance(state_dict, dict) and set(state_dict) == {"wrapper", "inner"}):
            return state_dict
        me = type(self).__name__
        wrapper, inner = state_dict["wrapper"], state_dict["inner"]
        if not isinstance(wrapper, dict):
            raise ValueError(f"{me}.load_state_dict: malformed 'wrapper' entry")
        if wrapper.get("type") != me:
            raise ValueError(f"{me}.load_state_dict got a state dict saved by {wrapper.get('type')!r}")
        migrate = getattr(self.optimizer, "_migrate", None)
        inner = migrate(inner) if callable(migrate) else inner
        if not isinstance(inner, dict) or "state" not in inner or "param_groups" not in inner:
            raise ValueError(f"{me}.load_state_dict: malformed 'inner' entry")
        groups = [dict(g) for g in inner["param_groups"]]
        ids = [pid for g in groups for pid in g["params"]]
        state = {pid: dict(s) for pid, s in inner["state"].items()}
        for i, s in wrapper.get("state", {}).items():
            if not (isinstance(i, int) and 0 <= i < len(ids)) or not isinstance(s, dict):
                raise ValueError(f"{me}.load_state_dict: state for unknown parameter index {i!r}")
            state.setdefault(ids[i], {}).update({self._prefix + k: v for k, v in s.items()})
        for gi, s in wrapper.get("groups", {}).items():
            if not (isinstance(gi, int) and 0 <= gi < len(groups)) or not isinstance(s, dict):
                raise ValueError(f"{me}.load_state_dict: state for unknown param group {gi!r}")
            groups[gi].update({self._prefix + k: v for k, v in s.items()})
        out = {k: v for k, v in inner.items() if k not in ("state", "param_groups")}
        out.update(state=state, param_groups=groups)
        out[self._entry] = {k: v for k, v in wrapper.items() if k not in ("state", "groups")}
        return out

    def _check_own(self, entry: dict[str, Any] | None, own_state: dict[int, dict[str, Any]],
                   own_groups: dict[int, dict[str, Any]], with_state: dict[int, dict[str, Any]]) -> None:
        """Check the wrapper's saved part (raise ``ValueError``); ``entry`` is None when absent.
        ``own_state``/``own_groups``: the wrapper's entries by parameter/group index, prefix removed;
        ``with_state``: every parameter's saved state by index."""

    def _load_own(self, entry: dict[str, Any] | None) -> None:
        """Restore what the top-level entry holds beyond the hyperparameters (after the checks)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict from :meth:`state_dict` (or from a tool that kept only ``state`` and
        ``param_groups``); checks the wrapper's part and the inner optimizer's before changing the
        wrapper. Saved hyperparameters replace the current ones. Dicts of danlu ≤ 0.1
        (``{"wrapper", "inner"}``) are converted."""
        me = type(self).__name__
        sd = self._migrate(run_load_pre_hooks(self, state_dict))
        if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
            raise ValueError(f"{me}.load_state_dict expects a dict with 'state' and 'param_groups' "
                             f"(what {me}.state_dict() returns)")
        entry = sd.get(self._entry)
        if entry is None and any(isinstance(k, str) and k.startswith("danlu_") for k in sd):
            # Tagged by danlu but without this wrapper's entry: saved by the inner optimizer (or another
            # wrapper) alone. A tool that keeps only state and param_groups drops every tag.
            raise ValueError(f"{me}.load_state_dict got a state dict saved without {me} (it has danlu's "
                             f"entries {sorted(k for k in sd if str(k).startswith('danlu_'))} but not {self._entry!r})")
        if entry is not None:
            if not isinstance(entry, dict) or entry.get("type") != me:
                raise ValueError(f"{me}.load_state_dict got a state dict saved by "
                                 f"{entry.get('type') if isinstance(entry, dict) else entry!r}")
        groups = sd["param_groups"]
        if len(groups) != len(self.param_groups) or any(
            len(g["params"]) != len(mine["params"]) for g, mine in zip(groups, self.param_groups)
        ):
            raise ValueError(f"{me}.load_state_dict: the state dict's param groups do not match the optimizer's "
                             "(number of groups or of parameters per group)")
        ids = [pid for g in groups for pid in g["params"]]
        index = {pid: i for i, pid in enumerate(ids)}
        pre = self._prefix
        own_state: dict[int, dict[str, Any]] = {}
        inner_state: dict[Any, dict[str, Any]] = {}
        for pid, s in sd["state"].items():
            if pid not in index or not isinstance(s, dict):
                raise ValueError(f"{me}.load_state_dict: state for unknown parameter id {pid!r}")
            mine = {k[len(pre):]: v for k, v in s.items() if k.startswith(pre)}
            if mine:
                own_state[index[pid]] = mine
            rest = {k: v for k, v in s.items() if not k.startswith(pre)}
            if rest:
                inner_state[pid] = rest
        own_groups = {gi: {k[len(pre):]: v for k, v in g.items() if k.startswith(pre)} for gi, g in enumerate(groups)}
        own_groups = {gi: s for gi, s in own_groups.items() if s}
        with_state = {index[pid]: s for pid, s in sd["state"].items() if s}
        self._check_own(entry, own_state, own_groups, with_state)
        inner_sd = {k: v for k, v in sd.items() if k not in ("state", "param_groups", self._entry)}
        inner_sd["state"] = inner_state
        inner_sd["param_groups"] = [{k: v for k, v in g.items() if not k.startswith(pre)} for g in groups]
        self.optimizer.load_state_dict(inner_sd)
        params = self._params()
        for i, s in own_state.items():
            p = params[i]
            self.state[p].update({pre + k: v.to(device=p.device) if isinstance(v, torch.Tensor) else v
                                  for k, v in s.items()})
        for gi, s in own_groups.items():
            group = self.param_groups[gi]
            device = group["params"][0].device if group["params"] else None
            group.update({pre + k: v.to(device=device) if isinstance(v, torch.Tensor) else v for k, v in s.items()})
        if entry is not None:
            for k in self._hyper_keys:
                if k in entry.get("hyper", {}):
                    setattr(self, k, entry["hyper"][k])
        self._load_own(entry)
        run_load_post_hooks(self)
