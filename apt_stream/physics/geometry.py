"""Scan geometry shared by the simulator and the engine (see docs/conventions.md).

Everything here is cheap scalar/array bookkeeping: extents of the rotated sample, the lab-frame
object field that all angles share, slice spacing per angle and the lateral scan positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from apt_stream.errors import InputError


def _trig(angle_deg: float) -> tuple[float, float]:
    t = math.radians(angle_deg)
    return abs(math.sin(t)), abs(math.cos(t))


def beam_extent_px(shape_zyx: Sequence[int], angle_deg: float) -> float:
    """Extent of the sample along the beam at ``angle_deg``, in voxels: nx|sinθ| + nz|cosθ|."""
    nz, _, nx = shape_zyx
    s, c = _trig(angle_deg)
    return nx * s + nz * c


def lateral_extent_px(shape_zyx: Sequence[int], angle_deg: float) -> float:
    """Extent of the sample across the beam (lab x′) at ``angle_deg``: nx|cosθ| + nz|sinθ|."""
    nz, _, nx = shape_zyx
    s, c = _trig(angle_deg)
    return nx * c + nz * s


def field_shape(
    shape_zyx: Sequence[int], frame_px: int, angles_deg: Sequence[float]
) -> tuple[int, int]:
    """Lab-frame object field (Ny, Nx) that holds the sample at every angle plus a probe margin.

    The margin of one frame lets probe windows centred on the sample edge stay inside the field.
    A ±90° range is allowed; the field is sized for the widest angle in ``angles_deg``.
    """
    if len(shape_zyx) != 3 or min(shape_zyx) < 1:
        raise InputError(f"volume shape must be (nz, ny, nx) with positive sizes, got {shape_zyx}")
    if frame_px < 2:
        raise InputError(f"frame_px must be >= 2, got {frame_px}")
    angles = list(angles_deg)
    if not angles:
        raise InputError("at least one angle is needed to size the object field")
    width = max(lateral_extent_px(shape_zyx, a) for a in angles)
    nx_field = int(math.ceil(width - 1e-9)) + frame_px
    return int(shape_zyx[1]) + frame_px, nx_field


def sample_row0(field_ny: int, ny: int) -> int:
    """Field row of sample row 0: ``(Ny − ny) // 2``, the sample centred in the field's rows.

    For the default field ``Ny = ny + h`` this is ``h // 2``.
    """
    if field_ny < ny:
        raise InputError(f"field of {field_ny} rows cannot hold {ny} sample rows")
    return (int(field_ny) - int(ny)) // 2


def field_shape_for_positions(
    shape_zyx: Sequence[int],
    frame_hw: Sequence[int],
    angles_deg: Sequence[float],
    positions_from_centre_px=None,
    *,
    even_width: bool = False,
) -> tuple[int, int]:
    """The smallest field (Ny, Nx) that holds the sample, a frame of margin and every position.

    ``positions_from_centre_px`` (K, 2) are the (y, x) top-left corners of the probe windows
    measured from the field centre ((Ny − 1)/2, (Nx − 1)/2), which is the rotation axis (x) and
    the sample's middle row (y); a scan may reach past the sample on any side. Without
    positions beyond the sample this is :func:`field_shape`, the simulators' field (the one the
    shipped network was trained on). The row margin ``Ny − ny`` is kept even, so the field
    centre is the sample's middle row; ``even_width`` makes ``Nx − nx`` even too, so voxel
    centres sit on field pixel centres (an odd margin puts them half a pixel off and the engine
    interpolates, docs/conventions.md).
    """
    nz, ny, nx = (int(v) for v in shape_zyx)
    h, w = (int(v) for v in frame_hw)
    angles = list(angles_deg)
    if not angles:
        raise InputError("at least one angle is needed to size the object field")
    width = max(lateral_extent_px(shape_zyx, a) for a in angles)
    need_y, need_x = ny + h, int(math.ceil(width - 1e-9)) + w
    if positions_from_centre_px is not None and len(positions_from_centre_px):
        pos = np.asarray(positions_from_centre_px, dtype=np.float64).reshape(-1, 2)
        tol = 0.01
        # corner = p + (N − 1)/2 must lie in [0, N − h]: N ≥ 1 − 2·min p and N ≥ 2·(max p + h) − 1
        for axis, size in ((0, h), (1, w)):
            lo, hi = float(pos[:, axis].min()), float(pos[:, axis].max())
            n = max(1 - 2 * (lo + tol), 2 * (hi - tol + size) - 1)
            n = int(math.ceil(n - 1e-9))
            if axis == 0:
                need_y = max(need_y, n)
            else:
                need_x = max(need_x, n)
    need_y += (need_y - ny) % 2
    if even_width:
        need_x += (need_x - nx) % 2
    return need_y, need_x


def slice_spacing_m(
    shape_zyx: Sequence[int], voxel_size_m: float, angle_deg: float, n_slices: int
) -> float:
    """Distance between the L Approximant slice planes at ``angle_deg`` (slab thickness)."""
    if n_slices < 1:
        raise InputError(f"n_slices must be >= 1, got {n_slices}")
    return beam_extent_px(shape_zyx, angle_deg) * voxel_size_m / n_slices


def uniform_angles(n_angles: int, range_deg: float) -> np.ndarray:
    """``n_angles`` equally spaced angles over [−range, +range] degrees (just 0 for one angle)."""
    if n_angles < 1:
        raise InputError(f"n_angles must be >= 1, got {n_angles}")
    if n_angles == 1:
        return np.zeros(1)
    return np.linspace(-range_deg, range_deg, n_angles)


def raster_positions(
    field: tuple[int, int],
    frame_px: int,
    *,
    step_px: float,
    jitter_px: float = 0.0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Top-left corners (y, x) of a jittered raster that covers the whole field.

    Positions are clipped to [0, N − frame] so every probe window lies inside the field.
    """
    span_y, span_x = _spans(field, frame_px)
    if step_px <= 0:
        raise InputError(f"step_px must be > 0, got {step_px}")
    ys = np.linspace(0, span_y, max(1, int(math.ceil(span_y / step_px)) + 1))
    xs = np.linspace(0, span_x, max(1, int(math.ceil(span_x / step_px)) + 1))
    pos = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2)
    return _jitter_and_clip(pos, jitter_px, rng, span_y, span_x)


