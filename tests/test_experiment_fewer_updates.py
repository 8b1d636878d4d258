"""Smoke test of ``danlu compare --experiment fewer-updates`` at a tiny budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from danlu.bench.experiments import _json_safe, get_experiment
from danlu.bench.experiments._common import VERDICTS, Context


def test_fewer_updates_experiment_tiny(tmp_path: Path) -> None:
    exp = get_experiment("fewer-updates")
    done: list[int] = []
    out = exp.run(Context(seeds=2, steps=8, out=tmp_path, advance=lambda n, _: done.append(n)))
    assert out.verdict in VERDICTS
    assert out.verdict == "inconclusive"  # under one epoch: inconclusive whatever the numbers
    assert sum(done) == exp.units(2, 8)
    assert len(out.plots) == 2
    for name in out.plots:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(_json_safe(out.data), allow_nan=False)

    data = out.data
    n, k = data["micro_steps"], data["k"]
    assert n == 8 and k == 4
    assert data["alpha"]["sgdm"] in (0.03, 0.1, 0.3) and data["alpha"]["adamw"] in (1e-3, 3e-3, 1e-2)
    for o in ("sgdm", "adamw"):
        moves = data["theta_moves"][o]
        # the gated arms move θ on every k-th micro-step only, the small-batch arms on every one
        for arm in ("exact", "chi", "tilde_chi"):
            assert moves[arm] == [n // k, n // k]
        for arm in ("small", "small_lr_over_k"):
            assert moves[arm] == [n, n]
        coef = data["coefficients"][o]
        beta = coef["small"][0]
        assert coef["chi"] == coef["small"] == coef["exact"]  # χ only: β unchanged
        assert coef["tilde_chi"][0] == pytest.approx(1 - (1 - beta) / k)  # β̃ = 1 − (1 − β)/k
        # the three gated arms are different algorithms
        L = data["val_loss"][o]
        for a, b in (("chi", "tilde_chi"), ("chi", "exact"), ("tilde_chi", "exact"), ("chi", "small")):
            assert all(abs(x - y) > 1e-7 for x, y in zip(L[a], L[b])), (o, a, b)
    xs = {tuple(c["micro_steps"]) for o in data["curves"].values() for c in o.values()}
    assert len(xs) == 1 and next(iter(xs))[-1] == n
