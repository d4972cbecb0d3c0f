"""DESIGN.md's layering: the numerical library never pulls in services; packaging is whole."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("prefect", "tiled", "zmq", "bluesky", "ophyd", "databroker")


@pytest.mark.parametrize(
    "module",
    ["apt_stream.physics.engine", "apt_stream.physics.tomo", "apt_stream.model",
     "apt_stream.sim.acquire", "apt_stream.metrics", "apt_stream.io", "apt_stream.reconstruct",
     "apt_stream.evaluation"],
)
def test_numerics_do_not_import_services(module):
    code = (
        f"import sys, {module}; "
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {SERVICES!r}); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"{module} imports {out.stdout.strip()}"


def test_cli_help_is_instant_and_light():
    code = "import sys, apt_stream.cli; print(sorted(m for m in ('torch','prefect','tiled') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    mapping = {"apt_stream": "apt_stream", "apt_stream.flows": "flows",
               "apt_stream.plugins": "plugins", "apt_stream.benchmarks": "benchmarks"}
    found = set()
    for pkg, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([pkg, *rel.parts]) if rel.parts else pkg)
    assert found <= listed, f"missing from pyproject: {sorted(found - listed)}"
