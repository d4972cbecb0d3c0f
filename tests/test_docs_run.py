"""What a user copies runs: docs/querying.md's Python blocks and the client snippet the demo prints,
as written, against ``apt-stream serve`` holding a real demo result (the tiny preset's, made by
the live path once per session); and ``apt-stream serve`` on a copied-and-moved demo folder.

Real components only: the demo's own Tiled catalog, ``apt-stream serve`` as a subprocess (and
its server class in-process), HTTP on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "querying.md"
KEY_ENV = "APT_STREAM_TILED_API_KEY"


def python_blocks(path: Path) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    assert len(blocks) >= 2, f"{path.name} lost its Python blocks"
    return blocks


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in (KEY_ENV, "APT_STREAM_TILED_URI", "TILED_SINGLE_USER_API_KEY")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def run_python(code: str, env: dict[str, str], cwd: Path) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=cwd, timeout=120)
    assert out.returncode == 0, f"snippet failed:\n{code}\n--- stderr:\n{out.stderr[-3000:]}"
    return out.stdout


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def demo(tiny_demo):
    work, summary = tiny_demo
    return Path(work), summary, Path(summary["tiled_data"])


@pytest.fixture(scope="module")
def served_demo(demo):
    """``apt-stream serve``'s server on the demo's own folder, on the port the demo's snippet
    names (8000) when it is free, else on a free one."""
    from apt_stream.publish.serve import DEFAULT_PORT, ResultsServer

    _, _, tiled_dir = demo
    port = DEFAULT_PORT if port_free(DEFAULT_PORT) else 0
    with ResultsServer(tiled_dir.parent, port=port, environ={}) as server:
        yield server


def test_querying_doc_runs_on_the_demo_result(demo, served_demo, monkeypatch):
    _, summary, _ = demo
    run_uid = summary["run_uid"]
    monkeypatch.setenv("APT_STREAM_TILED_URI", served_demo.uri)
    monkeypatch.setenv(KEY_ENV, served_demo.api_key)
    namespace: dict = {}
    exec(compile("\n".join(python_blocks(DOC)), str(DOC), "exec"), namespace)

    # The documented searches find the demo's scan by the values the demo writes.
    assert run_uid in namespace["done"] and run_uid in namespace["enough"]
    assert namespace["sample"] == "scan"
    scan = namespace["scan"]
    assert scan.metadata["run_uid"] == run_uid and scan.metadata["scan_id"] == 1
    assert scan.metadata["sample"] == "scan" and scan.metadata["status"] == "done"
    # ... and slice the real APT volume (the doc's index arithmetic fits its shape).
    from apt_stream.publish.server import TiledEndpoint, connect

    root = connect(TiledEndpoint(served_demo.uri, api_key=served_demo.api_key))
    apt = np.asarray(root[run_uid]["apt"].read())
    assert apt.ndim == 3 and apt.shape[0] == 12  # tiny: 12 layers deep
    np.testing.assert_array_equal(namespace["layer"], apt[apt.shape[0] // 2])
    np.testing.assert_array_equal(namespace["section"], apt[:, apt.shape[1] // 2, :])
    np.testing.assert_array_equal(namespace["whole"], apt)
    assert len(namespace["angles"]) == summary["angles"] == 7


def test_demo_snippet_runs_as_printed(demo, served_demo):
    """The snippet the demo prints, verbatim (only the port swapped if 8000 was taken)."""
    work, summary, tiled_dir = demo
    snippet = summary["client_snippet"]
    assert "import os" in snippet and f"apt-stream serve {tiled_dir.parent}" in snippet
    assert "127.0.0.1:8000/api/v1" in snippet
    if served_demo.port != 8000:
        snippet = snippet.replace("127.0.0.1:8000/", f"127.0.0.1:{served_demo.port}/")
    assert (tiled_dir / "api_key").is_file()  # where the snippet reads the key
    out = run_python(snippet, clean_env(), cwd=work)
    assert f"{summary['run_uid']} done 7" in out
    assert "(12, 24, 32) (12, 32)" in out  # the volume's shape, then an xz cross-section
    assert "angle_deg" in out and "-17.0" in out  # the angles table's first rows


def test_out_of_range_slice_is_a_400_with_a_reason(demo, served_demo):
    _, summary, _ = demo
    url = f"{served_demo.uri}/array/full/{summary['run_uid']}/apt"
    headers = {"Authorization": f"Apikey {served_demo.api_key}", "Accept": "application/json"}
    with httpx.Client(trust_env=False, timeout=30) as http:
        ok = http.get(url, params={"slice": "6"}, headers=headers)
        assert ok.status_code == 200 and np.asarray(ok.json()).shape == (24, 32)
        for bad in ("40", ":,30,:", "12"):
            r = http.get(url, params={"slice": bad}, headers=headers)
            assert r.status_code == 400, (bad, r.status_code, r.text)
            assert "out of range" in r.json()["detail"] and repr(bad) in r.json()["detail"]
        assert http.get(url, params={"slice": "10:40"}, headers=headers).status_code == 200

        # Any other ValueError stays Tiled's own 500 (the handler does not swallow bugs).
        def boom():
            raise ValueError("a bug")

        served_demo.app.add_api_route("/boom-for-test", boom)
        r = http.get(f"http://127.0.0.1:{served_demo.port}/boom-for-test")
        assert r.status_code == 500 and r.json()["detail"] == "Internal server error"


def test_web_ui_gets_table_rows_it_can_parse(demo, served_demo):
    """Tiled's web UI splits json-seq on newlines and JSON.parses each line; Tiled's server
    prefixes each row with RS (RFC 7464), so the UI showed "No rows". The UI's own requests get
    plain lines; any other client keeps Tiled's framing."""
    _, summary, _ = demo
    url = f"{served_demo.uri}/table/partition/{summary['run_uid']}/angles"
    params = {"partition": 0, "format": "application/json-seq"}
    auth = {"Authorization": f"Apikey {served_demo.api_key}", "Accept-Encoding": "gzip"}
    ui_page = f"http://127.0.0.1:{served_demo.port}/ui/browse/{summary['run_uid']}/angles"
    with httpx.Client(trust_env=False, timeout=30) as http:
        plain = http.get(url, params=params, headers=auth)
        assert plain.status_code == 200 and plain.content.startswith(b"\x1e")
        ui = http.get(url, params=params, headers={**auth, "Referer": ui_page})
        assert ui.status_code == 200 and b"\x1e" not in ui.content
    rows = [json.loads(line) for line in ui.text.split("\n") if line.strip()]  # as the UI does
    assert len(rows) == 7 and sorted(r["angle_deg"] for r in rows) == pytest.approx(
        np.linspace(-17, 17, 7))


