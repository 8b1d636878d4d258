"""`danlu compare --task MODULE:ATTR` and `danlu speed --params-from MODULE:ATTR` on the user's own model:
the protocol (danlu.bench.user_task), the report it writes, and one line + exit status 2 (and nothing
written) for each kind of bad entry point."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from danlu.bench.cli import main
from danlu.bench.loop import run
from danlu.bench.user_task import DEFAULT_LRS, UserTask, UserTaskError, check_task, load_param_shapes, load_task

USER_TASKS = Path(__file__).parent / "user_tasks"
MLP_PARAMS = 8 * 32 + 32 + 32 * 2 + 2  # my_task's model


@pytest.fixture(autouse=True)
def _importable(monkeypatch):
    monkeypatch.syspath_prepend(str(USER_TASKS))


def test_compare_on_a_user_task_writes_report_plots_and_json(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["compare", "--task", "my_task:make_task", "--optimizers", "adamw,lion", "--seeds", "1",
                 "--steps", "30", "--out", str(out), "--quiet"]) == 0
    assert str(out / "report.md") in capsys.readouterr().out
    assert "## my_task.make_task" in (out / "report.md").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["my_task.make_task-curves.png", "my_task.make_task-lr.png"]
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    data = json.loads((out / "results.json").read_text())
    assert data["generator"] == "danlu compare"
    assert data["config"]["user_tasks"] == {"my_task.make_task": "my_task:make_task"}
    assert data["config"]["steps"] == {"my_task.make_task": 30}
    by_opt = {s["optimizer"]: s for s in data["summary"]}
    assert set(by_opt) == {"adamw", "lion"}
    # the auto grid is centred on the task's lr for adamw and on the default for lion
    assert {0.00333333, 0.01, 0.03} <= {x["lr"] for x in by_opt["adamw"]["lrs"]}
    assert DEFAULT_LRS["lion"] in {x["lr"] for x in by_opt["lion"]["lrs"]}
    untrained = load_task("my_task:make_task").build(0).evaluate()["val_loss"]
    assert by_opt["adamw"]["mean_val_loss"] < untrained  # it trained
    for r in data["runs"]:
        assert r["task"] == "my_task.make_task" and r["steps_done"] == 30 and r["curve"][-1][0] == 30
        assert r["state_bytes_per_param"] > 0 and r["seconds_per_step"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]  # no temp dir left behind


def test_dict_task_beside_an_embedded_one(tmp_path):
    """A plain-dict task (no danlu import) whose batches are a list, re-iterated per epoch; its extra
    metrics are recorded; it runs beside an embedded task and a torch baseline."""
    out = tmp_path / "rep"
    assert main(["compare", "--task", "quadratic", "more_tasks:make_dict_task", "--optimizers", "adamw,torch-adamw",
                 "--seeds", "2", "--steps", "10", "--lrs", "0.01", "--out", str(out), "--quiet"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["steps"] == {"quadratic": 10, "dict-task": 10}
    runs = [r for r in data["runs"] if r["task"] == "dict-task"]
    assert len(runs) == 4 and all(r["steps_done"] == 10 for r in runs)  # 10 steps over 4 batches: 3 epochs
    assert all(set(r["final"]) == {"val_loss", "val_acc"} and 0 <= r["final"]["val_acc"] <= 1 for r in runs)
    assert "## dict-task" in (out / "report.md").read_text()


def test_runs_are_seeded_and_a_step_sees_one_batch():
    task = load_task("my_task:make_task")
    a, b, c = (run(task, "adamw", 1e-2, seed, 8) for seed in (0, 0, 1))
    assert a.final == b.final and a.train_losses == b.train_losses
    assert a.final != c.final  # another seed: another init and batch order
    problem = load_task("more_tasks:make_dict_task").build(0)
    first = problem.train_loss(0)
    assert torch.equal(first, problem.train_loss(0))  # a closure evaluated twice in a step: the same batch
    assert not torch.equal(first, problem.train_loss(1))
    assert problem.model is not None and problem.model.training  # evaluate() restores train mode
    problem.evaluate()
    assert problem.model.training


def test_file_path_entry_point():
    task = load_task(f"{USER_TASKS / 'my_task.py'}:make_task")
    assert task.name == "my_task.make_task" and task.default_steps == 300 and task.default_lr("adamw") == 1e-2
    check_task(task, ["adamw", "lion"])


@pytest.mark.parametrize(
    "spec,message",
    [
        ("no_such_module:make_task", "cannot import 'no_such_module' (ModuleNotFoundError: No module named"),
        ("my_task.py.missing:make_task", "cannot import 'my_task.py.missing'"),
        ("my_task:", "expected MODULE:ATTR"),
        ("my_task:make-task", "expected MODULE:ATTR"),
        ("my_task:no_such_attr", "module 'my_task' has no attribute 'no_such_attr'"),
        ("more_tasks:NOT_A_TASK", "more_tasks:NOT_A_TASK is a int; expected a function"),
        ("more_tasks:needs_args", "must be callable as more_tasks:needs_args(); its signature is (size)"),
        ("more_tasks:returns_int", "more_tasks:returns_int() is a int; expected a danlu.bench.user_task.UserTask"),
        ("more_tasks:raises", "more_tasks:raises() raised RuntimeError: no data on this machine"),
        ("more_tasks:missing_key", "missing key(s) metric"),
        ("more_tasks:unknown_key", "unknown key(s) 'metrics'"),
        ("more_tasks:bad_loss_signature", "loss_fn must be callable as loss_fn(model, batch); its signature is (batch"),
        ("more_tasks:bad_steps", "steps must be ≥ 1, got 0"),
        ("more_tasks:bad_lr_name", "lrs: unknown optimizer 'lamb'"),
        ("more_tasks:not_a_module", "model(seed) must return a torch.nn.Module, got list"),
        ("more_tasks:frozen_model", "has no parameters with requires_grad"),
        ("more_tasks:same_model", "model(seed) returned a model it had returned before"),
        ("more_tasks:not_iterable", "batches(seed) must return an iterable of batches, got int"),
        ("more_tasks:empty_batches", "batches(seed) yields no batches"),
        ("more_tasks:float_loss", "must return a scalar floating-point tensor, got float"),
        ("more_tasks:vector_loss", "got a torch.float32 tensor of shape (16,)"),
        ("more_tasks:detached_loss", "does not depend on the model's parameters"),
        ("more_tasks:loss_raises", "loss_fn(model, batch) at step 0 raised RuntimeError: mat1 and mat2"),
        ("more_tasks:nan_loss", "loss_fn(model, batch) is nan on the untrained model"),
        ("more_tasks:nan_metric", "metric(model) is nan on the untrained model"),
        ("more_tasks:metric_without_val_loss", "returned a dict without 'val_loss'"),
        ("more_tasks:metric_is_a_string", "metric(model) must be a number or a one-element tensor, got str"),
        ("more_tasks:bad_options", "adamw refuses options {'no_such_keyword': 1}"),
    ],
)
def test_bad_entry_point_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, spec, message):
    out = tmp_path / "rep"
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--task", spec, "--optimizers", "adamw", "--steps", "5", "--out", str(out), "--quiet"])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert len(err) == 1 and err[0].startswith("danlu compare: error: ") and message in err[0], captured.err
    assert captured.out == "" and not out.exists() and list(tmp_path.iterdir()) == []


def test_failure_mid_run_keeps_the_earlier_report(tmp_path, capsys):
    """A task that passes the check but fails at step 3 (its one-shot batches run out): one line, exit 2,
    and the earlier report in --out is left as it was (nothing half-written, no temp dir)."""
    out = tmp_path / "rep"
    out.mkdir()
    earlier = {"results.json": json.dumps({"generator": "danlu compare"}), "report.md": "# earlier"}
    for name, text in earlier.items():
        (out / name).write_text(text)
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--task", "more_tasks:runs_out", "--optimizers", "adamw", "--steps", "5", "--out", str(out),
              "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "batches(seed) ran out after 3 batches (at step 3)" in err[0]
    assert {p.name: p.read_text() for p in out.iterdir()} == earlier
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]


def test_duplicate_task_names_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--task", "my_task:make_task", f"{USER_TASKS / 'my_task.py'}:make_task", "--out",
              str(tmp_path / "rep"), "--quiet"])
    assert exc.value.code == 2 and "two tasks are named 'my_task.make_task'" in capsys.readouterr().err


def test_user_task_validates_its_fields():
    def ok(**changes):
        fields = dict(model=lambda seed: torch.nn.Linear(1, 1), batches=lambda seed: [0], loss_fn=lambda m, b: 0,
                      metric=lambda m: 0.0, steps=1)
        return UserTask(**{**fields, **changes})

    ok()
    with pytest.raises(TypeError, match="model must be callable as model"):
        ok(model=torch.nn.Linear(1, 1).weight)
    with pytest.raises(TypeError, match="steps must be an int, got bool"):
        ok(steps=True)
    with pytest.raises(ValueError, match=r"lrs\['adamw'\] must be a positive number"):
        ok(lrs={"adamw": -1.0})
    with pytest.raises(ValueError, match="must not set lr"):
        ok(options={"adamw": {"lr": 1.0}})
    with pytest.raises(ValueError, match="name must be"):
        ok(name="a/b")
    assert issubclass(UserTaskError, ValueError)


def test_speed_params_from_times_the_models_shapes(capsys):
    assert main(["speed", "--params-from", "my_task:build_model", "--optimizers", "lion,adamw", "--repeats", "2",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_params"] == MLP_PARAMS and out["params_from"] == "my_task:build_model"
    assert f"{MLP_PARAMS} parameters in 4 tensors from my_task:build_model" in out["environment"]
    by_name = {r["name"]: r for r in out["results"]}
    assert set(by_name) == {"torch-adamw-fused", "lion", "adamw"}
    assert by_name["lion"]["state_bytes_per_param"] == pytest.approx(4.0)
    assert all(r["median_ms"] > 0 for r in out["results"])


def test_params_from_accepts_modules_tensors_and_tasks():
    shapes = [(32, 8), (32,), (2, 32), (2,)]
    assert load_param_shapes("my_task:build_model") == shapes
    assert load_param_shapes("my_task:make_task") == shapes  # a task: its model(0)
    assert load_param_shapes("more_tasks:make_dict_task") == [(2, 4), (2,)]
    assert load_param_shapes("more_tasks:param_groups") == [(3, 4), (5,), (2, 2)]
    with pytest.raises(UserTaskError, match="no trainable parameters"):
        load_param_shapes("more_tasks:no_params")
    with pytest.raises(UserTaskError, match="expected an nn.Module, an iterable of tensors"):
        load_param_shapes("more_tasks:NOT_A_TASK")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--params-from", "no_such_module:build"], "danlu speed: error: cannot import 'no_such_module'"),
        (["--params-from", "more_tasks:returns_int"], "danlu speed: error: more_tasks:returns_int gave a int"),
        (["--params-from", "more_tasks:no_params"], "danlu speed: error: more_tasks:no_params has no trainable"),
    ],
)
def test_speed_bad_params_from_exits_2_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["speed", *argv, "--optimizers", "lion"])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [captured.err.strip()] and message in captured.err and captured.out == ""


def test_speed_params_and_params_from_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["speed", "--params", "1e6", "--params-from", "my_task:build_model"])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse's usage lines, then its one error line
    assert last == "danlu speed: error: argument --params-from: not allowed with argument --params"


def test_console_script_imports_from_the_working_directory(tmp_path):
    """The installed `danlu` script (whose sys.path[0] is its bin directory) finds the user's module in
    the current directory, and a bad one is one line and exit status 2 in a real process."""
    script = Path(sys.executable).with_name("danlu")
    if not script.exists():
        pytest.skip("the danlu console script is not installed beside this Python")
    proc = subprocess.run([str(script), "compare", "--task", "more_tasks:nan_metric", "--out", str(tmp_path / "rep")],
                          capture_output=True, text=True, cwd=USER_TASKS)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "danlu compare: error: task 'dict-task': metric(model) is nan on the untrained model (seed 0); the validation "
        "metric must be finite to pick an lr by"]
    assert not (tmp_path / "rep").exists()


def test_default_lrs_cover_every_suited_optimizer():
    task = load_task("my_task:make_task")
    assert all(math.isfinite(task.default_lr(o)) for o in task.suits)
    assert task.default_lr("lion") == DEFAULT_LRS["lion"]
