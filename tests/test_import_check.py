"""`apt-stream import` and `apt-stream check` (issue 10, items 4 and 5), on the tiny preset.

The done criterion in small: a scan simulated in our convention, handed over in pty-chi's
conventions and imported, reconstructs to the same Approximant (PCC >= 0.99); the same data
read as ours without converting, and deliberately mis-converted copies, are flagged by `check`.
"""

from __future__ import annotations

import dataclasses
import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from apt_stream.cli import app
from apt_stream.config import get_preset
from apt_stream.io import Conventions, read_scan, write_scan
from apt_stream.io.importers import FORMAT_CONVENTIONS, export_ptychi_npz
from apt_stream.metrics import pcc
from apt_stream.physics.engine import approximant_from_scan
from apt_stream.sim.acquire import simulate_scan

runner = CliRunner()
CHECK = ["--angles", "2", "--iterations", "20"]


def _json(output: str) -> dict:
    return json.JSONDecoder().raw_decode(output[output.index("{"):])[0]


@pytest.fixture(scope="module")
def native():
    return simulate_scan(get_preset("tiny"), seed=3, n_angles=5, range_deg=17.0)


@pytest.fixture(scope="module")
def native_volume(native):
    return approximant_from_scan(native).volume()


def strip_conventions(path):
    """What a user who copies the arrays into our layout by hand ends up with: no attributes."""
    with h5py.File(path, "r+") as f:
        for ds, names in (("/entry/instrument/probe/modes", ("phase_sign", "fft_norm", "plane")),
                          ("/entry/data/frames", ("fft_centring",)),
                          ("/entry/data/positions", ("reference", "relative_to"))):
            for name in names:
                f[ds].attrs.pop(name, None)
    return path


def test_ptychi_import_reconstructs_the_native_volume(native, native_volume, tmp_path):
    npz = export_ptychi_npz(native, tmp_path / "ptychi.npz")
    out = tmp_path / "imported.h5"
    result = runner.invoke(app, ["import", "ptychi", str(npz), str(out)])
    assert result.exit_code == 0, result.output
    summary = _json(result.output)
    assert summary["converted"]["phase_sign"] == 1 and summary["converted"]["fft_norm"] == "backward"
    imported = read_scan(out)
    np.testing.assert_allclose(imported.probe, native.probe, rtol=1e-5, atol=1e-3)
    assert imported.field_shape == native.field_shape  # the simulators' field
    np.testing.assert_allclose(imported.positions_px, native.positions_px, atol=1e-9)
    volume = approximant_from_scan(imported).volume()
    assert pcc(volume, native_volume) >= 0.99
    even = tmp_path / "even.h5"
    assert runner.invoke(app, ["import", "ptychi", str(npz), str(even), "--even-width"]).exit_code == 0
    wide = read_scan(even)
    assert (wide.field_shape[1] - wide.volume_shape_zyx[2]) % 2 == 0
    assert pcc(approximant_from_scan(wide).volume(), native_volume) >= 0.99
    checked = runner.invoke(app, ["check", str(out), *CHECK])
    assert checked.exit_code == 0, checked.output
    report = _json(checked.output)
    assert report["ok"] and report["warnings"] == []
    assert all(row["projection_pcc"] > 0.9 for row in report["angles"])


def test_check_flags_the_unconverted_scan(native, tmp_path):
    """pty-chi's arrays (conjugate probe, mirrored frames, unnormalised probe) read as ours."""
    ptychi = dataclasses.replace(FORMAT_CONVENTIONS["ptychi"], position_reference="corner",
                                 positions_relative_to="field")
    path = strip_conventions(write_scan(tmp_path / "unconverted.h5", native, conventions=ptychi))
    result = runner.invoke(app, ["check", str(path), *CHECK])
    assert result.exit_code == 2, result.output
    assert "WARNING: PROBE NORMALISATION" in result.output and "√(h·w)" in result.output
    assert "WARNING: PHASE SIGN LOOKS INVERTED" in result.output


