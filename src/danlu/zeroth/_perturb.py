"""Seeded, regenerable random directions over a list of tensors, applied in place (MeZO-style).

A direction u over parameters θ_1..θ_n is never stored: it is drawn tensor by tensor from a
``torch.Generator`` seeded with one integer, used (θ += scale·u), and drawn again from the same seed
when it is needed once more. Extra memory is therefore one tensor's worth (the largest parameter's
sample), never a copy of the model, and the global RNG is neither used nor disturbed.

Distributions (each with E u = 0 and Cov u = I, so E[(uᵀg)·u] = g):

* ``"gaussian"``: u ~ N(0, I).
* ``"rademacher"``: u_i = ±1 with probability ½.
* ``"sphere"``: u = √d · z/‖z‖ with z ~ N(0, I) over *all* tensors jointly (uniform on the sphere of
  radius √d); ‖z‖ takes one extra generation pass, cached per seed by :class:`Directions`.

Precision: θ + s·u − s·u is not bit-exact in floating point. In float32 the drift of one
perturb/restore cycle is within a few ulp; in bfloat16/float16 it is large compared with typical
updates, so :func:`snapshot_low_precision` keeps exact copies of the 16-bit tensors (and only those)
to restore from.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["DISTRIBUTIONS", "Directions", "snapshot_low_precision", "restore_"]

DISTRIBUTIONS = ("gaussian", "rademacher", "sphere")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class Directions:
    """Regenerable directions over ``params`` (fixed order) drawn from per-device generators.

    For an FSDP2 parameter (a DTensor sharded on dim 0) the direction is drawn for the whole parameter
    and sliced to the local shard, which is what :meth:`tensors` yields (``targets``): every rank then
    perturbs exactly its slice of the one-process direction, whatever the number of ranks. The draw
    costs the whole parameter's sample per rank (a temporary, one tensor at a time)."""

    def __init__(self, params: Sequence[torch.Tensor], distribution: str = "gaussian") -> None:
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"Invalid distribution: {distribution!r} (expected one of {DISTRIBUTIONS})")
        from .._core.distributed import layout_of  # noqa: PLC0415

        self.params = list(params)
        self.distribution = distribution
        self._dim = sum(p.numel() for p in self.params)
        self._sphere_cache: tuple[int, float] | None = None
        shards = [layout_of(p) for p in self.params]
        # (local tensor, first row, rows) of a sharded parameter; None for a whole one.
        self._slices = [None if sh is None else (sh.local, sh.row_offset, sh.local.shape[0] if sh.local.dim() else 0)
                        for sh in shards]
        self.targets = [p if sl is None else sl[0] for p, sl in zip(self.params, self._slices)]

    def _generators(self, seed: int) -> dict[torch.device, torch.Generator]:
        gens: dict[torch.device, torch.Generator] = {}
        for p in self.params:
            if p.device not in gens:
                gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        return gens

    def _draw(self, p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One (whole) tensor's sample, in float32 (or float64 for float64 parameters)."""
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        if self.distribution == "rademacher":
            z = torch.randint(0, 2, p.shape, generator=gen, device=p.device, dtype=dtype)
            return z.mul_(2).sub_(1)
        return torch.randn(p.shape, generator=gen, device=p.device, dtype=dtype)

    def _local(self, k: int, u: torch.Tensor) -> torch.Tensor:
        sl = self._slices[k]
        return u if sl is None else u.narrow(0, sl[1], sl[2])

    def _sphere_factor(self, seed: int) -> float:
        if self._sphere_cache is not None and self._sphere_cache[0] == seed:
            return self._sphere_cache[1]
        gens = self._generators(seed)
        sq = 0.0
        for p in self.params:
            sq += float(self._draw(p, gens[p.device]).double().square().sum())
        factor = math.sqrt(self._dim / sq) if sq > 0 else 0.0
        self._sphere_cache = (seed, factor)
        return factor

    def sq_norm(self, seed: int) -> float:
        """‖u(seed)‖² over every tensor, whole (an FSDP2 shard's parameter included), in float64: one more
        draw of the direction."""
        gens = self._generators(seed)
        factor = self._sphere_factor(seed) if self.distribution == "sphere" else 1.0
        total = 0.0
        for p in self.params:
            total += float(self._draw(p, gens[p.device]).double().square().sum())
        return total * factor * factor

    def tensors(self, seed: int):
        """Yield ``(param, u_param)`` for the direction of ``seed``, one tensor at a time."""
        gens = self._generators(seed)
        factor = self._sphere_factor(seed) if self.distribution == "sphere" else 1.0
        for k, p in enumerate(self.params):
            u = self._local(k, self._draw(p, gens[p.device]))
            if factor != 1.0:
                u.mul_(factor)
            yield self.targets[k], u

    @torch.no_grad()
    def add_(self, seed: int, scale: float) -> None:
        """θ ← θ + scale·u(seed), in place over every tensor."""
        for p, u in self.tensors(seed):
            p.add_(u.to(p.dtype), alpha=scale)

    @torch.no_grad()
    def project(self, seed: int, vectors: Sequence[torch.Tensor]) -> float:
        """⟨u(seed), v⟩ summed over tensors (v aligned with ``params``), in float64."""
        total = 0.0
        for (_p, u), v in zip(self.tensors(seed), vectors):
            total += float(torch.sum(u.double() * v.double()))
        return total


def snapshot_low_precision(params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """Exact copies of the 16-bit tensors (``None`` for the others), to undo a perturbation bitwise."""
    return [p.detach().clone() if p.dtype in _LOW_PRECISION else None for p in params]


@torch.no_grad()
def restore_(params: Sequence[torch.Tensor], snapshot: Sequence[torch.Tensor | None]) -> None:
    for p, s in zip(params, snapshot):
        if s is not None:
            p.copy_(s)
