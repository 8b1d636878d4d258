"""Smoke test of ``danlu compare --experiment implicit-regularization`` at a tiny budget."""

from __future__ import annotations

import json
import math
from pathlib import Path

from danlu.bench.experiments import _json_safe, get_experiment
from danlu.bench.experiments._common import VERDICTS, Context


def test_implicit_regularization_experiment_tiny(tmp_path: Path) -> None:
    exp = get_experiment("implicit-regularization")
    done: list[int] = []
    steps = 2
    out = exp.run(Context(seeds=2, steps=steps, out=tmp_path, advance=lambda n, _: done.append(n)))
    assert out.verdict in VERDICTS
    assert sum(done) == exp.units(2, steps)
    assert len(out.plots) == 3
    for name in out.plots:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(_json_safe(out.data), allow_nan=False)

    data = out.data
    arms = data["arms"]
    # Equal flow time: every arm's steps × lr is the same T = h_L · steps, and its curve ends there.
    assert data["flow_time"] == 2.0 * steps
    for arm in arms.values():
        assert arm["steps"] * arm["lr"] == data["flow_time"]
        assert arm["curve_t"][0] == 0.0 and arm["curve_t"][-1] == data["flow_time"]
    # The explicit penalty adds only the part of the large step's implicit penalty the small step lacks.
    assert data["egr_strength"] == (2.0 - 0.25) / 4
    assert {a["strength"] for a in arms.values()} == {0.0, data["egr_strength"]}
    # Paired design: a seed starts every arm from the same parameters (identical initial ‖∇L‖²) ...
    for s in range(2):
        assert len({a["init_grad_sq"][s] for a in arms.values()}) == 1
    # ... and the arms really differ: the penalties change the small-step run, and differently.
    small, exact, fd = arms["GD h=0.25"], arms["EGR exact"], arms["EGR finite-diff"]
    for s in range(2):
        assert not math.isclose(exact["grad_sq"][s], small["grad_sq"][s], rel_tol=1e-6)
        assert not math.isclose(fd["grad_sq"][s], small["grad_sq"][s], rel_tol=1e-6)
        assert not math.isclose(exact["grad_sq"][s], fd["grad_sq"][s], rel_tol=1e-6)
    # The reported log ratio is the per-seed log of the final ‖∇L‖² ratio.
    for s in range(2):
        expect = math.log(arms["GD h=2"]["grad_sq"][s] / small["grad_sq"][s])
        assert math.isclose(data["log_ratio_large_vs_small"][s], expect, rel_tol=1e-12)
