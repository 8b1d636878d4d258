"""The README's Python examples run as written, in order."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}  # later blocks continue the first one, as a reader's session would
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
