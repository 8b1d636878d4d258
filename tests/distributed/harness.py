"""Run an entry point of :mod:`workers` on ``world_size`` CPU ranks (gloo) and collect every rank's result."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
import torch.multiprocessing as mp

import workers


def run(entry: str, world_size: int, *args: Any, out: str | None = None) -> list[Any]:
    """``workers.<entry>(rank, world_size, out, *args)`` on every rank; returns the results by rank.
    ``out`` is a directory the ranks share (a fresh temporary one if None)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = out or tmp
        init = "file://" + os.path.join(tmp, "store")
        mp.spawn(workers.main, args=(world_size, init, out, entry, args), nprocs=world_size, join=True)
        results = [torch.load(os.path.join(out, f"{entry}-rank{r}.pt"), weights_only=False) for r in range(world_size)]
    for r, res in enumerate(results):
        if isinstance(res, dict) and "__error__" in res:
            raise RuntimeError(f"rank {r} failed:\n{res['__error__']}")
    return results
