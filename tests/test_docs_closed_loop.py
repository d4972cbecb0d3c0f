"""docs/closed-loop.md's Python blocks run verbatim (the benchmark commands are minutes: not here)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "closed-loop.md"


def test_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), {"__name__": "__doc__"})
    out = capsys.readouterr().out
    assert "stop advised at" in out and "next:" in out


def test_the_tables_are_filled_in():
    text = DOC.read_text()
    assert "DEMO_" not in text and "| advice wrong" in text and "| adaptive |" in text