def test_serve_with_the_users_own_key_never_shows_it(demo):
    from apt_stream.publish.serve import ResultsServer

    _, summary, tiled_dir = demo
    key = "c0ffee" * 8
    with ResultsServer(tiled_dir, port=0, environ={KEY_ENV: key}) as server:
        text = server.banner()
        assert key not in text
        assert f"?api_key=${KEY_ENV}" in text and f"os.environ[{KEY_ENV!r}]" in text
        out = run_python(text.split("up):\n\n", 1)[1].split("Ctrl-C", 1)[0],
                         clean_env(**{KEY_ENV: key}), cwd=tiled_dir)
        assert f"{summary['run_uid']} done 7" in out
        with httpx.Client(trust_env=False) as http:
            url = f"{server.uri}/metadata/{summary['run_uid']}"
            assert http.get(url, headers={"Authorization": f"Apikey {key}"}).status_code == 200
            assert http.get(url, headers={"Authorization": "Apikey wrong"}).status_code == 401
    for log in ("access.log", "error.log"):
        assert key not in (tiled_dir / log).read_text()


def test_serve_refuses_a_busy_port_with_a_reason(demo):
    from apt_stream.errors import ConfigError
    from apt_stream.publish.serve import ResultsServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        with pytest.raises(ConfigError, match=f"127.0.0.1:{busy} is in use.*--port"):
            ResultsServer(demo[2], port=busy, environ={}).start()


