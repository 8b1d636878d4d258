"""Smoke test of the eg-step-size experiment at tiny budgets."""

from __future__ import annotations

import json
import math
from pathlib import Path

from danlu.bench.experiments import Context, _json_safe
from danlu.bench.experiments._common import VERDICTS
from danlu.bench.experiments.eg_step_size import CAP, EXPERIMENT, LRS, _train


def _check_outcome(o, out: Path, seeds: int) -> None:
    assert o.verdict in VERDICTS
    assert o.reason and o.measured and o.expected and o.protocol
    for name in o.plots:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(_json_safe(o.data), allow_nan=False)
    for arm in ("sgd", "eg"):
        runs = o.data["runs"][arm]
        assert len(runs) == len(LRS) * seeds
        assert all(0.0 < r["score"] <= CAP for r in runs)


def test_eg_step_size_smoke(tmp_path: Path) -> None:
    o = EXPERIMENT.run(Context(seeds=2, steps=2, out=tmp_path))
    _check_outcome(o, tmp_path, 2)
    sgd, eg = o.data["runs"]["sgd"], o.data["runs"]["eg"]
    assert [(r["lr"], r["seed"]) for r in sgd] == [(r["lr"], r["seed"]) for r in eg]
    # After two steps ν has moved (ν_2 = exp(γ·g_1⊙g_2)), so the arms differ; the seeds differ too.
    assert any(a["val_loss"] != b["val_loss"] for a, b in zip(sgd, eg))
    assert any(r["nu_geomean"] != 1.0 for r in eg if math.isfinite(r["nu_geomean"]))
    assert sgd[0]["seed"] != sgd[1]["seed"] and sgd[0]["val_loss"] != sgd[1]["val_loss"]
    assert o.data["meta_lr"] in o.data["pilot"]["meta_grid"]


def test_eg_arm_is_sgd_on_its_first_step() -> None:
    # ν starts at 1 and g_0 = 0, so after one step EGStepSize(SGD) is bitwise SGD; every run starts afresh.
    for lr in (1e-2, 1.0):
        a = _train(0, lr, None, 1)
        b = _train(0, lr, 1000.0, 1)
        assert a["val_loss"] == b["val_loss"] and b["nu_geomean"] == 1.0
    assert _train(0, 1.0, None, 1)["val_loss"] == a["val_loss"]
