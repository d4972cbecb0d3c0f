"""The closed loop's queue-server route against a REAL bluesky-queueserver: redis-server and
``start-re-manager`` (startup module ``apt_stream.plugins.bluesky.qserver_profile``) on loopback.
apt-stream's advice -> ``QueueRoute`` -> ``REManagerAPI.item_add`` -> the RE Manager runs
``measure_angle`` -> a one-angle ptycho-tomo run of the suggested angle, on disk."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def queue_server(tmp_path_factory):
    redis = shutil.which("redis-server")
    if redis is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server; "
                    ".ci/run installs it)")
    manager = Path(sys.executable).with_name("start-re-manager")
    assert manager.exists(), "bluesky-queueserver is a dev dependency"
    work = tmp_path_factory.mktemp("qserver")
    redis_port = _free_port()
    redis_proc = subprocess.Popen(
        [redis, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(work)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    control = f"tcp://127.0.0.1:{_free_port()}"
    info = f"tcp://127.0.0.1:{_free_port()}"
    from apt_stream.plugins.bluesky.queue import write_permissions

    permissions = write_permissions(work / "user_group_permissions.yaml")
    log = open(work / "re-manager.log", "w")
    manager_proc = subprocess.Popen(
        [str(manager), "--startup-module", "apt_stream.plugins.bluesky.qserver_profile",
         "--redis-addr", f"127.0.0.1:{redis_port}", "--redis-name-prefix", "apt_stream_test",
         "--zmq-control-addr", control, "--zmq-info-addr", info,
         "--zmq-publish-console", "OFF", "--use-ipython-kernel", "OFF",
         "--existing-plans-devices", str(work / "existing_plans_and_devices.yaml"),
         "--update-existing-plans-devices", "ENVIRONMENT_OPEN",
         "--user-group-permissions", str(permissions)],
        stdout=log, stderr=subprocess.STDOUT, cwd=work)
    from bluesky_queueserver_api.zmq import REManagerAPI

    api = REManagerAPI(zmq_control_addr=control, request_fail_exceptions=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                api.status()
                break
            except Exception:
                if time.monotonic() > deadline or manager_proc.poll() is not None:
                    log.flush()
                    raise RuntimeError("RE Manager did not come up: "
                                       + (work / "re-manager.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        api.environment_open()
        api.wait_for_idle(timeout=120)
        assert api.status()["worker_environment_exists"]
        yield {"control": control, "api": api, "work": work}
    finally:
        try:
            api.environment_close()
            api.wait_for_idle(timeout=30)
        except Exception:
            pass
        api.close()
        _stop(manager_proc)
        _stop(redis_proc)
        log.close()


def _advice(angle: float, *, stop: bool = False) -> dict:
    return {"run_uid": "run-1", "n_angles": 9, "stop": stop, "reason": None,
            "next_angles": [{"angle_deg": angle, "score": 1.0, "gap_deg": 2.0,
                             "disagreement": 0.1}]}


def test_the_profile_offers_measure_angle(queue_server):
    api = queue_server["api"]
    plans = api.plans_allowed()["plans_allowed"]
    devices = api.devices_allowed()["devices_allowed"]
    assert "measure_angle" in plans
    assert {"rot", "sample_x", "sample_y"} <= set(devices)


def test_queue_route_queues_and_runs_the_suggested_angle(queue_server, tmp_path):
    from apt_stream.config import get_preset
    from apt_stream.io import write_scan
    from apt_stream.plugins.bluesky.queue import QueueRoute
    from apt_stream.sim.acquire import simulate_scan

    api = queue_server["api"]
    api.queue_clear()
    scan = simulate_scan(get_preset("tiny"), seed=5, n_angles=9, range_deg=17.0)
    scan_path = write_scan(tmp_path / "scan.h5", scan)
    runs = tmp_path / "runs"
    route = QueueRoute(queue_server["control"], scan_path=str(scan_path), data_root=str(runs))
    suggested = float(scan.angles_deg[3])

    # stop advice queues nothing; the same suggestion twice is queued once
    assert route("run-1", _advice(suggested, stop=True)) is None
    item = route("run-1", _advice(suggested))
    assert route("run-1", _advice(suggested)) is None
    assert item["name"] == "measure_angle" and item["kwargs"]["angle_deg"] == suggested
    queue = api.queue_get()["items"]
    assert [q["item_uid"] for q in queue] == [item["item_uid"]]

    api.queue_start()
    time.sleep(1)
    api.wait_for_idle(timeout=120)
    (done,) = [h for h in api.history_get()["items"] if h["item_uid"] == item["item_uid"]]
    assert done["result"]["exit_status"] == "completed", done["result"]
    assert len(done["result"]["run_uids"]) == 1
    # The RE Manager's run acquired that angle's frames: its journal (the run's documents).
    (journal,) = runs.glob("*/documents.jsonl")
    docs = [json.loads(line) for line in journal.read_text().splitlines()]
    names = [d.get("name", d[0] if isinstance(d, list) else None) for d in docs]
    assert names.count("start") == 1 and names.count("stop") == 1
    text = journal.read_text()
    assert "apt_stream_suggested_deg" in text and done["result"]["run_uids"][0] in text
    events = [d for d in docs if (d.get("name") if isinstance(d, dict) else d[0]) == "event"]
    assert events, "no frames acquired"
    assert route.errors == 0 and len(route.queued) == 1


def test_listen_queues_suggestions_on_the_queue_server(queue_server, prefect_harness,
                                                       tiled_server, tmp_path, monkeypatch):
    """`listen --suggest 3 --queue-address ADDR`: a real RunEngine scan (10 of 29 planned angles,
    coarse to fine) through the listen flow; each estimate's top suggestion lands in the real
    RE Manager's queue as measure_angle of a planned angle not yet measured, each angle once."""
    import threading

    import numpy as np

    from apt_stream.config import get_preset
    from apt_stream.flows.listen import ListenConfig, LiveResources, listen
    from apt_stream.physics.next_angle import bisection_order
    from apt_stream.plugins.bluesky import replay_scan, start_proxy
    from apt_stream.sim.acquire import simulate_scan

    api = queue_server["api"]
    api.queue_clear()
    monkeypatch.setenv("APT_STREAM_TILED_URI", tiled_server.uri)
    monkeypatch.setenv("APT_STREAM_TILED_API_KEY", tiled_server.api_key)
    scan = simulate_scan(get_preset("tiny"), seed=12, n_angles=29, range_deg=17.0)
    order = bisection_order(29)[:10]
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    with start_proxy() as proxy:
        def publish(listener) -> None:
            threading.Thread(target=lambda: replay_scan(
                scan, zmq_address=proxy.in_address, data_root=runs_dir, angle_order=order),
                daemon=True).start()

        config = ListenConfig(
            proxy_address=proxy.out_address, data_roots=[str(runs_dir)],
            spool_dir=str(tmp_path / "spool"), backup_dir=str(tmp_path / "backup"),
            preview_dir=str(tmp_path / "previews"), n_star=29, theta_star_deg=17.0,
            max_runs=1, max_duration_s=240, queue_address=queue_server["control"],
        )
        result = listen(config, LiveResources(on_ready=publish))
    (stats,) = result["runs"].values()
    n_estimates = len(stats["convergence"])
    assert n_estimates >= 3  # from the 6th angle on
    items = api.queue_get()["items"]
    angles = [it["kwargs"]["angle_deg"] for it in items]
    assert all(it["name"] == "measure_angle" for it in items)
    assert 1 <= len(angles) <= n_estimates and len(set(angles)) == len(angles)
    planned = np.asarray(scan.angles_deg)
    for it in items:
        # a planned angle not measured yet when the estimate suggested it
        n = it["kwargs"]["md"]["apt_stream_advice_n_angles"]
        a = it["kwargs"]["angle_deg"]
        measured = set(np.round(planned[order[:n]], 6))
        assert np.min(np.abs(planned - a)) < 1e-6 and round(a, 6) not in measured
    api.queue_clear()