class ServeProcess:
    """``apt-stream serve DIR --port 0`` as the user runs it; reads its banner."""

    def __init__(self, folder: Path) -> None:
        exe = Path(sys.executable).with_name("apt-stream")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "apt_stream.cli"]
        self.proc = subprocess.Popen([*cmd, "serve", str(folder), "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=clean_env(), cwd=folder.parent)
        self.lines: list[str] = []
        done = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                if line.startswith("Ctrl-C stops"):
                    done.set()
            done.set()

        threading.Thread(target=read, daemon=True).start()
        if not done.wait(120) or self.proc.poll() is not None:
            self.stop()
            raise AssertionError("apt-stream serve did not come up:\n" + "".join(self.lines))
        self.banner = "".join(self.lines)

    def field(self, name: str) -> str:
        return re.search(rf"^  {name}:\s+(\S+)", self.banner, flags=re.M).group(1)

    def snippet(self) -> str:
        return self.banner.split("up):\n\n", 1)[1].split("Ctrl-C stops", 1)[0]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(30)


def test_serve_a_moved_demo_folder_arrays_table_ui_and_snippet(demo, tmp_path):
    """Copy the demo folder, move the copy, serve it: every stored path now points into it,
    the arrays, the angles table and the web UI load, and the printed snippet runs; a restart
    reuses the folder's key."""
    work, summary, tiled_dir = demo
    run_uid = summary["run_uid"]
    copy = tmp_path / "copy"
    shutil.copytree(work, copy, ignore=shutil.ignore_patterns("api_key"))
    moved = tmp_path / "elsewhere" / "moved-demo"
    moved.parent.mkdir()
    copy.rename(moved)
    catalog = moved / tiled_dir.name / "catalog.db"

    def stored_uris() -> list[str]:
        with sqlite3.connect(catalog) as con:
            return [u for (u,) in con.execute("SELECT data_uri FROM assets")]

    # Before: the copy's catalog names the original folder (what broke `tiled serve config`);
    # the raw run's detector file (raw/<uid>, TiledWriter) lies beside the catalog folder.
    assert all(str(work) in u for u in stored_uris())

    serve = ServeProcess(moved)
    try:
        assert f"Tiled is serving {moved / tiled_dir.name}" in serve.banner
        assert re.search(r"moved:\s+\d+ stored paths now point into this folder", serve.banner)
        assert all(str(moved) in u and str(work) not in u for u in stored_uris())
        key_file = moved / tiled_dir.name / "api_key"
        key = key_file.read_text().strip()
        assert oct(key_file.stat().st_mode & 0o777) == "0o600" and len(key) == 64
        api = serve.field("API")
        ui = serve.field("web UI")
        assert ui.startswith(api.replace("/api/v1", f"/ui/browse/{run_uid}?api_key="))

        from apt_stream.publish.server import TiledEndpoint, connect

        node = connect(TiledEndpoint(api, api_key=key))[run_uid]
        angles = node["angles"].read()
        assert sorted(angles["angle_deg"]) == pytest.approx(np.linspace(-17, 17, 7))
        apt = node["apt"].read()
        assert apt.shape == (12, 24, 32) and np.isfinite(apt).all() and apt.std() > 0
        assert node["approximant"][6].shape == (24, 32)
        assert set(node["metrics"].read()["volume"]) >= {"apt", "approximant"}

        with httpx.Client(trust_env=False, timeout=30) as http:
            page = http.get(ui)
            assert page.status_code == 200 and "<html" in page.text.lower()
            assert "tiled_api_key" in page.headers.get("set-cookie", "")
            meta = http.get(f"{api}/metadata/{run_uid}/apt",
                            headers={"Authorization": f"Apikey {key}"}).json()
            assert meta["data"]["attributes"]["structure"]["shape"] == [12, 24, 32]

        out = run_python(serve.snippet(), clean_env(), cwd=tmp_path)
        assert f"{run_uid} done 7" in out and "angle_deg" in out
    finally:
        assert serve.stop() == 0, "".join(serve.lines[-40:])

    # The access log has the UI request, with the key redacted.
    access = (moved / tiled_dir.name / "access.log").read_text()
    assert "/ui/browse/" in access and key not in access and "api_key=***" in access

    # A restart: nothing left to rewrite, same key, still served.
    again = ServeProcess(moved)
    try:
        assert "moved:" not in again.banner
        assert key_file.read_text().strip() == key
        node = connect(TiledEndpoint(again.field("API"), api_key=key))[run_uid]
        assert len(node["angles"].read()) == 7
    finally:
        assert again.stop() == 0, "".join(again.lines[-40:])


def test_relocation_is_idempotent_and_leaves_foreign_paths(demo, tmp_path):
    from apt_stream.publish.serve import relocate_catalog

    _, _, tiled_dir = demo
    copy = tmp_path / "t"
    shutil.copytree(tiled_dir, copy)
    first = relocate_catalog(copy)
    assert first["rewritten"] >= 3 and first["missing"] == 0 and first["from"] == [str(tiled_dir)]
    assert relocate_catalog(copy)["rewritten"] == 0
    # A stored path whose file is not in the folder is left alone, and counted.
    with sqlite3.connect(copy / "catalog.db") as con:
        con.execute("INSERT INTO assets (data_uri, is_directory) VALUES (?, 0)",
                    ("file://localhost/nowhere/data/x/y",))
    again = relocate_catalog(copy)
    assert again["rewritten"] == 0 and again["missing"] == 1
    with sqlite3.connect(copy / "catalog.db") as con:
        assert con.execute("SELECT count(*) FROM assets WHERE data_uri LIKE "
                           "'file://localhost/nowhere/%'").fetchone() == (1,)
