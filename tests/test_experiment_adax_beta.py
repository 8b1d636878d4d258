"""``danlu compare --experiment adax-beta``: the β̂_t schedules it states are the optimizers' own, its
AdaX arm is ``danlu.AdaX``, its metric, and a smoke run at a tiny budget."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from danlu import Adafactor, AdamW, AdaX
from danlu.bench.experiments import _json_safe, get_experiment
from danlu.bench.experiments._common import VERDICTS, Context
from danlu.bench.experiments.adax_beta import (
    ADAFACTOR_C,
    ADAM_BETA2,
    ADAX_BETA2,
    BETA1,
    CAP,
    EPS,
    LR,
    SCHEDULES,
    TASK,
    _train_isolated,
    beta_hat_schedule,
    crossing_step,
    late_spike,
)
from danlu.bench.tasks import get_task
from danlu.optim.adafactor import adafactor_scalars
from danlu.optim.adax import adax_beta_hat

PROBE = (1, 2, 3, 10, 100, 1000, 5598, 20000)


def test_schedules_are_the_optimizers_functions() -> None:
    n = max(PROBE)
    adax, adafactor, adam = (beta_hat_schedule(a, n) for a in ("adax", "adafactor", "adam"))
    for t in PROBE:
        ours = float(adax[t - 1])
        theirs = float(adax_beta_hat(torch.tensor(float(t)), ADAX_BETA2))
        assert ours == pytest.approx(theirs, rel=0, abs=1e-15), t
        scal = adafactor_scalars(torch.tensor(float(t - 1), dtype=torch.float64), lr=LR, relative_step=False,
                                 decay_rate=ADAFACTOR_C)  # increments the counter to t
        assert float(adafactor[t - 1]) == pytest.approx(float(scal["beta2_hat"]), rel=0, abs=1e-15), t
        # Adam: the closed form of Su's rewrite of the bias-corrected v̂
        b = ADAM_BETA2
        assert float(adam[t - 1]) == pytest.approx(b * (1 - b ** (t - 1)) / (1 - b ** t), rel=1e-9, abs=1e-15)
    # The essays' landmarks: β̂_1 = 0 for all, AdaX ≈ 1 − 1/t early, Adam → β2, Adafactor and AdaX → 1.
    for s in (adax, adafactor, adam):
        assert float(s[0]) == 0.0
    assert float(adax[1]) == pytest.approx(0.5, abs=1e-4)
    assert float(adax[999]) == pytest.approx(0.99905, abs=1e-5)
    assert float(adam[n - 1]) == pytest.approx(ADAM_BETA2, abs=1e-9)   # off by ≈ β2^t·(1 − β2)
    assert float(adafactor[n - 1]) == pytest.approx(1 - n ** -ADAFACTOR_C, abs=1e-15)
    with pytest.raises(ValueError):
        beta_hat_schedule("sgd", 3)
    with pytest.raises(ValueError):
        beta_hat_schedule("adam", 0)


def _vhat_trace(opt_cls, kwargs, vhat_of, steps: int = 300) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run ``opt_cls`` on a float64 vector with a fixed gradient sequence; the (g_t, v̂_t) it stores."""
    p = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = opt_cls([p], **kwargs)
    gen = torch.Generator().manual_seed(0)
    grads, vhats = [], []
    for t in range(1, steps + 1):
        # gradients that shrink by 100× over the run, with a few large ones
        g = torch.randn(5, generator=gen, dtype=torch.float64) * (0.01 ** (t / steps)) * (30.0 if t % 97 == 0 else 1.0)
        p.grad = g.clone()
        opt.step()
        grads.append(g)
        vhats.append(vhat_of(opt.state[p], t).clone())
    return grads, vhats


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedules_are_what_the_optimizers_store(name: str) -> None:
    """The optimizers' second-moment state follows v̂_t = β̂_t·v̂_{t−1} + (1 − β̂_t)·g_t² with the
    protocol's β̂_t (AdamW's v̂ = v/(1 − β2^t), the bias correction)."""
    if name == "adam":
        grads, vhats = _vhat_trace(AdamW, {"lr": 1e-3, "betas": (BETA1, ADAM_BETA2), "eps": EPS, "weight_decay": 0.0},
                                   lambda st, t: st["exp_avg_sq"] / (1 - ADAM_BETA2 ** t))
        extra = 0.0
    elif name == "adax":
        grads, vhats = _vhat_trace(AdaX, {"lr": 1e-3, "betas": (BETA1, ADAX_BETA2), "eps": EPS},
                                   lambda st, t: st["exp_avg_sq"])
        extra = 0.0
    else:
        grads, vhats = _vhat_trace(Adafactor, {"lr": 1e-3, "relative_step": False, "scale_parameter": False,
                                                   "decay_rate": ADAFACTOR_C},
                                   lambda st, t: st["exp_avg_sq"])
        extra = 1e-30  # Adafactor's ε1, added to g²
    beta = beta_hat_schedule(name, len(grads))
    v = torch.zeros(5, dtype=torch.float64)
    for t, (g, stored) in enumerate(zip(grads, vhats)):
        v = beta[t] * v + (1 - beta[t]) * (g * g + extra)
        torch.testing.assert_close(stored, v, rtol=1e-10, atol=0.0)
    # and the three schedules really are three different things over this run
    others = [n for n in SCHEDULES if n != name]
    for other in others:
        assert (beta_hat_schedule(other, len(grads)) - beta).abs().max() > 1e-4


