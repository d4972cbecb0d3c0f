"""Mixed-state probes: M orthogonal coherent modes with geometrically decaying powers.

The modes are Hermite–Gauss beams (orthogonal by construction, re-orthonormalised on the grid),
optionally defocused by angular-spectrum propagation (unitary, so orthogonality survives). This is
the usual picture of a partially coherent synchrotron beam as a sum of mutually incoherent modes
(Wolf 1982; Thibault & Menzel 2013).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from apt_stream.config import ProbeOptions
from apt_stream.errors import InputError
from apt_stream.physics.multislice import angular_spectrum_kernel, propagate


def _hermite(n: int, x: np.ndarray) -> np.ndarray:
    """Physicists' Hermite polynomial H_n(x) by recurrence."""
    h0, h1 = np.ones_like(x), 2 * x
    if n == 0:
        return h0
    for k in range(1, n):
        h0, h1 = h1, 2 * x * h1 - 2 * k * h0
    return h1


def _mode_orders(n_modes: int) -> list[tuple[int, int]]:
    """(n, m) Hermite orders by increasing n+m: (0,0), (1,0), (0,1), (2,0), (1,1), (0,2), ..."""
    orders: list[tuple[int, int]] = []
    total = 0
    while len(orders) < n_modes:
        for n in range(total, -1, -1):
            orders.append((n, total - n))
        total += 1
    return orders[:n_modes]


def make_probe(
    options: ProbeOptions, *, pixel_size_m: float, wavelength_m: float
) -> np.ndarray:
    """Probe modes (M, h, w) complex64, ``Σ|P|²`` = photons per frame, powers decaying by mode."""
    if pixel_size_m <= 0 or wavelength_m <= 0:
        raise InputError("pixel_size_m and wavelength_m must be > 0")
    n = options.frame_px
    coords = np.arange(n) - (n - 1) / 2
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    if options.shape == "annular":
        return _annular_probe(options, xx, yy, pixel_size_m=pixel_size_m, wavelength_m=wavelength_m)
    # Gaussian intensity FWHM -> field waist w: I ∝ exp(−2r²/w²), FWHM = w·sqrt(2 ln 2).
    waist = options.beam_fwhm_px / math.sqrt(2 * math.log(2))
    envelope = np.exp(-(xx**2 + yy**2) / waist**2)
    modes = []
    for ny_, nx_ in _mode_orders(options.n_modes):
        modes.append(
            _hermite(nx_, math.sqrt(2) * xx / waist) * _hermite(ny_, math.sqrt(2) * yy / waist) * envelope
        )
    stack = np.stack(modes).reshape(options.n_modes, -1).astype(np.complex128)
    # Orthonormalise on the discrete grid (QR keeps the HG ordering).
    q, _ = np.linalg.qr(stack.T)
    basis = q.T.reshape(options.n_modes, n, n)
    return _finish(basis, options, pixel_size_m=pixel_size_m, wavelength_m=wavelength_m)


def _finish(basis: np.ndarray, options: ProbeOptions, *, pixel_size_m: float, wavelength_m: float):
    """Scale orthonormal modes to their powers (Σ|P|² = dose) and apply the defocus."""
    n = options.frame_px
    powers = options.mode_power_decay ** np.arange(options.n_modes)
    powers = powers / powers.sum() * options.photons_per_frame
    probe = basis * np.sqrt(powers)[:, None, None]
    probe_t = torch.from_numpy(probe.astype(np.complex64))
    if options.defocus_m:
        kernel = angular_spectrum_kernel(
            (n, n), pixel_size_m=pixel_size_m, wavelength_m=wavelength_m,
            distance_m=options.defocus_m,
        )
        probe_t = propagate(probe_t, kernel)
    return probe_t.numpy()


def _annular_probe(
    options: ProbeOptions, xx: np.ndarray, yy: np.ndarray, *, pixel_size_m: float, wavelength_m: float
) -> np.ndarray:
    """Zone-plate-like modes: Hermite-Gauss fields on an annular pupil, Fourier-transformed.

    A Fresnel zone plate with a central stop illuminates an annulus of its pupil; the focus is the
    pupil's Fourier transform (an Airy-like core with rings). Partial coherence enters as the
    Hermite-Gauss modes across the pupil, orthonormalised there; the FFT keeps them orthonormal.
    The pupil radius makes the focal core's FWHM about ``beam_fwhm_px``.
    """
    n = options.frame_px
    r = np.hypot(xx, yy)
    # Airy core FWHM = 1.03 λ/NA; in pixels of the focal grid that is 1.03 n / (2 R_pupil).
    r_pupil = 1.03 * n / (2 * options.beam_fwhm_px)
    aperture = (r <= r_pupil) & (r >= options.central_stop * r_pupil)
    if not aperture.any():
        raise InputError("annular probe: the pupil covers no pixel (beam_fwhm_px too large)")
    waist = max(r_pupil / 1.5, 1.0)
    fields = [
        _hermite(nx_, math.sqrt(2) * xx / waist) * _hermite(ny_, math.sqrt(2) * yy / waist) * aperture
        for ny_, nx_ in _mode_orders(options.n_modes)
    ]
    stack = np.stack(fields).reshape(options.n_modes, -1).astype(np.complex128)
    q, _ = np.linalg.qr(stack.T)
    pupil = q.T.reshape(options.n_modes, n, n)
    focus = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(pupil, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    return _finish(focus, options, pixel_size_m=pixel_size_m, wavelength_m=wavelength_m)
