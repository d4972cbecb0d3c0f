"""Scan file format (apt_stream.io): round trips, streaming SWMR writes, subsets and bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from apt_stream.config import wavelength_m
from apt_stream.errors import InputError, ScanFormatError
from apt_stream.io import (
    GroundTruth,
    LazyFrames,
    ScanData,
    ScanWriter,
    check_scan,
    read_scan,
    read_volumes,
    validate_scan,
    write_scan,
    write_volumes,
)

H = W = 16
FIELD = (24, 28)
VOLUME = (4, 8, 12)
ENERGY_KEV = 8.8
DISTANCE_M = 1.92
PIXEL_M = 14e-9


def make_scan(
    *, n_angles: int = 2, per_angle: int = 3, n_modes: int = 2, seed: int = 0
) -> ScanData:
    """A small, valid synthetic scan: 2 angles x 3 frames of 16x16, M = 2, with ground truth."""
    rng = np.random.default_rng(seed)
    k = n_angles * per_angle
    probe = rng.normal(size=(n_modes, H, W)) + 1j * rng.normal(size=(n_modes, H, W))
    return ScanData(
        frames=rng.poisson(20.0, size=(k, H, W)).astype(np.float32),
        angle_index=np.repeat(np.arange(n_angles), per_angle).astype(np.int32),
        positions_px=rng.uniform(0, [FIELD[0] - H, FIELD[1] - W], size=(k, 2)),
        angles_deg=np.linspace(-17.0, 17.0, n_angles),
        probe=probe.astype(np.complex64),
        energy_kev=ENERGY_KEV,
        detector_distance_m=DISTANCE_M,
        detector_pixel_m=wavelength_m(ENERGY_KEV) * DISTANCE_M / (H * PIXEL_M),
        object_pixel_m=PIXEL_M,
        field_shape=FIELD,
        slice_spacing_m=np.full(n_angles, 5.0e-8),
        n_slices=3,
        volume_shape_zyx=VOLUME,
        truth=GroundTruth(
            delta=rng.uniform(0, 1e-5, VOLUME).astype(np.float32),
            beta=rng.uniform(0, 1e-6, VOLUME).astype(np.float32),
            labels=rng.integers(0, 5, VOLUME).astype(np.uint8),
            voxel_size_m=PIXEL_M,
        ),
        provenance={
            "preset": "tiny",
            "seed": 7,
            "command_line": "apt-stream simulate",
            "note": [1, 2],
        },
    )


def header_kwargs(scan: ScanData) -> dict:
    return scan.header_kwargs()


def assert_same_scan(a: ScanData, b: ScanData) -> None:
    np.testing.assert_array_equal(np.asarray(a.frames), np.asarray(b.frames))
    np.testing.assert_array_equal(a.angle_index, b.angle_index)
    np.testing.assert_allclose(a.positions_px, b.positions_px, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(a.angles_deg, b.angles_deg)
    np.testing.assert_array_equal(a.probe, b.probe)
    np.testing.assert_array_equal(a.slice_spacing_m, b.slice_spacing_m)
    assert (a.energy_kev, a.detector_distance_m, a.detector_pixel_m, a.object_pixel_m) == (
        b.energy_kev,
        b.detector_distance_m,
        b.detector_pixel_m,
        b.object_pixel_m,
    )
    assert (a.field_shape, a.n_slices, a.volume_shape_zyx) == (
        b.field_shape,
        b.n_slices,
        b.volume_shape_zyx,
    )


@pytest.fixture
def scan() -> ScanData:
    return make_scan()


@pytest.fixture
def scan_file(tmp_path, scan) -> Path:
    return write_scan(tmp_path / "scan.h5", scan)


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["gzip", None])
def test_round_trip(tmp_path, scan, compression):
    path = write_scan(tmp_path / "sub" / "scan.h5", scan, compression=compression)
    back = read_scan(path)
    assert_same_scan(scan, back)
    assert back.frames.dtype == np.float32 and back.probe.dtype == np.complex64
    assert back.angle_index.dtype == np.int32 and back.positions_px.dtype == np.float64
    assert back.field_shape == FIELD and isinstance(back.n_slices, int)
    np.testing.assert_array_equal(back.truth.labels, scan.truth.labels)
    np.testing.assert_array_equal(back.truth.delta, scan.truth.delta)
    assert back.truth.labels.dtype == np.uint8 and back.truth.voxel_size_m == PIXEL_M
    prov = back.provenance
    assert prov["preset"] == "tiny" and prov["seed"] == 7 and prov["note"] == [1, 2]
    assert prov["command_line"] == "apt-stream simulate"
    assert prov["software_version"] and prov["created"]  # filled in by the writer
    assert back.n_angles == 2 and back.n_frames == 6
    assert back.wavelength_m == pytest.approx(1.239841984e-9 / ENERGY_KEV)
    assert not list(tmp_path.joinpath("sub").glob(".*tmp"))  # the temporary file was renamed


def test_file_layout_units_and_positions_in_metres(scan_file, scan):
    with h5py.File(scan_file, "r") as f:
        assert f.attrs["format"] == "apt-stream-scan"
        assert f["/entry"].attrs["NX_class"] == "NXentry"
        assert f["/entry/instrument/detector"].attrs["NX_class"] == "NXdetector"
        assert (
            f["/entry/data"].attrs["NX_class"] == "NXdata"
            and f["/entry/data"].attrs["signal"] == "frames"
        )
        assert f["/entry/data/positions"].attrs["units"] == "m"
        assert f["/entry/sample/rotation_angle"].attrs["units"] == "deg"
        assert f["/entry/instrument/source/energy"].attrs["units"] == "keV"
        np.testing.assert_allclose(f["/entry/data/positions"][()], scan.positions_px * PIXEL_M)
        assert f["/entry/instrument/probe/modes"].dtype == np.complex64


def test_validate_summary(scan_file, scan):
    summary = validate_scan(scan_file)
    assert summary["n_frames"] == 6 and summary["n_angles"] == 2 and summary["n_modes"] == 2
    assert summary["frame_shape"] == (H, W) and summary["frames_per_angle"] == (3, 3)
    assert summary["complete"] and summary["has_truth"]
    assert summary["mean_counts_per_frame"] == pytest.approx(float(scan.frames.sum()) / 6)
    assert check_scan(scan)["n_frames"] == 6


def test_lazy_frames_read_on_demand(scan_file, scan):
    lazy = read_scan(scan_file, load_frames=False)
    assert isinstance(lazy.frames, LazyFrames) and lazy.frames.shape == (6, H, W)
    np.testing.assert_array_equal(lazy.frames[[4, 1, 1]], scan.frames[[4, 1, 1]])
    np.testing.assert_array_equal(lazy.frames[2, 3:5], scan.frames[2, 3:5])
    frames, positions = lazy.frames_of(1)
    np.testing.assert_array_equal(frames, scan.frames[3:6])
    np.testing.assert_allclose(positions, scan.positions_px[3:6], atol=1e-9)


def test_no_truth_round_trip(tmp_path, scan):
    scan.truth = None
    back = read_scan(write_scan(tmp_path / "s.h5", scan))
    assert back.truth is None and not validate_scan(tmp_path / "s.h5")["has_truth"]


# ---------------------------------------------------------------------------------------------
# subset
# ---------------------------------------------------------------------------------------------


def test_subset_renumbers_angles():
    scan = make_scan(n_angles=3, per_angle=2)
    sub = scan.subset([2, 0])
    np.testing.assert_array_equal(sub.angles_deg, scan.angles_deg[[2, 0]])
    np.testing.assert_array_equal(sub.slice_spacing_m, scan.slice_spacing_m[[2, 0]])
    # Frames keep their order (angle 0's frames come first) and point at the new angle numbers.
    np.testing.assert_array_equal(sub.angle_index, [1, 1, 0, 0])
    np.testing.assert_array_equal(sub.frames, scan.frames[[0, 1, 4, 5]])
    np.testing.assert_array_equal(sub.frames_of(0)[0], scan.frames_of(2)[0])
    assert sub.provenance["angle_subset"] == [2, 0]
    assert sub.subset([1]).provenance["angle_subset"] == [0]
    check_scan(sub)
    with pytest.raises(InputError, match="out of range"):
        scan.subset([3])
    with pytest.raises(InputError, match="unique"):
        scan.subset([1, 1])


def test_subset_of_lazy_scan_writes_new_file(tmp_path):
    src = write_scan(tmp_path / "a.h5", make_scan(n_angles=3, per_angle=2))
    lazy = read_scan(src, load_frames=False).subset([1])
    assert isinstance(lazy.frames, LazyFrames)
    out = read_scan(write_scan(tmp_path / "b.h5", lazy))
    np.testing.assert_array_equal(out.frames, read_scan(src).frames[2:4])
    assert out.provenance["angle_subset"] == [1]


# ---------------------------------------------------------------------------------------------
# Streaming writer + SWMR reader in another process
# ---------------------------------------------------------------------------------------------

_READER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from apt_stream.io import read_scan, validate_scan
    s = read_scan(sys.argv[1], swmr=True, partial=True)
    summary = validate_scan(sys.argv[1], swmr=True, partial=True)
    print(json.dumps({"n": s.n_frames, "index": s.angle_index.tolist(),
                      "sum": float(np.asarray(s.frames).sum()), "complete": summary["complete"]}))
    """
)