def _spans(field: tuple[int, int], frame_px: int) -> tuple[int, int]:
    """How far the probe window's top-left corner may travel in y and x."""
    span_y, span_x = field[0] - frame_px, field[1] - frame_px
    if span_y < 0 or span_x < 0:
        raise InputError(f"frame of {frame_px} px does not fit the field {field}")
    return span_y, span_x


def _jitter_and_clip(pos, jitter_px, rng, span_y, span_x) -> np.ndarray:
    """Add Gaussian position jitter, then keep every probe window inside the field."""
    if jitter_px > 0:
        rng = rng if rng is not None else np.random.default_rng()
        pos = pos + rng.normal(0.0, jitter_px, size=pos.shape)
    pos[:, 0] = np.clip(pos[:, 0], 0, span_y)
    pos[:, 1] = np.clip(pos[:, 1], 0, span_x)
    return pos


def spiral_positions(
    field: tuple[int, int],
    frame_px: int,
    *,
    step_px: float,
    jitter_px: float = 0.0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Fermat-spiral fly-scan path (y, x) covering the field, clipped to the field."""
    span_y, span_x = _spans(field, frame_px)
    cy, cx = span_y / 2, span_x / 2
    radius = math.hypot(cy, cx)
    # Fermat spiral: point k at radius c*sqrt(k); density ~ 1/(pi c^2) matches a raster of step_px.
    c = step_px / math.sqrt(math.pi)
    n = int((radius / c) ** 2) + 1
    k = np.arange(n)
    r = c * np.sqrt(k)
    phi = k * math.radians(137.508)
    pos = np.stack([cy + r * np.sin(phi), cx + r * np.cos(phi)], axis=-1)
    keep = (pos[:, 0] >= -step_px / 2) & (pos[:, 0] <= span_y + step_px / 2)
    keep &= (pos[:, 1] >= -step_px / 2) & (pos[:, 1] <= span_x + step_px / 2)
    return _jitter_and_clip(pos[keep], jitter_px, rng, span_y, span_x)
