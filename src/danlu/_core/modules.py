"""Read a parameter's role off the module that owns it (shared by the Amos and scale-aware recipes)."""

from __future__ import annotations

from typing import Iterator, Literal

import torch
from torch import nn

__all__ = ["classify_parameters", "NORM_TYPES"]

Kind = Literal["weight", "embedding", "bias", "norm_gain", "other"]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def classify_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, Kind]]:
    """Yield ``(qualified_name, param, kind)`` once per trainable parameter of ``model``.

    kind is ``"norm_gain"`` for the weight of a normalisation layer, ``"bias"`` for any parameter named
    ``bias``, ``"embedding"`` for an ``nn.Embedding``/``nn.EmbeddingBag`` weight, ``"weight"`` for the
    ≥2-D weight of any other module (Linear, Conv, attention projections, …) and ``"other"`` otherwise.
    """
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            kind: Kind
            if p_name == "bias" or p_name.endswith("_bias"):
                kind = "bias"
            elif isinstance(module, NORM_TYPES) and p.dim() <= 1:
                kind = "norm_gain"
            elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                kind = "embedding"
            elif p.dim() >= 2:
                kind = "weight"
            else:
                kind = "other"
            yield name, p, kind
