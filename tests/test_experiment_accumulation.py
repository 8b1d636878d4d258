"""Smoke test of ``danlu compare --experiment accumulation`` at a tiny budget."""

from __future__ import annotations

import json
import math
from pathlib import Path

from danlu.bench.experiments import _json_safe, get_experiment
from danlu.bench.experiments._common import VERDICTS, Context


def test_accumulation_experiment_tiny(tmp_path: Path) -> None:
    exp = get_experiment("accumulation")
    done: list[int] = []
    out = exp.run(Context(seeds=2, steps=8, out=tmp_path, advance=lambda n, _: done.append(n)))
    assert out.verdict in VERDICTS
    assert sum(done) == exp.units(2, 8)
    for name in out.plots:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(_json_safe(out.data), allow_nan=False)

    data = out.data
    assert data["alpha"] in (0.03, 0.1, 0.3)
    # §2.3's exact identity: accumulation inside the momentum == SGDM on the union of the micro-batches.
    assert max(data["max_abs_dtheta_accum_vs_large"]) < 1e-5
    for a, b in zip(data["val_loss"]["accum"], data["val_loss"]["large"]):
        assert math.isclose(a, b, rel_tol=1e-5)
    # ... and it is *not* the same as plain small-batch SGDM (the arms are wired differently).
    assert all(abs(a - b) > 1e-4 for a, b in zip(data["val_loss"]["accum"], data["val_loss"]["small"]))
    # The curves share their x-axis (micro-batches seen) across arms and end at the budget.
    xs = {tuple(c["micro_steps"]) for c in data["curves"].values()}
    assert len(xs) == 1 and next(iter(xs))[-1] == data["micro_steps"] == 8
