"""The base class every danlu optimizer derives from.

It adds to :class:`torch.optim.Optimizer`:

* validation of every param group (constructor and :meth:`add_param_group`) through
  :meth:`_validate_group`, so a bad group is refused before it is added;
* lazy state: :meth:`_init_state` runs the first time a parameter has a gradient;
* a :meth:`step` that checks every gradient (sparse, complex) before touching any parameter, then
  calls the per-tensor kernel :meth:`_update` for each parameter with a gradient;
* a ``state_dict`` tagged with the optimizer's class and a ``load_state_dict`` that refuses, before
  changing anything, a state dict from another optimizer or another parameter layout.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

__all__ = ["DanluOptimizer", "ParamsT", "init_moments"]

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]

_TAG = "danlu_optimizer"
# Keys that torch itself may add to a group or to ``defaults`` (lr schedulers, named parameters,
# and ``differentiable``, which Optimizer.__setstate__ adds to ``defaults`` on unpickling/deepcopy).
_GROUP_BOOKKEEPING = frozenset({"initial_lr", "param_names", "differentiable"})


def init_moments(p: torch.Tensor, state: dict[str, Any]) -> None:
    """Adam-style state: a 0-d float64 update counter and two moment buffers shaped like ``p``."""
    state["step"] = torch.zeros((), dtype=torch.float64)
    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class DanluOptimizer(torch.optim.Optimizer):
    """Base class: subclasses define ``_validate_group``, ``_init_state`` and ``_update``."""

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
        for p, group in self._check_grads():
            state = self.state[p]
            if len(state) == 0:
                self._init_state(p, group, state)
            if p.numel() == 0:
                continue  # nothing to move; reductions over empty dims would write NaN into the state
            self._update(p, p.grad, state, group)
        return loss

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd[_TAG] = type(self).__name__
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by the same optimizer class over the same parameter layout.

        Refuses (``ValueError``), before changing anything, a state dict from another optimizer class
        (tagged by :meth:`state_dict`; an untagged one, e.g. rebuilt by a checkpointing tool, must not
        carry hyperparameters this optimizer lacks), with missing hyperparameter keys, another number
        of groups or parameters per group, or state entries whose names or shapes do not fit the
        parameters.
        """
        self._check_state_dict(state_dict)
        self._load_extra(state_dict)
        super().load_state_dict({"state": state_dict["state"], "param_groups": state_dict["param_groups"]})

    def _load_extra(self, state_dict: dict[str, Any]) -> None:
        """Restore what a subclass's ``state_dict`` adds beside ``state``/``param_groups`` (checked)."""

    def _check_state_dict(self, sd: Any) -> None:
        me = type(self).__name__
        if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
            raise ValueError(f"{me}.load_state_dict expects a dict with 'state' and 'param_groups'")
        tag = sd.get(_TAG)
        if tag is not None and tag != me:
            raise ValueError(f"{me}.load_state_dict got a state dict saved by {tag}")
        saved_groups = sd["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{me}.load_state_dict: the state dict has {len(saved_groups)} param groups, "
                f"the optimizer {len(self.param_groups)}"
            )
        index: dict[Any, tuple[torch.Tensor, dict[str, Any]]] = {}
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
            foreign = sorted(set(saved) - set(mine) - _GROUP_BOOKKEEPING)
            if tag is None and foreign:
                raise ValueError(
                    f"{me}.load_state_dict: param group {i} has hyperparameters {foreign} that {me} does not "
                    "have; the state dict was saved by a different optimizer"
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
            p, group = index[pid]
            expected: dict[str, Any] = {}
            self._init_state(torch.empty_like(p, device="meta"), group, expected)
            if set(st) != set(expected):
                raise ValueError(
                    f"{me}.load_state_dict: parameter {pid!r} has state {sorted(st)}, "
                    f"expected {sorted(expected)}; the state dict was saved by a different optimizer "
                    "or with different settings"
                )
            for key, ref in expected.items():
                val = st[key]
                if isinstance(ref, torch.Tensor):
                    if not isinstance(val, torch.Tensor) or tuple(val.shape) != tuple(ref.shape):
                        shape = tuple(val.shape) if isinstance(val, torch.Tensor) else type(val).__name__
                        raise ValueError(
                            f"{me}.load_state_dict: state {key!r} of parameter {pid!r} has shape {shape}, "
                            f"expected {tuple(ref.shape)} for a parameter of shape {tuple(p.shape)}"
                        )
