"""Declared conventions in the scan format (apt_stream.io.conventions), the engine's probe plane,
slice-spacing policy and fields sized for any scan extent (issue 10, item 3)."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest
import torch

from apt_stream.config import get_preset
from apt_stream.errors import InputError, ScanFormatError
from apt_stream.io import Conventions, read_scan, validate_scan, write_scan
from apt_stream.io.conventions import flip_frequencies, frames_from_ours, frames_to_ours
from apt_stream.physics import geometry
from apt_stream.physics.engine import ScanGeometry, approximant_from_scan
from apt_stream.physics.multislice import angular_spectrum_kernel
from apt_stream.sim.acquire import simulate_scan

PTYCHI = Conventions(phase_sign=1, fft_norm="backward", fft_centring="corner",
                     position_reference="centre", positions_relative_to="centre")


@pytest.fixture(scope="module")
def scan():
    return simulate_scan(get_preset("tiny"), seed=3, n_angles=3)


def test_flip_frequencies_is_the_conjugate_far_field():
    rng = np.random.default_rng(0)
    for h, w in ((8, 8), (7, 9)):
        psi = rng.normal(size=(h, w)) + 1j * rng.normal(size=(h, w))
        ours = np.fft.fftshift(np.abs(np.fft.fft2(psi)) ** 2)
        theirs = np.fft.fftshift(np.abs(np.fft.fft2(np.conj(psi))) ** 2)
        np.testing.assert_allclose(flip_frequencies(theirs), ours, rtol=1e-10)
        np.testing.assert_allclose(frames_to_ours(frames_from_ours(ours, PTYCHI), PTYCHI), ours)


@pytest.mark.parametrize("conv", [PTYCHI, Conventions(position_reference="centre_pixel"),
                                  Conventions(fft_centring="corner")], ids=["ptychi", "h2", "dc"])
def test_a_file_in_other_conventions_reads_as_ours(scan, conv, tmp_path):
    path = write_scan(tmp_path / "s.h5", scan, conventions=conv)
    with h5py.File(path) as f:
        raw = f["/entry/data/frames"][:4]
        assert f["/entry/data/frames"].attrs["fft_centring"] == conv.fft_centring
        assert f["/entry/data/positions"].attrs["reference"] == conv.position_reference
    if conv.fft_centring == "corner" or conv.phase_sign == 1:
        assert not np.allclose(raw, scan.frames[:4])  # really stored another way
    back = read_scan(path)
    np.testing.assert_allclose(back.frames, scan.frames)
    np.testing.assert_allclose(back.probe, scan.probe, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(back.positions_px, scan.positions_px, atol=1e-9)
    assert back.provenance["conventions_converted"] == conv.differences()
    lazy = read_scan(path, load_frames=False)
    np.testing.assert_allclose(lazy.frames_of(1)[0], scan.frames_of(1)[0])
    np.testing.assert_allclose(lazy.frames[[5, 2], 3:5], scan.frames[[5, 2], 3:5])
    assert validate_scan(path)["n_frames"] == scan.n_frames


def test_legacy_and_bad_attributes(scan, tmp_path):
    path = write_scan(tmp_path / "s.h5", scan)
    with h5py.File(path, "r+") as f:  # what format 1.0 wrote
        f["/entry/data/frames"].attrs["fft_centring"] = (
            "zero frequency at pixel (h//2, w//2) (numpy.fft.fftshift of an ortho FFT)")
        for name in ("phase_sign", "fft_norm", "plane"):
            del f["/entry/instrument/probe/modes"].attrs[name]
        f.attrs["format_version"] = "1.0"
    np.testing.assert_array_equal(read_scan(path).frames, scan.frames)
    with h5py.File(path, "r+") as f:
        f["/entry/data/positions"].attrs["reference"] = "middle"
    with pytest.raises(ScanFormatError, match="^/entry/data/positions: attribute 'reference' is"):
        validate_scan(path)
    with h5py.File(path, "r+") as f:
        f["/entry/data/positions"].attrs["reference"] = "corner"
        f["/entry/instrument/probe/modes"].attrs["phase_sign"] = 2
    with pytest.raises(ScanFormatError, match="phase_sign"):
        read_scan(path)


def test_engine_rejects_a_slice_spacing_it_would_not_use(scan):
    bad = dataclasses.replace(scan, slice_spacing_m=scan.slice_spacing_m * 1.5)
    with pytest.raises(InputError, match=r"^/entry/object/slice_spacing: angle 0 .* D\(θ\)"):
        approximant_from_scan(bad)
    ScanGeometry.from_scan(scan)  # the simulator writes exactly D(θ)·voxel/L


def test_probe_given_at_the_rotation_axis_is_propagated_to_each_entrance(scan):
    one = scan.subset([2])
    depth = geometry.beam_extent_px(one.volume_shape_zyx, one.angles_deg[0]) * one.object_pixel_m
    kernel = angular_spectrum_kernel(one.frame_shape, pixel_size_m=one.object_pixel_m,
                                     wavelength_m=one.wavelength_m, distance_m=depth / 2)
    at_axis = torch.fft.ifft2(torch.fft.fft2(torch.from_numpy(one.probe)) * kernel).numpy()
    moved = dataclasses.replace(one, probe=at_axis, probe_plane="axis")
    a = approximant_from_scan(one).volume()
    b = approximant_from_scan(moved).volume()
    np.testing.assert_allclose(b, a, atol=1e-3 * np.abs(a).max())
    naive = approximant_from_scan(dataclasses.replace(moved, probe_plane="entrance")).volume()
    assert np.abs(naive - a).max() > 10 * np.abs(b - a).max()


def test_field_with_margins_beyond_the_sample_gives_the_same_volume(scan):
    """Sample row 0 is field row (Ny − ny)//2 and the axis column (Nx − 1)/2, for any field."""
    from apt_stream.metrics import pcc

    ny, nx = scan.field_shape
    a = approximant_from_scan(scan).volume()
    taller = dataclasses.replace(scan, field_shape=(ny + 4, nx), positions_px=scan.positions_px + [2, 0])
    np.testing.assert_allclose(approximant_from_scan(taller).volume(), a, atol=1e-4 * np.abs(a).max())
    # Wider: the same up to the phase offset, which the never-illuminated new columns (vacuum
    # beside the sample, phase 0) pull a little.
    wider = dataclasses.replace(scan, field_shape=(ny, nx + 6), positions_px=scan.positions_px + [0, 3])
    assert pcc(approximant_from_scan(wider).volume(), a) > 0.999


