"""Smoke test of ``danlu compare --experiment eg-distribution-shift`` at a tiny budget."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from danlu.bench.experiments import _json_safe, get_experiment
from danlu.bench.experiments._common import VERDICTS, Context
from danlu.bench.experiments.eg_distribution_shift import ARMS, CAP, GAMMA_GRID, LR_GRID, _shifted, _train


def test_eg_distribution_shift_tiny(tmp_path: Path) -> None:
    exp = get_experiment("eg-distribution-shift")
    done: list[int] = []
    out = exp.run(Context(seeds=2, steps=16, out=tmp_path, advance=lambda n, _: done.append(n)))
    assert out.verdict in VERDICTS
    assert out.reason and out.measured and out.expected and out.protocol
    assert sum(done) == exp.units(2, 16)
    assert len(out.plots) == 2
    for name in out.plots:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(_json_safe(out.data), allow_nan=False)

    data = out.data
    assert data["shift"] == 8 and data["window"] == 2
    assert data["lr"]["constant"] in LR_GRID and data["lr"]["schedule"] in LR_GRID and data["gamma"] in GAMMA_GRID
    assert data["lr"]["eg"] == data["lr"]["constant"]
    for arm in ARMS:
        runs = data["runs"][arm]
        assert [r["seed"] for r in runs] == [0, 1]
        for r in runs:
            assert all(0.0 < v <= CAP for _, v in r["curve"])
            steps = [t for t, _ in r["curve"]]
            assert steps[0] == 0 and steps[-1] == 16 and 8 in steps and 10 in steps
    # Every arm of a seed starts from the same initialisation (same first evaluation) ...
    for i in range(2):
        firsts = {data["runs"][arm][i]["curve"][0][1] for arm in ARMS}
        assert len(firsts) == 1
    # ... and the seeds differ.
    assert data["runs"]["constant"][0]["curve"][0][1] != data["runs"]["constant"][1]["curve"][0][1]


def test_the_shift_changes_every_label() -> None:
    y = torch.arange(10).repeat(3)
    z = _shifted(y)
    assert bool((z != y).all()) and sorted(z[:10].tolist()) == list(range(10))


def test_arms_are_wired_differently_and_eg_starts_as_sgdm() -> None:
    steps = 12
    const = _train(0, "constant", 0.1, steps)
    sched = _train(0, "schedule", 0.1, steps)
    eg0 = _train(0, "eg", 0.1, steps, gamma=0.0)
    eg = _train(0, "eg", 0.1, steps, gamma=0.1)
    # γ = 0: the wrapper is bitwise its inner SGDM; the scale stays exactly 1.
    assert eg0["curve"] == const["curve"] and all(s == 1.0 for _, s in eg0["s_curve"])
    # The schedule's first step is at the peak lr (cos 0 = 1), then its lr falls: the curves part.
    assert sched["curve"][:2] == const["curve"][:2] and sched["curve"] != const["curve"]
    # EG with γ > 0 moves its scale (s_1 = 1 exactly: no previous step) and so its curve.
    assert eg["s_curve"][0][1] == 1.0 and any(s != 1.0 for _, s in eg["s_curve"])
    assert eg["curve"] != const["curve"]
    # The shock: right at the shift the model still predicts the old labels, so the loss on the new ones jumps.
    assert const["shock"] > const["pre"]
    assert math.isfinite(eg["log_s_rise"])
