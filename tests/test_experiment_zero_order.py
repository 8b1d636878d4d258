"""Smoke test of ``danlu compare --experiment zero-order`` at a tiny budget."""

from __future__ import annotations

import json
import math
from pathlib import Path

from danlu.bench.experiments import _json_safe, get_experiment
from danlu.bench.experiments import zero_order as zo_exp
from danlu.bench.experiments._common import VERDICTS, Context


def test_zero_order_experiment_tiny(tmp_path: Path) -> None:
    exp = get_experiment("zero-order")
    done: list[int] = []
    out = exp.run(Context(seeds=2, steps=4, out=tmp_path, advance=lambda n, _: done.append(n)))
    assert out.verdict in VERDICTS
    assert sum(done) == exp.units(2, 4)
    assert out.plots
    for name in out.plots:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(_json_safe(out.data), allow_nan=False)

    data = out.data
    # Every arm starts from the same CE-pretrained parameters (same 0-1 error at update 0) ...
    assert data["start_curves_equal"]
    assert all(len(c) == 5 for c in data["mean_curve"].values())
    # ... and the measured passes per update match what each arm is wired to do: CE and PG one
    # forward + backward; ZO 2n forwards of the 0-1 error and no backward; MGS one forward + backward
    # of the surrogate plus K + 1 = 5 evaluations of the 0-1 error.
    passes = data["passes_per_update"]
    assert passes["cross-entropy"] == {"forward": 1.0, "backward": 1.0}
    assert passes["policy-gradient"] == {"forward": 1.0, "backward": 1.0}
    assert passes["zero-order"] == {"forward": 2.0 * zo_exp.ZO_SAMPLES, "backward": 0.0}
    assert passes["MGS"] == passes[zo_exp.MGS_TUNED] == {"forward": 6.0, "backward": 1.0}
    for key in ("cos_zo_pg", "cos_zo_ce", "cos_pg_ce"):
        assert all(-1.0 <= c <= 1.0 for c in data[key])
    # The verdict's cosine is the σ = ZO_SIGMA entry of the sweep.
    assert data["cos_zo_pg"] == data["cos_zo_pg_by_sigma"][str(zo_exp.ZO_SIGMA)]
    assert all(0.0 <= t <= 1.0 for t in data["mgs_all_candidates_tied"] + data["mgs_sigma_matched_all_candidates_tied"])
    # The MGS arm runs at the non-tying 'uniform' noise with the reference β, the ablation at the ZO arm's
    # constant σ with β = n_train (read back from the optimizers, not from the constants' names).
    assert data["mgs_settings"]["MGS"] == {"noise": zo_exp.MGS_NOISE, "noise_scale": "uniform", "beta": 100.0}
    assert data["mgs_settings"][zo_exp.MGS_TUNED] == {"noise": zo_exp.ZO_SIGMA, "noise_scale": "constant",
                                                     "beta": float(data["n_train"])}
    for arm in zo_exp.ARMS:
        assert all(0.0 <= e <= 1.0 and math.isfinite(e) for e in data["train_error"][arm])
