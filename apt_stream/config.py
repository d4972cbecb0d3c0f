"""Typed settings and the named presets (tiny / demo / paper).

Options are pydantic models with ``extra="forbid"``; units live in the field names. Arrays never
live here. See docs/conventions.md for the physical conventions every number refers to.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from apt_stream.errors import ConfigError

#: h*c in keV * metre, for wavelength from photon energy.
HC_KEV_M = 1.239841984e-9


def wavelength_m(energy_kev: float) -> float:
    """Photon wavelength in metres for a photon energy in keV."""
    if not energy_kev > 0:
        raise ConfigError(f"energy_kev must be > 0, got {energy_kev!r}")
    return HC_KEV_M / energy_kev


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PhantomOptions(_Options):
    """Shape and design rules of a simulated IC (voxel counts along z, y, x)."""

    shape_zyx: tuple[int, int, int] = Field(description="volume shape (nz depth, ny, nx)")
    voxel_size_m: float = Field(gt=0, description="isotropic voxel edge length")
    n_metal_layers: int = Field(ge=1, le=8, description="metal layers, lines along x then y ...")
    min_width_px: int = Field(ge=1, description="minimum metal line width (voxels)")
    min_spacing_px: int = Field(ge=1, description="minimum gap between lines (voxels)")
    max_width_px: int = Field(ge=1, description="maximum metal line width (voxels)")
    via_probability: float = Field(ge=0, le=1, description="chance a line crossing gets a via")

    @model_validator(mode="after")
    def _check(self) -> PhantomOptions:
        if any(n < 4 for n in self.shape_zyx):
            raise ValueError(f"shape_zyx must be >= 4 along every axis, got {self.shape_zyx}")
        if self.max_width_px < self.min_width_px:
            raise ValueError("max_width_px must be >= min_width_px")
        return self


class ProbeOptions(_Options):
    """Mixed-state probe: M orthogonal modes with geometrically decaying powers."""

    frame_px: int = Field(ge=8, description="frame (and probe window) edge, pixels; even")
    n_modes: int = Field(ge=1, le=32, description="M, the number of mutually incoherent modes")
    mode_power_decay: float = Field(gt=0, le=1, description="power of mode m+1 / power of mode m")
    beam_fwhm_px: float = Field(gt=0, description="FWHM of the fundamental mode's intensity")
    defocus_m: float = Field(default=0.0, description="probe defocus (adds curvature), metres")
    photons_per_frame: float = Field(gt=0, description="dose: expected photons per frame")
    shape: Literal["gaussian", "annular"] = Field(
        default="gaussian",
        description="gaussian: Hermite-Gauss modes; annular: a zone-plate-like pupil with a central stop",
    )
    central_stop: float = Field(
        default=0.0, ge=0, lt=1, description="annular probes: central-stop radius / pupil radius"
    )

    @model_validator(mode="after")
    def _check(self) -> ProbeOptions:
        if self.frame_px % 2:
            raise ValueError(f"frame_px must be even, got {self.frame_px}")
        return self


class ScanOptions(_Options):
    """Tomographic angles and the lateral (ptycho) scan at each angle."""

    n_angles: int = Field(ge=1, description="N, the number of tomographic angles")
    angle_range_deg: float = Field(gt=0, le=90, description="angles span -range..+range")
    pattern: Literal["raster", "spiral"] = "raster"
    step_px: float = Field(gt=0, description="raster step / spiral radial step, object pixels")
    jitter_px: float = Field(ge=0, default=0.0, description="std-dev of position jitter")
    noise: bool = Field(default=True, description="Poisson noise on the frames")


class GeometryOptions(_Options):
    """Beam energy, detector and the multislice model."""

    energy_kev: float = Field(gt=0)
    detector_distance_m: float = Field(gt=0)
    n_slices: int = Field(ge=1, le=64, description="L, Approximant slices along the beam")
    sim_slice_px: float = Field(
        gt=0, description="thickness of one simulator slice (voxels); the simulator slices finer than L"
    )


class Preset(_Options):
    """Everything needed to simulate and reconstruct one scan."""

    name: str
    phantom: PhantomOptions
    probe: ProbeOptions
    scan: ScanOptions
    gold_scan: ScanOptions
    geometry: GeometryOptions

    @property
    def wavelength_m(self) -> float:
        return wavelength_m(self.geometry.energy_kev)

    @property
    def detector_pixel_m(self) -> float:
        """Detector pixel that makes the object pixel equal the voxel (far-field sampling)."""
        return (
            self.wavelength_m
            * self.geometry.detector_distance_m
            / (self.probe.frame_px * self.phantom.voxel_size_m)
        )

    @property
    def depth_of_field_m(self) -> float:
        """Probe depth of field 2*dx^2/lambda: multislice resolves depth only beyond this."""
        return 2 * self.phantom.voxel_size_m**2 / self.wavelength_m

    @property
    def thickness_over_dof(self) -> float:
        return self.phantom.shape_zyx[0] * self.phantom.voxel_size_m / self.depth_of_field_m

    def describe(self) -> dict:
        nz, ny, nx = self.phantom.shape_zyx
        return {
            "preset": self.name,
            "volume_zyx": [nz, ny, nx],
            "voxel_nm": self.phantom.voxel_size_m * 1e9,
            "energy_kev": self.geometry.energy_kev,
            "wavelength_pm": self.wavelength_m * 1e12,
            "frame_px": self.probe.frame_px,
            "modes": self.probe.n_modes,
            "slices": self.geometry.n_slices,
            "angles": self.scan.n_angles,
            "range_deg": self.scan.angle_range_deg,
            "gold_angles": self.gold_scan.n_angles,
            "gold_range_deg": self.gold_scan.angle_range_deg,
            "detector_pixel_um": self.detector_pixel_m * 1e6,
            "thickness_um": nz * self.phantom.voxel_size_m * 1e6,
            "depth_of_field_um": self.depth_of_field_m * 1e6,
            "thickness_over_dof": round(self.thickness_over_dof, 3),
        }


_PAPER_ENERGY_KEV = 8.8
_PAPER_DISTANCE_M = 1.92

PRESETS: dict[str, Preset] = {
    # Unit tests: seconds on one core.
    "tiny": Preset(
        name="tiny",
        phantom=PhantomOptions(
            shape_zyx=(12, 24, 32), voxel_size_m=14e-9, n_metal_layers=2,
            min_width_px=2, min_spacing_px=2, max_width_px=4, via_probability=0.3,
        ),
        probe=ProbeOptions(
            frame_px=16, n_modes=2, mode_power_decay=0.4, beam_fwhm_px=6.0, photons_per_frame=1e6
        ),
        scan=ScanOptions(n_angles=7, angle_range_deg=17.0, step_px=3.0, jitter_px=0.3),
        gold_scan=ScanOptions(n_angles=29, angle_range_deg=70.4, step_px=3.0, jitter_px=0.3),
        geometry=GeometryOptions(
            energy_kev=_PAPER_ENERGY_KEV, detector_distance_m=_PAPER_DISTANCE_M,
            n_slices=3, sim_slice_px=2.0,
        ),
    ),
    # The demo: a full N*=29, +-17 deg scan and a many-angle gold scan, minutes on 2 cores.
    "demo": Preset(
        name="demo",
        phantom=PhantomOptions(
            shape_zyx=(32, 64, 64), voxel_size_m=14e-9, n_metal_layers=3,
            min_width_px=2, min_spacing_px=2, max_width_px=6, via_probability=0.25,
        ),
        probe=ProbeOptions(
            frame_px=64, n_modes=3, mode_power_decay=0.35, beam_fwhm_px=18.0,
            photons_per_frame=1e7,
        ),
        scan=ScanOptions(n_angles=29, angle_range_deg=17.0, step_px=8.0, jitter_px=0.5),
        gold_scan=ScanOptions(n_angles=117, angle_range_deg=70.4, step_px=8.0, jitter_px=0.5),
        geometry=GeometryOptions(
            energy_kev=_PAPER_ENERGY_KEV, detector_distance_m=_PAPER_DISTANCE_M,
            n_slices=5, sim_slice_px=4.0,
        ),
    ),
    # The paper's geometry (Kang et al.): documented and constructible; GPU-scale.
    "paper": Preset(
        name="paper",
        phantom=PhantomOptions(
            shape_zyx=(280, 128, 128), voxel_size_m=14e-9, n_metal_layers=6,
            min_width_px=2, min_spacing_px=2, max_width_px=12, via_probability=0.2,
        ),
        probe=ProbeOptions(
            frame_px=128, n_modes=12, mode_power_decay=0.6, beam_fwhm_px=40.0,
            photons_per_frame=1e8,
        ),
        scan=ScanOptions(n_angles=29, angle_range_deg=17.0, step_px=12.0, jitter_px=0.5),
        gold_scan=ScanOptions(n_angles=349, angle_range_deg=70.4, step_px=12.0, jitter_px=0.5),
        geometry=GeometryOptions(
            energy_kev=_PAPER_ENERGY_KEV, detector_distance_m=_PAPER_DISTANCE_M,
            n_slices=5, sim_slice_px=4.0,
        ),
    ),
}


def get_preset(name: str) -> Preset:
    """Look up a preset by name, with a clear error listing the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def select_angles(available_deg, n: int, range_deg: float):
    """Indices of ``n`` angles spread uniformly over ±``range_deg`` chosen from ``available_deg``.

    For each of ``n`` uniformly spaced targets in [-range, +range] the nearest unused available
    angle is taken. Raises ConfigError when fewer than ``n`` angles lie within the range.
    """
    import numpy as np

    angles = np.asarray(available_deg, dtype=float)
    if n < 1:
        raise ConfigError(f"number of angles must be >= 1, got {n}")
    inside = np.flatnonzero(np.abs(angles) <= range_deg + 1e-6)
    if inside.size < n:
        raise ConfigError(
            f"asked for {n} angles within ±{range_deg}°, but the scan has only {inside.size} there"
        )
    targets = np.linspace(-range_deg, range_deg, n) if n > 1 else np.array([0.0])
    chosen: list[int] = []
    free = list(inside)
    for t in targets:
        best = min(free, key=lambda i: abs(angles[i] - t))
        chosen.append(best)
        free.remove(best)
    return np.array(sorted(chosen, key=lambda i: angles[i]), dtype=int)
