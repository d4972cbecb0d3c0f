"""The out-of-family simulator (apt_stream.sim.foreign) against the documents and the engine.

The simulator was written from docs/conventions.md and docs/scan-format.md only, so these tests
check the documented conventions end to end: if our engine reads the foreign scans right, the
projections it estimates match line integrals of the truth computed here, independently, from a
piecewise-constant voxel model. One small configuration (16 × 32 × 32 voxels, 32² frames,
2 modes, 7 angles) is simulated once per module.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from typer.testing import CliRunner

from apt_stream.cli import app
from apt_stream.errors import InputError
from apt_stream.io import check_scan, read_scan, validate_scan, write_scan
from apt_stream.physics import geometry
from apt_stream.physics.engine import approximant_from_scan
from apt_stream.sim.foreign import (
    FOREIGN_VOXEL_M,
    foreign_optical_constants,
    foreign_phantom,
    simulate_foreign_scan,
)
from apt_stream.sim.materials import AL, CO, CU, SI, SI3N4, W, is_metal
from apt_stream.sim.phantom import Phantom

SHAPE = (16, 32, 32)
SEED = 4
SMALL = dict(n_angles=7, range_deg=17.0, frame_px=32, n_modes=2, step_px=4.0)


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return foreign_phantom(SEED, shape_zyx=SHAPE)


@pytest.fixture(scope="module")
def scan(phantom):
    return simulate_foreign_scan(SEED, phantom=phantom, **SMALL)


@pytest.fixture(scope="module")
def vacuum_scan(phantom):
    return simulate_foreign_scan(SEED, phantom=phantom, vacuum=True, **SMALL)


@pytest.fixture(scope="module")
def engine(scan):
    return approximant_from_scan(scan, projection_iterations=10)


def _pearson(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def exact_projection(delta: np.ndarray, angle_deg: float, field_nx: int, sub: int = 8):
    """∫δ dz′ / voxel over the sample rows, (ny, field_nx): the engine's projection units.

    A ray-driven sum through the piecewise-constant voxel model with ``sub`` samples per voxel
    along and across the beam: voxel i covers [i, i+1) in index space, the rotation axis is the
    volume centre and field column c sits at x′ = c − (Nx − 1)/2. A lab point (z′, x′) comes from
    sample (z, x) = (x′ sinθ + z′ cosθ, x′ cosθ − z′ sinθ), the inverse of docs/conventions.md's
    x′ = x cosθ + z sinθ, z′ = −x sinθ + z cosθ.
    """
    nz, ny, nx = delta.shape
    theta = math.radians(angle_deg)
    c, s = math.cos(theta), math.sin(theta)
    half = 0.5 * math.hypot(nz, nx) + 1.0
    zp = np.arange(-half, half, 1.0 / sub) + 0.5 / sub
    xp = (np.arange(field_nx * sub) + 0.5) / sub - 0.5 - (field_nx - 1) / 2
    zz, xx = np.meshgrid(zp, xp, indexing="ij")
    ix = np.floor(xx * c - zz * s + nx / 2).astype(int)
    iz = np.floor(xx * s + zz * c + nz / 2).astype(int)
    inside = (ix >= 0) & (ix < nx) & (iz >= 0) & (iz < nz)
    vals = delta[np.clip(iz, 0, nz - 1), :, np.clip(ix, 0, nx - 1)]  # (Z, X, ny)
    vals = np.where(inside[..., None], vals, 0.0).sum(axis=0) / sub  # (X, ny)
    return vals.T.reshape(ny, field_nx, sub).mean(axis=-1)


def _footprint(shape_zyx, field_nx: int, angle_deg: float, *, inner: bool = False) -> np.ndarray:
    """Field columns inside the sample's lateral extent (or its full-thickness core)."""
    nz, _, nx = shape_zyx
    c, s = abs(math.cos(math.radians(angle_deg))), abs(math.sin(math.radians(angle_deg)))
    half = (nx * c - nz * s) / 2 - 1 if inner else (nx * c + nz * s) / 2
    return np.abs(np.arange(field_nx) - (field_nx - 1) / 2) <= half


