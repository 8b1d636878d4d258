"""Embedded benchmark tasks (danlu.bench.tasks): smoke runs with tiny budgets, determinism per seed."""

import math

import pytest
import torch

pytest.importorskip("sklearn")

import danlu  # noqa: E402
from danlu.bench.tasks import TASKS, Problem, Task, get_task  # noqa: E402

NAMES = sorted(TASKS)
SMOKE_STEPS = {"charlm": 5}
REQUIRED_METRICS = {"digits": {"val_acc"}, "charlm": {"val_bpc"}, "zero-one": {"val_error"},
                    "quadratic": {"dist_to_opt"}, "rosenbrock": {"dist_to_opt"}, "nnls": {"train_loss"}}


def _train(problem: Problem, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = problem.train_loss(step)
        loss.backward()
        opt.step()
        if problem.project is not None:
            problem.project()
        losses.append(loss.item())
    return losses


def test_registry_covers_the_issue_tasks():
    assert {"digits", "charlm", "quadratic", "rosenbrock", "zero-one", "nnls"} <= set(TASKS)
    for name, task in TASKS.items():
        assert isinstance(task, Task) and task.name == name and task.default_steps > 0
        assert task.suits and all(s == s.lower() for s in task.suits)
        for opt in task.suits:
            assert task.default_lr(opt) > 0 and task.default_lr(opt.upper()) == task.default_lr(opt)
    assert "egd" in TASKS["nnls"].suits
    assert {"zero-order", "mgs"} <= set(TASKS["zero-one"].suits)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="digits.*nnls"):
        get_task("mnist")
    assert get_task("Digits") is TASKS["digits"]
    with pytest.raises(ValueError, match="known"):
        TASKS["nnls"].default_lr("lion")


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_for_a_seed_and_leaves_global_rng_alone(name):
    task = TASKS[name]
    rng = torch.get_rng_state()
    a, b = task.build(0), task.build(0)
    assert torch.equal(torch.get_rng_state(), rng), "build must not advance the global RNG"
    assert len(a.params) == len(b.params)
    for p, q in zip(a.params, b.params):
        assert torch.equal(p, q)
    for step in (0, 1):
        assert torch.equal(a.train_loss(step), b.train_loss(step))
    assert torch.equal(torch.get_rng_state(), rng), "train_loss must not advance the global RNG"
    assert a.evaluate() == b.evaluate()
    # Another seed changes the start (analytic tasks: the start; models: the init).
    c = task.build(1)
    assert any(not torch.equal(p, q) for p, q in zip(a.params, c.params))


@pytest.mark.parametrize("name", NAMES)
def test_smoke_train_and_evaluate(name):
    task = TASKS[name]
    problem = task.build(0)
    before = problem.evaluate()
    steps = SMOKE_STEPS.get(name, 30)
    opt = torch.optim.AdamW(problem.params, lr=task.default_lr("adamw"), weight_decay=0.0)
    losses = _train(problem, opt, steps)
    after = problem.evaluate()
    assert all(math.isfinite(v) for v in losses)
    assert "val_loss" in after and REQUIRED_METRICS.get(name, set()) <= set(after)
    assert all(isinstance(v, float) and math.isfinite(v) for v in after.values())
    if name != "zero-one":  # a 0-1 val error may tie
        assert after["val_loss"] < before["val_loss"]
    if problem.model is not None:
        assert [id(p) for p in problem.params] == [id(p) for p in problem.model.parameters()]


def test_digits_learns():
    problem = TASKS["digits"].build(0)
    _train(problem, torch.optim.AdamW(problem.params, lr=3e-3), 60)
    assert problem.evaluate()["val_acc"] > 0.8


def test_charlm_bits_per_character_and_shapes():
    problem = TASKS["charlm"].build(0)
    metrics = problem.evaluate()
    assert metrics["val_bpc"] == pytest.approx(metrics["val_loss"] / math.log(2))
    # At init the model is near uniform over the vocabulary.
    assert metrics["val_bpc"] == pytest.approx(math.log2(problem.info["vocab_size"]), rel=0.1)
    assert problem.info["corpus_chars"] > 50_000


