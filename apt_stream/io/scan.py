"""The apt-stream scan file: one NeXus-flavoured HDF5 file per ptycho-tomography scan.

The layout, units and conventions are documented in ``docs/scan-format.md``; the physical
conventions behind them in ``docs/conventions.md``. In short::

    /entry                          NXentry
      instrument/source/energy      keV
      instrument/detector/distance, x_pixel_size, y_pixel_size    m
      instrument/probe/modes        (M, h, w) complex, sampled at the object pixel
      sample/rotation_angle         (N,) deg, rotation about +y, right-handed
      sample/volume_shape           (3,) reconstruction grid (nz, ny, nx)
      sample/ground_truth/…         optional: delta, beta, labels, voxel_size (m)
      object/pixel_size, field_shape, n_slices, slice_spacing (N,) m
      data/frames                   (K, h, w) float32 counts, DC at (h//2, w//2)
      data/angle_index, positions   (K,) int32, (K, 2) (y, x) top-left of the probe window, m
      provenance/…                  software_version, preset, seed, created, command_line, extra

In memory the positions are object-field pixels (:class:`ScanData`); the file keeps metres so
that it stands on its own. Every check reports the HDF5 path of the first bad field, so
``check_scan`` (in memory) and ``validate_scan`` (on a file) give the same messages.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from apt_stream.config import wavelength_m as _wavelength_m
from apt_stream.errors import InputError, ScanFormatError

FORMAT_NAME = "apt-stream-scan"
FORMAT_VERSION = "1.0"

ENERGY = "/entry/instrument/source/energy"
DISTANCE = "/entry/instrument/detector/distance"
X_PIXEL = "/entry/instrument/detector/x_pixel_size"
Y_PIXEL = "/entry/instrument/detector/y_pixel_size"
PROBE = "/entry/instrument/probe/modes"
ANGLES = "/entry/sample/rotation_angle"
VOLUME_SHAPE = "/entry/sample/volume_shape"
OBJECT_PIXEL = "/entry/object/pixel_size"
FIELD_SHAPE = "/entry/object/field_shape"
N_SLICES = "/entry/object/n_slices"
SLICE_SPACING = "/entry/object/slice_spacing"
FRAMES = "/entry/data/frames"
ANGLE_INDEX = "/entry/data/angle_index"
POSITIONS = "/entry/data/positions"
TRUTH = "/entry/sample/ground_truth"
PROVENANCE = "/entry/provenance"

#: Groups every scan file has, with their NeXus class (parents before children).
GROUPS: dict[str, str] = {
    "/entry": "NXentry",
    "/entry/instrument": "NXinstrument",
    "/entry/instrument/source": "NXsource",
    "/entry/instrument/detector": "NXdetector",
    "/entry/instrument/probe": "NXcollection",
    "/entry/sample": "NXsample",
    "/entry/object": "NXcollection",
    "/entry/data": "NXdata",
}
OPTIONAL_GROUPS: dict[str, str] = {TRUTH: "NXcollection", PROVENANCE: "NXcollection"}

#: Accepted spellings of each unit; the first one is what apt-stream writes.
UNITS: dict[str, tuple[str, ...]] = {
    "m": ("m", "metre", "meter", "metres", "meters"),
    "deg": ("deg", "degree", "degrees"),
    "keV": ("keV",),
    "counts": ("counts", "photons"),
}

#: Positions may overshoot the field by this much (pixels): float round trips through metres.
POSITION_TOLERANCE_PX = 0.01
#: Allowed relative mismatch of the object pixel against λ·distance / (h · detector pixel).
OBJECT_PIXEL_RTOL = 0.01
_PROVENANCE_KEYS = ("software_version", "preset", "seed", "created", "command_line")


@dataclass(frozen=True)
class _Spec:
    path: str
    kind: str  # "real" | "float" | "complex" | "int"
    ndim: int
    units: str | None


_SPECS = (
    _Spec(ENERGY, "real", 0, "keV"),
    _Spec(DISTANCE, "real", 0, "m"),
    _Spec(X_PIXEL, "real", 0, "m"),
    _Spec(Y_PIXEL, "real", 0, "m"),
    _Spec(PROBE, "complex", 3, None),
    _Spec(ANGLES, "real", 1, "deg"),
    _Spec(VOLUME_SHAPE, "int", 1, None),
    _Spec(OBJECT_PIXEL, "real", 0, "m"),
    _Spec(FIELD_SHAPE, "int", 1, None),
    _Spec(N_SLICES, "int", 0, None),
    _Spec(SLICE_SPACING, "real", 1, "m"),
    _Spec(FRAMES, "float", 3, "counts"),
    _Spec(ANGLE_INDEX, "int", 1, None),
    _Spec(POSITIONS, "real", 2, "m"),
)
_TRUTH_SPECS = (
    _Spec(TRUTH + "/delta", "float", 3, None),
    _Spec(TRUTH + "/beta", "float", 3, None),
    _Spec(TRUTH + "/labels", "int", 3, None),
    _Spec(TRUTH + "/voxel_size", "real", 0, "m"),
)


# --------------------------------------------------------------------------------------------
# In-memory data
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class GroundTruth:
    """Simulated ground truth on the reconstruction grid (sample frame, axes z, y, x)."""

    delta: np.ndarray  # (nz, ny, nx) float32
    beta: np.ndarray  # (nz, ny, nx) float32
    labels: np.ndarray  # (nz, ny, nx) uint8, 0 vacuum, 1 SiO2, 2 Si, 3 Cu, 4 W
    voxel_size_m: float


@dataclass(eq=False)
class ScanData:
    """One ptycho-tomography scan, in memory.

    Attributes
    ----------
    frames : (K, h, w) float32
        All frames of all angles, photon counts, zero frequency at ``(h//2, w//2)``. After
        ``read_scan(..., load_frames=False)`` this is a :class:`LazyFrames` that reads on demand.
    angle_index : (K,) int32
        Index into ``angles_deg`` of each frame.
    positions_px : (K, 2) float64
        ``(y, x)`` of the probe window's top-left corner in object-field pixels.
    angles_deg : (N,) float64
        Rotation about +y (right-handed), degrees.
    probe : (M, h, w) complex64
        Probe modes in the sample's entrance plane, sampled at ``object_pixel_m``.
    field_shape : (Ny, Nx)
        The lab-frame object field shared by all angles.
    slice_spacing_m : (N,) float64
        Distance between the L Approximant slices at each angle.
    volume_shape_zyx : (nz, ny, nx)
        The reconstruction grid (sample frame).
    """

    frames: Any
    angle_index: np.ndarray
    positions_px: np.ndarray
    angles_deg: np.ndarray
    probe: np.ndarray
    energy_kev: float
    detector_distance_m: float
    detector_pixel_m: float
    object_pixel_m: float
    field_shape: tuple[int, int]
    slice_spacing_m: np.ndarray
    n_slices: int
    volume_shape_zyx: tuple[int, int, int]
    truth: GroundTruth | None = None
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Accept lists/arrays for the shape tuples; anything stranger is left to check_scan.
        for name in ("field_shape", "volume_shape_zyx"):
            value = getattr(self, name)
            try:
                setattr(self, name, tuple(int(v) for v in value))
            except (TypeError, ValueError):
                pass

    @property
    def n_angles(self) -> int:
        return len(self.angles_deg)

    @property
    def n_frames(self) -> int:
        return len(self.angle_index)

    @property
    def frame_shape(self) -> tuple[int, int]:
        return tuple(int(v) for v in np.shape(self.probe)[-2:])

    @property
    def wavelength_m(self) -> float:
        return _wavelength_m(self.energy_kev)

    def frames_of(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Frames ``(J, h, w)`` and positions ``(J, 2)`` (pixels) of angle ``n``, in file order."""
        if not 0 <= int(n) < self.n_angles:
            raise InputError(f"angle index {n} out of range 0..{self.n_angles - 1}")
        rows = np.flatnonzero(np.asarray(self.angle_index) == int(n))
        return np.asarray(self.frames[rows]), np.asarray(self.positions_px)[rows]

    def header_kwargs(self) -> dict[str, Any]:
        """Everything but the frames, as :meth:`ScanWriter.write_header` takes it."""
        return dict(
            probe=self.probe,
            angles_deg=self.angles_deg,
            energy_kev=self.energy_kev,
            detector_distance_m=self.detector_distance_m,
            detector_pixel_m=self.detector_pixel_m,
            object_pixel_m=self.object_pixel_m,
            field_shape=self.field_shape,
            slice_spacing_m=self.slice_spacing_m,
            n_slices=self.n_slices,
            volume_shape_zyx=self.volume_shape_zyx,
            truth=self.truth,
            provenance=self.provenance,
        )

    def subset(self, angle_indices: Sequence[int]) -> ScanData:
        """A scan with only the given angles, renumbered in the order given.

        Frames keep their relative order. ``provenance["angle_subset"]`` records which angles of
        the original scan were kept (composed across repeated subsets).
        """
        sel = np.asarray(angle_indices, dtype=np.int64).reshape(-1)
        if sel.size == 0:
            raise InputError("subset needs at least one angle index")
        if sel.min() < 0 or sel.max() >= self.n_angles:
            raise InputError(f"angle indices {sel.tolist()} out of range 0..{self.n_angles - 1}")
        if np.unique(sel).size != sel.size:
            raise InputError(f"angle indices must be unique, got {sel.tolist()}")
        remap = np.full(self.n_angles, -1, dtype=np.int64)
        remap[sel] = np.arange(sel.size)
        old = np.asarray(self.angle_index)
        rows = np.flatnonzero(remap[old] >= 0)
        frames = (
            self.frames.take(rows) if isinstance(self.frames, LazyFrames) else self.frames[rows]
        )
        before = self.provenance.get("angle_subset")
        kept = np.asarray(before)[sel] if before is not None else sel
        return replace(
            self,
            frames=frames,
            angle_index=remap[old[rows]].astype(np.int32),
            positions_px=np.asarray(self.positions_px)[rows],
            angles_deg=np.asarray(self.angles_deg)[sel],
            slice_spacing_m=np.asarray(self.slice_spacing_m)[sel],
            provenance={**self.provenance, "angle_subset": [int(v) for v in kept]},
        )


class LazyFrames:
    """The frames of a scan file, read on demand; indexes along the first axis like an array.

    Each access opens the file, reads the rows asked for (contiguous runs as slices) and closes
    it, so a ``ScanData`` holding it keeps no file handle open.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        n_frames: int,
        frame_shape: tuple[int, int],
        rows: np.ndarray | None = None,
        swmr: bool = False,
    ) -> None:
        self.path = Path(path)
        self._rows = np.arange(n_frames) if rows is None else np.asarray(rows, dtype=np.int64)
        self._frame_shape = tuple(frame_shape)
        self._swmr = swmr

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self._rows), *self._frame_shape)

    @property
    def ndim(self) -> int:
        return 3

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self._rows)

    def take(self, rows: Sequence[int]) -> LazyFrames:
        """A view on some of these frames (no reading)."""
        return LazyFrames(
            self.path,
            n_frames=0,
            frame_shape=self._frame_shape,
            rows=self._rows[np.asarray(rows, dtype=np.int64)],
            swmr=self._swmr,
        )

    def __getitem__(self, key) -> np.ndarray:
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        wanted = self._rows[first]
        scalar = np.ndim(wanted) == 0
        wanted = np.atleast_1d(wanted)
        unique, inverse = np.unique(wanted, return_inverse=True)
        out = np.empty((unique.size, *self._frame_shape), dtype=np.float32)
        if unique.size:
            breaks = np.flatnonzero(np.diff(unique) != 1) + 1
            with open_hdf5(self.path, swmr=self._swmr) as f:
                ds = f[FRAMES]
                start = 0
                for run in np.split(unique, breaks):
                    out[start : start + run.size] = ds[int(run[0]) : int(run[-1]) + 1]
                    start += run.size
        data = out[inverse.reshape(-1)]
        data = data[0] if scalar else data
        return data[(slice(None),) * (0 if scalar else 1) + tuple(rest)] if rest else data

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        data = self[:]
        return data if dtype is None else data.astype(dtype)

    def __repr__(self) -> str:
        return f"LazyFrames({str(self.path)!r}, shape={self.shape})"


# --------------------------------------------------------------------------------------------
# Checks (shared by files, in-memory scans and streamed frames)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# File access
# --------------------------------------------------------------------------------------------


def open_hdf5(path: str | os.PathLike, *, swmr: bool = False) -> h5py.File:
    """Open an HDF5 file read-only; ScanFormatError naming the file when missing, not HDF5 or corrupt."""
    p = Path(path)
    if not p.is_file():
        raise ScanFormatError(f"{p}: no such file")
    if not h5py.is_hdf5(p):
        raise ScanFormatError(f"{p}: not an HDF5 file (no HDF5 signature)")
    try:
        return h5py.File(p, "r", swmr=swmr)
    except OSError as exc:
        hint = "" if swmr else "; if a writer still has it open, read with swmr=True"
        raise ScanFormatError(
            f"{p}: cannot open as HDF5 (truncated or corrupt?){hint}: {exc}"
        ) from exc


def _read(f: h5py.File, path: str, *, rows: slice | None = None) -> np.ndarray:
    try:
        ds = f[path]
        return ds[()] if rows is None else ds[rows]
    except (OSError, KeyError) as exc:
        raise _fail(path, f"cannot be read (truncated or corrupt file?): {exc}") from exc


def _get(f: h5py.File, path: str):
    """The object at ``path`` or None when absent; ScanFormatError when it cannot be opened."""
    try:
        return f[path] if path in f else None
    except (KeyError, OSError, RuntimeError) as exc:
        raise _fail(path, f"cannot be read (truncated or corrupt file?): {exc}") from exc


def _attr_str(obj, name: str) -> str | None:
    value = obj.attrs.get(name)
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
        return value.decode() if isinstance(value, bytes) else str(value)
    return str(value)


def _check_layout(f: h5py.File) -> bool:
    """Root attributes, groups, datasets, dtypes, ranks and units. Returns whether truth exists."""
    fmt = _attr_str(f, "format")
    if fmt != FORMAT_NAME:
        raise _fail("/", f"attribute 'format' is {fmt!r}, expected {FORMAT_NAME!r}")
    version = _attr_str(f, "format_version") or ""
    if version.split(".")[0] != FORMAT_VERSION.split(".")[0]:
        raise _fail(
            "/", f"attribute 'format_version' is {version!r}; this reader handles {FORMAT_VERSION}"
        )
    groups = dict(GROUPS)
    has_truth = TRUTH in f
    groups.update({g: c for g, c in OPTIONAL_GROUPS.items() if g in f})
    for path, nx_class in groups.items():
        obj = _get(f, path)
        if not isinstance(obj, h5py.Group):
            raise _fail(path, "required group is missing")
        got = _attr_str(obj, "NX_class")
        if got != nx_class:
            raise _fail(path, f"attribute NX_class is {got!r}, expected {nx_class!r}")
    for spec in _SPECS + (_TRUTH_SPECS if has_truth else ()):
        obj = _get(f, spec.path)
        if not isinstance(obj, h5py.Dataset):
            raise _fail(spec.path, "required dataset is missing")
        ok = {"real": "iuf", "float": "f", "int": "iu", "complex": "c"}[spec.kind]
        if obj.dtype.kind not in ok:
            raise _fail(spec.path, f"dtype {obj.dtype} is not {spec.kind}")
        if obj.ndim != spec.ndim:
            raise _fail(spec.path, f"has {obj.ndim} dimensions, expected {spec.ndim}")
        if spec.units is not None:
            units = _attr_str(obj, "units")
            if units is None:
                raise _fail(spec.path, f"attribute 'units' is missing (expected {spec.units!r})")
            if units not in UNITS[spec.units]:
                raise _fail(spec.path, f"units {units!r}, expected {spec.units!r}")
    x_pix, y_pix = float(_read(f, X_PIXEL)), float(_read(f, Y_PIXEL))
    if not math.isclose(x_pix, y_pix, rel_tol=1e-6):
        raise _fail(
            Y_PIXEL, f"{y_pix:.6g} m differs from x_pixel_size {x_pix:.6g} m; pixels must be square"
        )
    return has_truth


def _read_str(f: h5py.File, path: str) -> str:
    value = _read(f, path)
    return value.decode() if isinstance(value, bytes) else str(value)


def _read_provenance(f: h5py.File) -> dict:
    if PROVENANCE not in f:
        return {}
    group = _get(f, PROVENANCE)
    out: dict = {}
    extra = group.get("extra")
    if isinstance(extra, h5py.Dataset):
        try:
            out.update(json.loads(_read_str(f, PROVENANCE + "/extra")))
        except json.JSONDecodeError as exc:
            raise _fail(PROVENANCE + "/extra", f"is not valid JSON: {exc}") from exc
    for key in _PROVENANCE_KEYS:
        if key in group:
            out[key] = (
                int(_read(f, f"{PROVENANCE}/{key}"))
                if key == "seed"
                else _read_str(f, f"{PROVENANCE}/{key}")
            )
    return out


def _scan_from_file(f: h5py.File, *, load_frames: bool, partial: bool) -> tuple[ScanData, bool]:
    """Build a ScanData from an open, layout-checked file (frames as the h5py dataset or loaded)."""
    has_truth = _check_layout(f)
    n = len(f[ANGLE_INDEX])  # layout checked: these exist
    if partial:
        # A SWMR writer extends frames, positions and then angle_index; read the complete ones.
        n = min(n, len(f[FRAMES]), len(f[POSITIONS]))
    rows = slice(0, n) if partial else None
    obj_pixel = float(_read(f, OBJECT_PIXEL))
    frames = f[FRAMES]
    if load_frames:
        frames = _read(f, FRAMES, rows=rows).astype(np.float32, copy=False)
    elif partial:
        frames = _DatasetRows(frames, n)
    truth = None
    if has_truth:
        truth = GroundTruth(
            delta=_read(f, TRUTH + "/delta"),
            beta=_read(f, TRUTH + "/beta"),
            labels=_read(f, TRUTH + "/labels"),
            voxel_size_m=float(_read(f, TRUTH + "/voxel_size")),
        )
    scan = ScanData(
        frames=frames,
        angle_index=_read(f, ANGLE_INDEX, rows=rows),
        positions_px=np.asarray(_read(f, POSITIONS, rows=rows), dtype=np.float64) / obj_pixel,
        angles_deg=np.asarray(_read(f, ANGLES), dtype=np.float64),
        probe=_read(f, PROBE),
        energy_kev=float(_read(f, ENERGY)),
        detector_distance_m=float(_read(f, DISTANCE)),
        detector_pixel_m=float(_read(f, X_PIXEL)),
        object_pixel_m=obj_pixel,
        field_shape=_read(f, FIELD_SHAPE),
        slice_spacing_m=np.asarray(_read(f, SLICE_SPACING), dtype=np.float64),
        n_slices=_read(f, N_SLICES),
        volume_shape_zyx=_read(f, VOLUME_SHAPE),
        truth=truth,
        provenance=_read_provenance(f),
    )
    return scan, has_truth


class _DatasetRows:
    """The first ``n`` rows of an h5py dataset (a partial SWMR read) for block-wise checking."""

    def __init__(self, ds: h5py.Dataset, n: int) -> None:
        self._ds, self.shape, self.dtype = ds, (n, *ds.shape[1:]), ds.dtype

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, _ = key.indices(self.shape[0])
        return self._ds[start:stop]


@contextmanager
def _corruption_as_format_error(path) -> Iterator[None]:
    # Damaged metadata can surface from h5py anywhere as KeyError/OSError/RuntimeError; the
    # checks above name the field where they can, this names the file for the rest.
    try:
        yield
    except ScanFormatError:
        raise
    except (KeyError, OSError, RuntimeError, ValueError, TypeError) as exc:
        raise ScanFormatError(
            f"{path}: corrupt or unreadable: {type(exc).__name__}: {exc}"
        ) from exc


def validate_scan(path: str | os.PathLike, *, swmr: bool = False, partial: bool = False) -> dict:
    """Check a scan file against docs/scan-format.md without keeping anything in memory.

    Parameters
    ----------
    path : path-like
        The HDF5 scan file.
    swmr : bool, keyword-only
        Open in SWMR read mode (the file is still being written by a :class:`ScanWriter`).
    partial : bool, keyword-only
        Allow angles without frames yet (a scan still being acquired).

    Returns
    -------
    dict
        Summary: ``path``, ``format_version``, ``n_frames``, ``n_angles``, ``frame_shape``,
        ``n_modes``, ``energy_kev``, ``wavelength_m``, ``object_pixel_m``, ``field_shape``,
        ``volume_shape_zyx``, ``n_slices``, ``frames_per_angle`` (min, max),
        ``mean_counts_per_frame``, ``has_truth``, ``complete``, ``provenance``.

    Raises
    ------
    ScanFormatError
        Whose message starts with the HDF5 path of the first bad field (``/`` for the file itself).
    """
    with open_hdf5(path, swmr=swmr) as f, _corruption_as_format_error(path):
        scan, _ = _scan_from_file(f, load_frames=False, partial=partial)
        summary = check_scan(scan, partial=partial)
        summary.update(
            path=str(path),
            format_version=_attr_str(f, "format_version"),
            provenance=scan.provenance,
        )
    return summary


def read_scan(
    path: str | os.PathLike, *, load_frames: bool = True, swmr: bool = False, partial: bool = False
) -> ScanData:
    """Read (and first validate) a scan file.

    Parameters
    ----------
    path : path-like
        The HDF5 scan file.
    load_frames : bool, keyword-only
        Load all frames into memory. When False, ``frames`` is a :class:`LazyFrames` that reads
        from the file when indexed (the file is still validated in full).
    swmr, partial : bool, keyword-only
        As for :func:`validate_scan`: read a file a :class:`ScanWriter` is still appending to,
        taking the frames written so far.

    Raises
    ------
    ScanFormatError
        As :func:`validate_scan`.
    """
    with open_hdf5(path, swmr=swmr) as f, _corruption_as_format_error(path):
        scan, _ = _scan_from_file(f, load_frames=load_frames, partial=partial)
        check_scan(scan, partial=partial)
        n_frames = int(scan.frames.shape[0])
    scan.angle_index = np.asarray(scan.angle_index, dtype=np.int32)
    scan.n_slices = int(scan.n_slices)
    scan.probe = np.asarray(scan.probe, dtype=np.complex64)
    if scan.truth is not None:
        scan.truth.delta = scan.truth.delta.astype(np.float32, copy=False)
        scan.truth.beta = scan.truth.beta.astype(np.float32, copy=False)
        scan.truth.labels = scan.truth.labels.astype(np.uint8, copy=False)
    if not load_frames:
        scan.frames = LazyFrames(path, n_frames=n_frames, frame_shape=scan.frame_shape, swmr=swmr)
    return scan


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path | datetime):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def dumps_json(obj: Any, *, what: str) -> str:
    """JSON for provenance-like dicts (numpy scalars/arrays allowed); InputError naming ``what``."""
    try:
        return json.dumps(obj, default=_json_default, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} cannot be stored as JSON: {exc}") from exc


def _compression_kwargs(compression: str | None) -> dict:
    # Fletcher-32 checksums per chunk turn silent corruption of bulk data into a read error.
    if compression is None:
        return {"fletcher32": True}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 1, "shuffle": True, "fletcher32": True}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True, "fletcher32": True}
    raise InputError(f"compression must be 'gzip', 'lzf' or None, got {compression!r}")


def _dataset(
    group: h5py.Group, name: str, data, *, units: str | None = None, **kwargs
) -> h5py.Dataset:
    ds = group.create_dataset(name, data=data, **kwargs)
    if units is not None:
        ds.attrs["units"] = units
    return ds


def _write_provenance(f: h5py.File, provenance: Mapping) -> None:
    prov = dict(provenance)
    from apt_stream import __version__

    prov.setdefault("software_version", __version__)
    prov.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
    prov.setdefault("command_line", shlex.join(sys.argv))
    group = f.require_group(PROVENANCE)
    group.attrs["NX_class"] = OPTIONAL_GROUPS[PROVENANCE]
    for key in _PROVENANCE_KEYS:
        value = prov.pop(key, None)
        if value is None:
            continue
        if key == "seed":
            try:
                group.create_dataset(key, data=np.int64(value))
            except (TypeError, ValueError, OverflowError):
                raise InputError(f"provenance seed must be an integer, got {value!r}") from None
        else:
            group.create_dataset(key, data=str(value))
    group.create_dataset("extra", data=dumps_json(prov, what="provenance"))


def _write_header(f: h5py.File, scan: ScanData, comp: dict) -> None:
    f.attrs.update(
        NX_class="NXroot", default="entry", format=FORMAT_NAME, format_version=FORMAT_VERSION
    )
    for path, nx_class in GROUPS.items():
        f.require_group(path).attrs["NX_class"] = nx_class
    f["/entry"].attrs["default"] = "data"
    _dataset(f, ENERGY, np.float64(scan.energy_kev), units="keV")
    _dataset(f, DISTANCE, np.float64(scan.detector_distance_m), units="m")
    _dataset(f, X_PIXEL, np.float64(scan.detector_pixel_m), units="m")
    _dataset(f, Y_PIXEL, np.float64(scan.detector_pixel_m), units="m")
    probe = _dataset(f, PROBE, np.asarray(scan.probe, dtype=np.complex64), **comp)
    probe.attrs["description"] = (
        "mutually incoherent probe modes (M, h, w) in the sample entrance plane, sampled at "
        "/entry/object/pixel_size; sum over modes and pixels of |P|^2 = photons per frame in vacuum"
    )
    angles = _dataset(f, ANGLES, np.asarray(scan.angles_deg, dtype=np.float64), units="deg")
    angles.attrs.update(rotation_axis="+y", sense="right-handed")
    vol = _dataset(f, VOLUME_SHAPE, np.asarray(scan.volume_shape_zyx, dtype=np.int64))
    vol.attrs["dims"] = ["z", "y", "x"]
    _dataset(f, OBJECT_PIXEL, np.float64(scan.object_pixel_m), units="m")
    fs = _dataset(f, FIELD_SHAPE, np.asarray(scan.field_shape, dtype=np.int64))
    fs.attrs["dims"] = ["y", "x"]
    _dataset(f, N_SLICES, np.int64(scan.n_slices))
    _dataset(f, SLICE_SPACING, np.asarray(scan.slice_spacing_m, dtype=np.float64), units="m")
    if scan.truth is not None:
        group = f.require_group(TRUTH)
        group.attrs["NX_class"] = OPTIONAL_GROUPS[TRUTH]
        for name, dtype in (("delta", np.float32), ("beta", np.float32), ("labels", np.uint8)):
            ds = _dataset(group, name, np.asarray(getattr(scan.truth, name), dtype=dtype), **comp)
            ds.attrs["dims"] = ["z", "y", "x"]
        _dataset(group, "voxel_size", np.float64(scan.truth.voxel_size_m), units="m")
    _write_provenance(f, scan.provenance)


def _create_frame_datasets(f: h5py.File, frame_shape: tuple[int, int], comp: dict) -> None:
    h, w = frame_shape
    per_chunk = max(1, min(64, (256 * 1024) // (4 * h * w)))
    data = f["/entry/data"]
    data.attrs["signal"] = "frames"
    frames = data.create_dataset(
        "frames",
        shape=(0, h, w),
        maxshape=(None, h, w),
        dtype=np.float32,
        chunks=(per_chunk, h, w),
        **comp,
    )
    frames.attrs.update(
        units="counts",
        interpretation="image",
        fft_centring="zero frequency at pixel (h//2, w//2) (numpy.fft.fftshift of an ortho FFT)",
    )
    data.create_dataset(
        "angle_index", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1024,), **comp
    )
    pos = data.create_dataset(
        "positions", shape=(0, 2), maxshape=(None, 2), dtype=np.float64, chunks=(512, 2), **comp
    )
    pos.attrs.update(
        units="m",
        dims=["frame", "yx"],
        origin="(y, x) of the probe window's top-left corner in the lab-frame object field; "
        "pixels = value / /entry/object/pixel_size",
    )


class ScanWriter:
    """Write a scan file incrementally, as a streaming acquisition delivers frames.

    Open, :meth:`write_header` (probe, geometry, optional truth and provenance), then
    :meth:`append` the frames of an angle as they come, then :meth:`close` (or use ``with``).
    With ``swmr=True`` (default) every dataset is created by ``write_header`` and the file then
    switches to SWMR mode, so readers can open it with ``read_scan(path, swmr=True,
    partial=True)`` while frames are still being appended; each append is flushed.

    Parameters
    ----------
    path : path-like
        File to create (an existing file is replaced).
    compression : {"gzip", "lzf", None}, keyword-only
        Filter for frames, probe and truth.
    swmr : bool, keyword-only
        Enable single-writer/multiple-reader access after the header is written.
    """

    def __init__(
        self, path: str | os.PathLike, *, compression: str | None = "gzip", swmr: bool = True
    ) -> None:
        self.path = Path(path)
        self._comp = _compression_kwargs(compression)
        self._swmr = swmr
        self._file: h5py.File | None = None
        self._header: dict | None = None
        self._n_frames = 0
        self._closed = False

    @property
    def n_frames(self) -> int:
        """Frames appended so far."""
        return self._n_frames

    def write_header(
        self,
        *,
        probe: np.ndarray,
        angles_deg: Sequence[float],
        energy_kev: float,
        detector_distance_m: float,
        detector_pixel_m: float,
        object_pixel_m: float,
        field_shape: tuple[int, int],
        slice_spacing_m: Sequence[float],
        n_slices: int,
        volume_shape_zyx: tuple[int, int, int],
        truth: GroundTruth | None = None,
        provenance: Mapping | None = None,
    ) -> None:
        """Check the scan's fixed fields, create the file and every dataset, enter SWMR mode."""
        if self._file is not None or self._closed:
            raise InputError("write_header may be called once, before any append")
        probe = np.asarray(probe)
        frame_shape = probe.shape[-2:] if probe.ndim == 3 else (0, 0)
        header = ScanData(
            frames=np.zeros((0, *frame_shape), np.float32),
            angle_index=np.zeros(0, np.int32),
            positions_px=np.zeros((0, 2)),
            angles_deg=np.asarray(angles_deg),
            probe=probe,
            energy_kev=energy_kev,
            detector_distance_m=detector_distance_m,
            detector_pixel_m=detector_pixel_m,
            object_pixel_m=object_pixel_m,
            field_shape=field_shape,
            slice_spacing_m=np.asarray(slice_spacing_m),
            n_slices=n_slices,
            volume_shape_zyx=volume_shape_zyx,
            truth=truth,
            provenance=dict(provenance or {}),
        )
        summary = check_scan(header, partial=True)
        self._header = summary
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(self.path, "w", libver=("v110", "latest"))
        try:
            _write_header(f, header, self._comp)
            _create_frame_datasets(f, summary["frame_shape"], self._comp)
            if self._swmr:
                f.swmr_mode = True
            f.flush()
        except BaseException:
            f.close()
            raise
        self._file = f

    def append(self, angle_index: int, frames: np.ndarray, positions_px: np.ndarray) -> int:
        """Append the frames ``(J, h, w)`` (or one ``(h, w)``) of angle ``angle_index``.

        Positions are ``(J, 2)`` (y, x) top-left corners in object-field pixels. The block is
        checked like a file (finite, non-negative, positions inside the field) before anything
        is written. Returns the number of frames in the file afterwards.
        """
        frames = np.asarray(frames)
        if frames.dtype.kind in "iu":
            frames = frames.astype(np.float32)  # detectors deliver integer counts
        if frames.ndim == 2:
            frames = frames[None]
        index = np.full(frames.shape[0] if frames.ndim == 3 else 0, angle_index)
        return self._append(index, frames, positions_px)

    def _append(self, angle_index: np.ndarray, frames, positions_px) -> int:
        if self._file is None or self._header is None:
            raise InputError(
                "ScanWriter: call write_header before append"
                if not self._closed
                else "ScanWriter is closed"
            )
        summary = self._header
        _check_frame_block(frames, summary["frame_shape"])
        n = int(frames.shape[0])
        idx = _check_angle_index(np.asarray(angle_index), n, summary["n_angles"])
        try:
            pos = np.asarray(positions_px, dtype=np.float64)
        except (TypeError, ValueError):
            raise _fail(POSITIONS, f"positions must be numbers, got {positions_px!r}") from None
        pos = _check_positions(
            pos.reshape(-1, 2) if pos.size == 2 * n else pos,
            n,
            summary["field_shape"],
            summary["frame_shape"],
        )
        if n == 0:
            return self._n_frames
        f, k0, k1 = self._file, self._n_frames, self._n_frames + n
        # angle_index last: a SWMR reader trusts the shortest of the three datasets.
        for path, values in (
            (FRAMES, np.asarray(frames, dtype=np.float32)),
            (POSITIONS, pos * summary["object_pixel_m"]),
            (ANGLE_INDEX, idx.astype(np.int32)),
        ):
            ds = f[path]
            ds.resize(k1, axis=0)
            ds[k0:k1] = values
            ds.flush()
        f.flush()
        self._n_frames = k1
        return k1

    def close(self) -> None:
        """Flush and close the file (safe to call twice)."""
        if self._file is not None:
            self._file.flush()
            self._file.close()
            self._file = None
        self._closed = True

    def __enter__(self) -> ScanWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_scan(
    path: str | os.PathLike, scan: ScanData, *, compression: str | None = "gzip"
) -> Path:
    """Check ``scan`` and write it to ``path`` (atomically: a temporary file is renamed).

    Parameters
    ----------
    path : path-like
        Destination ``.h5`` file; parent folders are created.
    scan : ScanData
        A complete scan (every angle has frames).
    compression : {"gzip", "lzf", None}, keyword-only
        Filter for frames, probe and truth.

    Returns
    -------
    Path
        ``path``.
    """
    target = Path(path)
    if isinstance(scan.frames, LazyFrames) and scan.frames.path.resolve() == target.resolve():
        raise InputError(f"cannot write a scan onto the file its lazy frames come from: {target}")
    check_scan(scan)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with ScanWriter(tmp, compression=compression, swmr=False) as writer:
            writer.write_header(**scan.header_kwargs())
            for start, stop in _blocks(scan.n_frames, 256):
                writer._append(
                    np.asarray(scan.angle_index)[start:stop],
                    np.asarray(scan.frames[start:stop]),
                    np.asarray(scan.positions_px)[start:stop],
                )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _blocks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)
