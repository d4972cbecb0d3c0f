"""The streaming Approximant engine.

An :class:`AngleState` holds the L complex slices of one angle. Frames come in batches of any size
(down to one). The paper's first iteration is a full-gradient step from a flat start, and the
gradient of a sum over frames is the sum of per-frame gradients *at that flat start*, so *pass 1*
computes each batch's contribution the moment it arrives and only adds it up. When the angle is
complete, :meth:`AngleState.finish` applies that step and takes *pass 2*: one full-gradient step over
every frame. The result is the paper's two full iterations exactly, for any batching
(:func:`batch_reference` computes them directly with autograd and the tests check they agree), and
half of the work is already done when the last frame of an angle lands.

``EngineOptions(pass1="minibatch")`` instead steps after every batch (stochastic, ePIE-like): it can
help with large batches but is worse with single frames (docs/approximant.md has the numbers).

The step is the gradient of the amplitude loss divided by the probe illumination ``Σ_j Σ_m |P_j|²``
(plus a small floor), i.e. a diagonally preconditioned gradient step — the same normalisation
PIE-family and LSQML solvers use — scaled by ``step_size / L`` because a phase correction lands in all
L slices at once and would otherwise be applied L times over. The illumination of the incident probe
stands in for that of every slice: within the depth of field the beam's intensity barely changes
from slice to slice, and it is computed once per frame instead of L times per iteration.

:class:`ApproximantAccumulator` turns finished angles into δ estimates, spreads each slice over its
slab, rotates it back into the sample frame and keeps the running average (with a count volume).
:class:`StreamingApproximant` strings the two together for a whole scan.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from apt_stream.devices import host_to_device
from apt_stream.errors import InputError
from apt_stream.physics import geometry
from apt_stream.physics.allocator import keep_freed_memory
from apt_stream.physics.multislice import (
    FlatStart,
    PatchIndex,
    RampFactors,
    add_illumination,
    add_windows,
    angular_spectrum_kernel,
    extract_patches,
    flat_start_loss_and_gradient,
    probe_illumination,
    scatter_patches,
    shifted_probes,
    window_loss_and_gradient,
)


@dataclass(frozen=True)
class EngineOptions:
    """Tuning of the two gradient iterations (defaults chosen on the tiny/demo presets)."""

    step_size: float = 2.0
    #: floor of the preconditioner, relative to the brightest illuminated pixel of the batch
    illumination_floor: float = 0.01
    #: frames processed together (bounds memory: chunk × M × L × h × w complex values)
    chunk_frames: int = 8
    #: regularises the amplitude gradient where the model predicts ~0 photons (√photons)
    amplitude_eps: float = 0.1
    #: "accumulate" (exact paper scheme for any batching) or "minibatch" (a step per batch)
    pass1: str = "accumulate"
    #: full iterations per angle: the paper's Approximant uses 2; projections for classical
    #: tomography (baselines, gold standard) are better with ~10, as the paper's used 600 LSQML
    iterations: int = 2

    def __post_init__(self) -> None:
        if self.pass1 not in ("accumulate", "minibatch"):
            raise InputError(f"pass1 must be 'accumulate' or 'minibatch', got {self.pass1!r}")
        if self.iterations < 2:
            raise InputError(f"iterations must be >= 2 (pass 1 + pass 2), got {self.iterations}")
        if self.step_size <= 0 or self.illumination_floor < 0 or self.chunk_frames < 1:
            raise InputError("step_size must be > 0, illumination_floor >= 0, chunk_frames >= 1")


def _check_frames(frames: torch.Tensor, positions: torch.Tensor, hw: tuple[int, int]) -> None:
    if frames.ndim != 3 or tuple(frames.shape[1:]) != hw:
        raise InputError(f"frames must have shape (B, {hw[0]}, {hw[1]}), got {tuple(frames.shape)}")
    if positions.shape[0] != frames.shape[0]:
        raise InputError(
            f"{frames.shape[0]} frames but {positions.shape[0]} positions: lengths must match"
        )
    if frames.numel() == 0:
        return
    # One reduction pass (NaN propagates into both ends) instead of two masks over the batch.
    low, high = (float(v) for v in torch.aminmax(frames))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise InputError("frames contain NaN or Inf")
    if low < 0:
        raise InputError("frames contain negative intensities")


def _sqrt_counts(frames: torch.Tensor) -> torch.Tensor:
    """√I of a (shifted, owned) frame batch, in place.

    On the CPU numpy's square root is used: torch's takes a slow path on exact zeros, and most
    pixels of a photon-counting frame are 0 (0.66 ms against 0.14 ms for 90 frames of 64²).
    """
    if frames.device.type == "cpu":
        np.sqrt(frames.numpy(), out=frames.numpy())
        return frames
    return frames.sqrt_()


class AngleState:
    """The L slices of one angle, updated frame batch by frame batch.

    Parameters
    ----------
    probe : (M, h, w) complex array, the probe modes (docs/conventions.md normalisation).
    field_shape : (Ny, Nx) of the object field.
    n_slices : L.
    slice_spacing_m : distance between slice planes at this angle.
    wavelength_m, pixel_size_m : optics.
    """

    def __init__(
        self,
        probe,
        *,
        field_shape: tuple[int, int],
        n_slices: int,
        slice_spacing_m: float,
        wavelength_m: float,
        pixel_size_m: float,
        options: EngineOptions | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        keep_freed_memory()
        probe_t = torch.as_tensor(np.asarray(probe) if not torch.is_tensor(probe) else probe)
        if probe_t.ndim != 3 or not probe_t.is_complex():
            raise InputError(f"probe must be complex with shape (M, h, w), got {tuple(probe_t.shape)}")
        self.probe = probe_t.to(self.device, torch.complex64)
        self.frame_hw = tuple(self.probe.shape[1:])
        if n_slices < 1:
            raise InputError(f"n_slices must be >= 1, got {n_slices}")
        if field_shape[0] < self.frame_hw[0] or field_shape[1] < self.frame_hw[1]:
            raise InputError(f"field {field_shape} is smaller than the frame {self.frame_hw}")
        self.field_shape = (int(field_shape[0]), int(field_shape[1]))
        self.n_slices = int(n_slices)
        self.options = options or EngineOptions()
        self.kernel = angular_spectrum_kernel(
            self.frame_hw,
            pixel_size_m=pixel_size_m,
            wavelength_m=wavelength_m,
            distance_m=slice_spacing_m,
            device=self.device,
        )
        self.slices = torch.ones(
            (self.n_slices, *self.field_shape), dtype=torch.complex64, device=self.device
        )
        self._sqrt_frames: list[torch.Tensor] = []
        self._indices: list[PatchIndex] = []
        # Sub-pixel-shifted probes per batch, one tensor per chunk of chunk_frames frames,
        # computed once and reused by pass 2.
        self._probes: list[list[torch.Tensor]] = []
        self._illumination = torch.zeros((1, *self.field_shape), device=self.device)
        self._pass1_grad: torch.Tensor | None = None
        self._flat: FlatStart | None = None
        self._pass1_loss = 0.0
        self.losses: list[float] = []
        self.finished = False
        self.compute_seconds = 0.0

    @property
    def n_frames(self) -> int:
        return sum(int(f.shape[0]) for f in self._sqrt_frames)

    def add_frames(self, frames, positions_px, *, shifted: bool = True) -> float:
        """Pass 1 on one batch of frames (B, h, w); returns the batch's loss at the flat start.

        ``shifted`` says the frames have the zero frequency at the centre (the file convention).
        """
        if self.finished:
            raise InputError("this angle is finished; frames can no longer be added")
        t0 = time.perf_counter()
        frames_t = host_to_device(np.asarray(frames, dtype=np.float32), self.device)
        pos_t = torch.as_tensor(np.asarray(positions_px, dtype=np.float64))
        _check_frames(frames_t, pos_t, self.frame_hw)
        # The shift copies the caller's frames; unshifted ones are copied here, so √I can be taken
        # in place without touching the caller's array.
        frames_t = torch.fft.ifftshift(frames_t, dim=(-2, -1)) if shifted else frames_t.clone()
        sqrt_i = _sqrt_counts(frames_t)
        index = PatchIndex.from_positions(pos_t, self.frame_hw, self.field_shape).to(self.device)
        batch_illum = torch.zeros_like(self._illumination)
        if self.options.pass1 == "accumulate":
            # Pass 1 always sees the flat start: the cheaper exact form (FlatStart) applies.
            grad, loss, probes = self._flat_start_gradient(sqrt_i, index, batch_illum)
        else:
            shifted = shifted_probes(self.probe, index.frac).contiguous()
            probes = list(torch.split(shifted, self.options.chunk_frames))
            scatter_patches(batch_illum, probe_illumination(shifted)[None],
                            index.flat(self.field_shape[1]))
        self._illumination += batch_illum
        self._sqrt_frames.append(sqrt_i)
        self._indices.append(index)
        self._probes.append(probes)
        if self.options.pass1 == "minibatch":
            grad, loss = self._gradient([(sqrt_i, index, probes)])
            self._apply(grad, batch_illum)
        elif self._pass1_grad is None:
            self._pass1_grad = grad
        else:
            self._pass1_grad += grad
        self._pass1_loss += loss
        self.compute_seconds += time.perf_counter() - t0
        return loss

    def finish(self) -> torch.Tensor:
        """Pass 2 (and any further iterations) over every frame of the angle. Returns the slices."""
        if self.finished:
            return self.slices
        if not self._sqrt_frames:
            raise InputError("cannot finish an angle that received no frames")
        t0 = time.perf_counter()
        self.losses.append(self._pass1_loss)
        if self._pass1_grad is not None:
            self._apply(self._pass1_grad, self._illumination)
            self._pass1_grad = None
        for _ in range(self.options.iterations - 1):
            self._full_step()
        self.finished = True
        self.compute_seconds += time.perf_counter() - t0
        return self.slices

    def refine(self, n_iterations: int) -> torch.Tensor:
        """Extra full-gradient iterations beyond the paper's two (e.g. for a better single angle)."""
        if not self._sqrt_frames:
            raise InputError("no frames stored: refine() must come before release_frames()")
        for _ in range(int(n_iterations)):
            self._full_step()
        return self.slices

    def release_frames(self) -> None:
        """Drop the stored frames (after :meth:`finish`) to free memory."""
        self._sqrt_frames.clear()
        self._indices.clear()
        self._probes.clear()

    def _full_step(self) -> None:
        batches = list(zip(self._sqrt_frames, self._indices, self._probes, strict=True))
        grad, loss = self._gradient(batches)
        self._apply(grad, self._illumination)
        self.losses.append(loss)

    def _gradient(
        self, batches: Sequence[tuple[torch.Tensor, PatchIndex, list[torch.Tensor]]]
    ) -> tuple[torch.Tensor, float]:
        """∂L/∂O* summed over ``batches`` at the current slices, and the loss there."""
        n_slices, (ny, nx) = self.n_slices, self.field_shape
        grad = torch.zeros((n_slices, ny, nx), dtype=torch.complex64, device=self.device)
        total = 0.0
        chunk = self.options.chunk_frames
        for sqrt_i, index, probe_chunks in batches:
            origins = index.origin_tensor()
            for k, probes in enumerate(probe_chunks):
                sl = slice(k * chunk, (k + 1) * chunk)
                loss, g = window_loss_and_gradient(
                    self.slices, origins[sl], probes, sqrt_i[sl], self.kernel,
                    eps=self.options.amplitude_eps,
                )
                total += loss
                add_windows(grad, g, origins[sl])
        return grad, total

    def _flat_start_gradient(
        self, sqrt_i: torch.Tensor, index: PatchIndex, illumination: torch.Tensor
    ) -> tuple[torch.Tensor, float, list[torch.Tensor]]:
        """Pass 1's ∂L/∂O* at O = 1 for one batch, its loss and the shifted probes per chunk.

        Adds the batch's probe illumination into ``illumination`` chunk by chunk, while each
        chunk's probes are still in cache.
        """
        if self._flat is None:
            self._flat = FlatStart.build(self.probe, self.kernel, self.n_slices)
        n_slices, (ny, nx) = self.n_slices, self.field_shape
        grad = torch.zeros((n_slices, ny, nx), dtype=torch.complex64, device=self.device)
        origins = index.origin_tensor()
        ramps = RampFactors.of(index.frac, self.frame_hw, device=self.device)
        total, probes = 0.0, []
        chunk = self.options.chunk_frames
        for start in range(0, sqrt_i.shape[0], chunk):
            sl = slice(start, start + chunk)
            loss, g, p = flat_start_loss_and_gradient(
                self._flat, ramps[sl], sqrt_i[sl], eps=self.options.amplitude_eps
            )
            total += loss
            probes.append(p)
            add_windows(grad, g, origins[sl])
            add_illumination(illumination, p, origins[sl])
        return grad, total, probes

    def _apply(self, grad: torch.Tensor, illum: torch.Tensor) -> None:
        """The preconditioned step O ← O − (α/L)·∂L/∂O* / (Λ + floor·max Λ)."""
        floor = self.options.illumination_floor * illum.amax(dim=(-2, -1), keepdim=True)
        step = self.options.step_size / self.n_slices
        # The real factor made complex first: complex-by-real arithmetic is a slow path on CPU.
        self.slices -= grad * (step / (illum + floor + 1e-30)).to(grad.dtype)

    def phases(self) -> torch.Tensor:
        """Slice phases arg(O_l), (L, Ny, Nx) float32."""
        return torch.angle(self.slices)


