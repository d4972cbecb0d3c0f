"""Ptycho-tomography acquisition simulator.

At each angle the (δ, β) volume is rotated about y into the lab frame (trilinear sampling, vacuum
outside), cut along the beam into slabs of ``sim_slice_px`` voxels — finer than the L slices the
Approximant uses, so the engine never fits the exact model it was simulated with — and a mixed-state
probe is propagated through the slabs (multislice, angular spectrum) at every scan position. The
far-field intensities summed over modes get Poisson noise at the preset's dose.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from apt_stream import __version__
from apt_stream.config import Preset, ScanOptions
from apt_stream.errors import InputError
from apt_stream.physics import geometry
from apt_stream.physics.multislice import angular_spectrum_kernel, simulate_intensity
from apt_stream.sim.materials import delta_beta_volumes
from apt_stream.sim.phantom import make_ic_phantom
from apt_stream.sim.probe import make_probe


def lab_slab_integrals(
    volumes: torch.Tensor,
    *,
    angle_deg: float,
    n_slabs: int,
    field_shape: tuple[int, int],
    frame_px: int,
    samples_per_voxel: int = 2,
) -> torch.Tensor:
    """Line integrals (in voxels) of sample-frame volumes over ``n_slabs`` slabs along the beam.

    ``volumes`` is (C, nz, ny, nx); the result is (C, n_slabs, Ny, Nx) in the lab object field,
    zero outside the sample. The slabs split the sample's extent along the beam, [−D/2, D/2], evenly
    (docs/conventions.md), which is also how the engine places its L slices.
    """
    if volumes.ndim != 4:
        raise InputError(f"volumes must be (C, nz, ny, nx), got {tuple(volumes.shape)}")
    n_ch, nz, ny, nx = volumes.shape
    ny_field, nx_field = field_shape
    depth = geometry.beam_extent_px((nz, ny, nx), angle_deg)
    per_slab = max(1, math.ceil(depth / n_slabs * samples_per_voxel))
    n_samples = per_slab * n_slabs
    step = depth / n_samples  # voxels between depth samples
    z_lab = (torch.arange(n_samples, dtype=torch.float64) + 0.5) * step - depth / 2
    x_lab = torch.arange(nx_field, dtype=torch.float64) - (nx_field - 1) / 2
    theta = math.radians(angle_deg)
    zz, xx = torch.meshgrid(z_lab, x_lab, indexing="ij")
    x_s = xx * math.cos(theta) - zz * math.sin(theta)
    z_s = xx * math.sin(theta) + zz * math.cos(theta)
    # grid_sample wants (x, y, z) normalised to [-1, 1] with align_corners=True.
    gx = (x_s / ((nx - 1) / 2)) if nx > 1 else torch.zeros_like(x_s)
    gz = (z_s / ((nz - 1) / 2)) if nz > 1 else torch.zeros_like(z_s)
    gy = torch.linspace(-1, 1, ny, dtype=torch.float64) if ny > 1 else torch.zeros(1)
    grid = torch.stack(
        [
            gx[:, None, :].expand(n_samples, ny, nx_field),
            gy[None, :, None].expand(n_samples, ny, nx_field),
            gz[:, None, :].expand(n_samples, ny, nx_field),
        ],
        dim=-1,
    ).to(volumes.dtype)
    sampled = F.grid_sample(
        volumes[None], grid[None].to(volumes.device), mode="bilinear", padding_mode="zeros",
        align_corners=True,
    )[0]  # (C, n_samples, ny, Nx)
    slabs = sampled.reshape(n_ch, n_slabs, per_slab, ny, nx_field).sum(dim=2) * step
    out = torch.zeros((n_ch, n_slabs, ny_field, nx_field), dtype=volumes.dtype, device=volumes.device)
    row0 = geometry.sample_row0(ny_field, ny)  # frame_px // 2 for the default field
    out[:, :, row0 : row0 + ny, :] = slabs
    return out


def slab_transmission(
    delta_beta_slabs: torch.Tensor, *, voxel_size_m: float, wavelength_m: float
) -> torch.Tensor:
    """``exp(−i k δt − k βt)`` of slab integrals (2, S, Ny, Nx) given in voxel units → (S,Ny,Nx)."""
    k = 2 * math.pi / wavelength_m
    delta_t = delta_beta_slabs[0].double() * voxel_size_m
    beta_t = delta_beta_slabs[1].double() * voxel_size_m
    return torch.polar(torch.exp(-k * beta_t), -k * delta_t).to(torch.complex64)


def true_slice_phases(
    delta: np.ndarray, *, angle_deg: float, n_slices: int, field_shape, frame_px: int,
    voxel_size_m: float, wavelength_m: float,
) -> np.ndarray:
    """The phases the engine's L slices should converge to at ``angle_deg`` (L, Ny, Nx)."""
    vol = torch.from_numpy(np.asarray(delta, dtype=np.float32))[None]
    slabs = lab_slab_integrals(
        vol, angle_deg=angle_deg, n_slabs=n_slices, field_shape=field_shape, frame_px=frame_px
    )[0]
    k = 2 * math.pi / wavelength_m
    return (-k * slabs.double() * voxel_size_m).float().numpy()


