"""Learning-rate schedules that count parameter updates when the optimizer accumulates micro-batches.

With accumulation inside the momentum (``accum_steps=k``: :class:`~danlu.SGDM`, :class:`~danlu.AdamW`,
:class:`~danlu.Lion`, :class:`~danlu.Tiger`) ``optimizer.step()`` is called after every micro-batch
and moves the parameters on every k-th call only. Training loops that step the lr scheduler after
every ``optimizer.step()`` (HF Trainer, Lightning's ``interval="step"``, most hand-written loops) then
advance a schedule written in updates k times too fast. :class:`StepOnUpdate` wraps such a scheduler
and passes ``step()`` on only when the optimizer's last step was an update.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from ._core.accumulate import MICRO_STEP

__all__ = ["StepOnUpdate"]


def _was_update(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s last ``step`` moved the parameters: its ``is_update_step`` (danlu's
    accumulating optimizers and wrappers over them), else the window position in its param groups
    (tools that rebuild the optimizer, such as ZeroRedundancyOptimizer, keep the groups), else True."""
    flag = getattr(optimizer, "is_update_step", None)
    if isinstance(flag, bool):
        return flag
    groups = optimizer.param_groups
    if groups and MICRO_STEP in groups[0]:
        return groups[0][MICRO_STEP] == 0
    return True


class StepOnUpdate(LRScheduler):
    r"""Step a wrapped lr scheduler only on the calls where the optimizer updated the parameters.

    ``StepOnUpdate(scheduler).step()`` calls ``scheduler.step()`` when the optimizer's last ``step``
    completed an accumulation window (``optimizer.is_update_step``) and does nothing otherwise, so the
    schedule counts updates, as it would with a k-times-larger batch and no accumulation. Build the
    inner scheduler with its lengths in updates (``num_training_steps`` = micro-batches / k). Without
    accumulation (k = 1, or any torch optimizer) every call is an update and the wrapper is the inner
    scheduler.

    It is a :class:`torch.optim.lr_scheduler.LRScheduler`, so the frameworks that check for one take
    it: ``get_last_lr``, ``state_dict``/``load_state_dict`` (the inner scheduler's) and every other
    attribute (``last_epoch``, ``base_lrs``, ...) are the inner scheduler's. With
    ``ReduceLROnPlateau`` pass ``step(metrics)`` as usual (it is forwarded).

    Example (HF Trainer, accumulation in the optimizer's momentum instead of in ``.grad``)::

        opt = danlu.AdamW(model.parameters(), lr=3e-4, accum_steps=4)
        sched = transformers.get_linear_schedule_with_warmup(opt, 100, total_updates)
        trainer = Trainer(model, args, optimizers=(opt, danlu.StepOnUpdate(sched)), ...)
        # with TrainingArguments(gradient_accumulation_steps=1, max_steps=4 * total_updates)

    Args:
        scheduler: the lr scheduler to step on updates only (any ``torch.optim.lr_scheduler``
            scheduler, or one built the same way, e.g. ``transformers.get_scheduler``).
    """

    def __init__(self, scheduler: Any) -> None:
        if not (hasattr(scheduler, "step") and hasattr(scheduler, "optimizer")):
            raise TypeError(
                f"StepOnUpdate wraps an lr scheduler (with .step() and .optimizer), got {type(scheduler).__name__}; "
                "build the scheduler first, e.g. StepOnUpdate(torch.optim.lr_scheduler.LambdaLR(opt, f))"
            )
        # LRScheduler.__init__ is not run: the wrapper holds no schedule of its own (and must not
        # patch optimizer.step or take an initial step a second time).
        self.scheduler = scheduler
        self.optimizer = scheduler.optimizer

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Step the inner scheduler if the optimizer's last ``step`` moved the parameters."""
        if _was_update(self.optimizer):
            self.scheduler.step(*args, **kwargs)

    def get_last_lr(self) -> list[Any]:
        return self.scheduler.get_last_lr()

    def get_lr(self) -> list[Any]:
        return self.scheduler.get_lr()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict)

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes the wrapper lacks (last_epoch, base_lrs, _last_lr, ...).
        if name == "scheduler":
            raise AttributeError(name)
        return getattr(self.scheduler, name)

    def __repr__(self) -> str:
        return f"StepOnUpdate({self.scheduler!r})"