# ------------------------------------------------------------------------------------------------
# Phantoms
# ------------------------------------------------------------------------------------------------


def test_phantom_is_the_foreign_family(phantom):
    labels = phantom.labels
    assert isinstance(phantom, Phantom) and labels.dtype == np.uint8 and labels.shape == SHAPE
    assert phantom.voxel_size_m == FOREIGN_VOXEL_M
    assert (labels == CO).any(), "the foreign family must use Co"
    assert not (labels == 0).any(), "no voxel may be vacuum"
    assert not (labels == CU).any()
    for label in (AL, W, SI, SI3N4):
        assert (labels == label).any()
    # Layers tile the depth top to bottom; etch stops and passivation are 1-2 voxels thick.
    layers = phantom.layers
    assert layers[0].z_start == 0 and layers[-1].z_stop == SHAPE[0]
    assert all(a.z_stop == b.z_start for a, b in zip(layers, layers[1:], strict=False))
    assert layers[-1].kind == "substrate" and layers[0].kind == "cap"
    for layer in layers:
        if layer.kind in ("etch_stop", "cap"):
            assert 1 <= layer.thickness_px <= 2
        if layer.name.startswith("co_"):
            assert layer.metal_label == CO and layer.direction in ("x", "y")
    assert is_metal(labels).mean() > 0.05


@pytest.mark.parametrize("shape", [SHAPE, (32, 64, 64), (11, 8, 8)])
def test_phantom_seeds(shape):
    a, b, c = foreign_phantom(1, shape_zyx=shape), foreign_phantom(1, shape_zyx=shape), foreign_phantom(2, shape_zyx=shape)
    assert np.array_equal(a.labels, b.labels) and a.layers == b.layers
    assert not np.array_equal(a.labels, c.labels)
    assert (a.labels == CO).any() and not (a.labels == 0).any()


def test_phantom_rejects_bad_input():
    with pytest.raises(InputError):
        foreign_phantom(0, shape_zyx=(10, 32, 32))
    with pytest.raises(InputError):
        foreign_phantom(-1)


def test_optical_constants_are_chantler():
    table = foreign_optical_constants(7.8)
    assert table.shape[0] >= 9 and np.all(table[0] == 0) and np.all(table[1:] > 0)
    # Co's K edge (7.709 keV) lies just below 7.8 keV: its absorption jumps across it.
    assert foreign_optical_constants(7.8)[CO, 1] > 4 * foreign_optical_constants(7.6)[CO, 1]


# ------------------------------------------------------------------------------------------------
# The scan file
# ------------------------------------------------------------------------------------------------


def test_file_validates_and_round_trips(scan, tmp_path):
    path = write_scan(tmp_path / "foreign.h5", scan)
    summary = validate_scan(path)
    assert summary["n_angles"] == SMALL["n_angles"] and summary["has_truth"]
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    back = read_scan(path)
    np.testing.assert_array_equal(back.frames, scan.frames)
    np.testing.assert_allclose(back.positions_px, scan.positions_px, rtol=1e-12, atol=1e-9)
    np.testing.assert_array_equal(back.angle_index, scan.angle_index)
    np.testing.assert_array_equal(back.probe, scan.probe)
    np.testing.assert_array_equal(back.truth.labels, scan.truth.labels)
    np.testing.assert_array_equal(back.truth.delta, scan.truth.delta)
    assert back.field_shape == scan.field_shape and back.n_slices == 5
    assert back.provenance["simulated"] is True
    assert back.provenance["generator"] == "apt_stream.sim.foreign"
    assert back.provenance["seed"] == SEED and back.provenance["options"]["frame_px"] == 32


