"""danlu (丹炉): PyTorch optimizers from Su Jianlin's optimizer essays.

Adaptive optimizers (Lion, Tiger, AdaX, Adafactor, Amos), training dynamics (SGDM and AdamW with
accumulation inside the momentum, exponentiated gradient, EG step sizes, gradient penalty, flooding)
and derivative-free optimizers (ZeroOrder, MGS), all :class:`torch.optim.Optimizer` subclasses, plus
Su's hyperparameter recipes and a registry (``create_optimizer``, ``list_optimizers``).
"""

from .optim.adafactor import Adafactor
from .optim.adamw import AdamW
from .optim.adax import AdaX
from .optim.amos import Amos, amos_groups
from .optim.egd import EGD
from .optim.lion import Lion, Tiger
from .optim.sgdm import SGDM
from .registry import create_optimizer, list_optimizers
from .schedule import StepOnUpdate
from .recipes import (LION_PRESETS, ScaleAwareSchedule, lion_from_adamw, lion_preset, scale_aware_groups,
                      scale_aware_lr_lambda, tiger_groups)
from .wrappers.chi_gate import ChiGated
from .wrappers.eg_step_size import EGStepSize
from .wrappers.gradient_penalty import GradientPenalty, flood, igr_strength
from .wrappers.scale_aware_step import ScaleAwareStep
from .zeroth.mgs import MGS, sampling_step
from .zeroth.zero_order import Alternating, ZeroOrder, reinforce_loss, score_sq_norms

__version__ = "0.1.0"

__all__ = [
    "AdaX",
    "Adafactor",
    "AdamW",
    "Alternating",
    "Amos",
    "ChiGated",
    "EGD",
    "EGStepSize",
    "GradientPenalty",
    "LION_PRESETS",
    "Lion",
    "MGS",
    "SGDM",
    "ScaleAwareSchedule",
    "ScaleAwareStep",
    "StepOnUpdate",
    "Tiger",
    "ZeroOrder",
    "amos_groups",
    "create_optimizer",
    "flood",
    "igr_strength",
    "lion_from_adamw",
    "lion_preset",
    "list_optimizers",
    "reinforce_loss",
    "sampling_step",
    "scale_aware_groups",
    "scale_aware_lr_lambda",
    "score_sq_norms",
    "tiger_groups",
]
