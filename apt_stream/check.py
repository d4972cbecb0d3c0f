"""``apt-stream check SCAN.h5``: does the data fit our forward model, and in which convention?

A few angles (the extremes and the one nearest 0°) are reconstructed with many multislice
iterations from a flat start, and the frames' **R-factor** is reported per angle:
``R = Σ|√I_model − √I| / Σ√I`` over every pixel of every frame of the angle, next to
``R_poisson``, the R-factor that a perfect model would leave on frames with this many photons
(one Poisson draw of the model's own intensities). With ground truth, the forward model of the
true volume is compared with the frames the same way (``R_truth``), and the reconstructed
projection with the true one (``projection_pcc``).

It then looks for the signatures of a convention error and warns loudly about each:

* **phase sign**: matter has δ > 0, so its phase is negative in our convention; a reconstruction
  whose mean δ̂ over the sample is negative (``delta_sign`` < −0.2) or whose projection
  anticorrelates with the truth says the probe should be conjugated and the frames mirrored
  (``phase_sign = +1``);
* **transposed positions**: the same reconstruction with (y, x) swapped fits clearly better;
* **probe normalisation**: the frames hold far more (or fewer) photons than Σ|P|²; h·w times
  more means a probe for an unnormalised FFT (``fft_norm = "backward"``); the other checks then
  run with the probe rescaled;
* **off-centre DC**: the direct beam of the mean frame (located by circular cross-correlation
  with the probe's own far field) is not at (h//2, w//2); half a frame away means unshifted
  frames (``fft_centring = "corner"``); and a reconstruction of the re-centred frames fits
  clearly better.

"Clearly better" means an R-factor below 0.85 of the file's and within 3× its own Poisson floor.

The library never prints; :func:`check_file` returns a dict with ``warnings`` (a list of one-line
strings) and ``angles`` (one row per checked angle).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

#: A hypothesis "fits clearly better" when its R-factor is below this fraction of the file's.
BETTER = 0.85
#: delta_sign below this flags an inverted phase.
SIGN_LIMIT = -0.2


def _pick_angles(angles: np.ndarray, n: int) -> list[int]:
    order = np.argsort(angles)
    picks = [int(order[0]), int(order[-1]), int(np.argmin(np.abs(angles)))]
    picks += [int(i) for i in order[np.linspace(0, len(order) - 1, max(n, 1)).round().astype(int)]]
    out: list[int] = []
    for i in picks:
        if i not in out:
            out.append(i)
    return sorted(out[: max(1, n)], key=lambda i: angles[i])


def _r_factor(model: np.ndarray | None, data: np.ndarray) -> float:
    """Σ|√model − √data| / Σ√data; inf when the model diverged (a wrong convention can)."""
    if model is None:
        return math.inf
    a, b = np.sqrt(np.clip(model, 0, None)), np.sqrt(np.clip(data, 0, None))
    r = float(np.abs(a - b).sum() / max(b.sum(), 1e-30))
    return r if math.isfinite(r) else math.inf


def _floor(model: np.ndarray | None, rng: np.random.Generator) -> float:
    """R-factor that Poisson noise alone leaves on frames of these intensities (one draw)."""
    if model is None or not np.isfinite(model).all() or model.max() > 1e12:
        return math.inf
    lam = np.clip(model, 0, None)
    return _r_factor(lam, rng.poisson(lam).astype(np.float32))


def _finite(v: float) -> float | None:
    return round(v, 4) if math.isfinite(v) else None


def _sane(slices: torch.Tensor) -> bool:
    return bool(torch.isfinite(slices).all()) and float(slices.abs().max()) <= 10.0


def _reconstruct(geom, angle_deg, frames, positions, iterations):
    """Slices after ``iterations`` full iterations and the model frames (centred)."""
    from apt_stream.physics.engine import AngleState, EngineOptions
    from apt_stream.physics.multislice import simulate_intensity

    probe = torch.as_tensor(np.asarray(geom.probe_at_entrance(angle_deg))).to(torch.complex64)
    state = AngleState(
        probe, field_shape=geom.field_shape, n_slices=geom.n_slices,
        slice_spacing_m=geom.slice_spacing_m(angle_deg), wavelength_m=geom.wavelength_m,
        pixel_size_m=geom.object_pixel_m, options=EngineOptions(iterations=2),
    )
    state.add_frames(frames, positions)
    state.finish()
    if not _sane(state.slices):
        return state, None
    # Wrong data can make the steps diverge: stop at the last sane slices (|O| ≤ 10).
    for _ in range(max(0, iterations - 2)):
        if not _sane(state.slices):
            break
        before = state.slices.clone()
        state.refine(1)
        if not _sane(state.slices):
            state.slices = before
            break
    model = simulate_intensity(state.slices, probe, torch.as_tensor(positions), state.kernel)
    return state, np.fft.fftshift(model.numpy(), axes=(-2, -1))


def _footprint(geom, angle_deg):
    from apt_stream.physics import geometry

    nz, ny, nx = geom.volume_shape_zyx
    row0 = geometry.sample_row0(geom.field_shape[0], ny)
    half = geometry.lateral_extent_px(geom.volume_shape_zyx, angle_deg) / 2
    cols = np.arange(geom.field_shape[1]) - (geom.field_shape[1] - 1) / 2
    return slice(row0, row0 + ny), np.abs(cols) < half - 1.0


def _projection(geom, state, angle_deg) -> np.ndarray:
    """Σ_l δ̂_l over the slices after offset removal, on the sample rows: (ny, Nx), voxel units."""
    from apt_stream.physics import geometry
    from apt_stream.physics.engine import phases_to_delta, remove_phase_offset

    row0 = geometry.sample_row0(geom.field_shape[0], geom.volume_shape_zyx[1])
    phases = remove_phase_offset(torch.angle(state.slices), shape_zyx=geom.volume_shape_zyx,
                                 angle_deg=angle_deg, row0=row0)
    spacing = geom.slice_spacing_m(angle_deg)
    delta = phases_to_delta(phases, wavelength_m=geom.wavelength_m, slice_spacing_m=spacing)
    rows = delta[:, row0: row0 + geom.volume_shape_zyx[1], :]
    return (rows.sum(0) * spacing / geom.voxel_size_m).numpy()


def _truth_model(scan, geom, angle_deg, positions):
    """Frames (centred) of the true volume through a fine multislice, and its projection."""
    from apt_stream.physics import geometry
    from apt_stream.physics.multislice import angular_spectrum_kernel, simulate_intensity
    from apt_stream.sim.acquire import lab_slab_integrals, slab_transmission

    shape = geom.volume_shape_zyx
    depth = geometry.beam_extent_px(shape, angle_deg)
    n_slabs = max(1, math.ceil(depth / 2.0))
    vol = torch.from_numpy(np.stack([scan.truth.delta, scan.truth.beta]).astype(np.float32))
    slabs = lab_slab_integrals(vol, angle_deg=angle_deg, n_slabs=n_slabs,
                               field_shape=geom.field_shape, frame_px=scan.frame_shape[0])
    obj = slab_transmission(slabs, voxel_size_m=geom.voxel_size_m, wavelength_m=geom.wavelength_m)
    kernel = angular_spectrum_kernel(scan.frame_shape, pixel_size_m=geom.object_pixel_m,
                                     wavelength_m=geom.wavelength_m,
                                     distance_m=depth * geom.voxel_size_m / n_slabs)
    probe = torch.as_tensor(np.asarray(geom.probe_at_entrance(angle_deg))).to(torch.complex64)
    model = simulate_intensity(obj, probe, torch.as_tensor(positions), kernel).numpy()
    row0 = geometry.sample_row0(geom.field_shape[0], shape[1])
    proj = slabs[0].sum(0)[row0: row0 + shape[1]].numpy()
    return np.fft.fftshift(model, axes=(-2, -1)), proj


def _dc_offset(frames: np.ndarray, probe: np.ndarray) -> tuple[int, int]:
    """Cyclic shift (dy, dx) of the mean frame against the probe's far field (0, 0: centred)."""
    vac = np.fft.fftshift(np.sum(np.abs(np.fft.fft2(probe, norm="ortho")) ** 2, axis=0))
    mean = np.asarray(frames, dtype=np.float64).mean(axis=0)
    xc = np.fft.ifft2(np.fft.fft2(mean) * np.conj(np.fft.fft2(vac))).real
    dy, dx = np.unravel_index(int(np.argmax(xc)), xc.shape)
    h, w = mean.shape
    return int((dy + h // 2) % h - h // 2), int((dx + w // 2) % w - w // 2)


def check_scan_data(scan, *, n_angles: int = 3, iterations: int = 30,
                    progress: Callable[[int, int], None] | None = None) -> dict:
    """Run the checks on an in-memory scan (see the module docstring); returns the report."""
    from apt_stream.errors import InputError
    from apt_stream.io.conventions import flip_frequencies
    from apt_stream.metrics import pcc
    from apt_stream.physics.engine import ScanGeometry, check_slice_spacing

    warnings: list[str] = []
    try:
        geom = ScanGeometry.from_scan(scan)
        check_slice_spacing(geom)
    except InputError as exc:
        return {"ok": False, "warnings": [f"ENGINE REJECTS THE SCAN: {exc}"], "angles": []}
    picks = _pick_angles(np.asarray(scan.angles_deg), n_angles)
    h, w = scan.frame_shape
    rows_out, rng = [], np.random.default_rng(0)
    photons = float(np.mean([np.asarray(scan.frames_of(n)[0]).sum(axis=(1, 2)).mean()
                             for n in picks]))
    power = float(np.sum(np.abs(np.asarray(geom.probe)) ** 2))
    ratio = photons / max(power, 1e-30)
    probe_scale = 1.0
    if not 0.05 <= ratio <= 1.5:
        probe_scale = math.sqrt(ratio)
        hint = (f"; h·w = {h * w}: the probe looks normalised for an unnormalised FFT "
                "(fft_norm = 'backward', multiply it by √(h·w))"
                if 0.5 * h * w <= ratio <= 1.5 * h * w else "")
        warnings.append(
            f"PROBE NORMALISATION: the frames hold {photons:.4g} photons on average but the probe "
            f"Σ|P|² = {power:.4g} (ratio {ratio:.3g}; a sample transmits at most the probe's "
            f"photons){hint}. The other checks below use the probe scaled by {probe_scale:.4g}")
        geom = replace(geom, probe=np.asarray(geom.probe) * probe_scale)
    flipped_geom = replace(geom, probe=np.conj(np.asarray(geom.probe)))
    steps = len(picks)
    for done, n in enumerate(picks):
        angle = float(scan.angles_deg[n])
        frames, positions = scan.frames_of(n)
        frames = np.asarray(frames, dtype=np.float32)
        state, model = _reconstruct(geom, angle, frames, positions, iterations)
        r = _r_factor(model, frames)
        r_poisson = _floor(model, rng)
        proj = _projection(geom, state, angle)
        rows_sl, cols = _footprint(geom, angle)
        inside = proj[:, cols] if cols.any() else proj
        delta_sign = (float(inside.mean() / max(np.abs(inside).mean(), 1e-30))
                      if np.isfinite(inside).all() else None)
        row = {"angle_index": int(n), "angle_deg": round(angle, 4), "frames": int(len(frames)),
               "mean_photons": round(float(frames.sum(axis=(1, 2)).mean()), 1),
               "r_factor": _finite(r), "r_poisson": _finite(r_poisson),
               "delta_sign": None if delta_sign is None else round(delta_sign, 3)}
        # The alternatives a convention error would make the right ones.
        alt = {}
        _, m = _reconstruct(flipped_geom, angle, flip_frequencies(frames), positions, iterations)
        alt["phase_sign"] = (_r_factor(m, flip_frequencies(frames)), _floor(m, rng))
        swapped = positions[:, ::-1].copy()
        span = np.array(geom.field_shape) - [h, w]
        if np.all(swapped.max(0) <= span + 0.01) and np.all(swapped.min(0) >= -0.01):
            _, m = _reconstruct(geom, angle, frames, np.clip(swapped, 0, span), iterations)
            alt["transposed_positions"] = (_r_factor(m, frames), _floor(m, rng))
        recentred = np.fft.fftshift(frames, axes=(-2, -1))
        _, m = _reconstruct(geom, angle, recentred, positions, iterations)
        alt["fft_centring"] = (_r_factor(m, recentred), _floor(m, rng))
        row["r_if"] = {k: _finite(v[0]) for k, v in alt.items()}
        row["_r"], row["_alt"] = r, alt
        if scan.truth is not None:
            truth_frames, truth_proj = _truth_model(scan, geom, angle, positions)
            row["r_truth"] = _finite(_r_factor(truth_frames, frames))
            row["projection_pcc"] = (round(float(pcc(proj, truth_proj)), 4)
                                     if np.isfinite(proj).all() else None)
        rows_out.append(row)
        if progress is not None:
            progress(done + 1, steps)

    def mean(key, sub=None):
        vals = [(r[sub] if sub else r).get(key) for r in rows_out]
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else None

    def mean_inf(values):  # R-factors with inf for a diverged model
        return float(np.mean(values)) if values else None

    r_all = mean_inf([row["_r"] for row in rows_out])
    keys = ("phase_sign", "transposed_positions", "fft_centring")
    alts = {k: mean_inf([row["_alt"][k][0] for row in rows_out if k in row["_alt"]]) for k in keys}
    alt_floor = {k: mean_inf([row["_alt"][k][1] for row in rows_out if k in row["_alt"]])
                 for k in keys}
    for row in rows_out:
        del row["_r"], row["_alt"]
    r_mean = mean("r_factor")
    sign = mean("delta_sign")
    if sign is not None and sign < SIGN_LIMIT:
        warnings.append(
            f"PHASE SIGN LOOKS INVERTED: the reconstructed δ is negative over the sample "
            f"(delta_sign {sign:.2f}); matter has δ > 0. The data are probably in the exp(+ikδt) "
            "convention: conjugate the probe and mirror the frames (probe attribute "
            "phase_sign = +1, or apt-stream import --phase-sign +1)")
    ppcc = mean("projection_pcc")
    if ppcc is not None and ppcc < SIGN_LIMIT:
        warnings.append(f"PROJECTIONS ANTICORRELATE WITH THE TRUTH (PCC {ppcc:.2f}): phase sign "
                        "or geometry is inverted")
    for key, what in (("phase_sign", "with the probe conjugated and the frames mirrored "
                                     "(phase_sign = +1)"),
                      ("transposed_positions", "with positions (y, x) swapped: POSITIONS LOOK "
                                               "TRANSPOSED (they must be (y, x))"),
                      ("fft_centring", "with the frames re-centred: OFF-CENTRE DC (frames look "
                                       "unshifted: fft_centring = 'corner')")):
        r_alt = alts[key]
        floor = alt_floor[key]
        if (r_alt is not None and math.isfinite(r_alt) and r_alt < BETTER * r_all
                and floor is not None and r_alt < 3 * floor):
            warnings.append(f"THE DATA FIT BETTER {what}: R-factor {r_alt:.3f} vs {r_all:.3g}")
    dc = _dc_offset(np.asarray(scan.frames_of(picks[len(picks) // 2])[0]), np.asarray(geom.probe))
    if dc != (0, 0):
        half = abs(dc[0]) >= h // 2 - 1 and abs(dc[1]) >= w // 2 - 1
        warnings.append(
            f"OFF-CENTRE DC: the direct beam sits {dc} px from (h//2, w//2) = ({h // 2}, {w // 2})"
            + ("; the frames look unshifted (zero frequency at [0, 0]): set fft_centring = "
               "'corner' or apply numpy.fft.fftshift" if half else
               "; crop the detector images around the direct beam"))
    if r_all is not None and not math.isfinite(r_all):
        warnings.append("THE RECONSTRUCTION DIVERGED on the file as it is: the frames do not fit "
                        "the probe and positions (see the warnings above)")
    rt = mean("r_truth")
    if rt is not None and r_mean is not None and rt > 2 * max(mean("r_poisson") or 0, 1e-9):
        warnings.append(f"THE TRUE VOLUME DOES NOT REPRODUCE THE FRAMES: R_truth {rt:.3f} vs "
                        f"Poisson floor {mean('r_poisson'):.3f}: a convention of the file is wrong")
    return {
        "ok": not warnings, "warnings": warnings, "iterations": int(iterations),
        "r_factor": None if r_mean is None else round(r_mean, 4),
        "r_poisson": None if mean("r_poisson") is None else round(mean("r_poisson"), 4),
        "r_truth": None if rt is None else round(rt, 4),
        "dc_offset_px": list(dc), "angles": rows_out,
    }


def check_file(path: str | Path, *, n_angles: int = 3, iterations: int = 30,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Read a scan file (converting its declared conventions) and :func:`check_scan_data` it."""
    from apt_stream.io import read_scan

    scan = read_scan(path, load_frames=False)
    report = check_scan_data(scan, n_angles=n_angles, iterations=iterations, progress=progress)
    return {"scan": str(path), **report}
