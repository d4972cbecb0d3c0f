"""TiledPublisher against a real Tiled server on loopback (the session's ``tiled_server``)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from apt_stream.errors import InputError
from apt_stream.publish import TiledPublisher, read_backup
from apt_stream.stream.messages import RunHeader

DEPLOY_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "tiled-config.yml"
SHAPE = (4, 6, 8)
VOXEL_M = 14e-9


def make_header(run_uid: str, *, scan_id: int, sample: str = "ic-test") -> RunHeader:
    return RunHeader(
        run_uid=run_uid, scan_id=scan_id, sample=sample, preset="tiny", energy_kev=8.8,
        detector_distance_m=1.92, detector_pixel_m=75e-6, object_pixel_m=VOXEL_M,
        field_shape=(22, 30), frame_shape=(16, 16), n_slices=3,
        slice_spacing_m=np.full(5, 20e-9), angles_deg=np.linspace(-17, 17, 5),
        frames_per_angle=(4,) * 5, volume_shape_zyx=SHAPE,
        probe=np.ones((2, 16, 16), np.complex64),
    )


class Engine:
    """The part of the streaming engine the sink reads: the Approximant so far."""

    def __init__(self, volume: np.ndarray) -> None:
        self._volume = volume

    def volume(self) -> np.ndarray:
        return self._volume


def summary(angle_id: int, angle_deg: float) -> dict:
    return {"angle_id": angle_id, "angle_deg": angle_deg, "n_frames": 4, "seconds": 0.25,
            "loss_pass1": 2.0, "loss_pass2": 1.0}


@pytest.fixture
def run_uid() -> str:
    return f"test-{uuid.uuid4()}"


@pytest.fixture
def scan_id() -> int:
    return int(uuid.uuid4().int % 1_000_000_000)


@pytest.fixture
def publisher(tiled_root, tmp_path) -> TiledPublisher:
    return TiledPublisher(
        tiled_root, backup_dir=tmp_path / "backup",
        run_metadata={"n_star": 5, "theta_star_deg": 17.0, "model_name": "tiny"},
    )


def test_run_started_makes_a_container_found_by_key_queries(publisher, tiled_root, run_uid,
                                                            scan_id):
    from tiled.queries import Key

    publisher.run_started(make_header(run_uid, scan_id=scan_id))
    found = tiled_root.search(Key("scan_id") == scan_id)
    assert list(found) == [run_uid]
    md = found[run_uid].metadata
    assert md["run_uid"] == run_uid
    assert md["status"] == "acquiring"
    assert md["sample"] == "ic-test"
    assert md["n_star"] == 5 and md["theta_star_deg"] == 17.0
    assert md["voxel_size_m"] == pytest.approx(VOXEL_M)
    assert md["software_version"]
    assert "probe" not in md  # arrays that big stay out of the metadata
    both = tiled_root.search(Key("run_uid") == run_uid).search(Key("status") == "acquiring")
    assert list(both) == [run_uid]


def test_approximant_is_rewritten_and_angles_table_grows(publisher, tiled_root, run_uid, scan_id):
    publisher.run_started(make_header(run_uid, scan_id=scan_id))
    first = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    second = first + 1.0
    publisher.angle_finished(run_uid, summary(0, -17.0), Engine(first))
    publisher.angle_finished(run_uid, summary(3, 8.5), Engine(second))

    scan = tiled_root[run_uid]
    approximant = scan["approximant"]
    np.testing.assert_array_equal(approximant.read(), second)
    assert tuple(approximant.dims) == ("z", "y", "x")
    assert approximant.metadata["voxel_size_m"] == pytest.approx([VOXEL_M] * 3)
    table = scan["angles"].read()
    assert list(table["angle_id"]) == [0, 3]
    assert list(table["angle_deg"]) == [-17.0, 8.5]
    assert list(table["frames"]) == [4, 4]
    assert list(table["loss"]) == [1.0, 1.0]
    assert scan.metadata["angles_used"] == 2
    assert scan.metadata["angles_finished_deg"] == [-17.0, 8.5]


def test_throttled_approximant_goes_up_before_reconstruction_and_at_stop(tiled_root, tmp_path,
                                                                          run_uid, scan_id):
    publisher = TiledPublisher(tiled_root, backup_dir=tmp_path / "backup",
                               approximant_every_s=3600)
    publisher.run_started(make_header(run_uid, scan_id=scan_id))
    for n in range(3):
        publisher.angle_finished(run_uid, summary(n, float(n)), np.full(SHAPE, float(n)))
    scan = tiled_root[run_uid]
    # The first angle went up; the next two only as rows.
    np.testing.assert_array_equal(scan["approximant"].read(), np.zeros(SHAPE))
    assert len(scan["angles"].read()) == 3
    assert tiled_root[run_uid].metadata["angles_used"] == 1
    publisher.reconstruction_ready(run_uid, {"apt": np.ones(SHAPE)}, final=False)
    np.testing.assert_array_equal(scan["approximant"].read(), np.full(SHAPE, 2.0))
    assert tiled_root[run_uid].metadata["angles_used"] == 3
    publisher.angle_finished(run_uid, summary(3, 3.0), np.full(SHAPE, 3.0))
    publisher.run_stopped(run_uid, "success")
    np.testing.assert_array_equal(scan["approximant"].read(), np.full(SHAPE, 3.0))
    assert tiled_root[run_uid].metadata["angles_used"] == 4


def test_volumes_carry_dims_and_voxel_sizes_and_slice(publisher, tiled_root, run_uid, scan_id):
    publisher.run_started(make_header(run_uid, scan_id=scan_id))
    # The network doubles the lateral sampling: its voxels are half as wide in y and x.
    apt = np.arange(4 * 12 * 16, dtype=np.float32).reshape(4, 12, 16)
    fbp = np.zeros(SHAPE, np.float64)
    publisher.reconstruction_ready(run_uid, {"apt": apt, "fbp": fbp}, final=False,
                                   metadata={"model_checksum": "abc123"})
    scan = tiled_root[run_uid]
    node = scan["apt"]
    assert tuple(node.dims) == ("z", "y", "x")
    assert node.metadata["voxel_size_m"] == pytest.approx([VOXEL_M, VOXEL_M / 2, VOXEL_M / 2])
    np.testing.assert_array_equal(node[2], apt[2])
    baseline = scan["baselines"]["fbp"]
    assert baseline.dtype == np.float32 and tuple(baseline.shape) == SHAPE
    assert scan.metadata["status"] == "reconstructing"
    assert scan.metadata["model_checksum"] == "abc123"
    assert scan.metadata["volumes"] == ["apt", "baselines/fbp"]


@pytest.mark.parametrize(
    ("final", "given", "expected"),
    [(True, "success", "done"), (False, "abort", "stopped_before_trigger"),
     (True, "fail", "failed"), (False, "stopped_before_trigger", "stopped_before_trigger")],
)
def test_status_transitions(publisher, tiled_root, run_uid, scan_id, final, given, expected):
    publisher.run_started(make_header(run_uid, scan_id=scan_id))
    assert tiled_root[run_uid].metadata["status"] == "acquiring"
    publisher.angle_finished(run_uid, summary(0, 0.0), np.ones(SHAPE))
    if final:
        publisher.reconstruction_ready(run_uid, {"apt": np.ones(SHAPE)}, final=False)
        assert tiled_root[run_uid].metadata["status"] == "reconstructing"
        publisher.reconstruction_ready(run_uid, {"apt": np.ones(SHAPE)}, final=True)
    publisher.run_stopped(run_uid, given)
    md = tiled_root[run_uid].metadata
    assert md["status"] == expected
    assert md["timings"]["total_s"] >= md["timings"]["last_angle_s"] >= 0
    assert md["timings"]["tiled_s"] > 0
    assert publisher.stats()["open_runs"] == []


def test_metrics_table_is_replaced_not_appended(publisher, tiled_root, run_uid, scan_id):
    publisher.run_started(make_header(run_uid, scan_id=scan_id))
    publisher.metrics_ready(run_uid, {"apt": {"pcc": 0.5}, "fbp": {"pcc": 0.2, "dsc": 0.1}})
    publisher.metrics_ready(run_uid, {"apt": {"pcc": 0.9, "dsc": 0.8}})
    scan = tiled_root[run_uid]
    table = scan["metrics"].read()
    assert list(table["volume"]) == ["apt"]
    assert float(table["pcc"][0]) == pytest.approx(0.9)
    assert scan.metadata["metrics"]["apt"]["dsc"] == pytest.approx(0.8)


def test_time_in_tiled_is_measured(publisher, run_uid, scan_id):
    before = publisher.stats()
    publisher.run_started(make_header(run_uid, scan_id=scan_id))
    publisher.angle_finished(run_uid, summary(0, 0.0), np.ones(SHAPE))
    after = publisher.stats()
    assert after["tiled_ops"] == before["tiled_ops"] + 2
    assert after["tiled_s"] > before["tiled_s"]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p, uid: p.run_started({"run_uid": "a/b"}), "run_uid"),
        (lambda p, uid: p.run_started({"scan_id": 3}), "run_uid"),
        (lambda p, uid: p.angle_finished(uid, summary(0, 0.0), np.ones((4, 4))), "3-D"),
        (lambda p, uid: p.angle_finished(uid, {"frames": 3}, np.ones(SHAPE)), "angle_deg"),
        (lambda p, uid: p.angle_finished(uid, summary(0, np.nan), np.ones(SHAPE)), "non-finite"),
        (lambda p, uid: p.reconstruction_ready(uid, {}, final=True), "non-empty"),
        (lambda p, uid: p.reconstruction_ready(uid, {"angles": np.ones(SHAPE)}, final=True),
         "reserved"),
        (lambda p, uid: p.reconstruction_ready(uid, {"apt": np.ones(SHAPE) * 1j}, final=True),
         "real"),
        (lambda p, uid: p.run_stopped(uid, ""), "status must be"),
        (lambda p, uid: p.run_stopped(uid, None), "status must be"),
        (lambda p, uid: p.update_status(uid, " done"), "status must be"),
        (lambda p, uid: p.update_status(uid, 3), "status must be"),
    ],
)
def test_bad_input_names_the_problem(publisher, run_uid, scan_id, call, message):
    publisher.run_started(make_header(run_uid, scan_id=scan_id))
    with pytest.raises(InputError, match=message):
        call(publisher, run_uid)


def test_offline_publisher_writes_a_replayable_backup(tmp_path, tiled_root, run_uid, scan_id):
    from apt_stream.publish import replay_backup

    offline = TiledPublisher(None, backup_dir=tmp_path / "backup")
    offline.run_started(make_header(run_uid, scan_id=scan_id))
    offline.angle_finished(run_uid, summary(0, -17.0), np.zeros(SHAPE))
    offline.angle_finished(run_uid, summary(1, 17.0), np.full(SHAPE, 2.0))
    offline.reconstruction_ready(run_uid, {"apt": np.ones(SHAPE)}, final=True)
    offline.run_stopped(run_uid, "success")

    path = tmp_path / "backup" / f"{run_uid}.jsonl"
    lines = [json.loads(t) for t in path.read_text().splitlines()]
    assert [rec["call"] for rec in lines] == [
        "run_started", "angle_finished", "angle_finished", "reconstruction_ready", "run_stopped",
    ]
    assert lines[0]["error"] == "Tiled offline"
    records = read_backup(path)
    np.testing.assert_array_equal(records[2]["arrays"]["approximant"], np.full(SHAPE, 2.0))

    online = TiledPublisher(tiled_root, backup_dir=tmp_path / "unused")
    assert replay_backup(tmp_path / "backup", online) == 5
    scan = tiled_root[run_uid]
    assert scan.metadata["status"] == "done"
    assert scan.metadata["scan_id"] == scan_id
    assert list(scan["angles"].read()["angle_deg"]) == [-17.0, 17.0]
    np.testing.assert_array_equal(scan["apt"].read(), np.ones(SHAPE))


def test_tiled_outage_mid_run_goes_to_backup_without_raising(tmp_path, tiled_root, run_uid,
                                                             scan_id):
    """Start a real server from deploy/tiled-config.yml, take it down mid-run, keep going."""
    import stamina

    from apt_stream.plugins.tiled import serve_config
    from apt_stream.publish import connect, replay_backup

    header = make_header(run_uid, scan_id=scan_id)
    with serve_config(DEPLOY_CONFIG, data_dir=tmp_path / "tiled") as (endpoint, proc):
        # retry_every_s=None: no automatic replay (tests/test_publish_outage.py covers that).
        publisher = TiledPublisher(connect(endpoint), backup_dir=tmp_path / "backup",
                                   retry_every_s=None)
        publisher.run_started(header)
        publisher.angle_finished(run_uid, summary(0, -17.0), np.zeros(SHAPE))
        # The deployed config keeps the angles table in SQLite: it must be readable.
        assert list(connect(endpoint)[run_uid]["angles"].read()["angle_deg"]) == [-17.0]
        proc.terminate()
        proc.wait(10)
        # Tiled's client would retry a refused connection for up to 45 s; one try suffices here.
        with stamina.set_testing(True, attempts=1):
            publisher.angle_finished(run_uid, summary(1, 17.0), np.ones(SHAPE))
            publisher.reconstruction_ready(run_uid, {"apt": np.ones(SHAPE)}, final=True)
            publisher.run_stopped(run_uid, "success")
    stats = publisher.stats()
    assert stats["failures"] == 1  # only the first failing call touched the network
    records = read_backup(tmp_path / "backup" / f"{run_uid}.jsonl")
    assert [r["call"] for r in records] == [
        "run_started", "angle_finished", "reconstruction_ready", "run_stopped",
    ]
    assert "ConnectError" in records[1]["error"]
    assert endpoint.api_key not in (tmp_path / "backup" / f"{run_uid}.jsonl").read_text()

    # Once Tiled is back (here: the session's server), the backup fills the scan in.
    publisher_after = TiledPublisher(tiled_root, backup_dir=tmp_path / "unused")
    replay_backup(tmp_path / "backup" / f"{run_uid}.jsonl", publisher_after)
    scan = tiled_root[run_uid]
    assert scan.metadata["status"] == "done"
    np.testing.assert_array_equal(scan["approximant"].read(), np.ones(SHAPE))
    assert list(scan["angles"].read()["angle_deg"]) == [17.0]
