"""Raw runs in Tiled and back: a real RunEngine runs the ptycho-tomo plan with bluesky-tiled-plugins'
TiledWriter subscribed (apt_stream.publish.raw.RawRunStore) into a real Tiled server on
127.0.0.1; ``apt-stream reconstruct tiled://…`` and the ``reconstruct-stored-run`` flow read it
back through the live pipeline, and the result links to the raw run (and the raw run is found
from it)."""

from __future__ import annotations

import threading
import time
from urllib.parse import urlsplit

import h5py
import numpy as np
import pytest

#: The tiny preset: 7 angles over ±17°, 117 frames of 16 x 16 each.
N_ANGLES, RANGE, PER_ANGLE = 7, 17.0, 117


@pytest.fixture(scope="module")
def tiny_scan():
    from apt_stream.config import get_preset
    from apt_stream.sim.acquire import simulate_scan

    return simulate_scan(get_preset("tiny"), seed=11)


def acquire_into_tiled(root, runs_dir, scan=None, *, plan: str = "ptycho"):
    """Run a plan under a real RunEngine with TiledWriter (via RawRunStore) subscribed."""
    from apt_stream.plugins.bluesky.devices import SimPtychoDetector, make_stages
    from apt_stream.plugins.bluesky.plan import ptycho_tomo_plan
    from apt_stream.plugins.bluesky.replay import make_run_engine
    from apt_stream.publish.raw import RawRunStore

    store = RawRunStore(root)
    RE = make_run_engine()
    RE.subscribe(store)
    rot, stage_x, stage_y = make_stages()
    if plan == "count":
        import bluesky.plans as bp

        (uid,) = RE(bp.count([rot], num=2))
    else:
        detector = SimPtychoDetector(root=runs_dir)
        (uid,) = RE(ptycho_tomo_plan(detector, rot, stage_x, stage_y, scan_source=scan))
    store.close()
    assert store.stats()["stored"] == [uid], store.stats()
    return uid


@pytest.fixture(scope="module")
def stored(tiled_server, tmp_path_factory, tiny_scan):
    from apt_stream.publish.server import connect

    runs_dir = tmp_path_factory.mktemp("raw-runs")
    root = connect(tiled_server)
    uids = [acquire_into_tiled(root, runs_dir, tiny_scan) for _ in range(2)]
    return {"uids": uids, "runs_dir": runs_dir, "host": urlsplit(tiled_server.uri).netloc}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from apt_stream.model import create_model, save_checkpoint

    return save_checkpoint(tmp_path_factory.mktemp("model") / "apt-cpu.safetensors",
                           create_model("cpu"))


def test_tiledwriter_stores_the_raw_run_and_its_frames(stored, tiled_root):
    from databroker.client import BlueskyRun, CatalogOfBlueskyRuns

    uid = stored["uids"][0]
    raw = tiled_root["raw"]
    assert isinstance(raw, CatalogOfBlueskyRuns)  # databroker's catalog of runs
    run = raw[uid]
    assert isinstance(run, BlueskyRun)
    assert run.start["plan_name"] == "ptycho_tomo_plan" and run.stop["exit_status"] == "success"
    assert run.stop["num_events"] == {"primary": N_ANGLES * PER_ANGLE, "angles": N_ANGLES}
    # The frames are the detector's HDF5 file, served by Tiled (readable storage), row for row.
    frames = run["primary"]["ptycho_det_frames"].read()
    run_dir = run.start["apt_stream"]["run_dir"]
    with h5py.File(f"{run_dir}/frames.h5", "r") as fh:
        np.testing.assert_array_equal(frames, fh["/entry/data/frames"][()])
    assert frames.shape == (N_ANGLES * PER_ANGLE, 16, 16)


def test_stored_run_documents_replay_in_acquisition_order(stored, tiled_server):
    from apt_stream.stream.tiled_source import open_tiled_run

    uid = stored["uids"][0]
    source = open_tiled_run(f"tiled://{stored['host']}/raw/{uid}", api_key=tiled_server.api_key)
    docs = list(source)  # validated against event-model's schemas on the way
    names = [n for n, _ in docs]
    assert names[:4] == ["start", "descriptor", "descriptor", "stream_resource"]
    assert names[-1] == "stop" and names.count("stream_datum") == N_ANGLES * PER_ANGLE
    events = [d for n, d in docs if n == "event"]
    assert len(events) == N_ANGLES * PER_ANGLE + N_ANGLES
    # Every angle's completion event comes after that angle's frames.
    keys = source.info.data_keys
    seen: dict[int, int] = {}
    for ev in events:
        if keys.angle_index in ev["data"]:
            seen[ev["data"][keys.angle_index]] = seen.get(ev["data"][keys.angle_index], 0) + 1
        else:
            assert seen.get(ev["data"][keys.done_angle_index]) == PER_ANGLE
    assert source.raw_run["tiled_path"] == f"raw/{uid}"