def simulate_scan(
    preset: Preset,
    *,
    seed: int = 0,
    scan: ScanOptions | None = None,
    n_angles: int | None = None,
    range_deg: float | None = None,
    noise: bool | None = None,
    phantom=None,
    progress: Callable[[int, int], None] | None = None,
):
    """Simulate a ptycho-tomo scan of a seeded IC phantom; returns an ``apt_stream.io.ScanData``.

    ``scan`` defaults to the preset's N*-scan; ``n_angles``/``range_deg`` override it (e.g. the
    preset's ``gold_scan``). All randomness (phantom, jitter, noise) derives from ``seed``.
    ``phantom`` (an ``apt_stream.sim.phantom.Phantom``, e.g. from the wide design space of
    ``apt_stream.sim.design``) replaces the preset's own seeded phantom; its voxel size must be
    the preset's.
    """
    from apt_stream.io import GroundTruth, ScanData

    t_start = time.perf_counter()
    scan = scan or preset.scan
    updates = {}
    if n_angles is not None:
        updates["n_angles"] = n_angles
    if range_deg is not None:
        updates["angle_range_deg"] = range_deg
    if noise is not None:
        updates["noise"] = noise
    if updates:
        scan = scan.model_copy(update=updates)
        ScanOptions.model_validate(scan.model_dump())
    rng = np.random.default_rng(seed)
    voxel = preset.phantom.voxel_size_m
    if phantom is None:
        phantom = make_ic_phantom(preset.phantom, seed=seed)
    elif not math.isclose(phantom.voxel_size_m, voxel, rel_tol=1e-6):
        raise InputError(
            f"phantom voxel {phantom.voxel_size_m:g} m differs from the preset's {voxel:g} m"
        )
    energy = preset.geometry.energy_kev
    wavelength = preset.wavelength_m
    delta, beta = delta_beta_volumes(phantom.labels, energy)
    shape = tuple(phantom.labels.shape)
    frame = preset.probe.frame_px
    angles = geometry.uniform_angles(scan.n_angles, scan.angle_range_deg)
    field = geometry.field_shape(shape, frame, angles)
    probe = make_probe(preset.probe, pixel_size_m=voxel, wavelength_m=wavelength)
    probe_t = torch.from_numpy(probe)
    volumes = torch.from_numpy(np.stack([delta, beta]).astype(np.float32))
    positions_fn = geometry.raster_positions if scan.pattern == "raster" else geometry.spiral_positions

    frames_all, pos_all, index_all = [], [], []
    for n, angle in enumerate(angles):
        n_slabs = max(1, math.ceil(geometry.beam_extent_px(shape, angle) / preset.geometry.sim_slice_px))
        slabs = lab_slab_integrals(
            volumes, angle_deg=float(angle), n_slabs=n_slabs, field_shape=field, frame_px=frame
        )
        obj = slab_transmission(slabs, voxel_size_m=voxel, wavelength_m=wavelength)
        spacing = geometry.beam_extent_px(shape, angle) * voxel / n_slabs
        kernel = angular_spectrum_kernel(
            (frame, frame), pixel_size_m=voxel, wavelength_m=wavelength, distance_m=spacing
        )
        pos = positions_fn(field, frame, step_px=scan.step_px, jitter_px=scan.jitter_px, rng=rng)
        intensity = simulate_intensity(obj, probe_t, torch.from_numpy(pos), kernel).numpy()
        if scan.noise:
            intensity = rng.poisson(np.clip(intensity, 0, None)).astype(np.float32)
        frames_all.append(np.fft.fftshift(intensity.astype(np.float32), axes=(-2, -1)))
        pos_all.append(pos)
        index_all.append(np.full(len(pos), n, dtype=np.int32))
        if progress is not None:
            progress(n + 1, len(angles))

    detector_pixel = wavelength * preset.geometry.detector_distance_m / (frame * voxel)
    return ScanData(
        frames=np.concatenate(frames_all),
        angle_index=np.concatenate(index_all),
        positions_px=np.concatenate(pos_all),
        angles_deg=np.asarray(angles, dtype=np.float64),
        probe=probe,
        energy_kev=energy,
        detector_distance_m=preset.geometry.detector_distance_m,
        detector_pixel_m=detector_pixel,
        object_pixel_m=voxel,
        field_shape=field,
        slice_spacing_m=np.array(
            [geometry.slice_spacing_m(shape, voxel, a, preset.geometry.n_slices) for a in angles]
        ),
        n_slices=preset.geometry.n_slices,
        volume_shape_zyx=shape,
        truth=GroundTruth(delta=delta, beta=beta, labels=phantom.labels, voxel_size_m=voxel),
        provenance={
            "software": f"apt-stream {__version__}",
            "preset": preset.name,
            "seed": int(seed),
            "scan": scan.model_dump(),
            "simulated": True,
            "simulation_seconds": round(time.perf_counter() - t_start, 3),
        },
    )
