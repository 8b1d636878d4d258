"""danlu's optimizers under DDP and FSDP2 on 2 CPU ranks (gloo), and DCP checkpoints that reshard.

Each test compares with one process on the union of the ranks' batches (``workers.train_single``). The
ranks run in a few spawned groups per module (module-scoped fixtures), not one group per test: starting
a process group and importing torch in two processes costs seconds on two cores.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist

import harness
import workers

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WS = 2


def _scale(config: str, ref: torch.Tensor) -> float:
    """What a parameter's error is measured against: its largest entry; for EG± with a budget U the
    budget, since θ = θ⁺ − θ⁻ with θ⁺, θ⁻ of order U (θ itself may be a small difference of them)."""
    budget = workers.CONFIGS[config][1].get("l1_budget")
    return float(budget) if budget is not None else max(float(ref.abs().max()), 1e-30)


def _check(config: str, got: object, ref: list[torch.Tensor], rtol: float, what: str) -> None:
    if isinstance(got, str):
        pytest.fail(f"{config} {what} raised:\n{got}")
    assert isinstance(got, list) and len(got) == len(ref)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape
        err = float((a - b).abs().max()) / _scale(config, b) if b.numel() else 0.0
        assert err <= rtol, f"{config} {what}: parameter {i} of shape {tuple(b.shape)} differs by {err:.2e} (relative)"


@pytest.fixture(scope="module")
def battery() -> list[dict]:
    return harness.run("battery", WS)


@pytest.fixture(scope="module")
def references() -> dict[str, list[torch.Tensor]]:
    return {c: workers.train_single(c, ws=WS) for c in workers.CONFIGS}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("config", list(workers.CONFIGS))
def test_sharded_training_equals_one_process(battery, references, config, mode):
    """DDP (replicated parameters, averaged gradients) and FSDP2 (dim-0 shards: uneven, and empty on rank 1
    for the one-row layer) give one process's parameters: ≤ 1e-6 relative for DDP, ≤ 1e-5 for FSDP2 (the
    cross-shard sums of Adafactor, Amos and EG± add in another order)."""
    rtol = 1e-6 if mode == "ddp" else 1e-5
    _check(config, battery[0][config][mode], references[config], rtol, mode)


@pytest.mark.parametrize("config", list(workers.CONFIGS))
def test_ranks_hold_the_same_parameters(battery, config):
    """Every rank ends with the same (full) parameters, bit for bit."""
    for mode in ("ddp", "fsdp"):
        a, b = battery[0][config][mode], battery[1][config][mode]
        if isinstance(a, str) or isinstance(b, str):
            pytest.fail(f"{config} {mode} raised:\n{a if isinstance(a, str) else b}")
        assert all(torch.equal(x, y) for x, y in zip(a, b))


# --- torch.distributed.checkpoint ---------------------------------------------------------------------
DCP_CONFIGS = [c for c in workers.CONFIGS if not workers.CONFIGS[c][1].get("fused")]
SPLIT = 2


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """Saved on 2 FSDP2 ranks after 2 of 4 steps (both DCP layouts); loaded on 1 rank (saved again there)
    and on 2; the 1-rank checkpoint loaded on 2. Each load then trains to step 4."""
    out = str(tmp_path_factory.mktemp("dcp"))
    uninterrupted = harness.run("dcp_save_resume", WS, DCP_CONFIGS, SPLIT, out=out)[0]
    on_one = harness.run("dcp_load_resume", 1, DCP_CONFIGS, SPLIT, "", "-on1", out=out)[0]
    on_two = harness.run("dcp_load_resume", WS, DCP_CONFIGS, SPLIT, out=out)[0]
    back_on_two = harness.run("dcp_load_resume", WS, DCP_CONFIGS, SPLIT, "-on1", out=out)[0]
    return dict(uninterrupted=uninterrupted, on_one=on_one, on_two=on_two, back_on_two=back_on_two)


@pytest.mark.parametrize("layout", ["nested", "flat"])
@pytest.mark.parametrize("config", DCP_CONFIGS)
def test_dcp_resume_on_the_same_ranks_is_bitwise(checkpoints, config, layout):
    """Interrupted after 2 steps, saved with DCP, loaded into a fresh model and optimizer on 2 ranks and
    resumed: bit for bit the uninterrupted run (DCP's state-initialising fake step changes nothing)."""
    ref = checkpoints["uninterrupted"][config]
    got = checkpoints["on_two"][config][layout]
    _check(config, ref, ref, 0.0, "uninterrupted")
    _check(config, got, ref, 0.0, f"resumed on 2 ranks ({layout})")


@pytest.mark.parametrize("layout", ["nested", "flat"])
@pytest.mark.parametrize("config", DCP_CONFIGS)
def test_dcp_reshards_two_ranks_to_one_and_back(checkpoints, config, layout):
    """Saved on 2 ranks, loaded on 1 (and saved again there), loaded back on 2: the state went through a
    1-rank layout unchanged, so resuming on 2 ranks is bit for bit the uninterrupted run; resuming on the
    1 rank itself matches it to rounding (its gradients are sums over another split of the batch)."""
    ref = checkpoints["uninterrupted"][config]
    _check(config, checkpoints["back_on_two"][config][layout], ref, 0.0, f"2 → 1 → 2 ({layout})")
    _check(config, checkpoints["on_one"][config][layout], ref, 1e-6, f"resumed on 1 rank ({layout})")