def test_quadratic_optimum_and_noise_floor():
    problem = TASKS["quadratic"].build(0)
    (x,) = problem.params
    with torch.no_grad():
        x.copy_(problem.optimum)
    assert problem.evaluate()["val_loss"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        mean = sum(problem.train_loss(s).item() for s in range(400)) / 400
    assert mean == pytest.approx(problem.info["noise_floor"], rel=0.15)


@pytest.mark.parametrize("name", ["rosenbrock", "rosenbrock-32d"])
def test_rosenbrock_optimum(name):
    problem = TASKS[name].build(0)
    assert problem.evaluate()["val_loss"] > 1.0
    with torch.no_grad():
        problem.params[0].copy_(problem.optimum)
    assert problem.evaluate()["val_loss"] == 0.0


def test_zero_one_task_loss_and_zeroth_order_optimizers():
    problem = TASKS["zero-one"].build(0)
    err = problem.task_loss()
    assert isinstance(err, float) and 0.0 <= err <= 1.0
    assert 0.0 <= problem.evaluate()["val_error"] <= 1.0
    # ZeroOrder optimizes the 0-1 error itself; MGS takes the surrogate and the task loss.
    zo = danlu.ZeroOrder(problem.params, lr=TASKS["zero-one"].default_lr("zero-order"), sigma=0.05, seed=0)
    for _ in range(5):
        zo.step(problem.task_loss)
    mgs_problem = TASKS["zero-one"].build(0)
    mgs = danlu.MGS(mgs_problem.params, torch.optim.AdamW(mgs_problem.params, lr=1e-2))
    for step in range(3):
        mgs.zero_grad()
        mgs.step(lambda: mgs_problem.train_loss(step), mgs_problem.task_loss)
    for p in (problem, mgs_problem):
        assert 0.0 <= p.task_loss() <= 1.0 and math.isfinite(p.evaluate()["val_ce"])


def test_nnls_positive_start_known_optimum_and_egd():
    task = TASKS["nnls"]
    problem = task.build(0)
    (x,) = problem.params
    assert (x > 0).all()
    assert (problem.optimum >= 0).all()
    start = problem.evaluate()["train_loss"]
    assert problem.info["optimum_train_loss"] < start
    with torch.no_grad():
        x.copy_(problem.optimum)
    assert problem.evaluate()["train_loss"] == pytest.approx(problem.info["optimum_train_loss"], rel=1e-4)
    # The optimum is a KKT point of the full training objective: g ≥ 0, and g ≈ 0 where x > 0.
    from danlu.bench.tasks import NNLS_TRAIN_ROWS as N
    from danlu.bench.tasks import _nnls_data

    a, b = _nnls_data()
    point = problem.optimum.clone().requires_grad_(True)
    (0.5 * ((a[:N] @ point - b[:N]) ** 2).mean()).backward()
    g = point.grad
    assert (g > -1e-4).all() and g[problem.optimum > 1e-6].abs().max() < 1e-4
    egd_problem = task.build(0)
    losses = _train(egd_problem, danlu.EGD(egd_problem.params, lr=task.default_lr("egd")), 50)
    assert (egd_problem.params[0] > 0).all()
    assert egd_problem.evaluate()["train_loss"] < start
    assert all(math.isfinite(v) for v in losses)


def test_suited_optimizers_are_registered():
    list_optimizers = getattr(danlu, "list_optimizers", None)
    if list_optimizers is None:
        pytest.skip("no optimizer registry")
    known = set(list_optimizers())
    for task in TASKS.values():
        assert set(task.suits) <= known, task.name


def test_zero_order_searches_the_zero_one_error_itself():
    from danlu.bench.loop import run

    task = get_task("zero-one")
    assert dict(task.options["zero-order"]) == {"sigma": 0.1, "samples": 4}
    r = run(task, "zero-order", task.default_lr("zero-order"), 0, 30)
    assert not r.diverged
    # each step's loss is the mean of 2 × 4 evaluations of the train 0-1 error over 455 rows
    assert all(abs(v * 455 * 8 - round(v * 455 * 8)) < 1e-3 for v in r.train_losses)  # float32 error values
    assert r.train_losses[-1] < r.train_losses[0]