def _read_in_other_process(path: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _READER, str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_scan_writer_streams_and_swmr_reader_sees_frames(tmp_path, scan):
    path = tmp_path / "live.h5"
    with ScanWriter(path) as writer:
        writer.write_header(**header_kwargs(scan))
        seen = _read_in_other_process(path)  # header only
        assert seen == {"n": 0, "index": [], "sum": 0.0, "complete": False}
        for n in range(scan.n_angles):
            frames, positions = scan.frames_of(n)
            assert writer.append(n, frames, positions) == 3 * (n + 1)
            seen = _read_in_other_process(path)  # while the writer still holds the file
            assert seen["n"] == 3 * (n + 1)
            assert seen["index"] == scan.angle_index[: 3 * (n + 1)].tolist()
            assert seen["sum"] == pytest.approx(float(scan.frames[: 3 * (n + 1)].sum()))
        assert seen["complete"]
    assert_same_scan(scan, read_scan(path))


def test_scan_writer_rejects_bad_blocks_without_writing(tmp_path, scan):
    path = tmp_path / "live.h5"
    with ScanWriter(path, swmr=False) as writer:
        with pytest.raises(InputError, match="write_header"):
            writer.append(0, scan.frames[:1], scan.positions_px[:1])
        writer.write_header(**header_kwargs(scan))
        bad = scan.frames[:2].copy()
        bad[1, 0, 0] = np.nan
        with pytest.raises(ScanFormatError, match=r"^/entry/data/frames: contains 1 NaN values"):
            writer.append(0, bad, scan.positions_px[:2])
        with pytest.raises(
            ScanFormatError, match=r"^/entry/data/positions: 1 positions lie outside"
        ):
            writer.append(0, scan.frames[:1], [[0.0, 99.0]])
        with pytest.raises(ScanFormatError, match=r"^/entry/data/angle_index: 1 indices outside"):
            writer.append(5, scan.frames[:1], scan.positions_px[:1])
        assert writer.n_frames == 0
        # One (h, w) frame of integer counts, as a detector delivers it, is accepted.
        writer.append(1, scan.frames[0].astype(np.uint16), scan.positions_px[0])
        assert writer.n_frames == 1
    with pytest.raises(
        ScanFormatError, match=r"^/entry/data/angle_index: 1 of 2 angles have no frames"
    ):
        validate_scan(path)
    assert validate_scan(path, partial=True)["n_frames"] == 1


# ---------------------------------------------------------------------------------------------
# Bad files: each error names the first bad field
# ---------------------------------------------------------------------------------------------


def _replace(f: h5py.File, path: str, data, **attrs) -> None:
    old = dict(f[path].attrs)
    del f[path]
    ds = f.create_dataset(path, data=data)
    ds.attrs.update({**old, **attrs})


def _set(path: str, index, value):
    def mutate(f):
        f[path][index] = value

    return mutate


def _nan3(f):
    frames = f["/entry/data/frames"]
    for idx in [(0, 0, 0), (1, 2, 3), (5, 15, 15)]:
        frames[idx] = np.nan


BAD_FILES = {
    "frames wrong width": (
        lambda f: _replace(f, "/entry/data/frames", np.ones((6, H, W - 1), np.float32)),
        "/entry/data/frames",
        "frame shape (16, 15) differs from the probe's (16, 16)",
    ),
    "frames NaN": (_nan3, "/entry/data/frames", "contains 3 NaN values"),
    "frames Inf": (
        _set("/entry/data/frames", (2, 1, 1), np.inf),
        "/entry/data/frames",
        "1 infinite",
    ),
    "negative intensity": (
        _set("/entry/data/frames", (4, 0, 0), -1.5),
        "/entry/data/frames",
        "1 negative",
    ),
    "frames integer dtype": (
        lambda f: _replace(f, "/entry/data/frames", np.ones((6, H, W), np.uint16)),
        "/entry/data/frames",
        "dtype uint16 is not float",
    ),
    "position beyond field": (
        _set("/entry/data/positions", (3, 1), (FIELD[1] - W + 0.5) * PIXEL_M),
        "/entry/data/positions",
        "1 positions lie outside the object field (first: frame 3",
    ),
    "negative position": (
        _set("/entry/data/positions", (0, 0), -1.0 * PIXEL_M),
        "/entry/data/positions",
        "outside",
    ),
    "angle_index shorter than frames": (
        lambda f: _replace(f, "/entry/data/angle_index", np.zeros(5, np.int32)),
        "/entry/data/angle_index",
        "does not match the 6 frames",
    ),
    "angle index out of range": (
        _set("/entry/data/angle_index", 0, 2),
        "/entry/data/angle_index",
        "outside 0..1",
    ),
    "angle without frames": (
        lambda f: _replace(f, "/entry/data/angle_index", np.zeros(6, np.int32)),
        "/entry/data/angle_index",
        "1 of 2 angles have no frames",
    ),
    "positions wrong shape": (
        lambda f: _replace(f, "/entry/data/positions", np.zeros((6, 3))),
        "/entry/data/positions",
        "shape (6, 3), expected (6, 2)",
    ),
    "slice spacing length": (
        lambda f: _replace(f, "/entry/object/slice_spacing", np.ones(3) * 1e-8),
        "/entry/object/slice_spacing",
        "shape (3,), expected (2,)",
    ),
    "missing dataset": (
        lambda f: f.__delitem__("/entry/data/positions"),
        "/entry/data/positions",
        "missing",
    ),
    "missing group": (
        lambda f: f.__delitem__("/entry/object"),
        "/entry/object",
        "required group is missing",
    ),
    "real probe": (
        lambda f: _replace(f, "/entry/instrument/probe/modes", np.ones((2, H, W), np.float32)),
        "/entry/instrument/probe/modes",
        "dtype float32 is not complex",
    ),
    "missing units": (
        lambda f: f["/entry/data/positions"].attrs.__delitem__("units"),
        "/entry/data/positions",
        "attribute 'units' is missing",
    ),
    "wrong units": (
        lambda f: f["/entry/sample/rotation_angle"].attrs.__setitem__("units", "rad"),
        "/entry/sample/rotation_angle",
        "units 'rad', expected 'deg'",
    ),
    "wrong NX_class": (
        lambda f: f["/entry/sample"].attrs.__setitem__("NX_class", "NXcollection"),
        "/entry/sample",
        "NX_class is 'NXcollection', expected 'NXsample'",
    ),
    "object pixel inconsistent": (
        lambda f: _replace(f, "/entry/object/pixel_size", np.float64(PIXEL_M * 1.05)),
        "/entry/object/pixel_size",
        "disagrees",
    ),
    "non-square detector pixels": (
        lambda f: _replace(f, "/entry/instrument/detector/y_pixel_size", np.float64(1e-4)),
        "/entry/instrument/detector/y_pixel_size",
        "square",
    ),
    "NaN energy": (
        lambda f: _replace(f, "/entry/instrument/source/energy", np.float64(np.nan)),
        "/entry/instrument/source/energy",
        "finite",
    ),
    "truth wrong shape": (
        lambda f: _replace(f, "/entry/sample/ground_truth/delta", np.zeros((4, 8, 11), np.float32)),
        "/entry/sample/ground_truth/delta",
        "differs from /entry/sample/volume_shape",
    ),
    "not our format": (lambda f: f.attrs.__setitem__("format", "other"), "/", "attribute 'format'"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_names_the_field(scan_file, case):
    mutate, field_path, detail = BAD_FILES[case]
    with h5py.File(scan_file, "r+") as f:
        mutate(f)
    with pytest.raises(ScanFormatError) as err:
        validate_scan(scan_file)
    message = str(err.value)
    assert message.startswith(field_path + ": "), message
    assert detail in message, message
    with pytest.raises(ScanFormatError, match="^" + field_path + ": "):
        read_scan(scan_file)


def test_truncated_file(scan_file):
    data = scan_file.read_bytes()
    scan_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ScanFormatError, match=r": cannot open as HDF5 \(truncated or corrupt\?\)"
    ):
        validate_scan(scan_file)


@pytest.mark.parametrize(
    ("content", "detail"),
    [(b"frames,angle\n1,2\n", "not an HDF5 file"), (None, "no such file")],
)
def test_not_hdf5_or_missing(tmp_path, content, detail):
    path = tmp_path / "scan.h5"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ScanFormatError, match=f"^{re.escape(str(path))}: {detail}"):
        read_scan(path)


# ---------------------------------------------------------------------------------------------
# Bad in-memory scans (check_scan / write_scan): same messages, nothing written
# ---------------------------------------------------------------------------------------------


def _nan_frames(s):
    s.frames[0, :3, 0] = np.nan


BAD_SCANS = {
    "NaN frames": (_nan_frames, "/entry/data/frames: contains 3 NaN values"),
    "negative": (
        lambda s: s.frames.__setitem__((1, 1, 1), -2.0),
        "/entry/data/frames: contains 1 negative",
    ),
    "real probe": (
        lambda s: setattr(s, "probe", s.probe.real),
        "/entry/instrument/probe/modes: dtype float32",
    ),
    "frame shape": (
        lambda s: setattr(s, "frames", s.frames[:, :, :15]),
        "/entry/data/frames: frame shape (16, 15) differs",
    ),
    "probe shape breaks the pixel size": (
        lambda s: setattr(s, "probe", s.probe[:, :8, :8]),
        "/entry/object/pixel_size: 1.4e-08 m disagrees",
    ),
    "positions outside": (
        lambda s: s.positions_px.__setitem__((5, 0), FIELD[0]),
        "/entry/data/positions: 1 positions lie outside",
    ),
    "angle_index length": (
        lambda s: setattr(s, "angle_index", s.angle_index[:4]),
        "/entry/data/angle_index: shape (4,)",
    ),
    "float angle_index": (
        lambda s: setattr(s, "angle_index", s.angle_index.astype(float)),
        "/entry/data/angle_index: dtype float64",
    ),
    "field smaller than frame": (
        lambda s: setattr(s, "field_shape", (8, 28)),
        "/entry/object/field_shape",
    ),
    "zero slices": (
        lambda s: setattr(s, "n_slices", 0),
        "/entry/object/n_slices: every entry must be >= 1",
    ),
    "negative distance": (
        lambda s: setattr(s, "detector_distance_m", -1.0),
        "/entry/instrument/detector/distance: must be finite and > 0",
    ),
    "truth labels shape": (
        lambda s: setattr(s.truth, "labels", s.truth.labels[:2]),
        "/entry/sample/ground_truth/labels: shape (2, 8, 12)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SCANS))
def test_bad_scan_in_memory(tmp_path, scan, case):
    mutate, prefix = BAD_SCANS[case]
    mutate(scan)
    with pytest.raises(ScanFormatError, match="^" + re.escape(prefix)):
        check_scan(scan)
    with pytest.raises(ScanFormatError):
        write_scan(tmp_path / "bad.h5", scan)
    assert list(tmp_path.iterdir()) == []  # checked before any file is created


# ---------------------------------------------------------------------------------------------
# Volumes
# ---------------------------------------------------------------------------------------------


def test_volumes_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    vols = {
        "approximant": rng.normal(size=VOLUME).astype(np.float32),
        "apt": rng.normal(size=VOLUME),
        "labels": rng.integers(0, 5, VOLUME).astype(np.uint8),
    }
    attrs = {
        "scan": "scan.h5",
        "angles": np.arange(3),
        "model": {"name": "apt-tiny", "sha256": "ab"},
    }
    path = write_volumes(tmp_path / "v.h5", vols, voxel_size_m=PIXEL_M, attrs=attrs)
    back, meta = read_volumes(path)
    assert sorted(back) == sorted(vols)
    for name, vol in vols.items():
        np.testing.assert_array_equal(back[name], vol)
        assert back[name].dtype == vol.dtype
    assert meta == {
        "scan": "scan.h5",
        "angles": [0, 1, 2],
        "model": {"name": "apt-tiny", "sha256": "ab"},
        "voxel_size_m": PIXEL_M,
        "dims": ["z", "y", "x"],
    }
    with h5py.File(path, "r") as f:
        assert list(f["/entry/volumes/apt"].attrs["dims"]) == ["z", "y", "x"]
        assert json.loads(f.attrs["provenance"])["scan"] == "scan.h5"
    write_volumes(tmp_path / "w.h5", back, voxel_size_m=PIXEL_M, attrs=meta)  # attrs pass back


@pytest.mark.parametrize(
    ("volumes", "kwargs", "match"),
    [
        ({"a": np.zeros((4, 4))}, {}, "must be 3D"),
        ({"a/b": np.zeros((2, 2, 2))}, {}, "without '/'"),
        ({"a": np.full((2, 2, 2), np.nan)}, {}, "8 NaN/Inf"),
        ({"a": np.zeros((2, 2, 2), complex)}, {}, "real numbers"),
        ({}, {}, "non-empty"),
        ({"a": np.zeros((2, 2, 2))}, {"voxel_size_m": 0.0}, "voxel_size_m"),
        ({"a": np.zeros((2, 2, 2))}, {"attrs": {"voxel_size_m": 1.0}}, "reserved"),
        ({"a": np.zeros((2, 2, 2))}, {"attrs": {"x": object()}}, "JSON"),
    ],
)
def test_write_volumes_rejects(tmp_path, volumes, kwargs, match):
    kwargs = {"voxel_size_m": PIXEL_M, **kwargs}
    with pytest.raises(InputError, match=match):
        write_volumes(tmp_path / "v.h5", volumes, **kwargs)


def test_read_volumes_rejects_scan_file(scan_file):
    with pytest.raises(ScanFormatError, match="^/: attribute 'format' is 'apt-stream-scan'"):
        read_volumes(scan_file)


def test_docs_conversion_snippet_makes_a_valid_file(tmp_path, monkeypatch):
    """The h5py example in docs/scan-format.md must keep producing a file that validates."""
    doc = (Path(__file__).parents[1] / "docs" / "scan-format.md").read_text()
    code = re.findall(r"```python\n(.*?)```", doc, re.S)[-1]
    assert "validate_scan" in code
    rng = np.random.default_rng(3)
    monkeypatch.chdir(tmp_path)
    namespace = dict(
        h=H, w=W, energy_kev=ENERGY_KEV, distance_m=DISTANCE_M,
        det_pixel_m=wavelength_m(ENERGY_KEV) * DISTANCE_M / (H * PIXEL_M),
        probe=rng.normal(size=(2, H, W)) + 0j, angles_deg=np.array([-5.0, 5.0]),
        nz=VOLUME[0], ny=VOLUME[1], nx=VOLUME[2], ny_field=FIELD[0], nx_field=FIELD[1],
        slice_spacing_m=np.full(2, 3e-8), frames=rng.poisson(3, (4, H, W)),
        angle_index=np.array([0, 0, 1, 1]), positions_yx_px=rng.uniform(0, 8, (4, 2)),
    )  # fmt: skip
    exec(compile(code, "scan-format.md", "exec"), namespace)
    back = read_scan(tmp_path / "myscan.h5")
    np.testing.assert_allclose(back.positions_px, namespace["positions_yx_px"], atol=1e-9)
