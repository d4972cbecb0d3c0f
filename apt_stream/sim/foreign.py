"""An out-of-family test set: a second IC design family and a second multislice simulator.

Everything the model was trained and scored on came from :mod:`apt_stream.sim.phantom` and
:mod:`apt_stream.sim.acquire`. An error shared by the simulator and the engine (a sign, an axis,
an off-by-one in the field) would cancel out there and never show in a score. This module is an
independent implementation written from ``docs/conventions.md`` and ``docs/scan-format.md`` alone
(it imports neither the simulator nor :mod:`apt_stream.physics.multislice`), so a scan from it
checks the documented conventions end to end, and its phantoms come from a design family the
network never saw:

* **Phantoms** (:func:`foreign_phantom`, 15 nm voxels, which training never uses). From the bottom
  up: a Si substrate with shallow-trench isolation (SiO₂), a W contact level, one to three Co
  local-interconnect levels on a fixed routing grid with random track occupancy (in SiCOH or
  SiO₂), each capped by a Si₃N₄ etch stop of 1–2 voxels, Co vias through the etch stops, a thick
  Al pad/power level (wide lines in x, y or both) and a Si₃N₄ passivation on top (z = 0).
* **Optics**: δ, β from ``xraydb.xray_delta_beta`` (Chantler tables) for every material, not the
  project's Henke subset in :mod:`apt_stream.sim.materials` (only its label table and densities
  are used).
* **Forward model** (:func:`simulate_foreign_scan`): per angle the (δ, β) volume is resampled into
  the lab frame by bilinear sampling with 2× lateral and 4× axial oversampling, integrated over
  slabs of about 2 voxels (the engine's Approximant uses L = 5 slices over the whole depth),
  turned into transmissions, and a zone-plate-like, partially coherent probe is carried through
  them with a symmetric split-step angular-spectrum propagator. Positions follow jittered
  concentric rings, not a raster.

Conventions (axes, angles, propagation sign, field layout, positions, fftshift of the frames,
probe normalisation) are the documented ones; the module docstrings of the functions say where
the documents left a choice open and which reading was taken.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import ndimage

from apt_stream.errors import InputError
from apt_stream.io import GroundTruth, ScanData
from apt_stream.sim.materials import AL, CO, MATERIALS, SI, SI3N4, SICOH, SIO2, W
from apt_stream.sim.phantom import Layer, Phantom

__all__ = [
    "FOREIGN_VOXEL_M",
    "N_SLICES",
    "foreign_optical_constants",
    "foreign_phantom",
    "foreign_probe",
    "ring_positions",
    "simulate_foreign_scan",
]

#: Voxel edge of the foreign family (the training set never uses 15 nm).
FOREIGN_VOXEL_M = 15e-9
#: L, the number of Approximant slices written into the scan (``object/n_slices``).
N_SLICES = 5
#: λ = HC / E with the constant exactly as docs/conventions.md writes it (nm·keV).
_HC_NM_KEV = 1.239842
#: Slab thickness of the forward model along the beam, voxels (split evenly over D(θ)).
_SLAB_VOXELS = 2.0
#: Oversampling of the lab-frame resampling: samples per slab along the beam, per pixel across.
_SUB_Z, _SUB_X = 4, 2
#: Positions carried through the multislice together (bounds memory: B × M × h × w complex64).
_BATCH = 32
#: Distinct random streams per seed, so that e.g. the path does not change with the phantom.
_STREAM_PHANTOM, _STREAM_PATH, _STREAM_NOISE = 11, 12, 13


# ------------------------------------------------------------------------------------------------
# Phantoms
# ------------------------------------------------------------------------------------------------


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), stream])


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _drop_short_runs(track: np.ndarray, min_len: int) -> np.ndarray:
    """Remove runs of True shorter than ``min_len`` from a 1-D boolean array (slivers after cuts)."""
    padded = np.concatenate([[False], track, [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    out = track.copy()
    for start, stop in zip(edges[::2], edges[1::2], strict=True):
        if stop - start < min_len:
            out[start:stop] = False
    return out


def _routing_grid_lines(
    n_perp: int, n_along: int, *, pitch: int, width: int, occupancy: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Lines on a fixed routing grid: (n_perp, n_along) mask, lines along the second axis.

    Unlike the free placement of the training family, every line sits on one track of a grid of
    fixed pitch; a track is used with probability ``occupancy`` and may be cut into segments.
    At least one track is always used, so every level holds metal.
    """
    offset = int(rng.integers(0, pitch))
    starts = list(range(offset, n_perp - width + 1, pitch)) or [max(0, (n_perp - width) // 2)]
    used = rng.random(len(starts)) < occupancy
    if not used.any():
        used[int(rng.integers(len(starts)))] = True
    mask = np.zeros((n_perp, n_along), dtype=bool)
    for start, on in zip(starts, used, strict=True):
        if not on:
            continue
        track = np.ones(n_along, dtype=bool)
        for _ in range(int(rng.choice([0, 1, 2], p=[0.45, 0.35, 0.2]))):
            gap = int(rng.integers(2, pitch + 2))
            cut = int(rng.integers(0, max(1, n_along - gap)))
            track[cut : cut + gap] = False
        track = _drop_short_runs(track, min_len=3)
        mask[start : start + width] |= track[None, :]
    return mask


def _wide_lines(n_perp: int, n_along: int, rng: np.random.Generator) -> np.ndarray:
    """Wide pad/power lines at free positions with random widths and gaps (lines along axis 1)."""
    w_lo, w_hi = max(3, n_perp // 12), max(4, n_perp // 5)
    g_lo, g_hi = 3, max(4, n_perp // 8)
    mask = np.zeros((n_perp, n_along), dtype=bool)
    pos = int(rng.integers(0, g_hi + 1))
    while pos < n_perp:
        width = int(rng.integers(w_lo, w_hi + 1))
        mask[pos : pos + width] = True
        pos += width + int(rng.integers(g_lo, g_hi + 1))
    if not mask.any():
        mask[: min(n_perp, w_lo)] = True
    return mask


def _oriented(direction: str, ny: int, nx: int, make: Callable[[int, int], np.ndarray]):
    """A (ny, nx) mask of lines whose long axis is ``direction`` ("x" or "y")."""
    return make(ny, nx) if direction == "x" else make(nx, ny).T


def _vias_at_crossings(lower: np.ndarray, upper: np.ndarray, fraction: float, rng) -> np.ndarray:
    """Vias at a random subset of the places where metal of two adjacent levels overlaps."""
    cross = lower & upper
    comps, n = ndimage.label(cross)
    if n == 0:
        return cross
    keep = np.concatenate([[False], rng.random(n) < fraction])
    return keep[comps]


def _fit_thicknesses(specs: list[dict], nz: int, rng: np.random.Generator) -> list[int]:
    """Random thickness per layer within its range, then grown/shrunk one voxel at a time to nz.

    Layers are picked for growing/shrinking with probability proportional to their weight, never
    below their minimum nor above their maximum (etch stops and passivation stay 1–2 voxels); the
    substrate has no maximum, so the stack always fills the volume.
    """
    t = [int(rng.integers(s["lo"], s["hi"] + 1)) for s in specs]
    weights = np.array([s["weight"] for s in specs], dtype=float)
    while sum(t) != nz:
        grow = sum(t) < nz
        ok = np.array(
            [(ti < s["max"]) if grow else (ti > s["min"]) for ti, s in zip(t, specs, strict=True)]
        )
        p = weights * ok
        i = int(rng.choice(len(specs), p=p / p.sum()))
        t[i] += 1 if grow else -1
    return t


def foreign_phantom(seed: int, *, shape_zyx: Sequence[int] = (32, 64, 64)) -> Phantom:
    """A seeded IC phantom of the foreign design family (Co interconnect, Al pads, 15 nm voxels).

    The stack, from the top surface (z = 0, the face the beam meets first at θ = 0) down:

    ``passivation`` (Si₃N₄, 1–2) | ``pad`` (Al lines along x, y or a mesh of both, in SiO₂) |
    ``via_pad`` (Co vias in SiO₂) | ``es_n`` (Si₃N₄) | ``co_n`` (Co lines) | ``via_(n-1)`` |
    ``es_(n-1)`` | ... | ``co_1`` | ``contact`` (W plugs in SiO₂) | ``substrate`` (Si, SiO₂ STI).

    Co levels (1–3, as many as the depth allows, one fewer at random) use a routing grid whose
    pitch (4–6 voxels), line width, grid offset and track occupancy are drawn per seed, alternate
    direction and sit in SiCOH (70 %) or SiO₂. Vias fill a random subset of the crossings of
    adjacent levels through the etch stop below them; contacts sit under Co-1 lines at sites of a
    contact pitch and stand on active (non-STI) Si. Thicknesses are random per seed. Every voxel
    holds a material (no vacuum).

    Parameters
    ----------
    seed : int
        Non-negative; the same seed and shape give the same phantom.
    shape_zyx : (nz, ny, nx), keyword-only
        Volume shape; nz ≥ 11 (the thinnest stack) and ny, nx ≥ 8.

    Returns
    -------
    apt_stream.sim.phantom.Phantom
        ``labels`` uint8 (nz, ny, nx), ``voxel_size_m`` = :data:`FOREIGN_VOXEL_M`, ``seed`` and
        ``layers`` (top to bottom, z ascending; the pad's ``direction`` may be ``"xy"``).

    Raises
    ------
    InputError
        Bad seed or a shape too small for the stack.
    """
    seed = _check_seed(seed)
    try:
        nz, ny, nx = (int(n) for n in shape_zyx)
    except (TypeError, ValueError):
        raise InputError(f"shape_zyx must be (nz, ny, nx), got {shape_zyx!r}") from None
    if nz < 11 or ny < 8 or nx < 8:
        raise InputError(f"shape_zyx {tuple(shape_zyx)} too small: need nz >= 11, ny, nx >= 8")
    rng = _rng(seed, _STREAM_PHANTOM)

    # Minimum stack is 7 + 4 per Co level voxels; use the most levels that fit (≤ 3), or one fewer.
    most = min(3, (nz - 7) // 4)
    n_co = int(rng.integers(max(1, most - 1), most + 1))
    pitch0 = int(rng.integers(4, 7))
    bottom_dir = str(rng.choice(["x", "y"]))
    specs: list[dict] = [dict(name="substrate", kind="substrate", min=2, lo=3, hi=7, max=10**6,
                              weight=2.0),
                         dict(name="contact", kind="contact", min=2, lo=2, hi=4, max=6, weight=1.0)]
    co_levels = []
    for k in range(1, n_co + 1):
        pitch = pitch0 + (int(rng.integers(0, 2)) if k > 1 else 0)
        level = dict(
            k=k, pitch=pitch, width=max(2, int(round(pitch * rng.uniform(0.4, 0.6)))),
            occupancy=float(rng.uniform(0.5, 0.85)),
            direction=bottom_dir if k % 2 else ("y" if bottom_dir == "x" else "x"),
            dielectric=SICOH if rng.random() < 0.7 else SIO2,
        )
        co_levels.append(level)
        specs.append(dict(name=f"co_{k}", kind="metal", min=2, lo=2, hi=4, max=6, weight=1.5))
        specs.append(dict(name=f"es_{k}", kind="etch_stop", min=1, lo=1, hi=2, max=2, weight=0.3))
        if k < n_co:
            specs.append(dict(name=f"via_{k}", kind="via", min=1, lo=1, hi=3, max=4, weight=1.0))
    specs.append(dict(name="via_pad", kind="via", min=1, lo=1, hi=3, max=4, weight=1.0))
    specs.append(dict(name="pad", kind="metal", min=2, lo=3, hi=7, max=10, weight=2.0))
    specs.append(dict(name="passivation", kind="cap", min=1, lo=1, hi=2, max=2, weight=0.3))
    thick = _fit_thicknesses(specs, nz, rng)

    # z ranges: specs run bottom-up, z = 0 is the top surface.
    zr: dict[str, tuple[int, int]] = {}
    z_stop = nz
    for spec, t in zip(specs, thick, strict=True):
        zr[spec["name"]] = (z_stop - t, z_stop)
        z_stop -= t

    labels = np.empty((nz, ny, nx), dtype=np.uint8)
    layers: dict[str, Layer] = {}

    def fill(name: str, kind: str, value: int, *, direction=None, metal=None) -> slice:
        z0, z1 = zr[name]
        labels[z0:z1] = value
        layers[name] = Layer(name, kind, z0, z1, direction, metal)
        return slice(z0, z1)

    # Co levels and the etch stops on top of them.
    masks = []
    for level in co_levels:
        k = level["k"]
        mask = _oriented(
            level["direction"], ny, nx,
            lambda a, b, lv=level: _routing_grid_lines(
                a, b, pitch=lv["pitch"], width=lv["width"], occupancy=lv["occupancy"], rng=rng
            ),
        )
        masks.append(mask)
        zs = fill(f"co_{k}", "metal", level["dielectric"], direction=level["direction"], metal=CO)
        labels[zs][:, mask] = CO
        fill(f"es_{k}", "etch_stop", SI3N4)
    # Pad level: wide Al lines in one direction or a mesh of both.
    pad_dir = str(rng.choice(["x", "y", "xy"], p=[0.35, 0.35, 0.3]))
    pad = np.zeros((ny, nx), dtype=bool)
    for d in ("x", "y") if pad_dir == "xy" else (pad_dir,):
        pad |= _oriented(d, ny, nx, lambda a, b: _wide_lines(a, b, rng))
    zs = fill("pad", "metal", SIO2, direction=pad_dir, metal=AL)
    labels[zs][:, pad] = AL
    fill("passivation", "cap", SI3N4)
    # Vias: through the etch stop of the level below and the via layer itself.
    stacks = [*masks, pad]
    for k in range(1, n_co + 1):
        name = f"via_{k}" if k < n_co else "via_pad"
        dielectric = co_levels[k]["dielectric"] if k < n_co else SIO2
        vias = _vias_at_crossings(stacks[k - 1], stacks[k], float(rng.uniform(0.35, 0.7)), rng)
        zs = fill(name, "via", dielectric, metal=CO)
        labels[zs][:, vias] = CO
        es0, es1 = zr[f"es_{k}"]
        labels[es0:es1][:, vias] = CO
    # Contacts: W plugs at contact-pitch sites under Co-1 lines.
    co1 = masks[0]
    along_x = co_levels[0]["direction"] == "x"
    n_along = nx if along_x else ny
    site_pitch = int(rng.integers(2 * pitch0, 3 * pitch0 + 1))
    site_len = min(2, co_levels[0]["width"])
    sites_1d = np.zeros(n_along, dtype=bool)
    for s in range(int(rng.integers(0, site_pitch)), n_along, site_pitch):
        sites_1d[s : s + site_len] = True
    sites = co1 & (sites_1d[None, :] if along_x else sites_1d[:, None])
    contacts = _vias_at_crossings(sites, sites, 0.6, rng)
    zs = fill("contact", "contact", SIO2, metal=W)
    labels[zs][:, contacts] = W
    # Substrate: Si with STI everywhere but the active areas around contacts and a few islands.
    zs = fill("substrate", "substrate", SI)
    active = ndimage.binary_dilation(contacts, iterations=2)
    for _ in range(int(rng.integers(1, 4))):
        y0, x0 = int(rng.integers(0, ny)), int(rng.integers(0, nx))
        active[y0 : y0 + int(rng.integers(4, ny // 2 + 1)), x0 : x0 + int(rng.integers(4, nx // 2 + 1))] = True
    sub0, sub1 = zr["substrate"]
    sti_depth = min(sub1 - sub0 - 1, int(rng.integers(1, 3)))
    labels[sub0 : sub0 + sti_depth][:, ~active] = SIO2

    ordered = tuple(sorted(layers.values(), key=lambda layer: layer.z_start))
    return Phantom(labels=labels, voxel_size_m=FOREIGN_VOXEL_M, seed=seed, layers=ordered)


# ------------------------------------------------------------------------------------------------
# Optics
# ------------------------------------------------------------------------------------------------


def _formula(label: int) -> str:
    return "".join(f"{el}{n if n > 1 else ''}" for el, n in MATERIALS[label].composition)


@functools.lru_cache(maxsize=32)
def _optical_table(energy_kev: float) -> np.ndarray:
    import xraydb

    table = np.zeros((max(MATERIALS) + 1, 2))
    for label, material in MATERIALS.items():
        if material.composition:
            delta, beta, _ = xraydb.xray_delta_beta(
                _formula(label), material.density_g_cm3, energy_kev * 1e3
            )
            table[label] = delta, beta
    table.setflags(write=False)
    return table


def foreign_optical_constants(energy_kev: float) -> np.ndarray:
    """(δ, β) of every label from xraydb's Chantler tables: array (n_labels, 2), row 0 vacuum.

    Densities and compositions are those of :data:`apt_stream.sim.materials.MATERIALS`; the
    scattering factors are not (the training simulator uses a Henke subset for O, Si, Cu, W).
    """
    if not 1.0 <= float(energy_kev) <= 100.0:
        raise InputError(f"energy_kev must lie in 1–100 keV, got {energy_kev!r}")
    return _optical_table(float(energy_kev)).copy()


def _wavelength_m(energy_kev: float) -> float:
    return _HC_NM_KEV * 1e-9 / energy_kev


def _propagator(shape: tuple[int, int], pixel_m: float, wavelength_m: float, dz_m: float):
    """Angular-spectrum kernel of docs/conventions.md on an unshifted FFT grid, complex64.

    ``sqrt(1/λ² − f²) − 1/λ`` is written as ``−f² / (1/λ + sqrt(1/λ² − f²))``: the two terms
    agree to ~1e-5 relative at these frequencies, and the difference would be lost in float32.
    Evanescent frequencies (f > 1/λ) are dropped.
    """
    fy = np.fft.fftfreq(shape[0], d=pixel_m)[:, None]
    fx = np.fft.fftfreq(shape[1], d=pixel_m)[None, :]
    f2 = fy**2 + fx**2
    inv = 1.0 / wavelength_m
    ok = f2 < inv**2
    root = np.sqrt(np.where(ok, inv**2 - f2, 0.0))
    kernel = np.exp(-2j * np.pi * dz_m * f2 / (inv + root)) * ok
    return torch.as_tensor(kernel.astype(np.complex64))


def foreign_probe(
    frame_px: int, n_modes: int, photons_per_frame: float, *, wavelength_m: float, pixel_m: float
) -> np.ndarray:
    """A defocused zone-plate-like probe with spatially partially coherent modes, (M, h, w).

    The pupil is an annulus (outer radius 0.2·h frequency pixels, central stop 0.45 of it, edges
    softened over a pixel to keep ringing out of the window) with a little astigmatism. It is
    propagated from focus to a defocus at which the geometric beam is 0.35·h pixels across, so
    the probe is a ring-shaped beam of that size centred in the window. A partially coherent
    source is modelled as a Gaussian cloud (σ = 0.7 px in the sample plane) of mutually
    incoherent point sources, each shifting the probe laterally; the M strongest orthogonal
    modes of that ensemble (SVD) are kept and scaled so that Σ_m Σ_r |P_m|² = photons_per_frame
    (docs/conventions.md), the photon count of a vacuum frame with ``norm="ortho"``.
    """
    h = w = int(frame_px)
    ky = np.fft.fftfreq(h)[:, None]  # cycles per pixel
    kx = np.fft.fftfreq(w)[None, :]
    rho = np.hypot(ky * h, kx * w)  # frequency pixels
    phi = np.arctan2(ky, kx)
    r_out = 0.2 * h
    r_in = 0.45 * r_out
    pupil = np.clip(r_out + 0.5 - rho, 0.0, 1.0) * np.clip(rho - r_in + 0.5, 0.0, 1.0)
    defocus_m = 0.35 * h * w * pixel_m**2 / (2 * wavelength_m * r_out)
    kernel = _propagator((h, w), pixel_m, wavelength_m, defocus_m).numpy().astype(np.complex128)
    field_f = pupil * kernel * np.exp(0.6j * (rho / r_out) ** 2 * np.cos(2 * phi))

    offsets = np.arange(-3, 4) * 0.5  # px: a 7 × 7 source grid covering ±2σ
    sy, sx = (a.ravel() for a in np.meshgrid(offsets, offsets, indexing="ij"))
    weights = np.exp(-(sy**2 + sx**2) / (2 * 0.7**2))
    if n_modes > weights.size:
        raise InputError(f"n_modes must be <= {weights.size}, got {n_modes}")
    ramps = np.exp(-2j * np.pi * (ky[None] * sy[:, None, None] + kx[None] * sx[:, None, None]))
    copies = np.fft.fftshift(np.fft.ifft2(field_f[None] * ramps), axes=(-2, -1))
    ensemble = (np.sqrt(weights)[:, None] * copies.reshape(weights.size, -1))
    _, s, vh = np.linalg.svd(ensemble, full_matrices=False)
    modes = (s[:n_modes, None] * vh[:n_modes]).reshape(n_modes, h, w)
    modes *= math.sqrt(photons_per_frame / float(np.sum(np.abs(modes) ** 2)))
    return modes.astype(np.complex64)


# ------------------------------------------------------------------------------------------------
# Geometry (written from docs/conventions.md, not taken from apt_stream.physics.geometry)
# ------------------------------------------------------------------------------------------------


def _depth_vox(shape_zyx, angle_deg: float) -> float:
    t = math.radians(angle_deg)
    return shape_zyx[2] * abs(math.sin(t)) + shape_zyx[0] * abs(math.cos(t))


def _width_vox(shape_zyx, angle_deg: float) -> float:
    t = math.radians(angle_deg)
    return shape_zyx[2] * abs(math.cos(t)) + shape_zyx[0] * abs(math.sin(t))


def _field(shape_zyx, frame_px: int, angles_deg) -> tuple[int, int]:
    # ceil() of a width that is an integer up to rounding (θ = 0 gives nx·1.0 exactly, but
    # nz·sin θ + nx·cos θ need not) must not jump a column: allow 1e-9 px.
    widest = max(_width_vox(shape_zyx, a) for a in angles_deg)
    return shape_zyx[1] + frame_px, int(math.ceil(widest - 1e-9)) + frame_px


def ring_positions(
    span_yx: tuple[float, float], step_px: float, rng: np.random.Generator
) -> np.ndarray:
    """Concentric-ring scan path (y, x) of top-left corners covering [0, span_y] × [0, span_x].

    Rings of radius k·step around the centre carry ≈ 2πk points each (so the density is about
    one point per step²) with a random start phase per ring, out to the corners. Every point is
    then jittered uniformly by ±0.2 step per axis and clipped into the span, so every probe
    window lies inside the object field.
    """
    span_y, span_x = float(span_yx[0]), float(span_yx[1])
    cy, cx = span_y / 2, span_x / 2
    pts = [np.array([[cy, cx]])]
    for k in range(1, int(math.ceil(math.hypot(cy, cx) / step_px)) + 1):
        r = k * step_px
        n = max(6, int(round(2 * math.pi * r / step_px)))
        phi = rng.uniform(0, 2 * math.pi) + 2 * math.pi * np.arange(n) / n
        pts.append(np.stack([cy + r * np.sin(phi), cx + r * np.cos(phi)], axis=-1))
    pos = np.concatenate(pts)
    margin = step_px / 2
    keep = (pos[:, 0] >= -margin) & (pos[:, 0] <= span_y + margin)
    keep &= (pos[:, 1] >= -margin) & (pos[:, 1] <= span_x + margin)
    pos = pos[keep] + rng.uniform(-0.2 * step_px, 0.2 * step_px, size=(int(keep.sum()), 2))
    pos[:, 0] = np.clip(pos[:, 0], 0.0, span_y)
    pos[:, 1] = np.clip(pos[:, 1], 0.0, span_x)
    return pos


# ------------------------------------------------------------------------------------------------
# Forward model
# ------------------------------------------------------------------------------------------------


def _lab_slabs(volume: torch.Tensor, angle_deg: float, field_nx: int) -> tuple[torch.Tensor, float]:
    """Line integrals of (δ, β) through ≈2-voxel slabs of the rotated sample, in voxel units.

    ``volume`` is (2, nz, ny, nx) float32 (δ and β). Returns (2, S, ny, field_nx) and the slab
    thickness in voxels. Lab column c sits at x′ = c − (Nx − 1)/2 voxels from the rotation axis,
    the S slabs split [−D/2, D/2] along z′ evenly, and each lab point is mapped back into the
    sample by inverting x′ = x cosθ + z sinθ, z′ = −x sinθ + z cosθ, i.e.
    x = x′ cosθ − z′ sinθ, z = x′ sinθ + z′ cosθ, then sampled bilinearly (zero outside).
    """
    _, nz, ny, nx = volume.shape
    theta = math.radians(angle_deg)
    c, s = math.cos(theta), math.sin(theta)
    depth = _depth_vox((nz, ny, nx), angle_deg)
    n_slabs = max(1, int(math.ceil(depth / _SLAB_VOXELS - 1e-9)))
    t_vox = depth / n_slabs
    zp = -depth / 2 + (torch.arange(n_slabs * _SUB_Z, dtype=torch.float64) + 0.5) * t_vox / _SUB_Z
    xp = (
        torch.arange(field_nx * _SUB_X, dtype=torch.float64) / _SUB_X
        + (0.5 / _SUB_X - 0.5)
        - (field_nx - 1) / 2
    )
    zz, xx = torch.meshgrid(zp, xp, indexing="ij")
    x_s = xx * c - zz * s + (nx - 1) / 2  # sample-frame voxel indices
    z_s = xx * s + zz * c + (nz - 1) / 2
    grid = torch.stack([2 * x_s / (nx - 1) - 1, 2 * z_s / (nz - 1) - 1], dim=-1)[None].float()
    planes = volume.permute(0, 2, 1, 3).reshape(1, 2 * ny, nz, nx)  # channels (δ|β, y)
    out = torch.nn.functional.grid_sample(
        planes, grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    out = out.reshape(2, ny, n_slabs, _SUB_Z, field_nx, _SUB_X).sum(3).mean(-1)
    return (out * (t_vox / _SUB_Z)).permute(0, 2, 1, 3).contiguous(), t_vox


def _frames_of_angle(
    transmission: torch.Tensor,
    probe_f: torch.Tensor,
    positions: np.ndarray,
    kernel_half: torch.Tensor,
    kernel_full: torch.Tensor,
) -> np.ndarray:
    """Noise-free far-field intensities (J, h, w), zero frequency at (h//2, w//2).

    The probe (given in the entrance plane z′ = −D/2) is shifted to each position, propagated
    half a slab to the first slab's mid-plane, and then alternately multiplied by a slab's
    transmission and propagated a whole slab (symmetric split-step). The last half-slab to the
    exit face is left out: a pure-phase propagator does not change |FFT2(ψ)|².
    """
    n_slabs = transmission.shape[0]
    m, h, w = probe_f.shape
    ky = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    kx = torch.fft.fftfreq(w, dtype=torch.float64)[None, :]
    ar_y, ar_x = torch.arange(h), torch.arange(w)
    out = np.empty((len(positions), h, w), dtype=np.float64)
    for start in range(0, len(positions), _BATCH):
        pos = torch.as_tensor(positions[start : start + _BATCH], dtype=torch.float64)
        corner = torch.floor(pos)
        frac = pos - corner
        corner = corner.long()
        # Sub-pixel part as a Fourier shift: the probe's pixel r lands at field point pos + r.
        ramp = torch.exp(-2j * math.pi * (frac[:, 0, None, None] * ky + frac[:, 1, None, None] * kx))
        psi = torch.fft.ifft2(probe_f[None] * (ramp.to(torch.complex64) * kernel_half)[:, None])
        rows = (corner[:, 0, None] + ar_y)[:, :, None]
        cols = (corner[:, 1, None] + ar_x)[:, None, :]
        windows = transmission[:, rows, cols]  # (S, B, h, w)
        for slab in range(n_slabs):
            psi = psi * windows[slab][:, None]
            if slab < n_slabs - 1:
                psi = torch.fft.ifft2(torch.fft.fft2(psi) * kernel_full)
        far = torch.fft.fft2(psi, norm="ortho")
        intensity = (far.real.square() + far.imag.square()).sum(dim=1)
        out[start : start + len(pos)] = torch.fft.fftshift(intensity, dim=(-2, -1)).double().numpy()
    return out


def simulate_foreign_scan(
    seed: int,
    *,
    n_angles: int = 29,
    range_deg: float = 17.0,
    vacuum: bool = False,
    flip_z: bool = False,
    phantom: Phantom | None = None,
    energy_kev: float = 7.8,
    frame_px: int = 64,
    n_modes: int = 4,
    photons_per_frame: float = 3e6,
    step_px: float = 7.0,
    progress: Callable[[int, int], None] | None = None,
) -> ScanData:
    """Simulate a ptycho-tomography scan of a foreign-family phantom with the foreign simulator.

    Parameters
    ----------
    seed : int
        Seeds the phantom (unless ``phantom`` is given), the scan path and the Poisson noise,
        each from its own stream.
    n_angles, range_deg : keyword-only
        ``n_angles`` angles spaced uniformly over [−range_deg, +range_deg] (0 for one angle).
    vacuum : bool, keyword-only
        The same scan with the object removed: δ = β = 0, truth all zero with labels 0; the
        probe, positions and dose are identical (the noise realisation follows the intensities).
    flip_z : bool, keyword-only
        Mirror the sample along z (``labels[::-1]``) before scanning; the truth is mirrored too.
    phantom : Phantom, optional, keyword-only
        A phantom to scan instead of ``foreign_phantom(seed)``; its ``voxel_size_m`` becomes the
        object pixel.
    energy_kev, frame_px, n_modes, photons_per_frame, step_px : keyword-only
        Photon energy; frame and probe size h = w; probe modes M; expected photons of a vacuum
        frame (Σ_m Σ_r |P_m|²); ring spacing of the scan path in object pixels.
    progress : callable(done, total), optional, keyword-only
        Called after each angle.

    Returns
    -------
    apt_stream.io.ScanData
        Frames float32 (fftshifted), positions (y, x) of probe-window top-left corners in
        field pixels, ``field_shape`` (ny + h, ceil(max W) + w), ``n_slices`` 5 with
        ``slice_spacing_m`` D(θ)·voxel/5, the ground truth and provenance
        (``simulated``, ``generator``, ``seed``, ``options``, ``simulation_seconds``).

    Raises
    ------
    InputError
        Bad arguments.
    """
    t0 = time.perf_counter()
    seed = _check_seed(seed)
    if int(n_angles) < 1:
        raise InputError(f"n_angles must be >= 1, got {n_angles}")
    if int(frame_px) < 8 or int(frame_px) % 2:
        raise InputError(f"frame_px must be even and >= 8, got {frame_px}")
    if int(n_modes) < 1:
        raise InputError(f"n_modes must be >= 1, got {n_modes}")
    if not photons_per_frame > 0 or not step_px > 0 or not 0 <= range_deg <= 90:
        raise InputError("need photons_per_frame > 0, step_px > 0 and 0 <= range_deg <= 90")
    if phantom is None:
        phantom = foreign_phantom(seed)
    if not isinstance(phantom, Phantom):
        raise InputError(f"phantom must be an apt_stream.sim.phantom.Phantom, got {type(phantom).__name__}")
    labels = np.asarray(phantom.labels, dtype=np.uint8)
    if labels.ndim != 3 or labels.shape[0] < 2 or labels.shape[2] < 2:
        raise InputError(f"phantom labels must be (nz >= 2, ny, nx >= 2), got {labels.shape}")
    if flip_z:
        labels = np.ascontiguousarray(labels[::-1])
    h = int(frame_px)
    voxel = float(phantom.voxel_size_m)
    shape = tuple(int(n) for n in labels.shape)
    nz, ny, nx = shape

    table = foreign_optical_constants(energy_kev)
    if vacuum:
        labels = np.zeros_like(labels)
    delta = table[labels, 0].astype(np.float32)
    beta = table[labels, 1].astype(np.float32)

    lam = _wavelength_m(energy_kev)
    k = 2 * math.pi / lam
    distance = 2.0
    det_pixel = lam * distance / (h * voxel)  # makes the object pixel equal the voxel
    angles = (
        np.zeros(1) if n_angles == 1 else np.linspace(-range_deg, range_deg, int(n_angles))
    )
    field = _field(shape, h, angles)
    row0 = h // 2  # sample row index 0 sits at field row h/2
    probe = foreign_probe(h, int(n_modes), photons_per_frame, wavelength_m=lam, pixel_m=voxel)
    probe_f = torch.fft.fft2(torch.as_tensor(probe))

    path_rng = _rng(seed, _STREAM_PATH)
    noise_rng = _rng(seed, _STREAM_NOISE)
    volume = torch.as_tensor(np.stack([delta, beta]))
    frames, positions, angle_index = [], [], []
    for n, angle in enumerate(angles):
        # The path is drawn whether or not the sample is there, so vacuum scans share it.
        pos = ring_positions((field[0] - h, field[1] - h), step_px, path_rng)
        slabs, t_vox = _lab_slabs(volume, float(angle), field[1])
        transmission = torch.ones((slabs.shape[1], *field), dtype=torch.complex64)
        # exp(−ikδt − kβt): matter gives a negative phase (docs/conventions.md).
        transmission[:, row0 : row0 + ny, :] = torch.polar(
            torch.exp(-k * voxel * slabs[1]), -k * voxel * slabs[0]
        )
        t_m = t_vox * voxel
        intensity = _frames_of_angle(
            transmission, probe_f, pos,
            _propagator((h, h), voxel, lam, t_m / 2), _propagator((h, h), voxel, lam, t_m),
        )
        frames.append(noise_rng.poisson(np.maximum(intensity, 0.0)).astype(np.float32))
        positions.append(pos)
        angle_index.append(np.full(len(pos), n, dtype=np.int32))
        if progress is not None:
            progress(n + 1, len(angles))

    truth = GroundTruth(delta=delta, beta=beta, labels=labels, voxel_size_m=voxel)
    options = dict(
        n_angles=int(n_angles), range_deg=float(range_deg), vacuum=bool(vacuum),
        flip_z=bool(flip_z), energy_kev=float(energy_kev), frame_px=h, n_modes=int(n_modes),
        photons_per_frame=float(photons_per_frame), step_px=float(step_px),
        shape_zyx=list(shape), voxel_size_m=voxel, phantom_seed=int(phantom.seed),
        slab_voxels=_SLAB_VOXELS, optics="xraydb Chantler", path="jittered concentric rings",
    )
    return ScanData(
        frames=np.concatenate(frames),
        angle_index=np.concatenate(angle_index),
        positions_px=np.concatenate(positions),
        angles_deg=angles.astype(np.float64),
        probe=probe,
        energy_kev=float(energy_kev),
        detector_distance_m=distance,
        detector_pixel_m=det_pixel,
        object_pixel_m=voxel,
        field_shape=field,
        slice_spacing_m=np.array([_depth_vox(shape, a) * voxel / N_SLICES for a in angles]),
        n_slices=N_SLICES,
        volume_shape_zyx=shape,
        truth=truth,
        provenance={
            "simulated": True,
            "generator": "apt_stream.sim.foreign",
            "seed": seed,
            "preset": "foreign",
            "options": options,
            # z ranges of the scanned sample: mirrored with it under flip_z.
            "layers": [
                [layer.name, layer.kind,
                 *((nz - layer.z_stop, nz - layer.z_start) if flip_z else (layer.z_start, layer.z_stop)),
                 layer.direction]
                for layer in phantom.layers
            ],
            "simulation_seconds": time.perf_counter() - t0,
        },
    )
