"""State and secrets: a real publish with a known API key leaves the key nowhere we can read, and
previews never go through a folder another user could have planted.

The key is searched for in the captured logs (caplog, this process's stdout/stderr), the Tiled
servers' own logs (the embedded server's error.log / access.log, the ``tiled serve`` subprocess's
server.log), every Prefect flow run's parameters, every task run, every artifact and every log
line stored in Prefect's database (read back through the Prefect client).

Pickle: subscribers refuse pickled documents unless explicitly enabled; that is tested in
tests/test_stream_decode.py (``test_pickle_refused_unless_allowed``).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest

# The small real stand-in for the streaming Approximant, shared with the reconstruct-flow tests.
from test_flows_reconstruct import ANGLES, FRAME, PATTERN, SHAPE, MeanEngine  # noqa: E402
from test_flows_reconstruct import double as _double  # noqa: E402

from apt_stream.errors import ConfigError
from apt_stream.private_dir import private_dir


def _run_one_scan(publisher, run_uid: str, *, preview_dir: str | None):
    """One scan through LiveReconstructor -> LiveBridge -> the reconstruct_scan flow."""
    from apt_stream.flows.reconstruct import reconstruct_scan
    from apt_stream.flows.relay import LiveBridge
    from apt_stream.flows.tasks import LIVE_TASKS
    from apt_stream.stream import (
        FrameBatch,
        LiveReconstructor,
        RunHeader,
        RunStopped,
        TriggerPolicy,
    )

    bridge = LiveBridge(publisher, engine_factory=MeanEngine, reconstruct_fn=_double,
                        tasks=LIVE_TASKS)
    live = LiveReconstructor(bridge, engine_factory=bridge.engine_factory,
                             reconstruct_fn=bridge.reconstruct_fn,
                             policy=TriggerPolicy(n_star=3, theta_star_deg=10.0))
    live.submit(RunHeader(
        run_uid=run_uid, scan_id=9, sample="secrets-test", preset=None, energy_kev=8.8,
        detector_distance_m=1.92, detector_pixel_m=75e-6, object_pixel_m=14e-9,
        field_shape=(24, 24), frame_shape=FRAME, n_slices=3,
        slice_spacing_m=np.full(len(ANGLES), 20e-9), angles_deg=np.array(ANGLES),
        frames_per_angle=(4,) * len(ANGLES), volume_shape_zyx=SHAPE,
        probe=np.ones((1, *FRAME), np.complex64),
    ))
    for n, angle in enumerate(ANGLES):
        frames = np.full((4, *FRAME), 1.0 + n, np.float32)
        live.submit(FrameBatch(run_uid, n, angle, frames, np.zeros((4, 2)), angle_complete=True))
    live.submit(RunStopped(run_uid, "success"))
    channel = bridge.next_run(timeout_s=20)
    assert channel is not None and channel.run_uid == run_uid
    state = reconstruct_scan(channel, run_uid, n_star=3, theta_star_deg=10.0,
                             preview_dir=preview_dir, truth_fn=lambda header: PATTERN,
                             return_state=True)
    live.close()
    return state


def _prefect_records(canary: str) -> str:
    """Everything Prefect's database holds about flow runs, task runs, artifacts and logs, as
    one JSON text (checked to contain ``canary``, an artifact this test wrote itself)."""
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    parts = []
    with get_client(sync_client=True) as client:
        for reader in (client.read_flow_runs, client.read_task_runs, client.read_artifacts):
            offset = 0
            while True:
                page = reader(limit=200, offset=offset)
                parts += [item.model_dump_json() for item in page]
                if len(page) < 200:
                    break
                offset += 200
        offset = 0
        while True:
            page = client.read_logs(limit=200, offset=offset)
            parts += [item.model_dump_json() for item in page]
            if len(page) < 200:
                break
            offset += 200
    text = "\n".join(parts)
    assert canary in text, "the Prefect read-back missed a record it should hold"
    return text


def test_a_real_publish_leaves_the_key_nowhere(prefect_harness, tmp_path, caplog, capfd,
                                                monkeypatch):
    import httpx
    from prefect import flow
    from prefect.artifacts import create_markdown_artifact

    from apt_stream.flows.flight_check import FlightCheckConfig, flight_check
    from apt_stream.plugins.tiled import serve_config
    from apt_stream.publish import TiledPublisher, check_writable
    from apt_stream.publish.server import local_tiled_server

    caplog.set_level(logging.INFO)
    key = "k3y" + secrets.token_hex(24)
    canary = f"canary-{uuid.uuid4().hex}"
    # Previews: a planted symlink at the old shared path; the cache root is the test's own.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "shared-tmp"))
    (tmp_path / "shared-tmp").mkdir()
    trap = tmp_path / "attacker"
    trap.mkdir()
    (tmp_path / "shared-tmp" / "apt-stream-previews").symlink_to(trap)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    # A second embedded server in this process: tiled's settings (the single-user key) and the
    # server log handlers are process-wide, so tests that use the session's tiled_server after
    # this one would see this key. pytest's file order runs them before; keep it that way.
    with local_tiled_server(tmp_path / "tiled", api_key=key) as endpoint:
        # A whole scan through the Prefect flow, publishing with the key.
        run_uid = f"secret-{uuid.uuid4()}"
        publisher = TiledPublisher.from_endpoint(endpoint, backup_dir=tmp_path / "backup")
        state = _run_one_scan(publisher, run_uid, preview_dir=None)
        assert state.is_completed(), state.message

        # The flight check gets the key from the environment (as a deployment does).
        monkeypatch.setenv("APT_STREAM_TILED_URI", endpoint.uri)
        monkeypatch.setenv("APT_STREAM_TILED_API_KEY", key)
        checked = flight_check(FlightCheckConfig(), return_state=True)
        assert checked.is_completed(), checked.message

        # An endpoint handed to a flow as a parameter: Prefect stores it without its key.
        @flow(name="secrets-endpoint-parameter", persist_result=False)
        def takes_endpoint(ep):
            create_markdown_artifact(canary, key=f"secrets-{uuid.uuid4().hex[:8]}")
            return check_writable(ep)["uri"]

        assert takes_endpoint(endpoint) == endpoint.uri

        # A browser-style request with the key in the URL (what tiled's own link looks like).
        with httpx.Client(trust_env=False) as client:
            assert client.get(f"{endpoint.uri}/?api_key={key}").status_code == 200
        server_logs = [endpoint.data_dir / "error.log", endpoint.data_dir / "access.log"]

        # The deployed server (tiled serve config through our launcher), same key.
        with serve_config(Path(__file__).resolve().parents[1] / "deploy" / "tiled-config.yml",
                          data_dir=tmp_path / "served", api_key=key) as (served, _proc):
            check_writable(served)
            with httpx.Client(trust_env=False) as client:
                assert client.get(f"{served.uri}/?api_key={key}").status_code == 200
                anonymous = client.post(f"{served.uri}/metadata/", json={})
                assert anonymous.status_code in (401, 403)
        server_logs.append(tmp_path / "served" / "server.log")

    # The scan is in Tiled and the previews are in the private folder, not behind the symlink.
    previews = tmp_path / "cache" / "apt-stream" / "previews"
    assert sorted(p.name for p in previews.glob("*.png"))
    assert stat.S_IMODE(os.lstat(previews).st_mode) == 0o700
    assert list(trap.iterdir()) == []

    captured = capfd.readouterr()
    served_log = (tmp_path / "served" / "server.log").read_text()
    assert "api_key=***" in served_log  # tiled's start-up banner was there, redacted
    places = {
        "caplog": caplog.text,
        "stdout": captured.out,
        "stderr": captured.err,
        **{str(p): p.read_text(errors="replace") for p in server_logs if p.exists()},
        "prefect": _prefect_records(canary),
    }
    assert "access.log" in " ".join(places) and endpoint.uri in places["prefect"]
    leaked = [where for where, text in places.items() if key in text]
    assert leaked == [], f"the API key appears in {leaked}"


def test_private_dir_is_private_and_stable(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    first = private_dir("previews", environ=env)
    assert first == tmp_path / "cache" / "apt-stream" / "previews"
    assert private_dir("previews", environ=env) == first
    for folder in (first, first.parent):
        st = os.lstat(folder)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    # Ours but opened up: closed again.
    first.chmod(0o755)
    private_dir("previews", environ=env)
    assert stat.S_IMODE(os.lstat(first).st_mode) == 0o700
    with pytest.raises(ConfigError, match="one folder name"):
        private_dir("../x", environ=env)


@pytest.mark.parametrize("planted", ["apt-stream", "apt-stream/previews"])
def test_private_dir_refuses_a_planted_symlink(tmp_path, planted):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    trap = tmp_path / "attacker"
    trap.mkdir()
    link = tmp_path / "cache" / planted
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(trap, target_is_directory=True)
    with pytest.raises(ConfigError, match="symlink"):
        private_dir("previews", environ=env)
    # The flow's fallback: a fresh random private folder, never the symlink's target.
    fallback = private_dir("previews", environ=env, fallback_to_temp=True)
    try:
        assert trap not in fallback.resolve().parents and fallback.resolve() != trap
        assert stat.S_IMODE(os.lstat(fallback).st_mode) == 0o700
        assert list(trap.iterdir()) == []
    finally:
        fallback.rmdir()


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0,
                    reason="needs root to give a folder to another user")
def test_private_dir_refuses_someone_elses_folder(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    theirs = tmp_path / "cache" / "apt-stream"
    theirs.mkdir(parents=True, mode=0o700)
    os.chown(theirs, 54321, -1)
    with pytest.raises(ConfigError, match="owned by uid 54321"):
        private_dir("previews", environ=env)


def test_prefect_parameters_of_an_endpoint_hold_no_key():
    """The encoder Prefect uses for parameters (FastAPI's jsonable_encoder)."""
    from fastapi.encoders import jsonable_encoder

    from apt_stream.publish import TiledEndpoint

    endpoint = TiledEndpoint(uri="http://127.0.0.1:8000/api/v1", api_key="s3cr3tkey99")
    encoded = json.dumps(jsonable_encoder({"endpoint": endpoint, "nested": [endpoint]}))
    assert "s3cr3tkey99" not in encoded and "127.0.0.1:8000" in encoded
    assert "s3cr3tkey99" not in endpoint.model_dump_json()
    assert endpoint.api_key == "s3cr3tkey99"
