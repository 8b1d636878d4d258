"""danlu's optimizers under DDP and FSDP2 on 2 CPU ranks (gloo), and DCP checkpoints that reshard.

Each test compares with one process on the union of the ranks' batches (``workers.train_single``). The
ranks run in a few spawned groups per module (module-scoped fixtures), not one group per test: starting
a process group and importing torch in two processes costs seconds on two cores.
"""

from __future__ import annotations

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
    budget = workers.CONFIGS[config][1].get("l1_budget") if config in workers.CONFIGS else None
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
    cross-shard sums of Adafactor, Amos and EG± add in another order). The *-sync-window configs run
    danlu's accumulation with DDP's no_sync() on all but the last micro-batch of each window."""
    if config.endswith("-sync-window") and mode == "fsdp":
        got = battery[0][config][mode]
        assert isinstance(got, str) and "sync_window=True) serves DDP" in got, got
        return  # refused: under FSDP2 the micro-gradients must be synchronized
    rtol = 1e-6 if mode == "ddp" and config != "zero-order" else 1e-5  # zeroth order: see the ZeroOrder tests
    _check(config, battery[0][config][mode], references[config], rtol, mode)


@pytest.mark.parametrize("config", list(workers.CONFIGS))
def test_ranks_hold_the_same_parameters(battery, config):
    """Every rank ends with the same (full) parameters, bit for bit."""
    for mode in ("ddp",) if config.endswith("-sync-window") else ("ddp", "fsdp"):
        a, b = battery[0][config][mode], battery[1][config][mode]
        if isinstance(a, str) or isinstance(b, str):
            pytest.fail(f"{config} {mode} raised:\n{a if isinstance(a, str) else b}")
        assert all(torch.equal(x, y) for x, y in zip(a, b))


# --- torch.distributed.checkpoint ---------------------------------------------------------------------
DCP_CONFIGS = [c for c in workers.CONFIGS if not workers.CONFIGS[c][1].get("fused")
               and not workers.CONFIGS[c][1].get("sync_window")]  # the DCP runs are FSDP2's
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
    _check(config, checkpoints["on_one"][config][layout], ref, 1e-5 if config == "zero-order" else 1e-6,
           f"resumed on 1 rank ({layout})")


# --- zeroth order ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zero_order() -> list[dict]:
    return harness.run("zero_order", WS)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("config", list(workers.ZO_CONFIGS))
def test_zero_order_across_ranks_equals_one_process_on_the_union(zero_order, config, mode):
    """Each rank evaluates its own half of the batch; the loss values are averaged over the ranks, so the
    step is one process's on the whole batch (FSDP2: each shard perturbed by its slice of the one-process
    direction). ≤ 1e-5 relative: the estimate divides loss differences by σ = 1e-2, which scales the
    rounding of the averaged losses (≈1e-7) up by about 10²."""
    ref = workers.train_zo_single(config, ws=WS)
    _check(config, zero_order[0][config][mode], ref, 1e-5, f"ZeroOrder {mode}")
    other = zero_order[1][config][mode]
    assert all(torch.equal(a, b) for a, b in zip(zero_order[0][config][mode], other))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("config", list(workers.ZO_CONFIGS))
def test_zero_order_communicates_only_scalars(zero_order, config, mode):
    """What the optimizer all-reduces per step (the model's own collectives excluded): the seeds check,
    2·samples int64, and the loss values, one float64 each; nothing that grows with the model."""
    kw = workers.ZO_CONFIGS[config]
    samples = kw["samples"]
    values = (2 * samples if kw.get("estimator", "two_sided") == "two_sided"
              else samples + (kw.get("baseline", "f0") == "f0"))
    traffic = zero_order[0]["traffic"][(config, mode)]
    assert traffic["calls"] == 2 * workers.STEPS
    assert traffic["bytes"] == workers.STEPS * (16 * samples + 8 * values)


# --- bad input ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_input() -> list[dict]:
    return harness.run("bad_input", WS)


@pytest.mark.parametrize("case, message", [
    ("tensor_parallel", r"^ValueError: Lion: danlu optimizers support DTensor parameters sharded on dim 0 \(FSDP2\) "
                        r"or replicated; got placements \(S\(1\)\)"),
    ("two_d_mesh", r"^ValueError: Adafactor: danlu optimizers support DTensor parameters on a 1-D device mesh"),
    ("other_seeds", r"^ValueError: ZeroOrder: the ranks drew different direction seeds"),
    ("nonfinite_loss_on_one_rank", r"^ValueError: ZeroOrder: a rank's closure returned a non-finite loss"),
    ("zero_order_root_kept_gathered", r"^ValueError: ZeroOrder: FSDP2 keeps some of the parameters gathered after a "
                                      r"forward .*fully_shard\(model, reshard_after_forward=True\)"),
    ("mgs_root_kept_gathered", r"^ValueError: MGS: FSDP2 keeps some of the parameters gathered after a forward"),
    # DCP's own planner refuses these on every rank before anything is loaded (danlu's checks come after).
    ("checkpoint_of_another_optimizer", r"^CheckpointException: .*Missing key in checkpoint state_dict: optim\.state"),
    ("checkpoint_of_another_shape", r"^CheckpointException: .*[Ss]ize mismatch"),
])
def test_bad_distributed_input_raises_on_every_rank(bad_input, case, message):
    """An unsupported layout, different seeds, a NaN loss on one rank, a checkpoint of another optimizer or
    shape: the same clear error on every rank (none hangs in a collective the others skipped). Layout,
    seed and checkpoint errors come before anything moves; the NaN loss after the evaluations, with θ
    restored (by subtraction, MeZO's way: to a few ulp)."""
    import re

    for rank in range(WS):
        text, unchanged, moved = bad_input[rank][case]
        assert re.search(message, text, re.S), f"rank {rank}: {text}"
        if case in ("nonfinite_loss_on_one_rank", "zero_order_root_kept_gathered"):  # restored by subtraction
            assert moved <= 1e-6, f"rank {rank}: θ restored only to {moved:.1e}"
        else:
            assert unchanged, f"rank {rank}: {case} changed the parameters"


def test_collectives_are_bucketed_across_tensors():
    """One FSDP2 step's all-reduces (the model's own excluded): the k-th reduction of every tensor's
    kernel goes in one call, so a step costs as many calls as the kernel with the most reductions
    (Adafactor: the statistic over rows, the row-mean normaliser, RMS(U), RMS(θ)), not that per tensor;
    elementwise optimizers none."""
    counts = harness.run("collectives", WS)[0]
    assert counts["lion"]["calls"] == 0
    assert 1 <= counts["adafactor"]["calls"] <= 4, counts
    assert 1 <= counts["adafactor-beta1"]["calls"] <= 4, counts
    assert counts["amos"]["calls"] == 1, counts  # the biases' v: a mean over their only (sharded) dim
    assert counts["egd-budget"]["calls"] <= 2, counts  # Σθ and Σθ⁻ of every tensor
    # EGStepSize (paper form, per-tensor factors): the factors' sums and the scale's, one call each.
    assert counts["eg-step-size-paper-tensor"]["calls"] == 2, counts
    # MGS with K = 3 candidates: the gradient norm, the noise scales (mean |∇| per tensor), ‖∇‖², the
    # seeds, per candidate n·n and n·∇, the task losses, the final clip's norm: 2K + 6, whatever the number
    # of tensors.
    assert counts["mgs-adamw"]["calls"] == 2 * 3 + 6, counts


# --- shard_statistics="local" ------------------------------------------------------------------------------
def _local_reference(config: str) -> list[torch.Tensor]:
    """What shard_statistics="local" means, in one process: the optimizer's own kernel applied to each
    rank's block of every parameter (FSDP2's torch.chunk split over 2 ranks) on its own, with the choices
    that depend on the shape (Adafactor's factored dims, Amos's η̃ and averaged dims) made for the whole
    parameter, and the gradient of the union of the ranks' batches."""
    from torch import nn

    from danlu._core.numerics import factored_dims
    from danlu._core.optimizer import new_step
    from danlu.optim.adafactor import adafactor_update
    from danlu.optim.amos import amos_layout, amos_update

    model = workers.make_model()
    x, y = workers.batch()
    params = list(model.parameters())
    states: dict[tuple[int, int], dict] = {}
    for t in range(workers.STEPS):
        rows = [i for r in range(WS) for i in workers._rows(r, WS, 0, 1)]
        model.zero_grad()
        nn.functional.mse_loss(model(x[t, rows]), y[t, rows]).backward()
        with torch.no_grad():
            for i, p in enumerate(params):
                for r, (block, g) in enumerate(zip(torch.chunk(p.data, WS), torch.chunk(p.grad, WS))):
                    st = states.setdefault((i, r), {"step": new_step()})
                    if config == "adafactor-local":
                        dims = factored_dims(p.shape, 2)
                        if dims is None:
                            st.setdefault("exp_avg_sq", torch.zeros_like(block))
                        else:
                            st.setdefault("exp_avg_sq_row", block.new_zeros(
                                [1 if d == dims[0] else n for d, n in enumerate(block.shape)]))
                            st.setdefault("exp_avg_sq_col", block.new_zeros(
                                [1 if d == dims[1] else n for d, n in enumerate(block.shape)]))
                        adafactor_update(block, g, st, lr=1e-2, relative_step=True, eps1=1e-30, eps2=1e-3,
                                         clip_threshold=1.0, decay_rate=0.8, beta1=None, weight_decay=0.1,
                                         scale_parameter=True, dims=dims)
                    else:
                        eta, dims = amos_layout(p, None, None)
                        shape = [1 if d in dims else n for d, n in enumerate(block.shape)]
                        st.setdefault("v", block.new_zeros(shape))
                        st.setdefault("b", block.new_zeros(shape))
                        amos_update(block, g, st, lr=1e-1, eta=eta, reduce_dims=dims, beta=0.999, momentum=None,
                                    clip_value=None, c_coef=0.25, d_coef=0.25, extra_l2=0.0, eps=2.0**-125)
    return [p.detach().clone() for p in params]


@pytest.fixture(scope="module")
def local_mode() -> list[dict]:
    return harness.run("local_mode", WS)


@pytest.mark.parametrize("config", list(workers.LOCAL_CONFIGS))
def test_local_shard_statistics_reduce_each_shard_alone(local_mode, config):
    """shard_statistics="local" under FSDP2: each rank's statistics over its own rows, no all-reduce by the
    optimizer, per-rank statistics saved as one row per rank (Shard(0) over the ranks) and resumed bit for
    bit on the same ranks; the parameters are the one-process per-block reference's (≤ 1e-5)."""
    res = local_mode[0][config]
    if isinstance(res, str):
        pytest.fail(res)
    assert res["calls"] == 0
    _check(config, res["params"], _local_reference(config), 1e-5, "local statistics")
    _check(config, res["resumed"], res["params"], 0.0, "resumed (local statistics)")
    assert all(torch.equal(a, b) for a, b in zip(res["params"], local_mode[1][config]["params"]))
    if config == "adafactor-local":  # (5, 6): factored over (1, 0); the statistic over rows is per rank
        assert res["placements"]["exp_avg_sq_col"] == ("(Shard(dim=0),)", (WS, 6))
        assert res["placements"]["exp_avg_sq_row"] == ("(Shard(dim=0),)", (5, 1))
