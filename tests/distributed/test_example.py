"""examples/fsdp2_train.py, run with the README's command (torchrun, 2 CPU ranks on gloo)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fsdp2_train.py"


def _run(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(EXAMPLE), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _checksum(text: str) -> str:
    match = re.search(r"final parameter checksum (\S+)", text)
    assert match, text
    return match.group(1)


def test_example_trains_checkpoints_and_resumes_exactly(tmp_path):
    """Interrupted after 4 steps (DCP checkpoint) and resumed to 8 in a new torchrun: the same parameters,
    to the last digit of their sum, as 8 steps in one run; and the loss went down."""
    ckpt = str(tmp_path / "ckpt")
    first = _run("--optimizer", "amos", "--steps", "4", "--ckpt", ckpt)
    resumed = _run("--optimizer", "amos", "--steps", "8", "--ckpt", ckpt)
    assert "resumed from step 4" in resumed
    straight = _run("--optimizer", "amos", "--steps", "8")
    assert _checksum(resumed) == _checksum(straight)
    losses = [float(v) for v in re.findall(r"loss (\S+)", first + resumed)]
    assert losses[-1] < losses[0]