def test_field_shape_for_positions_holds_any_extent():
    shape, hw, angles = (12, 24, 32), (16, 16), [-17.0, 0.0, 17.0]
    assert geometry.field_shape_for_positions(shape, hw, angles) == geometry.field_shape(shape, 16, angles)
    ny, nx = geometry.field_shape_for_positions(shape, hw, angles, even_width=True)
    assert (ny, nx) == (40, 52) and (nx - 32) % 2 == 0
    # a scan reaching 5 px past the sample's margin in y and 7 px in x on one side
    pos = np.array([[-(ny - 1) / 2 - 5, -(nx - 1) / 2], [(ny - 1) / 2 - 16, (nx - 1) / 2 - 16 + 7]])
    for even in (False, True):
        big_y, big_x = geometry.field_shape_for_positions(shape, hw, angles, pos, even_width=even)
        corner = pos + [(big_y - 1) / 2, (big_x - 1) / 2]
        assert corner.min() >= -0.01 and (corner[:, 0].max() <= big_y - 16 + 0.01)
        assert corner[:, 1].max() <= big_x - 16 + 0.01
        assert (big_y - 24) % 2 == 0 and (not even or (big_x - 32) % 2 == 0)


def test_check_reports_the_engine_refusal(scan):
    from apt_stream.check import check_scan_data

    bad = dataclasses.replace(scan, slice_spacing_m=scan.slice_spacing_m * 1.5)
    report = check_scan_data(bad)
    assert not report["ok"] and report["warnings"][0].startswith(
        "ENGINE REJECTS THE SCAN: /entry/object/slice_spacing: angle 0")


def test_scan_file_source_refuses_data_stored_in_other_conventions(scan, tmp_path):
    from apt_stream.stream import ScanFileSource

    path = write_scan(tmp_path / "s.h5", scan, conventions=PTYCHI)
    with pytest.raises(ScanFormatError, match="stores its data in other conventions"):
        next(iter(ScanFileSource(path)))
    ours = write_scan(tmp_path / "ours.h5", read_scan(path))
    assert next(iter(ScanFileSource(ours)))[0] == "start"


def test_check_without_truth_and_with_one_angle(scan):
    from apt_stream.check import check_scan_data

    report = check_scan_data(dataclasses.replace(scan, truth=None), n_angles=5, iterations=10)
    assert report["ok"] and report["r_truth"] is None and len(report["angles"]) == 3
    assert len(check_scan_data(scan.subset([1]), iterations=10)["angles"]) == 1