def batch_reference(
    frames,
    positions_px,
    probe,
    *,
    field_shape: tuple[int, int],
    n_slices: int,
    slice_spacing_m: float,
    wavelength_m: float,
    pixel_size_m: float,
    options: EngineOptions | None = None,
    n_iterations: int = 2,
    shifted: bool = True,
) -> torch.Tensor:
    """The paper's scheme without streaming: ``n_iterations`` full-gradient steps over all frames.

    Written with autograd (a separate code path from the hand adjoint in :class:`AngleState`), so
    comparing the two checks the streaming engine, the chunking and the adjoint at once.
    """
    options = options or EngineOptions()
    probe_t = torch.as_tensor(np.asarray(probe)).to(torch.complex64)
    frames_t = torch.as_tensor(np.asarray(frames, dtype=np.float32))
    if shifted:
        frames_t = torch.fft.ifftshift(frames_t, dim=(-2, -1))
    sqrt_i = torch.sqrt(frames_t)
    hw = tuple(probe_t.shape[1:])
    index = PatchIndex.from_positions(torch.as_tensor(positions_px), hw, field_shape)
    flat = index.flat(field_shape[1])
    kernel = angular_spectrum_kernel(
        hw, pixel_size_m=pixel_size_m, wavelength_m=wavelength_m, distance_m=slice_spacing_m
    )
    probes = shifted_probes(probe_t, index.frac)
    slices = torch.ones((n_slices, *field_shape), dtype=torch.complex64)
    for _ in range(n_iterations):
        obj = slices.clone().requires_grad_(True)
        patches = extract_patches(obj, flat, hw)
        psi = probes
        illum = torch.zeros((1, *field_shape))
        illum[0].view(-1).index_add_(0, flat.reshape(-1), probe_illumination(probes).reshape(-1))
        for slab in range(n_slices):
            if slab > 0:
                psi = torch.fft.ifft2(torch.fft.fft2(psi) * kernel)
            psi = psi * patches[slab].unsqueeze(1)
        far = torch.fft.fft2(psi, norm="ortho")
        power = (far.abs() ** 2).sum(dim=1)
        amp = torch.sqrt(power)
        # d/dA of the regularised loss below is (A − √I)·A/(A + eps): the engine's amplitude_eps.
        weight = (amp / (amp + options.amplitude_eps)).detach()
        loss = (weight * (amp - sqrt_i) ** 2).sum()
        loss.backward()
        # torch returns 2·∂L/∂O* for a real loss of complex leaves: halve it to the Wirtinger form.
        grad = obj.grad / 2
        floor = options.illumination_floor * illum.amax(dim=(-2, -1), keepdim=True)
        slices = slices - options.step_size / n_slices * grad / (illum + floor + 1e-30)
    return slices.detach()


