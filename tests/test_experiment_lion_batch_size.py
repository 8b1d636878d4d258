"""Smoke test of ``danlu compare --experiment lion-batch-size`` at a tiny budget, and the digits
builder's ``batch`` keyword it relies on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from danlu.bench.experiments import _json_safe, get_experiment
from danlu.bench.experiments._common import VERDICTS, Context
from danlu.bench.experiments.lion_batch_size import BATCHES, _task
from danlu.bench.tasks import _build_digits, get_task


def test_digits_batch_keyword_default_unchanged() -> None:
    default, explicit = get_task("digits").build(3), _build_digits(3, batch=64)
    for step in (0, 7):
        assert torch.equal(default.train_loss(step), explicit.train_loss(step))
    # batch 16 draws the first 16 of the same per-step permutation, a different (smaller) batch
    small = _build_digits(3, batch=16)
    assert not torch.equal(small.train_loss(0), default.train_loss(0))
    with pytest.raises(ValueError):
        _build_digits(0, batch=0)
    with pytest.raises(ValueError):
        _build_digits(0, batch=10_000)
    with pytest.raises(TypeError):
        _build_digits(0, batch=16.0)  # type: ignore[arg-type]


def test_task_reports_full_train_loss() -> None:
    problem = _task(256).build(0)
    metrics = problem.evaluate()
    assert problem.train_data is not None and problem.batch_loss is not None
    full = problem.batch_loss(torch.arange(len(problem.train_data[1]))).item()
    assert math.isclose(metrics["train_loss"], full, rel_tol=1e-5)
    assert set(metrics) >= {"val_loss", "val_acc", "train_loss", "train_acc"}


def test_lion_batch_size_experiment_tiny(tmp_path: Path) -> None:
    exp = get_experiment("lion-batch-size")
    done: list[int] = []
    grown: list[int] = []
    out = exp.run(Context(seeds=2, steps=2, out=tmp_path, advance=lambda n, _: done.append(n),
                          grow=grown.append))
    assert out.verdict in VERDICTS
    assert sum(done) == exp.units(2, 2) + sum(grown)
    for name in out.plots:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(_json_safe(out.data), allow_nan=False)

    per = out.data["per_batch"]
    assert [int(b) for b in per] == list(BATCHES)
    # equal examples seen: steps × batch is the same at every batch size
    assert len({per[str(b)]["steps"] * b for b in BATCHES}) == 1
    for b in BATCHES:
        arms = per[str(b)]["arms"]
        assert all(n == per[str(b)]["steps"] for n in arms["adamw"]["steps_done"])
        # lion_from_adamw: lr ÷ k and weight decay × k of the tuned AdamW's
        best = per[str(b)]["best_adamw_lr"]
        assert math.isclose(arms["lion ÷10"]["lr"], best / 10) and math.isclose(arms["lion ÷3"]["lr"], best / 3)
        assert math.isclose(arms["lion ÷10"]["weight_decay"], 0.1)
        # the arms are wired differently: no two of them end at the same val loss
        finals = [arms[n]["val_loss"][0] for n in ("adamw", "lion ÷10", "lion ÷3", "lion scale-aware")]
        assert len({round(v, 7) for v in finals}) == len(finals)
        # Lion's own sweep is centred on the ÷10 lr, reuses its runs, and picks its grid's best
        grid = per[str(b)]["lion_grid"]
        assert grid[f"{arms['lion ÷10']['lr']:g}"] == arms["lion ÷10"]["val_loss"]
        own = arms["lion (own sweep)"]
        assert own["val_loss"] == grid[f"{own['lr']:g}"]
        assert sum(own["val_loss"]) == min(sum(v) for v in grid.values())
        # the gap is val loss − full-train loss
        for v, t, g in zip(arms["adamw"]["val_loss"], arms["adamw"]["train_loss"], arms["adamw"]["gap"]):
            assert math.isclose(g, v - t, abs_tol=1e-9)
        # r is ln(converted Lion / AdamW), per seed
        conv = arms[per[str(b)]["converted"]]["val_loss"]
        for r, x, y in zip(per[str(b)]["log_ratio_converted_vs_adamw"], conv, arms["adamw"]["val_loss"]):
            assert math.isclose(r, math.log(x / y), rel_tol=1e-9)
    # the AdamW grid is centred on 3e-3·√(B/64): larger batches are tuned around larger lrs
    assert "0.003" in per["64"]["adamw_grid"] and "0.006" in per["256"]["adamw_grid"]
    assert "0.0015" in per["16"]["adamw_grid"]
