"""Probe: the Prefect server killed mid-scan and restarted on the same port and database.

``python benchmarks/probe_prefect_outage.py [OUTAGE_S]`` (default 100) runs, on loopback: a
``prefect server start``, a local Tiled, a 0MQ proxy, ``apt-stream listen --max-runs 1`` and a
5-angle scan at 6 Hz. It kills the Prefect server 3 s into the scan, brings it back OUTAGE_S
later, then starts a second listener on the same spool (which records flow-run states an earlier
one could not) and prints the scan's status in Tiled and every flow run's state.
docs/reliability.md ("Outages") has the results. Takes OUTAGE_S + about 60 s.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _prefect_server(port: int, env: dict) -> subprocess.Popen:
    prefect = str(Path(sys.executable).parent / "prefect")
    proc = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the Prefect server did not start")


def _listen(args: list[str], env: dict, cwd: Path) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "apt_stream.cli", "listen", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.time() + 120
    while not any("ready" in line for line in lines) and time.time() < deadline:
        time.sleep(0.2)
    return proc, lines


def main(outage_s: float = 100.0) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from apt_stream.plugins.bluesky import (
        make_publisher,
        make_run_engine,
        replay_scan,
        start_proxy,
        synthetic_scan,
    )
    from apt_stream.publish.server import connect, local_tiled_server

    tmp = Path(tempfile.mkdtemp(prefix="apt-prefect-outage-"))
    (tmp / "data").mkdir()
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    penv = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false"}
    server = _prefect_server(port, penv)
    t0 = time.time()
    with local_tiled_server(tmp / "tiled") as tiled, start_proxy() as proxy:
        env = {**penv, "APT_STREAM_TILED_URI": tiled.uri, "APT_STREAM_TILED_API_KEY": tiled.api_key,
               "PREFECT_API_URL": api, "OMP_NUM_THREADS": "1"}
        common = ["--zmq", proxy.out_address, "--data-root", str(tmp / "data"),
                  "--spool", str(tmp / "spool")]
        first, lines = _listen([*common, "--n-star", "3", "--theta-star", "10", "--max-runs", "1"],
                               env, tmp)
        scan = synthetic_scan(n_angles=5, frames_per_angle=6, range_deg=10.0, seed=4)
        publisher = make_publisher(proxy.in_address)
        beamline = threading.Thread(target=replay_scan, args=(scan,), kwargs={
            "data_root": tmp / "data", "publisher": publisher, "run_engine": make_run_engine(),
            "rate_hz": 6.0})
        beamline.start()
        time.sleep(3)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        print(f"Prefect killed at {time.time() - t0:.1f} s", flush=True)
        time.sleep(outage_s)
        server = _prefect_server(port, penv)
        print(f"Prefect back at {time.time() - t0:.1f} s", flush=True)
        beamline.join()
        try:
            first.wait(300)
        except subprocess.TimeoutExpired:
            print("the first listener was still running after 300 s; SIGINT")
            first.send_signal(signal.SIGINT)
            first.wait(30)
        print(f"first listener: exit {first.returncode} at {time.time() - t0:.1f} s")
        (tmp / "listen.log").write_text("".join(lines))
        second, _ = _listen(common, env, tmp)
        time.sleep(3)
        second.send_signal(signal.SIGINT)
        second.wait(30)
        print(f"second listener: exit {second.returncode}")
        root = connect(tiled)
        for key in root:
            md = root[key].metadata
            print(f"Tiled: {key} {md.get('status')} angles_used={md.get('angles_used')} "
                  f"frames_missing={md.get('frames_missing')}")
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        for run in client.read_flow_runs():
            print(f"Prefect: {run.name} {run.state.type.value} {(run.state.message or '')[:80]}")
    os.killpg(server.pid, signal.SIGKILL)
    print(f"logs in {tmp}")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 100.0)
