"""Smoke test of ``danlu compare --experiment sampling-view`` at a tiny budget."""

from __future__ import annotations

import json
import math
from pathlib import Path

from danlu.bench.experiments import _json_safe, get_experiment
from danlu.bench.experiments import sampling_view as sv
from danlu.bench.experiments._common import VERDICTS, Context


def test_sampling_view_experiment_tiny(tmp_path: Path) -> None:
    exp = get_experiment("sampling-view")
    done: list[int] = []
    out = exp.run(Context(seeds=2, steps=4, out=tmp_path, advance=lambda n, _: done.append(n)))
    assert out.verdict in VERDICTS
    assert sum(done) == exp.units(2, 4)
    assert len(out.plots) == 2
    for name in out.plots:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(_json_safe(out.data), allow_nan=False)

    data = out.data
    # Every arm of a start begins at the same parameters, and the two starts differ (the pre-training ran).
    assert data["start_curves_equal"]
    assert data["start_train_error"]["scratch"] != data["start_train_error"]["pretrained"]
    for st in sv.STARTS:
        assert set(data["train_error"][st]) == set(sv.ARMS)
        assert all(len(c) == 5 for c in data["mean_curve"][st].values())
        for fracs in data["tie_fraction"][st].values():
            assert all(0.0 <= f <= 1.0 for f in fracs)
        # The selection rule: σ* is the smallest grid σ at or under TIE_MAX, else the least-tying one.
        for scale, grid in (("uniform", sv.UNIFORM_GRID), ("constant", sv.CONSTANT_GRID)):
            pick = data["chosen"][scale][st]
            means = {s: data["mean_tie_fraction"][st][sv._arm(scale, s)] for s in grid}
            ok = [s for s in grid if means[s] <= sv.TIE_MAX]
            assert pick["non_tying"] == bool(ok)
            assert pick["sigma"] == (ok[0] if ok else min(grid, key=means.__getitem__))
        # Each arm is wired to its own noise: the 9 arms end at 9 different distances from their start ...
        for seed in range(2):
            assert len({data["distance"][st][a][seed] for a in sv.ARMS}) == len(sv.ARMS)
        # ... and the largest 'constant' noise (σ = 0.3 moves a logit by ~σ·√31 ≈ 1.6) never ties.
        assert data["mean_tie_fraction"][st][sv._arm("constant", 0.3)] == 0.0
    # The large-α limit on the 0-1 error: α·Δ* → −σ²ĝ_ZO with an error that shrinks ∝ 1/α.
    for rel in data["limit_rel_error"]:
        assert all(math.isfinite(e) for e in rel)
        assert rel[-1] < 1e-3 and rel[-1] <= 0.02 * rel[1]
