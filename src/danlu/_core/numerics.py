"""Shared math of danlu's kernels: decoupled decay, RMS, factored second moments.

All functions are plain tensor code with no ``.item()`` and no branching on tensor values, so a kernel
built from them stays ``torch.compile``-clean. Scalars that change between steps (bias corrections,
relative step sizes) are 0-d float64 tensors computed from the step count; the lr may be a Python
number or a 0-d tensor (torch's compile-friendly form), and every helper here takes either.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "decoupled_decay_",
    "add_scaled_",
    "addcmul_scaled_",
    "scalar_sqrt",
    "rms",
    "factored_dims",
    "factored_rsqrt",
    "acc_dtype",
    "propagate_nonfinite_",
    "sum_along",
]


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype for reductions: float32 for 16-bit floats, the tensor's own dtype otherwise."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def add_scaled_(x: torch.Tensor, y: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """x += alpha·y in place, for a Python-number alpha (one fused op) or a 0-d tensor alpha."""
    if isinstance(alpha, torch.Tensor):
        return x.add_(y * alpha)
    return x.add_(y, alpha=alpha)


def addcmul_scaled_(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, value: float | torch.Tensor) -> torch.Tensor:
    """x += value·y·z in place, for a Python-number value (one fused op) or a 0-d tensor value."""
    if isinstance(value, torch.Tensor):
        return x.add_(y * z * value)
    return x.addcmul_(y, z, value=value)


def scalar_sqrt(x: float | torch.Tensor) -> float | torch.Tensor:
    """√x of a Python number (``math.sqrt``) or of a 0-d tensor."""
    return x.sqrt() if isinstance(x, torch.Tensor) else math.sqrt(x)


def decoupled_decay_(param: torch.Tensor, lr: float | torch.Tensor, weight_decay: float | torch.Tensor) -> None:
    """AdamW-style decay on the pre-update parameter, multiplied by the lr: θ ← θ·(1 − lr·λ)."""
    if isinstance(weight_decay, torch.Tensor) or weight_decay != 0.0:
        param.mul_(1.0 - lr * weight_decay)


_BLOCK = 16


def sum_along(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.sum(dim, keepdim=True)``. Under ``torch.compile``, a sum along a dim that is not the last
    (a strided one) and whose size divides by 16 is taken over blocks of 16 first: inductor's CPU
    loop over an outer dim walks memory one column strip at a time, twice as slow as the blocked form,
    which reads each block of 16 rows while it is in cache. Same sum, another order of additions."""
    dim = dim % max(x.dim(), 1)
    n = x.shape[dim] if x.dim() else 1
    if not torch.compiler.is_compiling() or dim == x.dim() - 1 or n % _BLOCK or n == _BLOCK:
        return x.sum(dim=dim, keepdim=True)
    blocked = x.reshape(*x.shape[:dim], n // _BLOCK, _BLOCK, *x.shape[dim + 1:])
    return blocked.sum(dim=dim + 1).sum(dim=dim, keepdim=True)


def rms(x: torch.Tensor) -> torch.Tensor:
    """RMS(x) = sqrt(mean(x²)) over the whole tensor, as a 0-d tensor (accumulated in ≥ float32)."""
    norm = torch.linalg.vector_norm(x, dtype=acc_dtype(x))
    return norm / math.sqrt(max(x.numel(), 1))


def factored_dims(shape: torch.Size | tuple[int, ...], min_dim_size_to_factor: int) -> tuple[int, int] | None:
    """The two dims a second moment is factored over, or ``None`` to keep it unfactored.

    Follows the paper as Su, optax and mesh-tf implement it: the two largest dims, and only when the
    smaller of them has at least ``min_dim_size_to_factor`` entries. Returns ``(d0, d1)`` with ``d0`` the
    largest dim (averaged out of the row statistic) and ``d1`` the second largest (averaged out of the
    column statistic). Ties keep the later index as the larger one (a stable sort, as numpy's argsort).
    """
    if len(shape) < 2:
        return None
    d0, d1 = 1, 0  # largest, second largest; a later index wins ties (written as loops to trace cleanly)
    if shape[0] > shape[1]:
        d0, d1 = 0, 1
    for i in range(2, len(shape)):
        if shape[i] >= shape[d0]:
            d0, d1 = i, d0
        elif shape[i] >= shape[d1]:
            d1 = i
    if shape[d1] < min_dim_size_to_factor:
        return None
    return d0, d1


def factored_rsqrt(row: torch.Tensor, col: torch.Tensor, d1: int, row_mean: torch.Tensor | None = None) -> torch.Tensor:
    """1/√V̂ for the rank-1 estimate V̂ = R·C / mean(R), R and C kept with size-1 reduced dims.

    ``row`` has size 1 along d0 (the mean of g² over d0) and ``col`` size 1 along d1; their outer
    product over the mean of ``row`` along d1 is the I-divergence-optimal nonnegative rank-1 fit
    (Shazeer & Stern 2018, §3; Su, kexue.fm/archives/7302). ``row_mean``: that mean along d1 when the
    caller has it (over the whole parameter, for an FSDP2 shard).
    """
    if row_mean is None:
        row_mean = row.mean(dim=d1, keepdim=True)
    return (row / row_mean).rsqrt() * col.rsqrt()


def propagate_nonfinite_(update: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Make ``update`` NaN wherever ``source`` is NaN or ±inf, in place.

    ``torch.sign`` maps NaN to 0 and ±inf to ±1, so a sign-based update would silently hide a
    non-finite gradient while the momentum stays corrupted. ``source − source`` is 0 for finite
    entries and NaN otherwise; adding it keeps finite entries bit-exact. Not ``source·0``: inductor
    simplifies a product with 0 to 0, which drops the propagation from the compiled (fused) path;
    nor a masked fill on ``isfinite``, which is 2–3× slower eagerly and, before an ``exp``, halved
    the speed of the compiled EG step on CPU.
    """
    return update.add_(source - source)
