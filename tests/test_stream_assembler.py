"""Run assembly: documents -> frame batches, data roots, late data, bad frames, scan files."""

from __future__ import annotations

import copy
import shutil

import h5py
import numpy as np
import pytest

from apt_stream.errors import ConfigError, DocumentError
from apt_stream.io import write_scan
from apt_stream.plugins.bluesky import (
    SimPtychoDetector,
    make_run_engine,
    make_stages,
    ptycho_tomo_plan,
    synthetic_scan,
)
from apt_stream.stream import FrameBatch, RunAssembler, RunHeader, RunStopped, ScanFileSource
from apt_stream.stream.paths import DataRoots, file_uri
from apt_stream.stream.schema import APT_KEY, FRAMES_DATASET


@pytest.fixture(scope="module")
def RE():
    return make_run_engine()


def acquire(RE, root, scan, **kwargs):
    docs = []
    token = RE.subscribe(lambda name, doc: docs.append((name, copy.deepcopy(doc))))
    try:
        rot, stage_x, stage_y = make_stages()
        RE(ptycho_tomo_plan(SimPtychoDetector(root=root), rot, stage_x, stage_y,
                            scan_source=scan, **kwargs))
    finally:
        RE.unsubscribe(token)
    return docs


def assemble(docs, roots, **kwargs):
    out = []
    assembler = RunAssembler(out.append, data_roots=roots, **kwargs)
    for name, doc in docs:
        assembler(name, doc)
    assert assembler.drain(timeout_s=30)
    return out, assembler


def frames_by_angle(messages):
    frames, positions, complete = {}, {}, []
    for m in messages:
        if isinstance(m, FrameBatch):
            frames.setdefault(m.angle_id, []).append(m.frames)
            positions.setdefault(m.angle_id, []).append(m.positions_px)
            if m.angle_complete:
                complete.append(m.angle_id)
    return (
        {k: np.concatenate(v) for k, v in frames.items()},
        {k: np.concatenate(v) for k, v in positions.items()},
        complete,
    )


def test_frames_arrive_per_angle_in_any_order(RE, tmp_path):
    scan = synthetic_scan(n_angles=3, frames_per_angle=4, seed=1)
    docs = acquire(RE, tmp_path, scan, angle_order=[2, 0, 1])
    messages, assembler = assemble(docs, [tmp_path], max_batch_frames=3)
    header = messages[0]
    assert isinstance(header, RunHeader)
    np.testing.assert_array_equal(header.probe, scan.probe)
    assert header.frame_shape == (16, 16) and header.n_angles == 3
    assert header.nominal_step_deg == pytest.approx(17.0)
    frames, positions, complete = frames_by_angle(messages)
    assert complete == [2, 0, 1]
    for n in range(3):
        expected, expected_pos = scan.frames_of(n)
        np.testing.assert_array_equal(frames[n], expected)
        np.testing.assert_allclose(positions[n], expected_pos)
    batches = [m for m in messages if isinstance(m, FrameBatch)]
    assert all(b.frames.dtype == np.float32 and b.n_frames <= 3 for b in batches)
    assert {b.angle_deg for b in batches if b.angle_id == 0} == {-17.0}
    stop = messages[-1]
    assert isinstance(stop, RunStopped)
    assert (stop.exit_status, stop.n_frames, stop.n_dropped) == ("success", 12, 0)
    assert not assembler.problems


def test_bad_frames_are_dropped_and_reported(RE, tmp_path):
    scan = synthetic_scan(n_angles=2, frames_per_angle=3, seed=2)
    scan.frames[1, 3, 3] = np.nan
    scan.frames[4, 0, 0] = -1.0
    messages, assembler = assemble(acquire(RE, tmp_path, scan), [tmp_path])
    frames, _, complete = frames_by_angle(messages)
    assert complete == [0, 1]
    np.testing.assert_array_equal(frames[0], scan.frames[[0, 2]])
    np.testing.assert_array_equal(frames[1], scan.frames[[3, 5]])
    assert sum(m.n_dropped for m in messages if isinstance(m, FrameBatch)) == 2
    assert messages[-1].n_dropped == 2
    reports = " | ".join(assembler.problems)
    assert "NaN" in reports and "negative" in reports


def _with_uri(docs, uri):
    out = copy.deepcopy(docs)
    for name, doc in out:
        if name == "stream_resource":
            doc["uri"] = uri
    return out


