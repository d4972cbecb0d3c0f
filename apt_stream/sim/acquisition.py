"""Randomised acquisitions for training data: energy, voxel, probe, dose, scan path and angles.

A network that only ever saw one beamline setting learns that setting. ``sample_acquisition``
draws a whole :class:`~apt_stream.config.Preset` (everything the simulator needs) from wide,
documented ranges, seeded, so every training phantom is scanned differently. The ranges are the
fields of :class:`AcquisitionRanges`; ``HELD_OUT_VOXEL_NM`` is the band of voxel sizes that
training never draws (the out-of-family evaluation uses 15 nm voxels there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from apt_stream.config import (
    GeometryOptions,
    PhantomOptions,
    Preset,
    ProbeOptions,
    ScanOptions,
)
from apt_stream.errors import InputError

#: Voxel sizes (nm) never drawn for training, kept for the out-of-family test set.
HELD_OUT_VOXEL_NM = (14.2, 15.8)


@dataclass(frozen=True)
class AcquisitionRanges:
    """Ranges of the randomised acquisition (inclusive bounds; log-uniform where noted)."""

    energy_kev: tuple[float, float] = (6.0, 12.0)
    voxel_nm: tuple[float, float] = (10.0, 20.0)
    frame_px: tuple[int, ...] = (32, 64)
    n_modes: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12)
    #: relative chance of each entry of ``n_modes`` (many modes cost CPU time)
    n_modes_weights: tuple[float, ...] = (3, 3, 3, 2, 1, 1, 0.5)
    mode_power_decay: tuple[float, float] = (0.2, 0.7)
    annular_probability: float = 0.35
    central_stop: tuple[float, float] = (0.2, 0.5)
    defocus_um: tuple[float, float] = (0.0, 3.0)
    #: beam FWHM as a fraction of the frame edge
    fwhm_fraction: tuple[float, float] = (0.22, 0.32)
    photons_per_frame: tuple[float, float] = (1e5, 1e8)  # log-uniform
    #: scan step as a fraction of the beam FWHM
    step_fraction: tuple[float, float] = (0.35, 0.6)
    jitter_px: tuple[float, float] = (0.0, 1.0)
    spiral_probability: float = 0.4
    n_angles: tuple[int, int] = (9, 61)
    angle_range_deg: tuple[float, float] = (8.0, 45.0)
    sim_slice_px: tuple[float, float] = (1.5, 4.0)


def _voxel_nm(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Uniform over [lo, hi] minus the held-out band."""
    a, b = HELD_OUT_VOXEL_NM
    left, right = max(0.0, min(a, hi) - lo), max(0.0, hi - max(b, lo))
    if left + right <= 0:
        raise InputError(f"voxel range {lo}-{hi} nm lies inside the held-out band {a}-{b} nm")
    u = rng.uniform(0, left + right)
    return lo + u if u < left else max(b, lo) + (u - left)


def sample_acquisition(
    seed: int,
    *,
    shape_zyx: tuple[int, int, int] = (32, 64, 64),
    ranges: AcquisitionRanges | None = None,
    n_angles: int | None = None,
    range_deg: float | None = None,
) -> Preset:
    """A seeded random Preset over ``ranges`` (its phantom options only carry shape and voxel).

    ``n_angles`` / ``range_deg`` fix the tomographic angles instead of drawing them. The gold scan
    of the returned preset is the same acquisition over ±70.4° with 4× the angles.
    """
    if seed < 0:
        raise InputError(f"seed must be >= 0, got {seed}")
    r = ranges or AcquisitionRanges()
    rng = np.random.default_rng([seed, 7_001])
    energy = float(rng.uniform(*r.energy_kev))
    voxel_m = _voxel_nm(rng, *r.voxel_nm) * 1e-9
    frame = int(rng.choice(r.frame_px))
    weights = np.asarray(r.n_modes_weights, dtype=float)
    modes = int(rng.choice(r.n_modes, p=weights / weights.sum()))
    fwhm = frame * float(rng.uniform(*r.fwhm_fraction))
    annular = bool(rng.random() < r.annular_probability)
    probe = ProbeOptions(
        frame_px=frame, n_modes=modes, mode_power_decay=float(rng.uniform(*r.mode_power_decay)),
        beam_fwhm_px=fwhm, defocus_m=float(rng.uniform(*r.defocus_um)) * 1e-6,
        photons_per_frame=float(math.exp(rng.uniform(*np.log(r.photons_per_frame)))),
        shape="annular" if annular else "gaussian",
        central_stop=float(rng.uniform(*r.central_stop)) if annular else 0.0,
    )
    n = int(n_angles if n_angles is not None else rng.integers(r.n_angles[0], r.n_angles[1] + 1))
    theta = float(range_deg if range_deg is not None else rng.uniform(*r.angle_range_deg))
    scan = ScanOptions(
        n_angles=n, angle_range_deg=theta,
        pattern="spiral" if rng.random() < r.spiral_probability else "raster",
        step_px=fwhm * float(rng.uniform(*r.step_fraction)),
        jitter_px=float(rng.uniform(*r.jitter_px)),
    )
    nz, ny, nx = (int(v) for v in shape_zyx)
    phantom = PhantomOptions(
        shape_zyx=(nz, ny, nx), voxel_size_m=voxel_m, n_metal_layers=1,
        min_width_px=2, min_spacing_px=2, max_width_px=6, via_probability=0.3,
    )
    return Preset(
        name=f"random-{seed}",
        phantom=phantom,
        probe=probe,
        scan=scan,
        gold_scan=scan.model_copy(update={"n_angles": 4 * n, "angle_range_deg": 70.4}),
        geometry=GeometryOptions(
            energy_kev=energy, detector_distance_m=1.92, n_slices=5,
            sim_slice_px=float(rng.uniform(*r.sim_slice_px)),
        ),
    )


def describe_acquisition(preset: Preset) -> dict:
    """JSON-ready summary of a (random) acquisition: the preset's describe() plus the probe."""
    return {
        **preset.describe(),
        "probe": preset.probe.model_dump(),
        "scan": preset.scan.model_dump(),
        "sim_slice_px": preset.geometry.sim_slice_px,
    }


__all__ = ["HELD_OUT_VOXEL_NM", "AcquisitionRanges", "describe_acquisition", "sample_acquisition"]
