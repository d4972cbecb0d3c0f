"""docs/conventions.md, docs/scan-format.md and docs/importing.md run as written: each page's
Python blocks (and importing.md's shell blocks) in order, in an empty folder, as a user would."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def blocks(page: str) -> list[tuple[str, str]]:
    text = (ROOT / "docs" / page).read_text()
    return re.findall(r"```(python|bash)\n(.*?)```", text, flags=re.S)


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def run_page(page: str, cwd: Path, *, one_session: bool = False) -> str:
    """Run the blocks in order; ``one_session``: the Python blocks as one program (a page whose
    later snippets use names an earlier one defined), else each on its own."""
    found = blocks(page)
    assert found, f"{page} lost its code blocks"
    if one_session:
        found = [("python", "\n".join(code for kind, code in found if kind == "python"))] + [
            b for b in found if b[0] == "bash"]
    out = []
    for kind, code in found:
        cmd = ([sys.executable, "-c", code] if kind == "python"
               else ["bash", "-e", "-o", "pipefail", "-c", code])
        res = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"{page} block failed:\n{code}\n--- stderr:\n{res.stderr[-3000:]}"
        out.append(res.stdout)
    return "".join(out)


def test_conventions_page_runs(tmp_path):
    out = run_page("conventions.md", tmp_path)
    assert "(50, 64) sample row 0 at field row 13" in out
    assert "51 -> voxel column 0 on field column 9.5" in out


def test_scan_format_page_runs(tmp_path):
    out = run_page("scan-format.md", tmp_path, one_session=True)
    assert "'phase_sign': 1" in out and (tmp_path / "myscan.h5").exists()


def test_importing_page_runs_end_to_end(tmp_path):
    out = run_page("importing.md", tmp_path)
    pcc = float(re.search(r"PCC imported vs native: ([0-9.]+)", out).group(1))
    assert pcc >= 0.99
    assert float(re.search(r"APT PCC imported vs native: ([0-9.]+)", out).group(1)) >= 0.99
    assert "check flagged unconverted.h5 (exit 2)" in out
