"""The beamline side: simulated devices, the ptycho-tomo plan, its documents and files."""

from __future__ import annotations

import json
import threading

import h5py
import numpy as np
import pytest
from event_model import DocumentNames, schema_validators

from apt_stream.errors import InputError, ServiceError
from apt_stream.io import write_scan
from apt_stream.plugins.bluesky import (
    FrameSource,
    SimPtychoDetector,
    make_publisher,
    make_run_engine,
    make_stages,
    ptycho_tomo_plan,
    replay_scan,
    start_proxy,
    synthetic_scan,
    wait_for_link,
)
from apt_stream.stream.paths import path_from_uri
from apt_stream.stream.schema import (
    ANGLES_STREAM,
    APT_KEY,
    FRAMES_DATASET,
    JOURNAL_FILE,
    parse_start_metadata,
)
from apt_stream.stream.source import ZmqDocumentSource
from apt_stream.stream.spool import replay_spool


@pytest.fixture(scope="module")
def RE():
    return make_run_engine()


def run_plan(RE, root, scan, **kwargs):
    docs = []
    token = RE.subscribe(lambda name, doc: docs.append((name, doc)))
    try:
        rot, stage_x, stage_y = make_stages()
        det = SimPtychoDetector(root=root)
        (uid,) = RE(ptycho_tomo_plan(det, rot, stage_x, stage_y, scan_source=scan, **kwargs))
    finally:
        RE.unsubscribe(token)
    return uid, docs


def test_plan_documents_follow_the_schema(RE, tmp_path):
    scan = synthetic_scan(n_angles=3, frames_per_angle=4)
    uid, docs = run_plan(RE, tmp_path, scan)
    names = [n for n, _ in docs]
    assert names[0] == "start" and names[-1] == "stop"
    for name, doc in docs:
        schema_validators[DocumentNames[name]].validate(doc)
    start = docs[0][1]
    assert start["uid"] == uid and start["num_points"] == 12
    info = parse_start_metadata(start)
    assert info.angles_deg == tuple(scan.angles_deg)
    assert info.frames_per_angle == (4, 4, 4)
    assert info.frame_shape == (16, 16) and info.probe_shape == (2, 16, 16)
    # Everything in the start document is plain JSON.
    json.dumps(start)
    descriptors = {d["name"]: d for n, d in docs if n == "descriptor"}
    assert set(descriptors) == {"primary", ANGLES_STREAM}
    frames_key = descriptors["primary"]["data_keys"][info.data_keys.frames]
    assert frames_key["external"] == "STREAM:" and frames_key["shape"] == [16, 16]
    (resource,) = [d for n, d in docs if n == "stream_resource"]
    assert resource["run_start"] == uid and resource["parameters"]["dataset"] == FRAMES_DATASET
    datums = [d for n, d in docs if n == "stream_datum"]
    assert [d["indices"]["start"] for d in datums] == list(range(12))
    events = [d for n, d in docs if n == "event" and d["descriptor"] == descriptors["primary"]["uid"]]
    assert len(events) == 12
    angle_events = [d for n, d in docs if n == "event" and d["descriptor"] == descriptors[ANGLES_STREAM]["uid"]]
    assert [e["data"][info.data_keys.done_angle_index] for e in angle_events] == [0, 1, 2]
    # Angle and positions are event data: the stage readbacks.
    first = events[0]["data"]
    assert first[info.data_keys.angle_deg] == pytest.approx(scan.angles_deg[0])
    assert (first[info.data_keys.position_y_px], first[info.data_keys.position_x_px]) == pytest.approx(
        tuple(scan.positions_px[0])
    )
    assert docs[-1][1]["exit_status"] == "success"


