"""The in-process Tiled server: table requests one at a time, and a stop that cannot hang.

A CI run once never finished: the shared test server's shutdown waited for good on a request
stuck in DuckDB (two processes appending at once). These tests make that situation on purpose.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from apt_stream.publish.embedded import SHUTDOWN_GRACE_S, SerialTableAccess, TiledThread

#: One client process: its own container and appendable table; appends and reads back.
_APPENDER = textwrap.dedent("""
    import os, sys
    import httpx, pyarrow as pa
    from tiled.client import from_uri
    name, rows = sys.argv[1], int(sys.argv[2])
    client = from_uri(os.environ["TILED_URI"], api_key=os.environ["TILED_KEY"],
                      structure_clients="numpy", timeout=httpx.Timeout(20.0))
    table = client.create_container(key=name).create_appendable_table(
        pa.schema([("k", pa.int64())]), key="rows")
    for k in range(rows):
        table.append_partition(0, pa.table({"k": [k]}))
        if k % 5 == 0:
            table.read()
    print(len(table.read()))
""")


def test_appends_from_several_processes_at_once_all_land(tiled_server):
    """Four processes appending to one server at once: without the serialising wrapper three
    of them time out within seconds (DuckDB's shared connection hangs) and the server never
    stops; with it, every row lands."""
    import uuid

    env = {**os.environ, "TILED_URI": tiled_server.uri, "TILED_KEY": tiled_server.api_key}
    names = [f"concurrent-{uuid.uuid4().hex[:8]}" for _ in range(4)]
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, name, "40"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in names]
    results = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert out.strip() == "40"


@pytest.mark.parametrize(("method", "path", "serial"), [
    ("GET", "/api/v1/table/full/scan/angles", True),
    ("GET", "/api/v1/array/full/scan/volume", True),
    ("GET", "/api/v1/container/full/scan", True),
    ("PATCH", "/api/v1/table/partition/scan/angles", True),
    ("POST", "/api/v1/metadata/scan", True),
    ("DELETE", "/api/v1/nodes/scan", True),
    ("GET", "/api/v1/metadata/scan", False),
    ("GET", "/api/v1/search/", False),
    ("GET", "/ui/browse/", False),
    ("GET", "/healthz", False),
])
def test_which_requests_wait_for_the_table_store(method, path, serial):
    assert SerialTableAccess.reaches_tables({"type": "http", "method": method,
                                             "path": path}) is serial
    assert not SerialTableAccess.reaches_tables({"type": "websocket", "path": path})


def _app_with_a_stuck_route(stuck: str, release: threading.Event):
    """A bare ASGI app: ``/healthz`` answers; ``/api/v1/table/stuck`` never does, either awaiting
    forever (``stuck="await"``) or blocking a worker thread until ``release`` (``"thread"``)."""

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/api/v1/table/stuck":
            if stuck == "await":
                await asyncio.Event().wait()
            else:
                await asyncio.to_thread(release.wait)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def _request_in_background(port: int) -> None:
    import httpx

    def go():
        try:
            httpx.get(f"http://127.0.0.1:{port}/api/v1/table/stuck", timeout=60, trust_env=False)
        except httpx.HTTPError:
            pass

    threading.Thread(target=go, daemon=True).start()
    time.sleep(0.5)  # the request is in


@pytest.mark.parametrize("stuck", ["await", "thread"])
def test_close_returns_while_a_request_is_stuck(tmp_path, stuck, caplog):
    import httpx

    release = threading.Event()
    server = TiledThread(_app_with_a_stuck_route(stuck, release), port=0, log_folder=tmp_path,
                         name=f"test-stuck-{stuck}")
    port = server.start()
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", trust_env=False).text == "ok"
    _request_in_background(port)
    # A second table request waits behind the stuck one (one at a time), other routes do not.
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"http://127.0.0.1:{port}/api/v1/table/other", timeout=1, trust_env=False)
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5, trust_env=False).text == "ok"
    thread = server._thread
    t0 = time.monotonic()
    server.close()
    took = time.monotonic() - t0
    assert took < SHUTDOWN_GRACE_S + 8
    assert not server.alive()
    if stuck == "await":  # uvicorn cancels it after the grace: the thread ends
        assert not thread.is_alive()
    else:  # a blocked worker thread cannot be cancelled: left behind (a daemon), said so
        assert thread.daemon
        assert "did not stop" in caplog.text
    release.set()
    thread.join(15)
    assert not thread.is_alive()


_HUNG_CLOSE = textwrap.dedent("""
    import sys, threading, time
    import apt_stream.publish.serve as serve
    serve.ResultsServer.close = lambda self: time.sleep(3600)  # a shutdown that never ends
    stop = threading.Event()
    threading.Timer(1, stop.set).start()
    serve.serve(sys.argv[1], port=0, say=lambda text: None, stop=stop, exit_deadline_s=2)
    print("serve returned")
""")


def test_serve_ends_the_process_by_its_deadline_when_closing_hangs(tmp_path):
    from apt_stream.publish.server import local_tiled_server

    with local_tiled_server(tmp_path / "tiled"):
        pass
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _HUNG_CLOSE, str(tmp_path / "tiled")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "serve returned" not in done.stdout  # the watchdog ended it, close() never returned
    assert time.monotonic() - t0 < 60


def test_ctrl_c_stops_serve_even_when_it_was_started_with_sigint_ignored(tmp_path):
    """A child inherits an ignored SIGINT; `apt-stream serve` must still stop on Ctrl-C."""
    import signal

    from apt_stream.publish.server import local_tiled_server

    with local_tiled_server(tmp_path / "tiled"):
        pass
    exe = os.path.join(os.path.dirname(sys.executable), "apt-stream")
    proc = subprocess.Popen([exe, "serve", str(tmp_path / "tiled"), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        for line in proc.stdout:
            if line.startswith("Ctrl-C stops"):
                break
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