@pytest.mark.parametrize("mistake, expect", [
    ("phase_sign", "PHASE SIGN LOOKS INVERTED"),
    ("transposed", "POSITIONS LOOK TRANSPOSED"),
    ("dc", "OFF-CENTRE DC"),
])
def test_check_flags_a_mis_converted_scan(native, tmp_path, mistake, expect):
    if mistake == "phase_sign":
        path = strip_conventions(write_scan(tmp_path / "s.h5", native,
                                            conventions=Conventions(phase_sign=1)))
    elif mistake == "dc":
        path = strip_conventions(write_scan(tmp_path / "s.h5", native,
                                            conventions=Conventions(fft_centring="corner")))
    else:
        span = np.array(native.field_shape) - native.frame_shape
        swapped = np.clip(native.positions_px[:, ::-1], 0, span)
        path = write_scan(tmp_path / "s.h5", dataclasses.replace(native, positions_px=swapped))
    result = runner.invoke(app, ["check", str(path), *CHECK])
    assert result.exit_code == 2, result.output
    assert f"WARNING: {expect}" in result.output or expect in result.output
    report = _json(result.output)
    assert any(expect in w for w in report["warnings"])


def write_nexus(scan, path):
    """A NeXus / ptychodus-style file of ``scan``: frames as NXdata signal, energy in eV,
    distance in mm, probe centres in metres about the field centre (ptychodus's
    probe_position_x_m / _y_m), one rotation angle per frame in radians."""
    h, w = scan.frame_shape
    centres = scan.positions_px + [(h - 1) / 2, (w - 1) / 2]
    centres -= [(scan.field_shape[0] - 1) / 2, (scan.field_shape[1] - 1) / 2]
    with h5py.File(path, "w") as f:
        f.attrs["default"] = "entry"
        entry = f.create_group("entry")
        entry.attrs.update(NX_class="NXentry", default="data")
        data = entry.create_group("data")
        data.attrs.update(NX_class="NXdata", signal="data")
        data["data"] = scan.frames
        inst = entry.create_group("instrument")
        inst.create_group("source").create_dataset("energy", data=scan.energy_kev * 1e3)
        inst["source/energy"].attrs["units"] = "eV"
        det = inst.create_group("detector")
        det["distance"] = scan.detector_distance_m * 1e3
        det["distance"].attrs["units"] = "mm"
        det["x_pixel_size"] = scan.detector_pixel_m
        det["x_pixel_size"].attrs["units"] = "m"
        sample = entry.create_group("sample")
        sample["rotation_angle"] = np.radians(scan.angles_deg[scan.angle_index])
        sample["rotation_angle"].attrs["units"] = "rad"
        sample["volume_shape"] = np.asarray(scan.volume_shape_zyx)
        f["probe"] = scan.probe
        f["probe"].attrs.update(pixel_width_m=scan.object_pixel_m, pixel_height_m=scan.object_pixel_m)
        f["probe_position_x_m"] = centres[:, 1] * scan.object_pixel_m
        f["probe_position_y_m"] = centres[:, 0] * scan.object_pixel_m
    return path


def test_nexus_import(native, native_volume, tmp_path):
    src = write_nexus(native, tmp_path / "nexus.h5")
    out = tmp_path / "imported.h5"
    result = runner.invoke(app, ["import", "nexus", str(src), str(out), "--slices", "3"])
    assert result.exit_code == 0, result.output
    imported = read_scan(out)
    np.testing.assert_allclose(imported.angles_deg, native.angles_deg, atol=1e-9)
    assert imported.n_frames == native.n_frames
    assert pcc(approximant_from_scan(imported).volume(), native_volume) >= 0.99


def test_import_errors_are_one_line(native, tmp_path):
    npz = export_ptychi_npz(native, tmp_path / "p.npz")
    bad = runner.invoke(app, ["import", "ptychi", str(npz), str(tmp_path / "o.h5"),
                              "--volume-shape", "12,24"])
    assert bad.exit_code == 1 and "ConfigError: --volume-shape must be 3" in bad.output
    bad = runner.invoke(app, ["import", "ptychi", str(npz), str(tmp_path / "o.h5"),
                              "--fft-norm", "unitary"])
    assert bad.exit_code == 1 and "'fft_norm' is 'unitary'" in bad.output
    bad = runner.invoke(app, ["import", "cxi", str(npz), str(tmp_path / "o.h5")])
    assert bad.exit_code == 1 and "unknown import format 'cxi'" in bad.output
    arrays = dict(np.load(npz))
    del arrays["probe"]
    np.savez(tmp_path / "noprobe.npz", **arrays)
    bad = runner.invoke(app, ["import", "ptychi", str(tmp_path / "noprobe.npz"), str(tmp_path / "o.h5")])
    assert bad.exit_code == 1 and "needs an array named 'probe'" in bad.output
    assert "Traceback" not in bad.output