def test_paths_outside_the_data_roots_are_refused(RE, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    docs = acquire(RE, root, synthetic_scan(n_angles=1, frames_per_angle=2))
    (resource,) = [d for n, d in docs if n == "stream_resource"]
    real = resource["uri"].removeprefix("file://localhost")
    shutil.copy(real, outside / "frames.h5")
    (root / "link.h5").symlink_to(outside / "frames.h5")
    for uri in (
        file_uri(outside / "frames.h5"),
        "file://localhost" + str(root) + "/../outside/frames.h5",
        "file://localhost" + str(root / "link.h5"),  # a symlink that leads out
        "file://elsewhere" + real,
        "http://localhost" + real,
        "frames.h5",
    ):
        out = []
        assembler = RunAssembler(out.append, data_roots=[root])
        with pytest.raises(DocumentError):
            for name, doc in _with_uri(docs, uri):
                assembler(name, doc)
        # The listener goes on: the rest of the run is delivered, its frames are not read.
        rest = _with_uri(docs, uri)
        names = [n for n, _ in rest]
        for name, doc in rest[names.index("stream_resource") + 1 :]:
            assembler(name, doc)
        assert not any(isinstance(m, FrameBatch) and m.n_frames for m in out)
        assert isinstance(out[-1], RunStopped) and out[-1].n_dropped == 2
    with pytest.raises(DocumentError, match="outside the data roots"):
        DataRoots([root]).resolve(file_uri(outside / "frames.h5"))
    with pytest.raises(ConfigError, match="not an existing directory"):
        DataRoots([tmp_path / "missing"])


def test_datum_before_data_is_retried_then_dropped(RE, tmp_path):
    scan = synthetic_scan(n_angles=2, frames_per_angle=2, seed=5)
    docs = acquire(RE, tmp_path, scan)
    # Point the run at a file we fill by hand, to control when data becomes visible.
    late = tmp_path / "late" / "frames.h5"
    late.parent.mkdir()
    writer = h5py.File(late, "w", libver="latest")
    ds = writer.create_dataset(FRAMES_DATASET, shape=(0, 16, 16), maxshape=(None, 16, 16),
                               dtype=np.float32, chunks=(1, 16, 16))
    writer.swmr_mode = True
    docs = _with_uri(docs, file_uri(late))
    out = []
    assembler = RunAssembler(out.append, data_roots=[tmp_path], data_wait_s=0.05,
                             retry_interval_s=0.01)
    names = [n for n, _ in docs]
    first_angle_done = [i for i, (n, d) in enumerate(docs) if n == "event"][2]
    for name, doc in docs[:first_angle_done]:  # two frame events of angle 0, not yet written
        assembler(name, doc)
    assembler.flush()
    assert [type(m) for m in out] == [RunHeader]  # nothing readable yet, nothing lost
    ds.resize(2, axis=0)
    ds[0:2] = scan.frames[0:2]
    ds.flush()
    assembler.flush()
    np.testing.assert_array_equal(out[1].frames, scan.frames[0:2])
    # Angle 1's frames are never written: its completion waits, then drops them with a report.
    for name, doc in docs[first_angle_done:]:
        assembler(name, doc)
    assert assembler.open_runs  # the stop waits for angle 1's frames, without blocking
    assert assembler.drain(timeout_s=10)
    writer.close()
    frames, _, complete = frames_by_angle(out)
    assert complete == [0, 1] and len(frames[1]) == 0
    assert out[-1].n_dropped == 2
    assert sum("not readable" in p for p in assembler.problems) == 2
    assert names.count("stream_datum") == 4


def test_malformed_start_names_the_key(RE, tmp_path):
    docs = acquire(RE, tmp_path, synthetic_scan(n_angles=1, frames_per_angle=1))
    del docs[0][1][APT_KEY]["energy_kev"]
    out = []
    assembler = RunAssembler(out.append, data_roots=[tmp_path])
    with pytest.raises(DocumentError, match="energy_kev"):
        assembler(*docs[0])
    for name, doc in docs[1:]:
        assembler(name, doc)  # the rest of that run is ignored quietly
    assert out == []


def test_scan_file_source_gives_the_same_frames(tmp_path):
    scan = synthetic_scan(n_angles=2, frames_per_angle=3, seed=7)
    path = write_scan(tmp_path / "scan.h5", scan)
    docs = list(ScanFileSource(path))
    messages, assembler = assemble(docs, [tmp_path])
    header = messages[0]
    assert header.sample == "scan" and header.preset == "synthetic"
    np.testing.assert_array_equal(header.probe, scan.probe)
    frames, positions, complete = frames_by_angle(messages)
    assert complete == [0, 1]
    for n in range(2):
        np.testing.assert_array_equal(frames[n], scan.frames_of(n)[0])
        np.testing.assert_allclose(positions[n], scan.frames_of(n)[1], atol=1e-9)
    assert messages[-1].n_frames == 6


def test_run_header_serves_where_a_scan_is_expected(RE, tmp_path):
    from apt_stream.physics.engine import ScanGeometry

    scan = synthetic_scan(n_angles=2, frames_per_angle=1)
    header = assemble(acquire(RE, tmp_path, scan), [tmp_path])[0][0]
    live, offline = ScanGeometry.from_scan(header), ScanGeometry.from_scan(scan)
    for name in ("field_shape", "n_slices", "volume_shape_zyx", "wavelength_m", "object_pixel_m"):
        assert getattr(live, name) == getattr(offline, name)
    np.testing.assert_array_equal(live.probe, offline.probe)
    np.testing.assert_allclose(header.slice_spacing_m, scan.slice_spacing_m)