def test_cli_reconstructs_a_stored_run_and_links_back(stored, tiled_server, tiled_root,
                                                       checkpoint, monkeypatch, tmp_path):
    from tiled.queries import Key
    from typer.testing import CliRunner

    from apt_stream.cli import app

    uid = stored["uids"][0]
    monkeypatch.setenv("APT_STREAM_TILED_API_KEY", tiled_server.api_key)
    monkeypatch.chdir(tmp_path)  # the publisher's backup folder
    t0 = time.perf_counter()
    out = CliRunner().invoke(app, [
        "reconstruct", f"tiled://{stored['host']}/raw/{uid}", "--data-root",
        str(stored["runs_dir"]), "--angles", str(N_ANGLES), "--range", str(RANGE),
        "--checkpoint", str(checkpoint)])
    seconds = time.perf_counter() - t0
    assert out.exit_code == 0, out.output
    assert tiled_server.api_key not in out.output
    print(f"reconstruct tiled:// (tiny: {N_ANGLES} angles x {PER_ANGLE} frames): {seconds:.2f} s")

    scan = tiled_root[uid]
    md = scan.metadata
    assert md["status"] == "done" and md["angles_used"] == N_ANGLES
    assert md["raw_run"]["uid"] == uid and md["raw_run"]["tiled_path"] == f"raw/{uid}"
    apt = scan["apt"].read()
    assert apt.shape == tuple(md["volume_shape_zyx"]) and np.isfinite(apt).all()
    # Reconstruction -> raw run, and raw run -> its reconstructions.
    raw = tiled_root[md["raw_run"]["tiled_path"]]
    assert raw.start["uid"] == uid
    hits = tiled_root.search(Key("raw_run.uid") == raw.start["uid"])
    assert list(hits) == [uid]


def test_stored_run_bad_inputs_say_what_is_wrong(stored, tiled_server, tiled_root, tmp_path,
                                                  monkeypatch):
    from typer.testing import CliRunner

    from apt_stream.cli import app
    from apt_stream.errors import InputError
    from apt_stream.publish.server import check_writable
    from apt_stream.stream.tiled_source import open_tiled_run, parse_tiled_uri

    check_writable(tiled_server)  # a plain container (not a run) to point at
    host, key = stored["host"], tiled_server.api_key
    with pytest.raises(InputError, match="scheme 'http'"):
        parse_tiled_uri(f"http://{host}/raw/x")
    with pytest.raises(InputError, match="names no run"):
        parse_tiled_uri(f"tiled://{host}/")
    with pytest.raises(InputError, match="not in the address"):
        parse_tiled_uri(f"tiled://{host}/raw/x?api_key=secret")
    with pytest.raises(InputError, match="no run 'no-such-uid' in raw"):
        open_tiled_run(f"tiled://{host}/raw/no-such-uid", api_key=key)
    with pytest.raises(InputError, match="no container 'nowhere'"):
        open_tiled_run(f"tiled://{host}/nowhere/x", api_key=key)
    # A reconstruction container is not a Bluesky run.
    with pytest.raises(InputError, match="is not a Bluesky run"):
        open_tiled_run(f"tiled://{host}/{FLIGHT}", api_key=key)
    # A Bluesky run of another plan.
    other = acquire_into_tiled(tiled_root, tmp_path, plan="count")
    with pytest.raises(InputError, match="not a ptycho-tomo scan.*plan_name 'count'"):
        open_tiled_run(f"tiled://{host}/raw/{other}", api_key=key)

    monkeypatch.setenv("APT_STREAM_TILED_API_KEY", key)
    uid = stored["uids"][0]
    runner = CliRunner()
    res = runner.invoke(app, ["reconstruct", f"tiled://{host}/raw/{uid}"])
    assert res.exit_code == 1 and "--data-root" in res.output and uid in res.output
    # Files outside the data roots are refused, naming the file.
    res = runner.invoke(app, ["reconstruct", f"tiled://{host}/raw/{uid}", "--data-root",
                              str(tmp_path)])
    assert res.exit_code == 1 and "outside the data roots" in res.output, res.output
    res = runner.invoke(app, ["reconstruct", f"tiled://{host}/raw/{uid}", "-o", "x.h5",
                              "--data-root", str(tmp_path)])
    assert res.exit_code == 1 and "for scan files only" in res.output
    # A wrong key: one line naming the server, never the key.
    res = runner.invoke(app, ["reconstruct", f"tiled://{host}/raw/{uid}", "--data-root",
                              str(tmp_path), "--api-key", "wrongkey12345678"])
    assert res.exit_code == 1 and host in res.output and "wrongkey12345678" not in res.output


