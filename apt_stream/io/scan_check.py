"""Checks of a scan against docs/scan-format.md, shared by files, in-memory scans and streamed
frames. Every message starts with the HDF5 path of the first bad field."""

from __future__ import annotations

import math

import numpy as np

from apt_stream.config import wavelength_m as _wavelength_m
from apt_stream.errors import ScanFormatError
from apt_stream.io.scan_data import GroundTruth, ScanData
from apt_stream.io.scan_format import (
    ANGLE_INDEX,
    ANGLES,
    DISTANCE,
    ENERGY,
    FIELD_SHAPE,
    FRAMES,
    N_SLICES,
    OBJECT_PIXEL,
    OBJECT_PIXEL_RTOL,
    POSITION_TOLERANCE_PX,
    POSITIONS,
    PROBE,
    SLICE_SPACING,
    TRUTH,
    VOLUME_SHAPE,
    X_PIXEL,
)


def _fail(path: str, message: str) -> ScanFormatError:
    return ScanFormatError(f"{path}: {message}")


def _positive_scalar(value, path: str) -> float:
    try:
        v = float(np.asarray(value).reshape(()))
    except (TypeError, ValueError):
        raise _fail(path, f"expected one positive number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise _fail(path, f"must be finite and > 0, got {v!r}")
    return v


def _int_tuple(value, n: int, path: str, *, minimum: int = 1) -> tuple[int, ...]:
    arr = np.asarray(value)
    if arr.shape != (n,) or not (np.issubdtype(arr.dtype, np.integer) or _is_whole(arr)):
        raise _fail(path, f"expected {n} integers, got {value!r}")
    out = tuple(int(v) for v in arr)
    if min(out) < minimum:
        raise _fail(path, f"every entry must be >= {minimum}, got {out}")
    return out


def _is_whole(arr: np.ndarray) -> bool:
    return (
        arr.dtype.kind == "f"
        and bool(np.all(np.isfinite(arr)))
        and bool(np.all(arr == np.round(arr)))
    )


def _count_bad(values: np.ndarray) -> str | None:
    """Describe NaN / infinite entries, or None when all are finite."""
    n_nan = int(np.count_nonzero(np.isnan(values)))
    n_inf = int(np.count_nonzero(np.isinf(values)))
    if not (n_nan or n_inf):
        return None
    parts = ([f"{n_nan} NaN"] if n_nan else []) + ([f"{n_inf} infinite"] if n_inf else [])
    return "contains " + " and ".join(parts) + " values"


def _check_real_array(
    arr, path: str, *, shape: tuple | None = None, kind: str = "real"
) -> np.ndarray:
    arr = np.asarray(arr)
    ok = {"real": "iuf", "float": "f", "int": "iu", "complex": "c"}[kind]
    if arr.dtype.kind not in ok:
        raise _fail(path, f"dtype {arr.dtype} is not {kind}")
    if shape is not None and arr.shape != tuple(shape):
        raise _fail(path, f"shape {arr.shape}, expected {tuple(shape)}")
    if arr.dtype.kind in "fc":
        bad = _count_bad(arr)
        if bad:
            raise _fail(path, bad)
    return arr


def _check_frame_block(frames, frame_shape: tuple[int, int], *, block: int = 256) -> float:
    """Check dtype, frame shape and values of ``frames`` block by block; return the photon sum."""
    dtype = getattr(frames, "dtype", None)
    if getattr(dtype, "kind", None) != "f":
        raise _fail(FRAMES, f"dtype {dtype} is not floating point")
    shape = tuple(frames.shape)
    if len(shape) != 3:
        raise _fail(FRAMES, f"shape {shape}, expected (K, h, w)")
    if shape[1:] != tuple(frame_shape):
        raise _fail(
            FRAMES,
            f"frame shape {shape[1:]} differs from the probe's {tuple(frame_shape)} ({PROBE})",
        )
    n_nan = n_inf = n_neg = 0
    total, min_value = 0.0, 0.0
    # Blocks keep memory bounded when the frames are still in the file.
    for start in range(0, shape[0], block):
        values = np.asarray(frames[start : start + block])
        n_nan += int(np.count_nonzero(np.isnan(values)))
        n_inf += int(np.count_nonzero(np.isinf(values)))
        negative = values < 0
        if negative.any():
            n_neg += int(np.count_nonzero(negative))
            min_value = min(min_value, float(values[negative].min()))
        total += float(np.nansum(values, dtype=np.float64))
    if n_nan or n_inf:
        parts = ([f"{n_nan} NaN"] if n_nan else []) + ([f"{n_inf} infinite"] if n_inf else [])
        raise _fail(FRAMES, "contains " + " and ".join(parts) + " values")
    if n_neg:
        raise _fail(
            FRAMES,
            f"contains {n_neg} negative intensities (min {min_value:.6g}); counts must be >= 0",
        )
    return total


def _check_positions(positions_px, n_frames: int, field_shape, frame_shape) -> np.ndarray:
    pos = _check_real_array(positions_px, POSITIONS, shape=(n_frames, 2))
    ny, nx = field_shape
    h, w = frame_shape
    tol = POSITION_TOLERANCE_PX
    outside = (
        (pos[:, 0] < -tol)
        | (pos[:, 0] > ny - h + tol)
        | (pos[:, 1] < -tol)
        | (pos[:, 1] > nx - w + tol)
    )
    if np.any(outside):
        first = int(np.flatnonzero(outside)[0])
        y, x = pos[first]
        raise _fail(
            POSITIONS,
            f"{int(outside.sum())} positions lie outside the object field (first: frame {first} at "
            f"(y, x) = ({y:.3f}, {x:.3f}) px; allowed 0 <= y <= {ny - h}, 0 <= x <= {nx - w} "
            f"for {h}x{w} frames in a {ny}x{nx} field)",
        )
    return pos


def _check_angle_index(angle_index, n_frames: int, n_angles: int) -> np.ndarray:
    idx = _check_real_array(angle_index, ANGLE_INDEX, kind="int")
    if idx.shape != (n_frames,):
        raise _fail(
            ANGLE_INDEX, f"shape {idx.shape} does not match the {n_frames} frames of {FRAMES}"
        )
    if idx.size and (idx.min() < 0 or idx.max() >= n_angles):
        bad = idx[(idx < 0) | (idx >= n_angles)]
        raise _fail(
            ANGLE_INDEX,
            f"{bad.size} indices outside 0..{n_angles - 1} (e.g. {int(bad[0])}); {ANGLES} has {n_angles} angles",
        )
    return idx


def _check_header(scan: ScanData) -> dict:
    """Every field but the frames; returns the summary entries it computed."""
    energy = _positive_scalar(scan.energy_kev, ENERGY)
    distance = _positive_scalar(scan.detector_distance_m, DISTANCE)
    det_pixel = _positive_scalar(scan.detector_pixel_m, X_PIXEL)
    probe = np.asarray(scan.probe)
    if probe.dtype.kind != "c":
        raise _fail(
            PROBE, f"dtype {probe.dtype} is not complex; probe modes are complex amplitudes"
        )
    if probe.ndim != 3 or min(probe.shape) < 1:
        raise _fail(PROBE, f"shape {probe.shape}, expected (M, h, w)")
    _check_real_array(probe, PROBE, kind="complex")
    power = float(np.sum(np.abs(probe) ** 2, dtype=np.float64))
    if power <= 0:
        raise _fail(PROBE, "all probe modes are zero")
    frame_shape = probe.shape[1:]
    plane = getattr(scan, "probe_plane", "entrance")
    if plane not in ("entrance", "axis"):
        raise _fail(PROBE, f"probe plane {plane!r}; expected 'entrance' or 'axis'")
    angles = _check_real_array(scan.angles_deg, ANGLES)
    if angles.ndim != 1 or angles.size < 1:
        raise _fail(ANGLES, f"shape {angles.shape}, expected (N,) with N >= 1")
    volume = _int_tuple(scan.volume_shape_zyx, 3, VOLUME_SHAPE)
    obj_pixel = _positive_scalar(scan.object_pixel_m, OBJECT_PIXEL)
    lam = _wavelength_m(energy)
    for axis, n in zip(("h", "w"), frame_shape, strict=True):
        expected = lam * distance / (n * det_pixel)
        if abs(obj_pixel - expected) > OBJECT_PIXEL_RTOL * expected:
            raise _fail(
                OBJECT_PIXEL,
                f"{obj_pixel:.6g} m disagrees with λ·distance/({axis}·detector pixel) = {expected:.6g} m "
                f"by {abs(obj_pixel / expected - 1):.1%} (limit {OBJECT_PIXEL_RTOL:.0%})",
            )
    field_yx = _int_tuple(scan.field_shape, 2, FIELD_SHAPE)
    if field_yx[0] < frame_shape[0] or field_yx[1] < frame_shape[1]:
        raise _fail(FIELD_SHAPE, f"field {field_yx} is smaller than a {frame_shape} frame")
    n_slices = _int_tuple([scan.n_slices], 1, N_SLICES)[0]
    spacing = _check_real_array(scan.slice_spacing_m, SLICE_SPACING, shape=(angles.size,))
    if np.any(spacing <= 0):
        raise _fail(SLICE_SPACING, f"must be > 0 for every angle, got min {spacing.min():.6g} m")
    return {
        "energy_kev": energy,
        "wavelength_m": lam,
        "n_modes": probe.shape[0],
        "frame_shape": tuple(int(v) for v in frame_shape),
        "probe_photons": power,
        "n_angles": int(angles.size),
        "angle_range_deg": (float(angles.min()), float(angles.max())),
        "volume_shape_zyx": volume,
        "object_pixel_m": obj_pixel,
        "field_shape": field_yx,
        "n_slices": n_slices,
    }


def _check_truth(truth: GroundTruth, volume_shape: tuple[int, ...]) -> None:
    for name, kind in (("delta", "float"), ("beta", "float"), ("labels", "int")):
        path = f"{TRUTH}/{name}"
        arr = np.asarray(getattr(truth, name))
        if arr.shape != tuple(volume_shape):
            raise _fail(
                path, f"shape {arr.shape} differs from {VOLUME_SHAPE} {tuple(volume_shape)}"
            )
        _check_real_array(arr, path, kind=kind)
    _positive_scalar(truth.voxel_size_m, f"{TRUTH}/voxel_size")


def check_scan(scan: ScanData, *, partial: bool = False) -> dict:
    """Check an in-memory scan against docs/scan-format.md.

    Parameters
    ----------
    scan : ScanData
        The scan to check; ``frames`` may be an array, a :class:`LazyFrames` or an h5py dataset.
    partial : bool, keyword-only
        Allow angles without frames (a scan still being acquired).

    Returns
    -------
    dict
        A summary (counts, shapes, geometry).

    Raises
    ------
    ScanFormatError
        Naming the HDF5 path of the first bad field, e.g.
        ``"/entry/data/frames: contains 3 NaN values"``.
    """
    summary = _check_header(scan)
    frame_shape = summary["frame_shape"]
    frames = scan.frames
    if not hasattr(frames, "shape") or not hasattr(frames, "dtype"):
        frames = np.asarray(frames)
    total = _check_frame_block(frames, frame_shape)
    n_frames = int(frames.shape[0])
    idx = _check_angle_index(scan.angle_index, n_frames, summary["n_angles"])
    _check_positions(scan.positions_px, n_frames, summary["field_shape"], frame_shape)
    per_angle = np.bincount(idx.astype(np.int64), minlength=summary["n_angles"])
    if not partial and np.any(per_angle == 0):
        empty = np.flatnonzero(per_angle == 0)
        raise _fail(
            ANGLE_INDEX,
            f"{empty.size} of {summary['n_angles']} angles have no frames (e.g. angle {int(empty[0])})",
        )
    if scan.truth is not None:
        _check_truth(scan.truth, summary["volume_shape_zyx"])
    summary.update(
        n_frames=n_frames,
        frames_per_angle=(int(per_angle.min()), int(per_angle.max())),
        mean_counts_per_frame=total / n_frames if n_frames else 0.0,
        has_truth=scan.truth is not None,
        complete=bool(np.all(per_angle > 0)),
    )
    return summary
