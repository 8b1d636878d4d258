"""Base class for optimizers that own an inner optimizer (EG step sizes, gradient penalty, ...).

A wrapper *is* a :class:`torch.optim.Optimizer` (so ``torch.optim.lr_scheduler`` accepts it), but it
holds no param groups of its own: ``param_groups`` and ``defaults`` are the inner optimizer's, so a
scheduler that changes ``group["lr"]`` on the wrapper changes the inner optimizer's lr. The wrapper's
own per-parameter state lives in ``self.state``; its ``state_dict`` nests the inner one's::

    {"wrapper": {"state": {index: {...}}, "hyper": {...}}, "inner": inner.state_dict()}

Parameter indices follow torch's convention (order of ``param_groups``, then of each group's params).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

__all__ = ["OptimizerWrapper"]


class OptimizerWrapper(torch.optim.Optimizer):
    """Share an inner optimizer's param groups; nest its state dict in the wrapper's.

    Subclasses implement ``step`` and list their own scalar hyperparameters in ``_hyper_keys`` (saved
    under ``"hyper"`` and restored on load).
    """

    _hyper_keys: tuple[str, ...] = ()

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"{type(self).__name__} wraps a torch.optim.Optimizer, got {type(optimizer).__name__}; "
                "build the optimizer first, e.g. "
                f"{type(self).__name__}(torch.optim.SGD(model.parameters(), lr=0.1), ...)"
            )
        self.optimizer = optimizer
        # torch's own unpickling path sets up the hook tables and the profiled step; nothing else of
        # Optimizer.__init__ applies, since the groups belong to the inner optimizer.
        self.__setstate__({"defaults": optimizer.defaults, "state": defaultdict(dict)})

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    def __getstate__(self) -> dict[str, Any]:
        # Like torch's Optimizer: hooks and instance-level patches (an lr scheduler wraps ``step``) are
        # not pickled; the inner optimizer and the wrapper's own attributes are.
        return {
            k: v
            for k, v in self.__dict__.items()
            if k not in ("param_groups", "step") and not k.startswith("_optimizer_")
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = {k: v for k, v in state.items() if k != "param_groups"}
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

    def state_dict(self) -> dict[str, Any]:
        index = {id(p): i for i, p in enumerate(self._params())}
        wrapper_state = {index[id(p)]: dict(s) for p, s in self.state.items() if id(p) in index}
        hyper = {k: getattr(self, k) for k in self._hyper_keys}
        return {"wrapper": {"type": type(self).__name__, "state": wrapper_state, "hyper": hyper},
                "inner": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the inner optimizer's state, then the wrapper's; refuses a foreign dict unchanged."""
        me = type(self).__name__
        if not isinstance(state_dict, dict) or set(state_dict) != {"wrapper", "inner"}:
            raise ValueError(f"{me}.load_state_dict expects the dict {me}.state_dict() returns "
                             "({'wrapper': ..., 'inner': ...})")
        wrapper = state_dict["wrapper"]
        if wrapper.get("type") != me:
            raise ValueError(f"{me}.load_state_dict got a state dict saved by {wrapper.get('type')!r}")
        params = self._params()
        bad = [i for i in wrapper["state"] if not (isinstance(i, int) and 0 <= i < len(params))]
        if bad:
            raise ValueError(f"{me}.load_state_dict: state for unknown parameter indices {bad}")
        for i, s in wrapper["state"].items():
            for key, val in s.items():
                mine = self.state.get(params[i], {}).get(key)
                if isinstance(val, torch.Tensor) and isinstance(mine, torch.Tensor) and val.shape != mine.shape:
                    raise ValueError(f"{me}.load_state_dict: state {key!r} of parameter {i} has shape "
                                     f"{tuple(val.shape)}, expected {tuple(mine.shape)}")
        self.optimizer.load_state_dict(state_dict["inner"])
        self.state = defaultdict(dict)
        for i, s in wrapper["state"].items():
            p = params[i]
            self.state[p] = {
                k: v.to(device=p.device) if isinstance(v, torch.Tensor) else v for k, v in s.items()
            }
        for k in self._hyper_keys:
            if k in wrapper["hyper"]:
                setattr(self, k, wrapper["hyper"][k])
