"""Stochastic rounding of float32 to bfloat16 with counter-based noise.

A bfloat16 number is the upper 16 bits of a float32. Adding a uniform random integer r ∈ [0, 2^16) to
the float32's bit pattern and clearing the lower 16 bits rounds the magnitude up with probability
(lower 16 bits)/2^16 and down otherwise, so E[round(x)] = x exactly (unbiased), every result is one of
the two bfloat16 neighbours of x, representable values are unchanged (their lower bits are 0), ±inf
stays ±inf and NaN is kept as NaN. Small updates that round-to-nearest would drop (below half an ulp of
the state) survive in expectation: this is what keeps bfloat16 optimizer state on track.

The noise is not drawn from any generator: r is a 32-bit integer hash of (the parameter's seed, its
update count, the element's offset), so replicas under DDP draw the same noise, a resumed run is bit
exact, the global RNG is never touched, and the code is plain tensor arithmetic that
``torch.compile`` fuses into the step (no ``.item()``, no RNG state). All products stay below 2^63
(multipliers below 2^31 on values below 2^32), so int64 arithmetic never overflows.
"""

from __future__ import annotations

import torch

__all__ = ["hash32", "stochastic_round_to_bf16", "param_seed"]

_M32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) of an int64 tensor, values in [0, 2^32)."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def param_seed(group_index: int, position: int) -> torch.Tensor:
    """The noise seed of the ``position``-th parameter of param group ``group_index`` (a 0-d int64)."""
    return hash32(torch.tensor(group_index * 0x10001 + position * 0x9E37 + 0x2545F491, dtype=torch.int64))


def stochastic_round_to_bf16(x: torch.Tensor, seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded stochastically to bfloat16, the noise keyed by (seed, step, offset)."""
    key = hash32(seed ^ hash32(step.to(torch.int64) * 0x61C88647 + 0x7F4A7C15))
    offsets = torch.arange(x.numel(), dtype=torch.int64, device=x.device).reshape(x.shape)
    r = (hash32(offsets * 0x2545F491 + key) & 0xFFFF).to(torch.int32)
    bits = x.contiguous().view(torch.int32)
    rounded = ((bits + r) & -65536).view(torch.float32)
    return torch.where(torch.isnan(x), x, rounded).to(torch.bfloat16)
