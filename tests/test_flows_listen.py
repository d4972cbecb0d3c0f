"""The listen flow end to end on loopback: RunEngine + simulated detector -> 0MQ proxy -> listen
flow (Listener, LiveReconstructor with the real physics engine, a real network checkpoint) ->
reconstruct_scan flow run -> Tiled. Everything real; only the scan is small."""

from __future__ import annotations

import threading

import pytest


@pytest.fixture
def checkpoint(tmp_path):
    """A randomly initialised network of the CPU preset, saved as a real checkpoint."""
    from apt_stream.model import create_model, save_checkpoint

    return save_checkpoint(tmp_path / "model" / "apt-cpu.safetensors", create_model("cpu"))


def test_listen_reconstructs_a_replayed_scan(prefect_harness, tiled_server, tiled_root, tmp_path,
                                             checkpoint, monkeypatch):
    from tiled.queries import Key

    from apt_stream.flows.listen import ListenConfig, LiveResources, listen
    from apt_stream.model import read_metadata
    from apt_stream.plugins.bluesky import replay_scan, start_proxy, synthetic_scan

    monkeypatch.setenv("APT_STREAM_TILED_URI", tiled_server.uri)
    monkeypatch.setenv("APT_STREAM_TILED_API_KEY", tiled_server.api_key)
    scan = synthetic_scan(n_angles=3, frames_per_angle=4, range_deg=10.0, seed=3)
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    published: list[str] = []

    with start_proxy() as proxy:
        def publish_scan(listener) -> None:
            def run() -> None:
                published.append(replay_scan(scan, zmq_address=proxy.in_address,
                                             data_root=runs_dir))
            threading.Thread(target=run, daemon=True).start()

        config = ListenConfig(
            proxy_address=proxy.out_address, data_roots=[str(runs_dir)],
            spool_dir=str(tmp_path / "spool"), backup_dir=str(tmp_path / "backup"),
            preview_dir=str(tmp_path / "previews"), checkpoint=str(checkpoint),
            n_star=3, theta_star_deg=10.0, max_runs=1, max_duration_s=120,
        )
        result = listen(config, LiveResources(on_ready=publish_scan))

    assert len(published) == 1
    run_uid = published[0]
    (summary,) = result["scans"]
    assert summary["run_uid"] == run_uid
    assert summary["status"] == "done", summary
    assert summary["angles"] == 3 and summary["reconstructions"] == 1
    assert result["publisher"]["failures"] == 0

    scan_node = tiled_root.search(Key("run_uid") == run_uid).values().first()
    md = scan_node.metadata
    assert md["status"] == "done" and md["sample"] == "synthetic"
    assert md["n_star"] == 3 and md["angles_used"] == 3
    assert md["model_checksum"] == read_metadata(checkpoint)["sha256"]
    assert tuple(scan_node["apt"].shape) == tuple(scan.volume_shape_zyx)
    assert len(scan_node["angles"].read()) == 3


def test_listen_stopped_short_then_full_run_back_to_back(prefect_harness, tiled_server, tiled_root,
                                                         tmp_path, checkpoint, monkeypatch):
    """Two runs through one listener: the first stops before N* (marked so, its Approximant
    still in Tiled, no APT volume), the second completes and gets its APT volume."""
    from tiled.queries import Key

    from apt_stream.flows.listen import ListenConfig, LiveResources, listen
    from apt_stream.plugins.bluesky import replay_scan, start_proxy, synthetic_scan

    monkeypatch.setenv("APT_STREAM_TILED_URI", tiled_server.uri)
    monkeypatch.setenv("APT_STREAM_TILED_API_KEY", tiled_server.api_key)
    scan = synthetic_scan(n_angles=4, frames_per_angle=3, range_deg=10.0, seed=5)
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    published: list[str] = []

    with start_proxy() as proxy:
        def publish_scans(listener) -> None:
            def run() -> None:
                published.append(replay_scan(scan, zmq_address=proxy.in_address,
                                             data_root=runs_dir, max_angles=2))
                published.append(replay_scan(scan, zmq_address=proxy.in_address,
                                             data_root=runs_dir))
            threading.Thread(target=run, daemon=True).start()

        config = ListenConfig(
            proxy_address=proxy.out_address, data_roots=[str(runs_dir)],
            spool_dir=str(tmp_path / "spool"), backup_dir=str(tmp_path / "backup"),
            preview_dir=str(tmp_path / "previews"), checkpoint=str(checkpoint),
            n_star=4, theta_star_deg=10.0, max_runs=2, max_duration_s=180,
        )
        result = listen(config, LiveResources(on_ready=publish_scans))

    assert len(published) == 2
    statuses = {s["run_uid"]: s["status"] for s in result["scans"]}
    assert statuses == {published[0]: "stopped_before_trigger", published[1]: "done"}
    short = tiled_root.search(Key("run_uid") == published[0]).values().first()
    assert short.metadata["status"] == "stopped_before_trigger"
    assert "approximant" in short and "apt" not in short
    full = tiled_root.search(Key("run_uid") == published[1]).values().first()
    assert full.metadata["status"] == "done"
    assert tuple(full["apt"].shape) == tuple(scan.volume_shape_zyx)


