"""`danlu speed`: a smoke run with a tiny budget, its JSON, and its one-line errors (exit status 2)."""

import json
import subprocess
import sys

import pytest
import torch

from danlu.bench.cli import main
from danlu.bench.speed import _state_bytes, run_speed, transformer_shapes


def test_speed_json_schema(capsys):
    assert main(["speed", "--params", "2e6", "--repeats", "2", "--optimizers", "lion,amos,adafactor", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in out["results"]]
    assert names[0] == "torch-adamw-fused" and set(names[1:]) == {"lion", "amos", "adafactor"}
    assert out["stream_bandwidth_bytes_per_s"] > 1e8
    assert out["compiler_setup_s"] is None  # no fused optimizer asked for, so no compiler set up
    for r in out["results"]:
        assert set(r) == {"name", "median_ms", "ratio_to_fused_adamw", "state_bytes_per_param", "first_step_s",
                          "path", "bytes_per_param", "ideal_ms", "fraction_of_limit"}
        assert r["median_ms"] > 0 and r["ratio_to_fused_adamw"] > 0 and r["first_step_s"] > 0
        assert r["ideal_ms"] > 0 and r["fraction_of_limit"] == pytest.approx(r["ideal_ms"] / r["median_ms"])
    paths = {r["name"]: r["path"] for r in out["results"]}
    assert paths == {"torch-adamw-fused": "fused", "lion": "loop", "amos": "loop", "adafactor": "loop"}
    step_bytes = {r["name"]: r["bytes_per_param"] for r in out["results"]}
    # θ read and written, g read, state read and written; Adafactor reads g twice more, Amos once.
    assert step_bytes["torch-adamw-fused"] == pytest.approx(28.0, rel=1e-3)
    assert step_bytes["lion"] == pytest.approx(20.0)
    assert 20.0 <= step_bytes["adafactor"] < 21.0 and 16.0 <= step_bytes["amos"] < 16.5
    bpp = {r["name"]: r["state_bytes_per_param"] for r in out["results"]}
    assert bpp["torch-adamw-fused"] == pytest.approx(8.0, rel=1e-3)  # exp_avg + exp_avg_sq in fp32 (+ steps)
    assert bpp["lion"] == pytest.approx(4.0)
    assert bpp["amos"] < 0.25 and bpp["adafactor"] < 0.5  # factored state (vs 8 for AdamW)


def test_state_bytes_counts_wrapper_and_inner():
    res = {r.name: r for r in run_speed(["adamw", "eg-step-size"], n_params=1e5, repeats=1, warmup=1)}
    assert res["eg-step-size"].state_bytes_per_param > res["adamw"].state_bytes_per_param


def test_transformer_shapes_hit_the_target():
    for n in (1e5, 1e6, 3e7):
        total = sum(torch.Size(s).numel() for s in transformer_shapes(n))
        assert 0.8 * n < total < 1.2 * n


@pytest.mark.parametrize(
    "argv,message",
    [
        (["speed", "--optimizers", "lamb"], "unknown optimizer(s) lamb; known:"),
        (["speed", "--params", "-1"], "expected a positive number"),
        (["speed", "--repeats", "x"], "expected an integer"),
        (["compare-nothing"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message):
    proc = subprocess.run([sys.executable, "-m", "danlu", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr.strip().splitlines()[-1]
    assert proc.stdout == ""


def test_state_bytes_of_a_fresh_optimizer_is_zero():
    p = torch.nn.Parameter(torch.zeros(3))
    assert _state_bytes(torch.optim.AdamW([p])) == 0


def test_bf16_state_variants_are_timed_with_half_the_state():
    from danlu.bench.speed import is_valid_name

    assert is_valid_name("lion-fused-bf16") and is_valid_name("sgdm-bf16") and is_valid_name("adamw-fused")
    assert not is_valid_name("egd-bf16") and not is_valid_name("zero-order-bf16")
    assert not is_valid_name("lion-bf16-fused")
    res = {r.name: r for r in run_speed(["lion", "lion-bf16"], n_params=1e5, repeats=1, warmup=1)}
    assert res["lion-bf16"].path == "loop"
    assert res["lion-bf16"].state_bytes_per_param < res["lion"].state_bytes_per_param / 2 + 0.01
    assert res["lion-bf16"].bytes_per_param == 3 * 4 + 2 * res["lion-bf16"].state_bytes_per_param


def test_egd_is_timed_in_both_modes():
    """``egd`` is EGU, EGD's default (positive parameters, no state); ``egd-signed`` is EG± (θ⁻: one
    parameter's worth of state); both are default names, with their fused variants."""
    from danlu.bench.speed import default_names, is_valid_name

    names = default_names()
    for name in ("egd", "egd-fused", "egd-signed", "egd-signed-fused"):
        assert name in names and is_valid_name(name, names)
    by_name = {r.name: r for r in run_speed(["egd", "egd-signed"], n_params=2e4, repeats=1, warmup=1, bandwidth=1e10)}
    assert by_name["egd"].state_bytes_per_param == 0.0
    assert by_name["egd-signed"].state_bytes_per_param == 4.0
