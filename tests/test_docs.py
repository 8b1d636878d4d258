"""The documentation site: every exported optimizer has a page, the strict build passes, the math renders.

The static checks need nothing beyond the repository. The build needs the ``docs`` extra (MkDocs Material,
mkdocstrings); the rendering check needs Debian's ``chromium`` (``apt-get install -y chromium``), which loads
each built page headless, lets the vendored KaTeX run, and dumps the resulting DOM.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import danlu

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SECTIONS = ("optimizers", "wrappers")

EXPORTED_OPTIMIZERS = sorted(
    name
    for name in danlu.__all__
    if inspect.isclass(getattr(danlu, name)) and issubclass(getattr(danlu, name), torch.optim.Optimizer)
)

# Exports documented on another object's entry rather than by their own ``::: danlu.NAME``.
DOCUMENTED_ELSEWHERE = {"LION_PRESETS": "lion_preset"}


def _page(name: str) -> Path:
    """The page source of an exported optimizer or wrapper: docs/<section>/<lowercased name>.md."""
    candidates = [DOCS / section / f"{name.lower()}.md" for section in SECTIONS]
    found = [page for page in candidates if page.exists()]
    assert len(found) == 1, f"{name}: expected exactly one page among docs/{{{','.join(SECTIONS)}}}/{name.lower()}.md"
    return found[0]


def test_the_optimizer_list_is_derived_from_the_exports():
    assert {"Lion", "Tiger", "Adafactor", "Amos", "ZeroOrder", "EGStepSize", "ChiGated"} <= set(EXPORTED_OPTIMIZERS)


@pytest.mark.parametrize("name", EXPORTED_OPTIMIZERS)
def test_every_exported_optimizer_has_a_page_in_the_nav(name):
    page = _page(name)
    text = page.read_text(encoding="utf-8")
    assert re.search(rf"^::: danlu\.{name}\s*$", text, re.M), f"{page}: no API block '::: danlu.{name}'"
    assert "\\[" in text and "\\]" in text, f"{page}: no display math for the update"
    for part in ("**State**", "**When to use it**", "**Recipe**", "**Measured**"):
        assert part in text, f"{page}: missing {part}"
    nav_entry = page.relative_to(DOCS).as_posix()
    assert re.search(rf":\s*{re.escape(nav_entry)}\s*$", (ROOT / "mkdocs.yml").read_text(), re.M), (
        f"{nav_entry} is not in mkdocs.yml's nav"
    )


def test_every_export_is_in_the_api_reference():
    blocks = set()
    for md in DOCS.rglob("*.md"):
        blocks |= set(re.findall(r"^::: danlu\.(\w+)\s*$", md.read_text(encoding="utf-8"), re.M))
    missing = [n for n in danlu.__all__ if n not in blocks and DOCUMENTED_ELSEWHERE.get(n) not in blocks]
    assert not missing, f"exports without a '::: danlu.NAME' block in docs/: {missing}"


needs_mkdocs = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers")),
    reason="the docs extra is not installed (make docs installs it)",
)


def _build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=config.parent, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = _build(ROOT / "mkdocs.yml", out)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-4000:]}"
    return out


@needs_mkdocs
def test_the_strict_build_fails_on_a_broken_reference(tmp_path):
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    src = tmp_path / "src"
    src.symlink_to(ROOT / "src")
    index = tmp_path / "docs" / "index.md"
    index.write_text(index.read_text(encoding="utf-8") + "\nSee [the missing page](no-such-page.md).\n")
    result = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0 and "no-such-page.md" in result.stderr, result.stderr[-2000:]


@needs_mkdocs
@pytest.mark.parametrize("name", EXPORTED_OPTIMIZERS)
def test_each_page_has_its_generated_api_reference(site, name):
    html = (site / _page(name).relative_to(DOCS).with_suffix("") / "index.html").read_text(encoding="utf-8")
    assert f'id="danlu.{name}"' in html, f"{name}: mkdocstrings rendered no entry for danlu.{name}"
    assert "doc-section-title" in html, f"{name}: the docstring's Args section was not rendered"
    assert 'class="arithmatex"' in html, f"{name}: no math block reached the page"


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def _rendered_dom(page: Path, profile: Path) -> str:
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
         "--virtual-time-budget=1500", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, f"chromium failed on {page}:\n{result.stderr[-2000:]}"
    return result.stdout


@needs_mkdocs
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_the_math_renders_in_a_browser(site, tmp_path):
    pages = {name: site / _page(name).relative_to(DOCS).with_suffix("") / "index.html" for name in EXPORTED_OPTIMIZERS}
    pages["guides/migrating"] = site / "guides" / "migrating" / "index.html"
    with ThreadPoolExecutor(max_workers=4) as pool:
        profiles = [tmp_path / name.replace("/", "-") for name in pages]
        doms = dict(zip(pages, pool.map(_rendered_dom, pages.values(), profiles)))
    for name, dom in doms.items():
        blocks = len(re.findall(r'class="arithmatex"', dom))
        rendered = len(re.findall(r'class="katex"', dom))
        assert blocks > 0, f"{name}: no math on the page"
        assert rendered >= blocks, f"{name}: {rendered} KaTeX renderings for {blocks} math blocks"
        assert "katex-error" not in dom, f"{name}: KaTeX reported a parse error"
        # arithmatex leaves \( \) and \[ \] around the TeX; KaTeX replaces them, so none may remain
        assert "\\[" not in dom and "\\(" not in dom, f"{name}: raw math delimiters left unrendered"