# ----------------------------------------------------------------------------------------------
# Rotating finished angles back into the sample frame
# ----------------------------------------------------------------------------------------------


@dataclass
class _BackRotation:
    """Per-angle lookup of (slab, field column, weight) for every (z, x) of the sample plane."""

    slab: torch.Tensor  # (nz*nx,) int64
    col0: torch.Tensor  # (nz*nx,) int64
    weight: torch.Tensor  # (nz*nx,) float32, linear weight of col0+1
    valid: torch.Tensor  # (nz*nx,) bool


def _back_rotation(
    shape_zyx: Sequence[int], field_nx: int, angle_deg: float, n_slices: int
) -> _BackRotation:
    nz, _, nx = shape_zyx
    theta = math.radians(angle_deg)
    z = torch.arange(nz, dtype=torch.float64) - (nz - 1) / 2
    x = torch.arange(nx, dtype=torch.float64) - (nx - 1) / 2
    zz, xx = torch.meshgrid(z, x, indexing="ij")
    x_lab = xx * math.cos(theta) + zz * math.sin(theta)
    z_lab = -xx * math.sin(theta) + zz * math.cos(theta)
    depth = geometry.beam_extent_px(shape_zyx, angle_deg)
    slab = torch.floor((z_lab + depth / 2) / (depth / n_slices)).long().clamp_(0, n_slices - 1)
    col = x_lab + (field_nx - 1) / 2
    col0 = torch.floor(col)
    weight = (col - col0).float()
    col0 = col0.long()
    valid = (col0 >= 0) & (col0 + 1 <= field_nx - 1)
    return _BackRotation(
        slab=slab.reshape(-1),
        col0=col0.clamp(0, field_nx - 2).reshape(-1),
        weight=weight.reshape(-1),
        valid=valid.reshape(-1),
    )


