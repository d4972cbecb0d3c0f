"""Multislice mixed-state forward model and its hand-derived adjoint (paper Eqs. 1–8).

Conventions (docs/conventions.md): ``exp(i(kz − ωt))`` waves, angular-spectrum propagation with the
plane-wave phase removed, far field by an orthonormal FFT, frames given *unshifted* here (zero
frequency at index 0; the scan file stores them fftshift-ed and callers undo that once).

The loss is the mixed-state amplitude loss ``Σ_q (sqrt(Σ_m |Ψ_m|²) − sqrt(I))²``. The paper writes
Eqs. 1 and 8 per mode; for M = 1 the two agree, and for M > 1 only the incoherent sum over modes is
what a detector measures, so that is what we fit (docs/approximant.md).

Why a hand-written adjoint: it needs 2M(2L−1) FFTs per frame and stores only the incident waves,
while autograd also keeps every intermediate product; ``tests/test_multislice.py`` checks the two
agree and ``apt-stream bench approximant`` times both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from apt_stream.errors import InputError
from apt_stream.physics import fused


def angular_spectrum_kernel(
    shape_hw: tuple[int, int],
    *,
    pixel_size_m: float,
    wavelength_m: float,
    distance_m: float,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Free-space transfer function ``exp(i 2π Δz (sqrt(1/λ² − f²) − 1/λ))`` (unshifted, complex64).

    Evanescent components (f > 1/λ) are dropped (set to zero).
    """
    if pixel_size_m <= 0 or wavelength_m <= 0:
        raise InputError("pixel_size_m and wavelength_m must be > 0")
    h, w = shape_hw
    fy = np.fft.fftfreq(h, d=pixel_size_m)
    fx = np.fft.fftfreq(w, d=pixel_size_m)
    f2 = fy[:, None] ** 2 + fx[None, :] ** 2
    inv_l2 = 1.0 / wavelength_m**2
    prop = f2 < inv_l2
    # sqrt(1/λ² − f²) − 1/λ written as −f²/(sqrt(1/λ²−f²)+1/λ): no cancellation at small f.
    root = np.sqrt(np.where(prop, inv_l2 - f2, 0.0))
    phase = 2 * math.pi * distance_m * (-f2 / (root + 1.0 / wavelength_m))
    kernel = np.where(prop, np.exp(1j * phase), 0.0).astype(np.complex64)
    return torch.from_numpy(kernel).to(device)


