"""The README's Python examples run as written, in order.

A block whose first line is ``# fragment: <where it runs>`` is a snippet for a framework's own
hooks (HF Trainer, Lightning, a process group); it is compiled here, and run where its comment says
(tests/test_integrations.py, tests/test_torch_contract.py)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}  # later blocks continue the first one, as a reader's session would
    for block in blocks:
        code = compile(block, str(README), "exec")
        if not block.startswith("# fragment: "):
            exec(code, namespace)