def slices_to_sample_frame(
    delta_slices: torch.Tensor,
    *,
    shape_zyx: Sequence[int],
    frame_px: int,
    angle_deg: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spread L per-slab δ maps (L, Ny, Nx) over their slabs and rotate them by −θ.

    Returns the sample-frame volume (nz, ny, nx) and a 0/1 coverage volume of the same shape.
    Each sample voxel takes the value of the slab it falls in at this angle, linearly interpolated
    across the lab x′ columns (rows are the rotation axis, so no interpolation is needed there).
    Sample row 0 is field row :func:`geometry.sample_row0` ``(Ny − ny) // 2`` (``frame_px // 2``
    for the default field ``Ny = ny + frame_px``); ``frame_px`` is kept for callers.
    """
    nz, ny, nx = shape_zyx
    n_slices, field_ny, field_nx = delta_slices.shape
    row0 = geometry.sample_row0(field_ny, ny)
    if row0 + ny > field_ny:
        raise InputError(f"field of {field_ny} rows cannot hold {ny} sample rows + margin")
    lut = _back_rotation(shape_zyx, field_nx, angle_deg, n_slices)
    rows = delta_slices[:, row0 : row0 + ny, :].permute(1, 0, 2).reshape(ny, n_slices * field_nx)
    dev = delta_slices.device
    base = (lut.slab * field_nx + lut.col0).to(dev)
    w = lut.weight.to(dev)
    v0 = rows[:, base]
    v1 = rows[:, base + 1]
    vol = (v0 * (1 - w) + v1 * w) * lut.valid.to(dev)
    vol = vol.reshape(ny, nz, nx).permute(1, 0, 2).contiguous()
    cover = lut.valid.to(dev, torch.float32).reshape(nz, 1, nx).expand(nz, ny, nx)
    return vol, cover


def remove_phase_offset(
    phases: torch.Tensor, *, shape_zyx: Sequence[int], angle_deg: float, row0: int
) -> torch.Tensor:
    """Subtract from each slice the mean phase of the vacuum beside the sample.

    Ptychography leaves the phase free up to a constant, and two iterations from a flat start do not
    pin it. Columns of the field that the sample's footprint at this angle does not reach are
    vacuum (phase 0), so their mean over the sample rows is the offset — the same "phase offset
    removal" step that precedes tomography in the paper's gold-standard pipeline.
    """
    nz, ny, nx = shape_zyx
    field_nx = phases.shape[-1]
    half = geometry.lateral_extent_px(shape_zyx, angle_deg) / 2 + 1.0
    x_lab = torch.arange(field_nx, dtype=torch.float32, device=phases.device) - (field_nx - 1) / 2
    vacuum = x_lab.abs() > half
    if not bool(vacuum.any()):
        return phases
    rows = phases[:, row0 : row0 + ny, :][:, :, vacuum]
    return phases - rows.mean(dim=(1, 2), keepdim=True)


def phases_to_delta(phases: torch.Tensor, *, wavelength_m: float, slice_spacing_m: float):
    """δ̂ = −arg(O)/(k Δz): slice phases to the mean refractive index decrement of each slab."""
    k = 2 * math.pi / wavelength_m
    return -phases / (k * slice_spacing_m)


class ApproximantAccumulator:
    """Running average, over angles, of the back-rotated per-slab δ estimates."""

    def __init__(
        self,
        *,
        shape_zyx: Sequence[int],
        frame_px: int,
        wavelength_m: float,
        device: torch.device | str = "cpu",
    ) -> None:
        self.shape_zyx = tuple(int(n) for n in shape_zyx)
        self.frame_px = int(frame_px)
        self.wavelength_m = float(wavelength_m)
        self.device = torch.device(device)
        self.total = torch.zeros(self.shape_zyx, dtype=torch.float32, device=self.device)
        self.count = torch.zeros(self.shape_zyx, dtype=torch.float32, device=self.device)
        self.angles_deg: list[float] = []

    def add_angle(self, angle_deg: float, slices: torch.Tensor, slice_spacing_m: float) -> None:
        """Add an angle given its complex slices (L, Ny, Nx)."""
        delta = phases_to_delta(
            torch.angle(slices.to(self.device)),
            wavelength_m=self.wavelength_m,
            slice_spacing_m=slice_spacing_m,
        )
        self.add_delta(angle_deg, delta)

    def add_delta(self, angle_deg: float, delta: torch.Tensor) -> None:
        """Add an angle given its per-slab δ estimates (L, Ny, Nx)."""
        vol, cover = slices_to_sample_frame(
            delta, shape_zyx=self.shape_zyx, frame_px=self.frame_px, angle_deg=angle_deg
        )
        self.total += vol
        self.count += cover
        self.angles_deg.append(float(angle_deg))

    @property
    def n_angles(self) -> int:
        return len(self.angles_deg)

    def volume(self) -> np.ndarray:
        """The Approximant (nz, ny, nx) float32 in units of δ; zero where no angle reached."""
        return (self.total / self.count.clamp(min=1)).cpu().numpy()

    def count_volume(self) -> np.ndarray:
        return self.count.cpu().numpy()


# ----------------------------------------------------------------------------------------------
# A whole scan, streamed
# ----------------------------------------------------------------------------------------------


@dataclass
class ScanGeometry:
    """What the engine needs to know about a scan before its frames arrive."""

    probe: np.ndarray
    field_shape: tuple[int, int]
    n_slices: int
    volume_shape_zyx: tuple[int, int, int]
    wavelength_m: float
    object_pixel_m: float
    voxel_size_m: float
    #: "entrance": the probe is each angle's field at its entrance face z′ = −D(θ)/2 and meets
    #: slice 1 as it is; "axis": it is given at z′ = 0 and propagated by −D(θ)/2 per angle
    probe_plane: str = "entrance"
    #: angle index -> (angle_deg, stored slice spacing m), checked when the angle is used
    stored_spacing: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.probe_plane not in ("entrance", "axis"):
            raise InputError(f"probe_plane must be 'entrance' or 'axis', got {self.probe_plane!r}")

    @classmethod
    def from_scan(cls, scan) -> ScanGeometry:
        """From an :class:`apt_stream.io.ScanData` (or anything with the same fields).

        The engine places its L slices over the sample's extent along the beam, so the slice
        spacing at angle θ is D(θ)·voxel/L (docs/conventions.md). A stored ``slice_spacing_m``
        is kept and checked against that when an angle is first used
        (:meth:`StreamingApproximant.add_frames`, :func:`check_slice_spacing`): one differing
        by more than :data:`SLICE_SPACING_RTOL` is **rejected** (InputError naming the angle),
        never silently replaced.
        """
        geom = cls(
            probe=scan.probe,
            field_shape=tuple(scan.field_shape),
            n_slices=int(scan.n_slices),
            volume_shape_zyx=tuple(scan.volume_shape_zyx),
            wavelength_m=float(scan.wavelength_m),
            object_pixel_m=float(scan.object_pixel_m),
            voxel_size_m=float(scan.object_pixel_m),
            probe_plane=str(getattr(scan, "probe_plane", "entrance") or "entrance"),
        )
        stored = getattr(scan, "slice_spacing_m", None)
        angles = getattr(scan, "angles_deg", None)
        if stored is not None and angles is not None:
            stored = np.asarray(stored, dtype=np.float64).reshape(-1)
            angles = np.asarray(angles, dtype=np.float64).reshape(-1)
            if stored.shape == angles.shape:
                geom.stored_spacing = {n: (float(a), float(d))
                                       for n, (a, d) in enumerate(zip(angles, stored, strict=True))}
        return geom

    def slice_spacing_m(self, angle_deg: float) -> float:
        return geometry.slice_spacing_m(
            self.volume_shape_zyx, self.voxel_size_m, angle_deg, self.n_slices
        )

    def probe_at_entrance(self, angle_deg: float):
        """The probe modes at this angle's entrance face (the scan's own for "entrance")."""
        if self.probe_plane == "entrance":
            return self.probe
        depth_m = geometry.beam_extent_px(self.volume_shape_zyx, angle_deg) * self.voxel_size_m
        probe_t = torch.as_tensor(np.asarray(self.probe)).to(torch.complex64)
        kernel = angular_spectrum_kernel(
            tuple(probe_t.shape[-2:]), pixel_size_m=self.object_pixel_m,
            wavelength_m=self.wavelength_m, distance_m=-depth_m / 2,
        )
        return torch.fft.ifft2(torch.fft.fft2(probe_t) * kernel)


#: Allowed relative difference of a stored slice spacing from D(θ)·voxel/L.
SLICE_SPACING_RTOL = 1e-3


def check_slice_spacing(geom: ScanGeometry, angle_ids=None) -> None:
    """Raise InputError when a stored slice spacing (of the given angles, default all) is not
    D(θ)·voxel/L."""
    items = geom.stored_spacing.items()
    for n, (angle, dz) in items:
        if angle_ids is not None and n not in angle_ids:
            continue
        want = geom.slice_spacing_m(float(angle))
        if not abs(dz - want) <= SLICE_SPACING_RTOL * want:
            depth = geometry.beam_extent_px(geom.volume_shape_zyx, float(angle))
            raise InputError(
                f"/entry/object/slice_spacing: angle {n} ({angle:g}°) stores {dz:.6g} m, but the "
                f"engine spreads L = {geom.n_slices} slices over the sample's depth D(θ) = "
                f"{depth:.4g} voxels, i.e. {want:.6g} m (D(θ)·voxel/L, docs/conventions.md); "
                f"write that spacing or fix volume_shape / n_slices"
            )


@dataclass
class AngleSummary:
    angle_id: int
    angle_deg: float
    n_frames: int
    seconds: float
    loss_pass1: float
    loss_pass2: float
    #: line integral of δ along the beam (voxel units) over the sample rows, (ny, Nx): the
    #: projection classical tomography (FBP/SIRT/SART) reconstructs from
    projection: np.ndarray | None = field(default=None, repr=False)
    #: the same line integral from the Approximant's own iterations (what a physics-in-the-loop
    #: network reads: training banks hold these, so live inference matches training)
    input_projection: np.ndarray | None = field(default=None, repr=False)
    slices: torch.Tensor | None = field(default=None, repr=False)
    #: per-slab δ estimates after offset removal (L, Ny, Nx), kept with ``keep_slices``
    delta: torch.Tensor | None = field(default=None, repr=False)


class StreamingApproximant:
    """Angle states + accumulator for one scan; angles may arrive in any order, interleaved."""

    def __init__(
        self,
        geometry_: ScanGeometry,
        *,
        options: EngineOptions | None = None,
        device: torch.device | str = "cpu",
        keep_slices: bool = False,
        projection_iterations: int | None = None,
    ) -> None:
        self.geometry = geometry_
        self.options = options or EngineOptions()
        self.device = torch.device(device)
        self.keep_slices = keep_slices
        # After an angle's slices have gone into the Approximant, keep iterating (to this many in
        # total) for the projection that classical tomography uses: one pass serves both.
        self.projection_iterations = projection_iterations
        self._states: dict[int, AngleState] = {}
        self._angle_deg: dict[int, float] = {}
        self._first_loss: dict[int, float] = {}
        self.accumulator = ApproximantAccumulator(
            shape_zyx=geometry_.volume_shape_zyx,
            frame_px=int(np.asarray(geometry_.probe).shape[-1]),
            wavelength_m=geometry_.wavelength_m,
            device=self.device,
        )
        self.summaries: dict[int, AngleSummary] = {}

    def _state(self, angle_id: int, angle_deg: float) -> AngleState:
        state = self._states.get(angle_id)
        if state is None:
            g = self.geometry
            stored = g.stored_spacing.get(angle_id)
            if stored is not None and abs(stored[0] - float(angle_deg)) < 1e-6:
                check_slice_spacing(g, [angle_id])
            spacing = g.slice_spacing_m(angle_deg)
            state = AngleState(
                g.probe_at_entrance(angle_deg),
                field_shape=g.field_shape,
                n_slices=g.n_slices,
                slice_spacing_m=spacing,
                wavelength_m=g.wavelength_m,
                pixel_size_m=g.object_pixel_m,
                options=self.options,
                device=self.device,
            )
            state.slice_spacing_m = spacing
            self._states[angle_id] = state
            self._angle_deg[angle_id] = float(angle_deg)
        return state

    def add_frames(self, angle_id: int, angle_deg: float, frames, positions_px) -> float:
        if angle_id in self.summaries:
            raise InputError(f"angle {angle_id} is already finished")
        state = self._state(angle_id, angle_deg)
        loss = state.add_frames(frames, positions_px)
        self._first_loss.setdefault(angle_id, 0.0)
        self._first_loss[angle_id] += loss
        return loss

    def _delta(self, state: AngleState, angle: float) -> torch.Tensor:
        """Offset-corrected per-slab δ estimates (L, Ny, Nx) of an angle's current slices."""
        g = self.geometry
        row0 = geometry.sample_row0(g.field_shape[0], g.volume_shape_zyx[1])
        phases = remove_phase_offset(
            torch.angle(state.slices), shape_zyx=g.volume_shape_zyx, angle_deg=angle, row0=row0
        )
        return phases_to_delta(
            phases, wavelength_m=g.wavelength_m, slice_spacing_m=state.slice_spacing_m
        )

    def finish_angle(self, angle_id: int) -> AngleSummary:
        state = self._states.get(angle_id)
        if state is None:
            raise InputError(f"angle {angle_id} received no frames")
        t0 = time.perf_counter()
        slices = state.finish().clone()
        g = self.geometry
        angle = self._angle_deg[angle_id]
        delta = self._delta(state, angle)
        self.accumulator.add_delta(angle, delta)
        extra = (self.projection_iterations or 0) - self.options.iterations
        if extra > 0:
            state.refine(extra)
            delta_for_projection = self._delta(state, angle)
        else:
            delta_for_projection = delta
        row0 = geometry.sample_row0(g.field_shape[0], g.volume_shape_zyx[1])

        def line_integral(d: torch.Tensor) -> np.ndarray:
            rows = d[:, row0 : row0 + g.volume_shape_zyx[1], :]
            return (rows.sum(dim=0) * (state.slice_spacing_m / g.voxel_size_m)).cpu().numpy().astype(np.float32)

        projection = line_integral(delta_for_projection)
        input_projection = projection if delta_for_projection is delta else line_integral(delta)
        summary = AngleSummary(
            angle_id=angle_id,
            angle_deg=self._angle_deg[angle_id],
            n_frames=state.n_frames,
            seconds=state.compute_seconds + (time.perf_counter() - t0),
            loss_pass1=self._first_loss.get(angle_id, float("nan")),
            loss_pass2=state.losses[-1],
            projection=projection,
            input_projection=input_projection,
            slices=slices if self.keep_slices else None,
            delta=delta.clone() if self.keep_slices else None,
        )
        state.release_frames()
        del self._states[angle_id]
        self.summaries[angle_id] = summary
        return summary

    def finished_angles_deg(self) -> list[float]:
        return sorted(s.angle_deg for s in self.summaries.values())

    def volume(self) -> np.ndarray:
        return self.accumulator.volume()

    def pending_angles(self) -> list[int]:
        return sorted(self._states)

    def forget_angle(self, angle_id: int) -> None:
        """Drop an unfinished angle's frames and pass-1 sums (it is about to be replayed)."""
        self._states.pop(angle_id, None)
        self._first_loss.pop(angle_id, None)
        self._angle_deg.pop(angle_id, None)

    def projections(self, *, refined: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(angles_deg (N,), projections (N, ny, Nx)) of the finished angles, sorted by angle.

        ``refined``: after ``projection_iterations`` (classical baselines, data consistency);
        otherwise from the Approximant's own iterations (the network's SART input channel).
        """
        items = sorted(self.summaries.values(), key=lambda s: s.angle_deg)
        key = "projection" if refined else "input_projection"
        return (
            np.array([s.angle_deg for s in items]),
            np.stack([getattr(s, key) for s in items]) if items else np.zeros((0, 0, 0), np.float32),
        )


def approximant_from_scan(
    scan,
    *,
    angle_indices: Sequence[int] | None = None,
    batch_size: int | None = None,
    options: EngineOptions | None = None,
    device: torch.device | str = "cpu",
    keep_slices: bool = False,
    projection_iterations: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> StreamingApproximant:
    """Run the streaming engine over a scan (optionally a subset of its angles).

    ``batch_size`` None feeds each angle as one batch (the paper's two full iterations); a number
    feeds frames in batches of that size, as a live stream would.
    """
    indices = list(range(scan.n_angles)) if angle_indices is None else list(angle_indices)
    engine = StreamingApproximant(
        ScanGeometry.from_scan(scan), options=options, device=device, keep_slices=keep_slices,
        projection_iterations=projection_iterations,
    )
    for done, n in enumerate(indices):
        frames, positions = scan.frames_of(n)
        size = len(frames) if batch_size is None else max(1, int(batch_size))
        for start in range(0, len(frames), size):
            engine.add_frames(
                n, float(scan.angles_deg[n]), frames[start : start + size],
                positions[start : start + size],
            )
        engine.finish_angle(n)
        if progress is not None:
            progress(done + 1, len(indices))
    return engine