def test_listen_interim_previews(prefect_harness, tiled_server, tmp_path, checkpoint, monkeypatch):
    """preview_every=1 reconstructs after every finished angle before the trigger fires."""
    from apt_stream.flows.listen import ListenConfig, LiveResources, listen
    from apt_stream.plugins.bluesky import replay_scan, start_proxy, synthetic_scan

    monkeypatch.setenv("APT_STREAM_TILED_URI", tiled_server.uri)
    monkeypatch.setenv("APT_STREAM_TILED_API_KEY", tiled_server.api_key)
    scan = synthetic_scan(n_angles=3, frames_per_angle=3, range_deg=10.0, seed=7)
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    with start_proxy() as proxy:
        def publish_scan(listener) -> None:
            threading.Thread(
                target=lambda: replay_scan(scan, zmq_address=proxy.in_address, data_root=runs_dir),
                daemon=True,
            ).start()

        config = ListenConfig(
            proxy_address=proxy.out_address, data_roots=[str(runs_dir)],
            backup_dir=str(tmp_path / "backup"), preview_dir=str(tmp_path / "previews"),
            checkpoint=str(checkpoint), n_star=3, theta_star_deg=10.0, preview_every=1,
            max_runs=1, max_duration_s=120,
        )
        result = listen(config, LiveResources(on_ready=publish_scan))
    (summary,) = result["scans"]
    assert summary["status"] == "done"
    # Previews after angles 1 and 2, the trigger at 3 (the final one re-announces it).
    assert summary["reconstructions"] >= 3


def test_listen_config_is_checked():
    from pydantic import ValidationError

    from apt_stream.flows.listen import ListenConfig

    with pytest.raises(ValidationError, match="data_roots"):
        ListenConfig(data_roots=[])
    with pytest.raises(ValidationError, match="extra"):
        ListenConfig(data_roots=["/d"], tiled_api_key="k")
    config = ListenConfig(data_roots=["/d"], tiled_uri="http://127.0.0.1:1/api/v1")
    endpoint = config.tiled_endpoint({"APT_STREAM_TILED_API_KEY": "abc"})
    assert endpoint.api_key == "abc" and endpoint.uri == "http://127.0.0.1:1/api/v1"
    assert ListenConfig(data_roots=["/d"]).tiled_endpoint({}) is None


def test_model_reconstructor_defaults_to_the_shipped_model(tmp_path):
    from apt_stream.errors import ModelError
    from apt_stream.flows.wiring import model_reconstructor
    from apt_stream.model import read_metadata
    from apt_stream.reconstruct import DEFAULT_CHECKPOINT

    _, info = model_reconstructor(None)
    assert info["model_checksum"] == read_metadata(DEFAULT_CHECKPOINT)["sha256"]
    with pytest.raises(ModelError, match="does not exist"):
        model_reconstructor(tmp_path / "missing.safetensors")


def test_a_run_whose_stop_never_comes_does_not_hold_up_the_next(prefect_harness, tiled_server,
                                                                tiled_root, tmp_path, checkpoint,
                                                                monkeypatch):
    """Each scan's flow runs on its own thread: the first run's stop is lost, the second run
    still reconstructs at once (it used to wait attach_timeout_s and run outside Prefect)."""
    import time

    from tiled.queries import Key

    from apt_stream.flows.listen import ListenConfig, LiveResources, listen
    from apt_stream.plugins.bluesky import (
        make_publisher,
        make_run_engine,
        replay_scan,
        start_proxy,
        synthetic_scan,
    )

    monkeypatch.setenv("APT_STREAM_TILED_URI", tiled_server.uri)
    monkeypatch.setenv("APT_STREAM_TILED_API_KEY", tiled_server.api_key)
    scan = synthetic_scan(n_angles=3, frames_per_angle=3, range_deg=10.0, seed=6)
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    published: list[str] = []
    took: list[float] = []

    with start_proxy() as proxy:
        def publish_scans(listener) -> None:
            def run() -> None:
                publisher = make_publisher(proxy.in_address)
                RE = make_run_engine()
                # Run 1 loses its stop on the wire (and its journal is not there to help).
                published.append(replay_scan(
                    scan, publisher=lambda name, doc: None if name == "stop" else
                    publisher(name, doc), run_engine=RE, data_root=runs_dir))
                for journal in runs_dir.glob("*/documents.jsonl"):
                    journal.unlink()
                t0 = time.monotonic()
                published.append(replay_scan(scan, publisher=publisher, run_engine=RE,
                                             data_root=runs_dir))
                took.append(t0)
            threading.Thread(target=run, daemon=True).start()

        config = ListenConfig(
            proxy_address=proxy.out_address, data_roots=[str(runs_dir)],
            spool_dir=str(tmp_path / "spool"), backup_dir=str(tmp_path / "backup"),
            preview_dir=str(tmp_path / "previews"), checkpoint=str(checkpoint),
            n_star=3, theta_star_deg=10.0, max_runs=1, max_duration_s=120,
            attach_timeout_s=30.0,
        )
        result = listen(config, LiveResources(on_ready=publish_scans))
        finished = time.monotonic()

    assert len(published) == 2
    assert finished - took[0] < 25, finished - took[0]  # not behind a 30 s attach timeout
    second = tiled_root.search(Key("run_uid") == published[1]).values().first()
    assert second.metadata["status"] == "done"
    summary = {s["run_uid"]: s for s in result["scans"]}
    assert summary[published[1]]["status"] == "done"
    assert summary[published[1]]["tasks"] > 0  # it ran as Prefect tasks, in its own flow run
