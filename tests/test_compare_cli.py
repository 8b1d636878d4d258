"""`danlu compare`: a smoke run with tiny budgets, its report and JSON, the lr selection, divergence,
and the one-line errors (exit status 2, nothing written)."""

import json
import math
import subprocess
import sys

import pytest

from danlu.bench.cli import main
from danlu.bench.loop import RunResult, run
from danlu.bench.report import format_leaderboard, summarize
from danlu.bench.tasks import get_task

RUN_KEYS = {"task", "optimizer", "lr", "seed", "steps", "curve", "train_losses", "final", "diverged",
            "steps_done", "seconds_per_step", "state_bytes_per_param"}
SUMMARY_KEYS = {"task", "optimizer", "best_lr", "mean_val_loss", "std_val_loss", "steps_to_target",
                "seconds_per_step", "state_bytes_per_param", "lrs"}
ENV_KEYS = {"danlu_version", "git_commit", "torch_version", "processor", "cpu_count"}


def test_compare_smoke_writes_report_png_and_json(tmp_path, capsys):
    out = tmp_path / "rep"
    argv = ["compare", "--task", "quadratic", "--optimizers", "adamw,lion", "--steps", "5", "--seeds", "1",
            "--lrs", "0.01,0.1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert str(out / "report.md") in capsys.readouterr().out
    assert "## quadratic" in (out / "report.md").read_text()
    pngs = list(out.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    data = json.loads((out / "results.json").read_text())
    assert data["generator"] == "danlu compare"
    assert ENV_KEYS <= set(data["environment"])
    assert data["environment"]["git_commit"] is None or len(data["environment"]["git_commit"]) == 40
    assert len(data["runs"]) == 4
    for r in data["runs"]:
        assert set(r) == RUN_KEYS
        assert r["steps_done"] == 5 and not r["diverged"] and r["curve"][-1][0] == 5
        assert r["final"]["val_loss"] >= 0 and r["seconds_per_step"] > 0
    assert {s["optimizer"] for s in data["summary"]} == {"adamw", "lion"}
    for s in data["summary"]:
        assert set(s) == SUMMARY_KEYS and s["best_lr"] in (0.01, 0.1) and len(s["lrs"]) == 2
        best = min(s["lrs"], key=lambda x: x["mean_val_loss"])
        assert best["lr"] == s["best_lr"]
    # running again over an earlier report replaces it
    assert main(argv) == 0
    assert not [p for p in tmp_path.iterdir() if p.name != "rep"]  # no temp dir left behind


def _r(opt, lr, seed, val, diverged=False):
    r = RunResult("t", opt, lr, seed, 10, curve=[(5, 2 * val), (10, val)], diverged=diverged,
                  final={} if diverged else {"val_loss": val}, steps_done=10, seconds_per_step=1e-3,
                  state_bytes_per_param=8.0)
    return r


def test_best_lr_is_lowest_mean_and_ignores_diverged():
    results = [
        _r("a", 0.1, 0, 1.0), _r("a", 0.1, 1, 3.0),               # mean 2.0
        _r("a", 0.3, 0, 1.5), _r("a", 0.3, 1, 1.7),               # mean 1.6 ← best
        _r("a", 1.0, 0, 0.1), _r("a", 1.0, 1, math.nan, True),    # one diverged seed: mean of the other
        _r("a", 3.0, 0, math.nan, True), _r("a", 3.0, 1, math.nan, True),  # all diverged
        _r("b", 0.1, 0, math.nan, True),
    ]
    results[4].final = {"val_loss": 5.0}  # lr 1.0 → mean 5.0 over its one finished seed
    by = {s.optimizer: s for s in summarize(results)}
    a = by["a"]
    assert a.best_lr == 0.3 and a.mean == pytest.approx(1.6) and a.std == pytest.approx(math.sqrt(0.02))
    scores = {s.lr: s for s in a.lrs}
    assert scores[1.0].n_ok == 1 and scores[1.0].n_diverged == 1 and scores[1.0].mean == 5.0
    assert scores[3.0].diverged and math.isnan(scores[3.0].mean)
    assert by["b"].best_lr is None
    assert "diverged at every lr" in format_leaderboard(list(by.values()))
    assert a.steps_to_target == 10  # the only non-diverged optimizer sets the target


def test_diverging_lr_is_reported_not_raised(tmp_path):
    r = run(get_task("quadratic"), "torch-sgd", 1e3, 0, 50)
    assert r.diverged and r.steps_done < 50 and math.isnan(r.final_val_loss)
    out = tmp_path / "rep"
    assert main(["compare", "--task", "quadratic", "--optimizers", "torch-sgd", "--steps", "20", "--seeds", "1",
                 "--lrs", "0.1,1000", "--out", str(out), "--quiet"]) == 0
    data = json.loads((out / "results.json").read_text())
    lrs = {x["lr"]: x for x in data["summary"][0]["lrs"]}
    assert lrs[1000.0]["seeds_diverged"] == 1 and lrs[1000.0]["mean_val_loss"] is None
    assert data["summary"][0]["best_lr"] == 0.1
    assert "*diverged*" in (out / "report.md").read_text()


def test_closure_driven_optimizers_and_projection():
    zo = run(get_task("zero-one"), "zero-order", 1e-2, 0, 3)
    mgs = run(get_task("zero-one"), "mgs", 1e-2, 0, 3)
    nnls = run(get_task("nnls"), "adamw", 1e-1, 0, 5)
    assert not zo.diverged and not mgs.diverged and zo.steps_done == mgs.steps_done == 3
    assert nnls.final["val_loss"] >= 0 and nnls.curve[-1][0] == 5


@pytest.mark.parametrize(
    "args,message",
    [
        (["--task", "nope"], "unknown task"),
        (["--task", "quadratic", "--optimizers", "nope"], "unknown optimizer"),
        (["--task", "quadratic", "--optimizers", "amos"], "not supported on task"),
        (["--task", "quadratic", "--lrs", "a,b"], "--lrs"),
        (["--task", "quadratic", "--steps", "0"], "--steps"),
        (["--task", "quadratic", "--seeds", "0"], "--seeds"),
        (["--experiment", "nope"], "unknown experiment(s) nope"),
        (["--experiment", "amos", "--task", "digits"], "--task cannot be combined"),
        (["--experiment", "amos", "--lrs", "0.1"], "--lrs cannot be combined"),
        (["--experiment", "amos", "--steps", "0"], "--steps must be an integer ≥ 1"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "rep"
    with pytest.raises(SystemExit) as exc:
        main(["compare", *args, "--out", str(out), "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("danlu") and "error:" in err[-1]
    assert len(err) <= 2  # usage + one line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_foreign_out_dir_is_refused(tmp_path, capsys):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--task", "quadratic", "--steps", "2", "--out", str(out), "--quiet"])
    assert exc.value.code == 2 and "holds something other" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and [p.name for p in tmp_path.iterdir()] == ["rep"]


def test_import_danlu_stays_light():
    code = ("import sys, danlu; bad = [m for m in ('matplotlib', 'rich', 'sklearn') if m in sys.modules]; "
            "print(bad); sys.exit(bool(bad))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_python_m_danlu_compare(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "danlu", "compare", "--task", "nope", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown task" in proc.stderr