def test_layout_follows_the_documents(scan, vacuum_scan):
    h = SMALL["frame_px"]
    angles = scan.angles_deg
    np.testing.assert_allclose(angles, np.linspace(-17, 17, 7))
    # The field and slice spacing re-derived from the documents agree with the project's helpers.
    assert scan.field_shape == geometry.field_shape(SHAPE, h, angles)
    np.testing.assert_allclose(
        scan.slice_spacing_m,
        [geometry.slice_spacing_m(SHAPE, FOREIGN_VOXEL_M, a, 5) for a in angles], rtol=1e-12,
    )
    assert scan.object_pixel_m == FOREIGN_VOXEL_M == scan.truth.voxel_size_m
    lam = scan.wavelength_m
    assert abs(lam * scan.detector_distance_m / (h * scan.detector_pixel_m) / FOREIGN_VOXEL_M - 1) < 1e-6
    assert scan.probe.dtype == np.complex64 and scan.probe.shape == (2, h, h)
    assert scan.frames.dtype == np.float32 and scan.frames.min() >= 0
    np.testing.assert_allclose(np.sum(np.abs(scan.probe) ** 2), 3e6, rtol=1e-5)
    pos = scan.positions_px
    assert pos.min() >= 0 and np.all(pos <= np.array(scan.field_shape) - h)
    check_scan(scan)
    # A vacuum frame holds the probe's photons, and its bright field is centred on (h//2, w//2).
    mean_vac = vacuum_scan.frames.mean(axis=0)
    assert abs(mean_vac.sum() / 3e6 - 1) < 1e-3
    grid = np.arange(h)
    centroid = (mean_vac.sum(1) @ grid / mean_vac.sum(), mean_vac.sum(0) @ grid / mean_vac.sum())
    np.testing.assert_allclose(centroid, (h // 2, h // 2), atol=0.05)


def test_probe_modes_are_orthogonal_and_ordered(scan):
    modes = scan.probe.reshape(scan.probe.shape[0], -1).astype(np.complex128)
    gram = modes.conj() @ modes.T
    power = np.real(np.diag(gram))
    assert np.all(np.diff(power) < 0)
    assert np.max(np.abs(gram - np.diag(power))) < 1e-4 * power.max()


def test_positions_are_not_a_raster_and_vary_per_angle(scan):
    p0 = scan.positions_px[scan.angle_index == 0]
    p1 = scan.positions_px[scan.angle_index == 1]
    assert len(np.unique(np.round(p0[:, 0], 6))) > len(p0) / 2  # a raster repeats its rows
    assert p0.shape != p1.shape or not np.allclose(p0, p1)


# ------------------------------------------------------------------------------------------------
# The engine reads the geometry right
# ------------------------------------------------------------------------------------------------


def test_engine_projections_match_exact_line_integrals(scan, engine):
    angles, proj = engine.projections()
    np.testing.assert_allclose(angles, scan.angles_deg)
    delta = scan.truth.delta
    nx_field = scan.field_shape[1]
    r_true, r_flip, r_mirror, d_true, d_mirror, d_sense = [], [], [], [], [], []
    for angle, p in zip(angles, proj, strict=True):
        truth = exact_projection(delta, angle, nx_field)
        foot = _footprint(SHAPE, nx_field, angle)
        r_true.append(_pearson(p[:, foot], truth[:, foot]))
        r_flip.append(_pearson(p[:, foot], -truth[:, foot]))
        r_mirror.append(_pearson(p[:, foot], truth[:, ::-1][:, foot]))
        # Lines along x are mirror-symmetric; the x-structure alone (row means removed over the
        # full-thickness core) tells a mirror or a wrong rotation sense apart much more sharply.
        core = _footprint(SHAPE, nx_field, angle, inner=True)

        def detail(a, core=core):
            return a[:, core] - a[:, core].mean(axis=1, keepdims=True)

        d_true.append(_pearson(detail(p), detail(truth)))
        d_mirror.append(_pearson(detail(p), detail(truth[:, ::-1])))
        d_sense.append(_pearson(detail(p), detail(exact_projection(delta, -angle, nx_field))))
    print(
        f"\nprojection Pearson over the footprint: min {min(r_true):.3f} mean {np.mean(r_true):.3f}; "
        f"sign-flipped {np.mean(r_flip):.3f}; x-mirrored {np.mean(r_mirror):.3f}\n"
        f"x-structure: true {np.mean(d_true):.3f}, x-mirrored {np.mean(d_mirror):.3f}, "
        f"wrong sense at ±17° {d_sense[0]:.3f}/{d_sense[-1]:.3f}"
    )
    assert min(r_true) > 0.8
    assert max(r_flip) < 0
    assert np.mean(r_mirror) < np.mean(r_true) - 0.1
    assert min(d_true) > 0.7 and np.mean(d_mirror) < 0.4
    assert max(d_sense[0], d_sense[-1]) < min(d_true) - 0.3


def test_engine_projection_scale_is_delta_in_voxel_units(scan, engine):
    """A slope near 1: the projection is ∫δ dz′/voxel, not off by k, the voxel or L."""
    angles, proj = engine.projections()
    n = len(angles) // 2
    truth = exact_projection(scan.truth.delta, angles[n], scan.field_shape[1])
    foot = _footprint(SHAPE, scan.field_shape[1], angles[n], inner=True)
    slope = np.polyfit(truth[:, foot].ravel(), proj[n][:, foot].ravel(), 1)[0]
    print(f"\nprojection slope at 0°: {slope:.3f}")
    assert 0.6 < slope < 1.2


def test_approximant_correlates_with_truth(scan, engine):
    r = _pearson(engine.volume(), scan.truth.delta)
    print(f"\nApproximant Pearson vs truth δ: {r:.3f}")
    assert r > 0.3


def test_vacuum_scan(scan, vacuum_scan, engine):
    assert not vacuum_scan.truth.delta.any() and not vacuum_scan.truth.beta.any()
    assert not vacuum_scan.truth.labels.any()
    np.testing.assert_array_equal(vacuum_scan.positions_px, scan.positions_px)
    np.testing.assert_array_equal(vacuum_scan.probe, scan.probe)
    np.testing.assert_array_equal(vacuum_scan.angles_deg, scan.angles_deg)
    vac = approximant_from_scan(vacuum_scan).volume()

    def rms(v):
        return float(np.sqrt(np.mean(np.square(v))))

    ratio = rms(vac) / rms(engine.volume())
    print(f"\nvacuum/sample Approximant RMS: {ratio:.4f}")
    assert ratio < 0.05


def test_flip_z(phantom, scan):
    calls = []
    flipped = simulate_foreign_scan(
        SEED, phantom=phantom, flip_z=True, progress=lambda d, t: calls.append((d, t)), **SMALL
    )
    np.testing.assert_array_equal(flipped.truth.labels, phantom.labels[::-1])
    np.testing.assert_array_equal(flipped.truth.delta, scan.truth.delta[::-1])
    np.testing.assert_array_equal(flipped.positions_px, scan.positions_px)
    assert not np.array_equal(flipped.frames, scan.frames)
    assert calls == [(i + 1, SMALL["n_angles"]) for i in range(SMALL["n_angles"])]
    assert flipped.provenance["options"]["flip_z"] is True


def test_seed_determinism(phantom, scan):
    again = simulate_foreign_scan(SEED, phantom=phantom, **SMALL)
    np.testing.assert_array_equal(again.frames, scan.frames)
    np.testing.assert_array_equal(again.positions_px, scan.positions_px)
    other = simulate_foreign_scan(SEED + 1, phantom=phantom, **SMALL)
    assert not np.array_equal(other.positions_px[:10], scan.positions_px[:10])


@pytest.mark.parametrize(
    "kwargs", [dict(frame_px=31), dict(n_modes=0), dict(n_angles=0), dict(step_px=0.0)]
)
def test_bad_arguments(phantom, kwargs):
    with pytest.raises(InputError):
        simulate_foreign_scan(SEED, phantom=phantom, **{**SMALL, **kwargs})
