"""Stochastic rounding of float32 to bfloat16 with counter-based noise, in float arithmetic.

A float32 ``x`` lies between two neighbouring bfloat16 values ``y`` (its round-to-nearest) and ``y₂``
(the neighbour on the other side of ``x``), ``g = |y₂ − y|`` apart. Stochastic rounding returns ``y₂``
with probability ``|x − y| / g`` and ``y`` otherwise, so E[round(x)] = x exactly (unbiased), every result
is one of the two neighbours, representable values are unchanged (``x = y``), and small updates that
round-to-nearest would drop (below half an ulp of the state) survive in expectation: this is what
keeps bfloat16 optimizer state on track.

Every step is exact in float32, so eager and compiled code (inductor, with or without fused
multiply-adds) give the same bits:

- ``y = bf16(x)`` and ``d = x − y`` (exact: ``y`` is within half a bfloat16 ulp of ``x``);
- ``y₂ = bf16(y ± s)`` with the sign of ``d`` and ``s = max(|y|·5/1024, 2⁻¹³³)``: ``s`` is between 0.625
  and 1.25 bfloat16 ulps of ``y`` on either side (also going down from a power of two, where the ulp
  below is half the ulp above; 2⁻¹³³ is the ulp of the subnormals), so ``y ± s`` (exact in float32)
  rounds to the neighbour;
- round to ``y₂`` when ``u·g < |d|``, with ``u = r/2¹⁶`` and ``r`` a 16-bit integer: ``|d|/g`` is a multiple of
  2⁻¹⁶ (a float32 has 16 more mantissa bits than a bfloat16), so the probability is exactly ``|d|/g``.

±inf and NaN are kept (``d`` is NaN, the comparison is false). A finite ``x`` above the largest
bfloat16 rounds to it or to inf as round-to-nearest does; one just below it never rounds up to inf.

The noise is not drawn from any generator, so replicas under DDP draw the same noise, a resumed run
is bit exact, the global RNG is never touched, and the code is plain tensor arithmetic that
``torch.compile`` fuses into the step. The element at offset ``i`` gets the top 16 bits of the 32-bit
sum ``i·φ + key`` (φ = 0x9E3779B9, the golden-ratio multiplier of Fibonacci hashing), with ``key`` a
32-bit hash of (the parameter's seed, its update count). Over steps, each element's noise is uniform
and independent from step to step (the key is rehashed each step); within one step the elements'
noise is a randomly shifted golden-ratio (Weyl) sequence, evenly spread rather than independent.
Only the rounding of each element on its own matters for the state's expectation, and this form
costs a multiply and three integer operations per element where a per-element hash (xorshift-multiply
rounds) costs a dozen, in a compiled step that is compute-bound already. The comparisons and
conversions above avoid integer bit casts, which inductor's CPU code generator runs one element at a
time; every integer stays in int64 without overflow (a signed overflow is undefined in the generated
C++, and gcc dropped the code around one). Compiled, the float32 → bfloat16 → float32 round trips must
be kept (``emulate_precision_casts``, as the fused path compiles); inductor otherwise elides them.
"""

from __future__ import annotations

import torch

__all__ = ["hash32", "stochastic_round_to_bf16", "param_seed", "rounding_key", "shift_key", "round_with_key",
           "round_with_noise"]

_M32 = 0xFFFFFFFF
_PHI32 = 0x9E3779B9  # the golden-ratio multiplier of Fibonacci hashing (2³²/φ)
_S = 5.0 / 1024.0  # 0.625 bfloat16 ulps of a power of two, 1.25 of the ulp below it
_SUBNORMAL_ULP = 2.0**-133


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


def rounding_key(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The 32-bit key of one rounding (a 0-d int64 in [0, 2³²)) from the parameter's seed and update count."""
    return hash32(seed.to(torch.int64) ^ hash32(step.to(torch.int64) * 0x61C88647 + 0x7F4A7C15))


def shift_key(key: torch.Tensor, offset: int) -> torch.Tensor:
    """The key whose noise at element i is ``key``'s noise at element ``offset + i``: (key + offset·φ) mod 2³².
    An FSDP2 shard whose first element is element ``offset`` of the parameter rounds with it, so that it
    draws exactly its slice of the one-process noise (for parameters below 2³¹ elements)."""
    return (key + ((offset & 0x7FFFFFFF) * _PHI32 & _M32)) & _M32


def _noise(x: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """u ∈ [0, 1) in steps of 2⁻¹⁶ per element of ``x``: the top 16 bits of (offset·φ + key) mod 2³².

    In int64 and without overflow (offsets below 2³¹, φ and the key below 2³²), so no step relies on
    wrapping: compiled C++ treats a signed overflow as undefined and may drop the code around it.
    Offsets of larger tensors are taken mod 2³¹ (the noise repeats every 2³¹ elements)."""
    offsets = torch.arange(x.numel(), dtype=torch.int64, device=x.device).reshape(x.shape)
    if x.numel() > 1 << 31:
        offsets = offsets & 0x7FFFFFFF
    r = ((((offsets * _PHI32) & _M32) + key) & _M32) >> 16
    return r.to(torch.int32).to(torch.float32) * 2.0**-16


def round_with_noise(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded to bfloat16: to the far neighbour where ``u·gap < |x − bf16(x)|``."""
    y = x.to(torch.bfloat16).float()
    d = x - y
    s = torch.clamp_min(y.abs() * _S, _SUBNORMAL_ULP)
    y2 = (y + torch.where(d < 0, -s, s)).to(torch.bfloat16).float()
    return torch.where(u * (y2 - y).abs() < d.abs(), y2, y).to(torch.bfloat16)


def round_with_key(x: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded stochastically to bfloat16 with the noise of ``key`` (see the module)."""
    return round_with_noise(x, _noise(x, key))


def stochastic_round_to_bf16(x: torch.Tensor, seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded stochastically to bfloat16, the noise keyed by (seed, step, offset)."""
    return round_with_key(x.float(), rounding_key(seed, step))
