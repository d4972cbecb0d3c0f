"""docs/phantoms.md's Python snippets run verbatim (the old phantom and the wide design space)."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "phantoms.md"


def test_phantom_doc_snippets_run_verbatim():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 2, "docs/phantoms.md lost its code blocks"
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), {})
