"""`danlu compare --experiment`: the registry, the shared statistics, the CLI path (report, JSON, one-line
errors) and smoke runs of the experiments written in the lead module set, with tiny budgets. The
experiments' own smoke tests live in tests/test_experiment_<name>.py."""

import json
import math

import pytest

from danlu.bench.cli import main
from danlu.bench.experiments import EXPERIMENT_NAMES, Context, get_experiment
from danlu.bench.experiments._common import VERDICTS, difference, fmt_spread, mean_std, significant
from danlu.bench.loop import RunResult, lr_beyond_edge

PNG = b"\x89PNG\r\n\x1a\n"


def test_every_name_resolves_to_its_experiment():
    for name in EXPERIMENT_NAMES:
        e = get_experiment(name)
        assert e.name == name and e.default_seeds >= 1 and e.default_steps >= 1
        assert e.units(e.default_seeds, e.default_steps) > 0
    with pytest.raises(ValueError, match="known: lion-vs-adamw"):
        get_experiment("nope")


def test_statistics():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_std([5.0]) == (5.0, 0.0) and math.isnan(mean_std([math.nan])[0])
    d, se = difference([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    assert d == pytest.approx(1.0) and se == pytest.approx(math.sqrt(2 / 3))
    assert significant([1.0, 2.0, 3.0], [0.0, 1.0, 2.0]) == 0            # 1 < 2·0.816
    assert significant([10.0, 10.1, 9.9], [0.0, 0.1, -0.1]) == 1
    assert significant([0.0, 0.1, -0.1], [10.0, 10.1, 9.9]) == -1
    assert significant([1.0], [0.0]) == 0                                 # one seed: nothing counts
    assert fmt_spread([0.5]) == "0.5 (1 seed)"
    assert fmt_spread([1.0, 3.0]) == "2 ± 1.4 (2 seeds)"
    assert fmt_spread([1.0, math.nan, 3.0]) == "2 ± 1.4 (2 seeds, 1 diverged)"
    assert fmt_spread([math.nan]) == "diverged"


def _r(lr, val):
    return RunResult("t", "o", lr, 0, 10, final={} if math.isnan(val) else {"val_loss": val},
                     diverged=math.isnan(val))


def _extend(runs, lrs):
    return lr_beyond_edge(runs, lrs, 3.0)


def test_auto_grid_extends_only_at_an_edge():
    lrs = [0.1, 0.3, 0.9]
    assert _extend([_r(0.1, 3.0), _r(0.3, 2.0), _r(0.9, 1.0)], lrs) == pytest.approx(2.7)
    assert _extend([_r(0.1, 1.0), _r(0.3, 2.0), _r(0.9, 3.0)], lrs) == pytest.approx(0.1 / 3, rel=1e-5)
    assert _extend([_r(0.1, 3.0), _r(0.3, 1.0), _r(0.9, 2.0)], lrs) is None
    # a diverged largest lr never counts as best: the interior one is, so no extension
    assert _extend([_r(0.1, 3.0), _r(0.3, 1.0), _r(0.9, math.nan)], lrs) is None
    assert _extend([_r(0.1, math.nan)], [0.1]) is None


def test_experiment_cli_writes_report_and_json(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["compare", "--experiment", "lion-vs-adamw", "--steps", "4", "--seeds", "2",
                 "--out", str(out), "--quiet"]) == 0
    assert str(out / "report.md") in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert "## lion-vs-adamw" in md and "**Expected.**" in md and "**Verdict: " in md
    data = json.loads((out / "results.json").read_text())
    assert data["generator"] == "danlu compare"
    (exp,) = data["experiments"]
    assert exp["name"] == "lion-vs-adamw" and exp["seeds"] == 2 and exp["steps"] == 4
    assert exp["verdict"] in VERDICTS and exp["plots"]
    for name in exp["plots"]:
        assert (out / name).read_bytes()[:8] == PNG and f"![{name}]({name})" in md
    digits = exp["data"]["digits"]
    # the Lion arms use exactly lion_from_adamw of the tuned AdamW lr
    best = digits["best_adamw_lr"]
    assert digits["arms"]["lion ÷10"]["lr"] == pytest.approx(best / 10)
    assert digits["arms"]["lion ÷10"]["weight_decay"] == pytest.approx(0.1)
    grid = digits["adamw_grid"]
    assert float(min(grid, key=lambda lr: sum(grid[lr]))) == best


def test_amos_smoke(tmp_path):
    e = get_experiment("amos")
    o = e.run(Context(seeds=1, steps=4, out=tmp_path))
    assert o.verdict == "inconclusive"  # one seed
    for name in o.plots:
        assert (tmp_path / name).read_bytes()[:8] == PNG
    for task in ("digits", "charlm"):
        d = o.data[task]
        # factored Amos state with momentum: about half of AdamW's two full buffers
        assert 0.4 < d["state_bytes_per_param"]["amos"] / d["state_bytes_per_param"]["adamw"] < 0.6
        assert d["target"] == pytest.approx(sum(d["adamw_final"]) / len(d["adamw_final"]))


def test_sweep_extends_at_most_as_told_and_reports_each_extension():
    from danlu.bench.loop import sweep

    calls, told = [], []

    def run_one(lr, seed):  # lower loss for larger lr: the best is always the top end
        calls.append((lr, seed))
        return _r(lr, 1.0 / lr + seed)

    by_lr = sweep([0.1, 0.3, 0.9], 2, run_one, extensions=2, factor=3.0, on_extend=told.append)
    assert told == [pytest.approx(2.7), pytest.approx(8.1)]
    assert list(by_lr) == [0.1, 0.3, 0.9, *told] and all(len(v) == 2 for v in by_lr.values())
    assert len(calls) == 10  # nothing ran twice
    calls.clear()
    assert list(sweep([0.1, 0.3], 1, run_one)) == [0.1, 0.3] and len(calls) == 2  # no extensions asked
