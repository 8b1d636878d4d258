"""Smoke test of ``danlu compare --experiment implicit-regularization`` at a tiny budget, and its rules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from danlu.bench.experiments import _json_safe, get_experiment
from danlu.bench.experiments import implicit_regularization as ir
from danlu.bench.experiments._common import VERDICTS, Context


def test_implicit_regularization_experiment_tiny(tmp_path: Path) -> None:
    exp = get_experiment("implicit-regularization")
    done: list[int] = []
    steps = 2
    out = exp.run(Context(seeds=2, steps=steps, out=tmp_path, advance=lambda n, _: done.append(n)))
    assert out.verdict in VERDICTS
    assert sum(done) == exp.units(2, steps)
    assert len(out.plots) == 4
    for name in out.plots:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(_json_safe(out.data), allow_nan=False)

    data = out.data
    arms = data["arms"]
    assert data["train_size"] == 200
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

    # --- flooding -------------------------------------------------------------------------------------
    large, flood = arms["GD h=2"], arms["flood h=2"]
    path = data["plain_large_path"]
    # The plain h_L path: one (loss, ‖∇L‖²) per step plus the final point, consistent with the checkpoints.
    for s in range(2):
        assert len(path["train_loss"][s]) == len(path["grad_sq"][s]) == steps + 1
        assert path["train_loss"][s][-1] == large["train_loss"][s]
        assert path["grad_sq"][s][-1] == large["grad_sq"][s]
        assert math.isclose(path["grad_sq"][s][0], large["init_grad_sq"][s], rel_tol=1e-12)
    # The flood level follows its rule: plain h_L train loss at step round(steps/8), seed mean, 2 digits.
    k_b = round(steps / 8)
    assert data["flood_step"] == k_b
    mean_b = sum(path["train_loss"][s][k_b] for s in range(2)) / 2
    assert data["flood_level"] == float(f"{mean_b:.2g}") == flood["flood_level"]
    assert flood["lr"] == 2.0 and flood["strength"] == 0.0 and flood["steps"] == steps
    # Flooding is plain GD, bit for bit, up to the first step whose loss is below b, and not after.
    for s in range(2):
        k = flood["first_below"][s]
        assert k is not None and path["train_loss"][s][k] < data["flood_level"]
        assert all(v >= data["flood_level"] for v in path["train_loss"][s][:k])
        for j, t in enumerate(flood["curve_t"]):
            if t / flood["lr"] <= k:
                assert flood["curve_r"][s][j] == large["curve_r"][s][j]
        assert not math.isclose(flood["grad_sq"][s], large["grad_sq"][s], rel_tol=1e-6)
    # Part (c) compares at equal train loss: recompute from the stored path with a reference interpolation.
    for s in range(2):
        ref = _reference_grad_sq_at(path["train_loss"][s], path["grad_sq"][s], flood["train_loss"][s])
        got = data["plain_large_grad_sq_at_flood_loss"][s]
        assert (math.isnan(ref) and got is not None and math.isnan(got)) or math.isclose(got, ref, rel_tol=1e-9)
        if math.isfinite(ref):
            assert math.isclose(data["log_ratio_flood_vs_plain_at_equal_loss"][s],
                                math.log(flood["grad_sq"][s] / ref), rel_tol=1e-9)

    # --- generalisation ---------------------------------------------------------------------------------
    gen = data["generalisation"]
    assert {g["reference"] for g in gen.values()} == {"GD h=0.25", "GD h=2"}
    assert gen["flooding"]["arm"] == "flood h=2" and gen["flooding"]["reference"] == "GD h=2"
    n_val = 360
    for g in gen.values():
        a, r = arms[g["arm"]], arms[g["reference"]]
        for s in range(2):
            assert g["d_val_acc"][s] == a["val_acc"][s] - r["val_acc"][s]
            assert g["d_val_loss"][s] == a["val_loss"][s] - r["val_loss"][s]
            # An accuracy difference needs at least as many changed predictions (val_acc = hits / 360).
            changed = g["val_rows_changed"][s]
            assert 0 <= changed <= n_val
            assert abs(g["d_val_acc"][s]) * n_val <= changed + 1e-4
        assert g["score"] == ir._generalisation(g["sign_acc"], g["sign_loss"])
    deciding = [gen[k]["score"] for k in ("implicit", "explicit", "flooding")]
    assert data["part_g"] == (ir._combine(deciding) if data["overfit"] else 0)
    assert out.verdict == ir._verdict([data["part_a"], data["part_b"], data["part_c"], data["part_g"]])


def _reference_grad_sq_at(losses: list[float], grads: list[float], target: float) -> float:
    """Written apart from the module: walk the path's segments, find the first one that brackets the
    target from above, interpolate log ‖∇L‖² linearly in log L."""
    if losses and losses[0] <= target:
        return grads[0] if losses[0] == target else math.nan
    for (la, ga), (lb, gb) in zip(zip(losses, grads), zip(losses[1:], grads[1:])):
        if lb <= target < la:
            frac = math.log(la / target) / math.log(la / lb)
            return ga * (gb / ga) ** frac
    return math.nan


def test_grad_sq_at_loss_interpolates_in_log_log() -> None:
    # On a path where ‖∇L‖² = L², log-linear interpolation is exact anywhere between the points.
    losses = [4.0, 2.0, 1.0, 0.5]
    grads = [v * v for v in losses]
    for target in (3.9, 2.0, math.sqrt(8.0), 1.3, 0.5):
        assert math.isclose(ir.grad_sq_at_loss(losses, grads, target), target * target, rel_tol=1e-12)
    assert ir.grad_sq_at_loss(losses, grads, 4.0) == 16.0
    # The first crossing is used when the path is not monotone.
    assert math.isclose(ir.grad_sq_at_loss([4.0, 1.0, 3.0, 0.5], [16.0, 1.0, 9.0, 0.25], 2.0), 4.0, rel_tol=1e-12)
    for target in (5.0, 0.25, 0.0, -1.0, math.nan):
        assert math.isnan(ir.grad_sq_at_loss(losses, grads, target))


@pytest.mark.parametrize(("acc", "loss", "want"), [(1, -1, 1), (1, 0, 1), (1, 1, 0), (0, -1, 0), (0, 1, 0),
                                                   (-1, -1, -1), (-1, 1, -1), (0, 0, 0)])
def test_generalisation_rule(acc: int, loss: int, want: int) -> None:
    # loss sign +1 = val loss significantly *higher* (worse): it vetoes an accuracy gain, nothing else.
    assert ir._generalisation(acc, loss) == want


def test_combination_rules() -> None:
    assert ir._combine([1, 0, 0]) == 1 and ir._combine([0, 0, -1]) == -1
    assert ir._combine([1, -1, 0]) == 0 and ir._combine([0, 0, 0]) == 0
    assert ir._verdict([1, 1, 1, 1]) == "supported"
    assert ir._verdict([1, 1, 1, 0]) == "mixed" and ir._verdict([1, -1, -1, -1]) == "mixed"
    assert ir._verdict([0, 0, -1, 0]) == "not supported"
    assert ir._verdict([0, 0, 0, 0]) == "inconclusive"
