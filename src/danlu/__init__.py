"""danlu (丹炉): PyTorch optimizers from Su Jianlin's optimizer essays.

Adaptive optimizers (Lion, Tiger, AdaX, Adafactor, Amos) built on :class:`torch.optim.Optimizer`,
and Su's hyperparameter recipes (AdamW → Lion, scale-aware lr and weight decay).
"""

from .optim.adafactor import Adafactor
from .optim.adamw import AdamW
from .optim.adax import AdaX
from .optim.amos import Amos, amos_groups
from .optim.egd import EGD
from .optim.lion import Lion, Tiger
from .optim.sgdm import SGDM
from .recipes import ScaleAwareSchedule, lion_from_adamw, scale_aware_groups, scale_aware_lr_lambda
from .wrappers.eg_step_size import EGStepSize
from .wrappers.gradient_penalty import GradientPenalty, flood, igr_strength
from .zeroth.mgs import MGS, sampling_step
from .zeroth.zero_order import ZeroOrder, reinforce_loss

__version__ = "0.1.0"

__all__ = sorted(
    [
        "AdaX",
        "AdamW",
        "Adafactor",
        "Amos",
        "EGD",
        "EGStepSize",
        "GradientPenalty",
        "Lion",
        "MGS",
        "SGDM",
        "ScaleAwareSchedule",
        "Tiger",
        "ZeroOrder",
        "amos_groups",
        "flood",
        "igr_strength",
        "lion_from_adamw",
        "reinforce_loss",
        "sampling_step",
        "scale_aware_groups",
        "scale_aware_lr_lambda",
    ]
)