FLIGHT = "apt-stream-flight-check"


def test_end_of_run_flow_reconstructs_a_stored_run(prefect_harness, stored, tiled_server,
                                                   tiled_root, checkpoint, monkeypatch, tmp_path):
    from apt_stream.flows.stored import StoredRunConfig, reconstruct_stored_run

    uid = stored["uids"][1]
    monkeypatch.setenv("APT_STREAM_TILED_API_KEY", tiled_server.api_key)
    config = StoredRunConfig(data_roots=[str(stored["runs_dir"])], checkpoint=str(checkpoint),
                             n_star=N_ANGLES, theta_star_deg=RANGE,
                             backup_dir=str(tmp_path / "backup"),
                             preview_dir=str(tmp_path / "previews"))
    result = reconstruct_stored_run(f"tiled://{stored['host']}/raw/{uid}", config)
    assert result["status"] == "done", result
    assert result["scan"]["status"] == "done" and result["scan"]["angles"] == N_ANGLES
    assert result["raw_run"]["uid"] == uid
    md = tiled_root[uid].metadata
    assert md["raw_run"]["tiled_path"] == f"raw/{uid}" and md["status"] == "done"
    assert md["n_star"] == N_ANGLES


def test_listen_stores_each_raw_run_and_links_it(prefect_harness, tiled_server, tiled_root,
                                                 tmp_path, checkpoint, monkeypatch, tiny_scan):
    from apt_stream.flows.listen import ListenConfig, LiveResources, listen
    from apt_stream.plugins.bluesky import replay_scan, start_proxy

    monkeypatch.setenv("APT_STREAM_TILED_URI", tiled_server.uri)
    monkeypatch.setenv("APT_STREAM_TILED_API_KEY", tiled_server.api_key)
    scan = tiny_scan
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    published: list[str] = []
    with start_proxy() as proxy:
        def publish_scan(listener) -> None:
            threading.Thread(target=lambda: published.append(replay_scan(
                scan, zmq_address=proxy.in_address, data_root=runs_dir)), daemon=True).start()

        config = ListenConfig(
            proxy_address=proxy.out_address, data_roots=[str(runs_dir)],
            spool_dir=str(tmp_path / "spool"), backup_dir=str(tmp_path / "backup"),
            preview_dir=str(tmp_path / "previews"), checkpoint=str(checkpoint),
            n_star=N_ANGLES, theta_star_deg=RANGE, max_runs=1, max_duration_s=120)
        result = listen(config, LiveResources(on_ready=publish_scan))
    (uid,) = published
    assert result["raw_runs"]["stored"] == [uid], result["raw_runs"]
    md = tiled_root[uid].metadata
    assert md["status"] == "done" and md["raw_run"]["tiled_path"] == f"raw/{uid}"
    raw = tiled_root["raw"][uid]
    assert raw.stop["num_events"]["primary"] == N_ANGLES * PER_ANGLE
    assert raw["primary"]["ptycho_det_frames"].shape == (N_ANGLES * PER_ANGLE, 16, 16)


def test_docs_end_of_run_snippet_starts_the_deployment(prefect_harness):
    """docs/streaming.md's RunEngine callback, verbatim: a stop document starts a run of the
    `end-of-run` deployment for that run's Tiled URI (a start document starts nothing)."""
    from pathlib import Path

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from test_docs_run import python_blocks

    from apt_stream.flows.stored import reconstruct_stored_run

    doc = Path(__file__).resolve().parents[1] / "docs" / "streaming.md"
    (block,) = [b for b in python_blocks(doc) if "def end_of_run" in b]
    deployment_id = reconstruct_stored_run.to_deployment(
        name="end-of-run", parameters={"config": {"data_roots": ["/data/apt-stream/runs"]}},
    ).apply()
    namespace: dict = {}
    exec(compile(block, str(doc), "exec"), namespace)
    namespace["end_of_run"]("start", {"uid": "abc"})
    namespace["end_of_run"]("stop", {"run_start": "abc"})
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
            id=DeploymentFilterId(any_=[deployment_id])))
    assert len(runs) == 1
    assert runs[0].parameters["uri"] == "tiled://tiled.beamline:8000/raw/abc"