def propagate(field: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Propagate the last two axes of ``field`` by the transfer function ``kernel``."""
    return torch.fft.ifft2(torch.fft.fft2(field) * kernel)


def shifted_probes(probe: torch.Tensor, frac_yx: torch.Tensor) -> torch.Tensor:
    """Probe modes (M,h,w) shifted by sub-pixel offsets (B,2) → (B,M,h,w), via Fourier ramps.

    A positive offset moves the probe towards larger indices, so a frame at position 10.3 sees the
    probe window at 10 with the probe 0.3 px further in.
    """
    m, h, w = probe.shape
    if frac_yx.numel() == 0 or bool((frac_yx == 0).all()):
        return probe.unsqueeze(0).expand(frac_yx.shape[0], m, h, w)
    ramp = shift_ramps(frac_yx, (h, w), device=probe.device)
    return torch.fft.ifft2(torch.fft.fft2(probe).unsqueeze(0) * ramp)


def shift_ramps(
    frac_yx: torch.Tensor, hw: tuple[int, int], *, device, factored: bool = False
) -> torch.Tensor:
    """Fourier phase ramps (B, 1, h, w) that shift a field by the sub-pixel offsets (B, 2).

    ``factored`` forms each ramp as the product of a row ramp and a column ramp: one complex
    multiply per pixel instead of a cosine and a sine (about 10x cheaper at 64², equal to
    rounding). The engine uses it; the simulator keeps the direct form so simulated data do not
    change.
    """
    if factored:
        return RampFactors.of(frac_yx, hw, device=device).full()
    fy_dy, fx_dx = _phase_args(frac_yx, hw, device)
    ramp = torch.polar(
        torch.ones((), device=device),
        -2 * math.pi * (fy_dy[:, :, None] + fx_dx[:, None, :]),
    )
    return ramp.unsqueeze(1)


def _phase_args(frac_yx: torch.Tensor, hw: tuple[int, int], device):
    h, w = hw
    fy = torch.fft.fftfreq(h, device=device, dtype=torch.float32)
    fx = torch.fft.fftfreq(w, device=device, dtype=torch.float32)
    fy_dy = frac_yx[:, 0, None].float().to(device) * fy[None, :]
    fx_dx = frac_yx[:, 1, None].float().to(device) * fx[None, :]
    return fy_dy, fx_dx


@dataclass(frozen=True)
class RampFactors:
    """Shift ramps kept as a row ramp (B, h) and a column ramp (B, w): ``R = rows ⊗ cols``.

    A batch's factors are a few kilobytes where its full ramps are a (B, h, w) complex array, so
    the engine computes them once per batch; the fused pass-1 loop multiplies them out on the fly.
    """

    rows: torch.Tensor  # (B, h) complex64
    cols: torch.Tensor  # (B, w) complex64

    @classmethod
    def of(cls, frac_yx: torch.Tensor, hw: tuple[int, int], *, device) -> RampFactors:
        fy_dy, fx_dx = _phase_args(frac_yx, hw, device)
        one = torch.ones((), device=device)
        return cls(rows=torch.polar(one, -2 * math.pi * fy_dy),
                   cols=torch.polar(one, -2 * math.pi * fx_dx))

    def __getitem__(self, frames: slice) -> RampFactors:
        return RampFactors(self.rows[frames], self.cols[frames])

    def full(self) -> torch.Tensor:
        """The ramps (B, 1, h, w)."""
        return (self.rows[:, :, None] * self.cols[:, None, :]).unsqueeze(1)


@dataclass(frozen=True)
class PatchIndex:
    """Integer window indices of a batch of probe positions into the (Ny, Nx) object field."""

    rows: torch.Tensor  # (B, h) int64
    cols: torch.Tensor  # (B, w) int64
    frac: torch.Tensor  # (B, 2) float32 sub-pixel remainder

    @classmethod
    def from_positions(
        cls, positions_px: torch.Tensor, frame_hw: tuple[int, int], field_hw: tuple[int, int]
    ) -> PatchIndex:
        pos = torch.as_tensor(positions_px, dtype=torch.float64)
        if pos.ndim != 2 or pos.shape[1] != 2:
            raise InputError(f"positions must have shape (B, 2), got {tuple(pos.shape)}")
        if not torch.isfinite(pos).all():
            raise InputError("positions contain NaN or Inf")
        h, w = frame_hw
        ny, nx = field_hw
        base = torch.floor(pos)
        frac = (pos - base).float()
        base = base.long()
        tol = 1e-6
        bad = (pos[:, 0] < -tol) | (pos[:, 1] < -tol) | (pos[:, 0] > ny - h + tol)
        bad |= pos[:, 1] > nx - w + tol
        if bool(bad.any()):
            first = int(torch.nonzero(bad)[0])
            raise InputError(
                f"position {first} = {pos[first].tolist()} puts the {h}x{w} probe window outside "
                f"the {ny}x{nx} object field"
            )
        # A position exactly at the far edge (frac 0 after clamping) stays in range.
        base[:, 0].clamp_(0, ny - h)
        base[:, 1].clamp_(0, nx - w)
        rows = base[:, :1] + torch.arange(h)[None, :]
        cols = base[:, 1:] + torch.arange(w)[None, :]
        return cls(rows=rows, cols=cols, frac=frac)

    def to(self, device: torch.device | str) -> PatchIndex:
        return PatchIndex(self.rows.to(device), self.cols.to(device), self.frac.to(device))

    def flat(self, nx: int) -> torch.Tensor:
        """(B, h*w) flat indices into an (Ny, Nx) plane."""
        return (self.rows[:, :, None] * nx + self.cols[:, None, :]).reshape(self.rows.shape[0], -1)

    def origins(self) -> list[tuple[int, int]]:
        """(row, column) of each window's first pixel."""
        return list(zip(self.rows[:, 0].tolist(), self.cols[:, 0].tolist(), strict=True))

    def origin_tensor(self) -> torch.Tensor:
        """(B, 2) int64 (row, column) of each window's first pixel, contiguous."""
        return torch.stack([self.rows[:, 0], self.cols[:, 0]], dim=1).contiguous()


def extract_patches(slices: torch.Tensor, flat_index: torch.Tensor, hw: tuple[int, int]):
    """Object windows (L, B, h, w) of the slices (L, Ny, Nx) at flat indices (B, h*w).

    Slab-major layout on purpose: every per-slab operation then works on a contiguous (B, h, w)
    block, which makes the broadcast multiplications ~6x faster than strided views on CPU.
    """
    n_slices = slices.shape[0]
    b = flat_index.shape[0]
    return slices.reshape(n_slices, -1)[:, flat_index.reshape(-1)].reshape(n_slices, b, *hw)


def extract_windows(
    slices: torch.Tensor, origins: list[tuple[int, int]], hw: tuple[int, int]
) -> torch.Tensor:
    """:func:`extract_patches` from window origins: one strided copy per frame, the same values.

    A gather by flat index visits every pixel through an index tensor; copying each frame's
    (L, h, w) window is about 4x faster at 64² (docs/approximant.md). Not differentiable in
    place: the autograd reference keeps :func:`extract_patches`.
    """
    h, w = hw
    out = torch.empty((slices.shape[0], len(origins), h, w), dtype=slices.dtype,
                      device=slices.device)
    for b, (row, col) in enumerate(origins):
        out[:, b].copy_(slices[:, row : row + h, col : col + w])
    return out


def scatter_patches(target: torch.Tensor, patches: torch.Tensor, flat_index: torch.Tensor) -> None:
    """Add patches (L, B, h, w) into target (L, Ny, Nx) in place (overlaps accumulate)."""
    n_slices = target.shape[0]
    target.view(n_slices, -1).index_add_(1, flat_index.reshape(-1), patches.reshape(n_slices, -1))


def add_windows(target: torch.Tensor, patches: torch.Tensor, origins: torch.Tensor) -> None:
    """:func:`scatter_patches` by window origins (B, 2): the fused loop where it applies."""
    if fused.usable(target, patches, origins):
        fused.scatter_add(target, patches, origins)
        return
    scatter_patches(target, patches, _flat_from_origins(origins, patches.shape[-2:], target.shape[-1]))


def add_illumination(target: torch.Tensor, probes: torch.Tensor, origins: torch.Tensor) -> None:
    """Add Σ_m |P_m|² of per-frame probes (B, M, h, w) into target (1, Ny, Nx) at the windows."""
    if fused.usable(target, probes, origins):
        fused.scatter_illumination(target[0], probes, origins)
        return
    flat = _flat_from_origins(origins, probes.shape[-2:], target.shape[-1])
    scatter_patches(target, probe_illumination(probes)[None], flat)


def _flat_from_origins(origins: torch.Tensor, hw, nx: int) -> torch.Tensor:
    h, w = hw
    rows = origins[:, :1] + torch.arange(h, device=origins.device)[None, :]
    cols = origins[:, 1:] + torch.arange(w, device=origins.device)[None, :]
    return (rows[:, :, None] * nx + cols[:, None, :]).reshape(origins.shape[0], -1)


def forward_far_field(
    obj_patches: torch.Tensor, probes: torch.Tensor, kernel: torch.Tensor, *, keep_waves: bool
):
    """Eqs. 2–3: far-field modes Ψ (B,M,h,w) and, if asked, the incident wave at every slice.

    ``obj_patches`` (L,B,h,w) complex, ``probes`` (B,M,h,w) complex, ``kernel`` (h,w) one slab.
    """
    n_slices = obj_patches.shape[0]
    incident = []
    psi = probes
    # Each exit wave is only an FFT's input: one buffer for all of them stays in cache
    # (autograd, which the reference implementations use, needs fresh outputs instead).
    traced = torch.is_grad_enabled() and (obj_patches.requires_grad or probes.requires_grad)
    exit_wave = None if traced else torch.empty(
        probes.shape, dtype=torch.result_type(probes, obj_patches), device=probes.device
    )
    for slab in range(n_slices):
        if slab > 0:
            psi = torch.fft.fft2(psi)
            psi.mul_(kernel)
            psi = torch.fft.ifft2(psi)
        if keep_waves:
            incident.append(psi)
        obj = obj_patches[slab].unsqueeze(1)
        psi = psi * obj if exit_wave is None else torch.mul(psi, obj, out=exit_wave)
    far = torch.fft.fft2(psi, norm="ortho")
    return far, incident


def probe_illumination(probes: torch.Tensor) -> torch.Tensor:
    """Σ_m |P_m|² of per-frame probes (B, M, h, w) → (B, h, w): the step preconditioner."""
    return _intensity(probes)


def _intensity(field: torch.Tensor) -> torch.Tensor:
    """Σ_m |Ψ_m|² over dim 1 of a (B, M, h, w) complex tensor."""
    # vecdot is one fused pass; real² + imag² then sum is three (measured 2.4× slower at M = 3).
    return torch.linalg.vecdot(field, field, dim=1).real


def amplitude_residual(far: torch.Tensor, sqrt_intensity: torch.Tensor, *, eps: float = 1e-12):
    """Loss ``Σ (A − √I)²`` with ``A = sqrt(Σ_m |Ψ_m|²)``; overwrites ``far`` with ∂L/∂Ψ*.

    ``eps`` (in √photons) regularises ``(A − √I)/A`` where the model predicts almost nothing but a
    photon was counted: there the gradient's direction is pure rounding noise (its size is bounded
    by √I), so a tiny ``eps`` makes results depend on FFT batch sizes. The engine uses 0.1.
    """
    amp = torch.sqrt(_intensity(far))
    diff = amp - sqrt_intensity
    loss = float(diff.square().sum())
    scale = diff.div_(amp.add_(eps))
    return loss, far.mul_(_as_complex(scale, far.dtype).unsqueeze(1))


def _as_complex(real: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``real`` cast to ``dtype``: CPU torch multiplies complex by real through a per-element
    type cast, 4.5x slower than complex by complex at (8, 3, 64, 64); the cast of a per-frame
    (B, h, w) factor costs a fraction of that."""
    return real.to(dtype)


def loss_and_gradient(
    obj_patches: torch.Tensor,
    probes: torch.Tensor,
    sqrt_intensity: torch.Tensor,
    kernel: torch.Tensor,
    *,
    eps: float = 1e-12,
):
    """Amplitude loss and its gradient ∂L/∂O* per object patch (L,B,h,w) — paper Eqs. 4–8.

    The adjoint runs on the *conjugate* adjoint wave ``η = χ̄``: ``χ ← F⁻¹[F[χ Ō] K̄]`` becomes
    ``η ← F[F⁻¹[η O] K]`` and ``Σ_m ψ̄ χ = conj(Σ_m ψ η)``, so no complex conjugate of a
    (B, M, h, w) array is formed per slab (CPU torch materialises those: a 2× slower multiply).
    """
    far, incident = forward_far_field(obj_patches, probes, kernel, keep_waves=True)
    loss, d_far = amplitude_residual(far, sqrt_intensity, eps=eps)
    n_slices = obj_patches.shape[0]
    grad = torch.empty_like(obj_patches)
    # η at the exit: conj(F⁻¹_ortho[d]) = F_ortho[d̄]
    # (an in-place conjugate: a conjugate view as the FFT's input costs a copy)
    eta = torch.fft.fft2(d_far.conj_physical_(), norm="ortho")
    for slab in range(n_slices - 1, -1, -1):
        # Past slab 0 the incident waves are this call's own and used for the last time here,
        # so the product overwrites them (no fresh, cache-cold buffer); slab 0 is the caller's probes.
        wave = incident[slab]
        torch.sum(wave.mul_(eta) if slab > 0 else wave * eta, dim=1, out=grad[slab])
        if slab > 0:
            eta.mul_(obj_patches[slab].unsqueeze(1))
            eta = torch.fft.ifft2(eta)
            eta.mul_(kernel)
            eta = torch.fft.fft2(eta)
    return loss, grad.conj_physical_()


def window_loss_and_gradient(
    slices: torch.Tensor,
    origins: torch.Tensor,
    probes: torch.Tensor,
    sqrt_intensity: torch.Tensor,
    kernel: torch.Tensor,
    *,
    eps: float = 1e-12,
):
    """:func:`loss_and_gradient` on the windows of ``slices`` (L, Ny, Nx) at ``origins`` (B, 2).

    On the CPU the fused loops (:mod:`apt_stream.physics.fused`) read each window straight from
    the slices and do the products, the amplitude residual and the adjoint's mode sums in one pass
    each; the FFTs and the propagator products are the same torch calls as in
    :func:`loss_and_gradient`, which is what runs everywhere else.
    """
    hw = tuple(probes.shape[-2:])
    if not fused.usable(slices, origins, probes, sqrt_intensity):
        patches = extract_windows(slices, [tuple(o) for o in origins.tolist()], hw)
        return loss_and_gradient(patches, probes, sqrt_intensity, kernel, eps=eps)
    n_slices = slices.shape[0]
    incident = []
    psi = probes
    exit_wave = torch.empty_like(probes)
    for slab in range(n_slices):
        if slab > 0:
            psi = torch.fft.fft2(exit_wave)
            psi.mul_(kernel)
            psi = torch.fft.ifft2(psi)
        incident.append(psi)
        fused.forward_exit(psi, slices[slab], origins, exit_wave)
    far = torch.fft.fft2(exit_wave, norm="ortho")
    loss = fused.residual_conj(far, sqrt_intensity, eps)
    eta = torch.fft.fft2(far, norm="ortho")  # η at the exit, as in loss_and_gradient
    grad = torch.empty((n_slices, probes.shape[0], *hw), dtype=probes.dtype, device=probes.device)
    for slab in range(n_slices - 1, -1, -1):
        fused.adjoint_slab(incident[slab], eta, slices[slab] if slab > 0 else None, origins,
                           grad[slab])
        if slab > 0:
            eta = torch.fft.ifft2(eta)
            eta.mul_(kernel)
            eta = torch.fft.fft2(eta)
    return loss, grad


@dataclass(frozen=True)
class FlatStart:
    """What pass 1 needs at the flat start O = 1, computed once per angle (docs/approximant.md).

    With every slice equal to 1 the object does nothing, so the wave reaching slab ``l`` is the
    shifted probe propagated ``l`` slabs, ``F⁻¹[P̂ R K^l]``, and every frame's model far field is
    ``P̂ R K^(L−1)``: its amplitude does not depend on the frame (``|R| = 1``). The adjoint wave at
    slab ``l`` is ``F⁻¹[P̂ K^(L−1) K̄^(L−1−l) R s]`` with ``s`` the frame's amplitude residual; its
    conjugate, ``F[conj(P̂ K^(L−1) K̄^(L−1−l)) R̄ s] / N``, is what the gradient sum uses (see
    :func:`loss_and_gradient`). So a frame costs 2ML FFTs instead of 2M(2L−1) + the probe shift,
    and no object gathers — exactly, for sub-pixel positions too, because the shift ramp ``R`` is a
    Fourier multiplier like the propagator and is applied before the transform.
    """

    incident_hat: torch.Tensor  # (L, M, h, w)  P̂ K^l
    adjoint_hat_conj: torch.Tensor  # (L, M, h, w)  conj(P̂ K^(L−1) K̄^(L−1−l)) / N
    amplitude: torch.Tensor  # (h, w)  sqrt(Σ_m |Ψ_m|²) of the model far field (ortho FFT)

    @classmethod
    def build(cls, probe: torch.Tensor, kernel: torch.Tensor, n_slices: int) -> FlatStart:
        p_hat = torch.fft.fft2(probe.to(torch.complex128))
        k = kernel.to(torch.complex128)
        powers = [torch.ones_like(k)]
        for _ in range(n_slices - 1):
            powers.append(powers[-1] * k)
        incident = torch.stack([p_hat * kl for kl in powers])
        exit_hat = incident[-1]
        n_pix = probe.shape[-1] * probe.shape[-2]
        adjoint_conj = torch.stack(
            [(exit_hat * powers[n_slices - 1 - sl].conj()).conj() / n_pix for sl in range(n_slices)]
        )
        amplitude = torch.sqrt((exit_hat.abs() ** 2).sum(dim=0) / n_pix)
        return cls(
            incident_hat=incident.to(torch.complex64),
            adjoint_hat_conj=adjoint_conj.to(torch.complex64),
            amplitude=amplitude.to(torch.float32),
        )


def flat_start_loss_and_gradient(
    flat: FlatStart,
    ramps: torch.Tensor | RampFactors,
    sqrt_intensity: torch.Tensor,
    *,
    eps: float = 1e-12,
):
    """:func:`loss_and_gradient` at O = 1, from :class:`FlatStart` tables and shift ``ramps``
    ((B, 1, h, w), or their :class:`RampFactors`).

    Returns the loss, ∂L/∂O* per object patch (L, B, h, w) and the shifted probes (B, M, h, w)
    (the incident wave at slab 0), which the later iterations reuse.
    """
    n_slices = flat.incident_hat.shape[0]
    diff = flat.amplitude - sqrt_intensity  # (B, h, w)
    loss = float(diff.square().sum())
    # ∂L/∂Ψ* = Ψ (A − √I)/A (amplitude_residual); the ortho FFT's 1/√N cancels in the inverse.
    scale = diff.div_(flat.amplitude + eps)
    b = sqrt_intensity.shape[0]
    grad = torch.empty((n_slices, b, *sqrt_intensity.shape[-2:]), dtype=torch.complex64,
                       device=sqrt_intensity.device)
    use_fused = isinstance(ramps, RampFactors) and fused.usable(
        grad, ramps.rows, ramps.cols, scale, flat.incident_hat, flat.adjoint_hat_conj
    )
    if not use_fused:
        full = ramps.full() if isinstance(ramps, RampFactors) else ramps
        weighted_conj = torch.conj_physical(full).mul_(_as_complex(scale, full.dtype).unsqueeze(1))
    probes = None
    # The table-times-ramp products are only FFT inputs: one buffer for all of them.
    spectrum = torch.empty((b, *flat.incident_hat.shape[1:]), dtype=torch.complex64,
                           device=sqrt_intensity.device)
    for slab in range(n_slices):
        if use_fused:
            psi = torch.fft.ifft2(fused.ramp_product(flat.incident_hat[slab], ramps.rows,
                                                     ramps.cols, None, spectrum))
            eta = torch.fft.fft2(fused.ramp_product(flat.adjoint_hat_conj[slab], ramps.rows,
                                                    ramps.cols, scale, spectrum))
            fused.mode_sum_conj(eta, psi, grad[slab])
        else:
            psi = torch.fft.ifft2(torch.mul(flat.incident_hat[slab], full, out=spectrum))
            eta = torch.fft.fft2(torch.mul(flat.adjoint_hat_conj[slab], weighted_conj,
                                           out=spectrum))
            torch.sum(eta.mul_(psi), dim=1, out=grad[slab])
        if slab == 0:
            probes = psi
    return loss, grad if use_fused else grad.conj_physical_(), probes


def simulate_intensity(
    slices: torch.Tensor,
    probe: torch.Tensor,
    positions_px: torch.Tensor,
    kernel: torch.Tensor,
    *,
    chunk: int = 64,
) -> torch.Tensor:
    """Noise-free far-field intensities (B,h,w), unshifted, of slices (L,Ny,Nx) at positions."""
    _, h, w = probe.shape
    index = PatchIndex.from_positions(positions_px, (h, w), slices.shape[-2:]).to(slices.device)
    flat = index.flat(slices.shape[-1])
    out = []
    for start in range(0, flat.shape[0], chunk):
        sl = slice(start, start + chunk)
        patches = extract_patches(slices, flat[sl], (h, w))
        probes = shifted_probes(probe, index.frac[sl])
        far, _ = forward_far_field(patches, probes, kernel, keep_waves=False)
        out.append(_intensity(far))
    return torch.cat(out)