def test_detector_file_probe_and_journal(RE, tmp_path):
    scan = synthetic_scan(n_angles=2, frames_per_angle=3, seed=4)
    uid, docs = run_plan(RE, tmp_path, scan, angle_order=[1, 0])
    start = docs[0][1]
    info = parse_start_metadata(start)
    (resource,) = [d for n, d in docs if n == "stream_resource"]
    with h5py.File(path_from_uri(resource["uri"]), "r", swmr=True) as fh:
        written = fh[FRAMES_DATASET][()]
    # Angle 1 was acquired first, so the file holds its frames first.
    expected = np.concatenate([scan.frames[3:6], scan.frames[0:3]])
    np.testing.assert_array_equal(written, expected)
    with h5py.File(path_from_uri(info.probe_uri), "r") as fh:
        np.testing.assert_array_equal(fh[info.probe_dataset][()], scan.probe)
    journal = list(replay_spool(tmp_path / info.run_dir.split("/")[-1] / JOURNAL_FILE))
    assert [(n, d["uid"]) for n, d in journal] == [(n, d["uid"]) for n, d in docs]


def test_plan_stops_early_and_from_a_scan_file(RE, tmp_path):
    scan = synthetic_scan(n_angles=4, frames_per_angle=2)
    path = write_scan(tmp_path / "scan.h5", scan)
    uid, docs = run_plan(RE, tmp_path / "data", path, max_angles=2, rate_limit_hz=1e4)
    info = parse_start_metadata(docs[0][1])
    assert len(info.angles_deg) == 4  # the plan announces the planned scan
    assert sum(1 for n, _ in docs if n == "stream_datum") == 4
    assert docs[0][1]["sample"] == "scan"


def test_plan_refuses_bad_arguments(tmp_path):
    rot, stage_x, stage_y = make_stages()
    det = SimPtychoDetector(root=tmp_path)
    scan = synthetic_scan()
    with pytest.raises(InputError, match="apt_stream"):
        next(ptycho_tomo_plan(det, rot, stage_x, stage_y, scan_source=scan, md={APT_KEY: {}}))
    with pytest.raises(InputError, match="angle_order"):
        FrameSource(scan).acquisition_order(angle_order=[0, 0, 1])
    with pytest.raises(InputError, match="fields"):
        FrameSource(object())
    with pytest.raises(InputError, match="armed"):
        det.stage()


def test_proxy_forwards_publisher_json_and_stops(tmp_path):
    proxy = start_proxy()
    assert proxy.in_address.startswith("tcp://127.0.0.1:")
    source = ZmqDocumentSource(proxy.out_address, serializer="json", strict=True)
    got = []
    arrived = threading.Event()

    def collect(name, doc):
        got.append((name, doc))
        arrived.set()

    thread = threading.Thread(target=source.run, args=(collect,))
    thread.start()
    publisher = make_publisher(proxy.in_address, serializer="json")
    try:
        assert source.ready.wait(5)
        wait_for_link(publisher, source.probe_seen, timeout_s=5)
        publisher("start", {"uid": "u1", "time": np.float64(1.5), "scan_id": np.int64(3)})
        assert arrived.wait(5)
    finally:
        source.stop()
        thread.join(5)
        publisher.close()
        proxy.stop()
    assert not thread.is_alive()
    # numpy values crossed the wire as plain numbers; the probes never reached the callback.
    assert got == [("start", {"uid": "u1", "time": 1.5, "scan_id": 3})]
    assert source.stats.probes >= 1
    proxy.stop()  # twice is fine
    with pytest.raises(ServiceError):
        proxy.start()


def test_replay_scan_file_defaults_its_data_root(tmp_path):
    scan = synthetic_scan(n_angles=2, frames_per_angle=2)
    path = write_scan(tmp_path / "scan.h5", scan)
    proxy = start_proxy()
    try:
        uid = replay_scan(path, zmq_address=proxy.in_address, rate_hz=500.0, connect_grace_s=0.0)
    finally:
        proxy.stop()
    (journal,) = (tmp_path / "runs").glob(f"*/{JOURNAL_FILE}")
    docs = list(replay_spool(journal))
    assert docs[0][1]["uid"] == uid and docs[-1][0] == "stop"
    assert sum(1 for n, _ in docs if n == "stream_datum") == 4
    with pytest.raises(InputError, match="data_root"):
        replay_scan(scan, zmq_address=proxy.in_address)