def test_adax_arm_is_danlu_adax() -> None:
    steps = 400
    ours = _train_isolated("adax", 0, steps)
    problem = get_task(TASK).build(0)
    opt = AdaX(problem.params, lr=LR, betas=(BETA1, ADAX_BETA2), eps=EPS)
    losses = []
    for s in range(steps):
        opt.zero_grad()
        loss = problem.train_loss(s)
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
    theta = torch.cat([p.detach().reshape(-1) for p in problem.params])
    torch.testing.assert_close(ours["theta"], theta, rtol=0, atol=0)
    assert ours["losses"] == losses
    # ... while the Adam schedule, through the same kernel, takes another path.
    adam = _train_isolated("adam", 0, steps)
    assert (adam["theta"] - ours["theta"]).abs().max() > 1e-6


def test_late_spike_and_crossing() -> None:
    assert late_spike([1.0, 0.1, 0.01, 1.0]) == pytest.approx(2.0)
    assert late_spike([1.0, 0.1, 0.01, 0.001]) == 0.0
    assert late_spike([1.0, 10.0, 0.5, 0.4]) == 0.0              # a rise in the first half does not count
    assert late_spike([1e-3, 1e-15, 1e-14, 1e-13]) == 0.0        # below the floor, rises are not resolved
    assert late_spike([1.0, 0.5, math.nan]) == CAP
    with pytest.raises(ValueError):
        late_spike([])
    t = crossing_step()
    n = t + 1
    adam, adafactor = beta_hat_schedule("adam", n), beta_hat_schedule("adafactor", n)
    assert adafactor[t - 2] < adam[t - 2] and adafactor[t - 1] >= adam[t - 1]
    assert 5000 < t < 6000   # t^0.8 ≈ 1/(1 − 0.999)


def test_adax_beta_experiment_tiny(tmp_path: Path) -> None:
    exp = get_experiment("adax-beta")
    done: list[int] = []
    seeds, steps = 2, 60
    out = exp.run(Context(seeds=seeds, steps=steps, out=tmp_path, advance=lambda n, _: done.append(n)))
    assert sum(done) == exp.units(seeds, steps)
    assert out.verdict in VERDICTS
    assert out.verdict == "inconclusive"   # far shorter than 2·t_×
    assert len(out.plots) == 3
    for name in out.plots:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(_json_safe(out.data), allow_nan=False)
    data = out.data
    assert set(data["late_spike"]) == {*SCHEDULES, "ref_adamw", "ref_adafactor"}
    assert all(len(v) == seeds for v in data["late_spike"].values())
    assert all(0.0 <= v <= CAP for vs in data["late_spike"].values() for v in vs)
    # the arms differ only in β̂_t, and that is already visible after 60 steps
    th = data["final_theta"]
    for s in range(seeds):
        assert th["adam"][s] != th["adax"][s] != th["adafactor"][s]
    assert th["adam"][0] != th["adam"][1]   # seeds differ
    assert data["crossing_step"] == crossing_step()
