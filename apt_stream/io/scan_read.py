"""Reading and validating scan files (docs/scan-format.md)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

import h5py
import numpy as np

from apt_stream.errors import ScanFormatError
from apt_stream.io.conventions import (
    Conventions,
    conventions_from_attrs,
    frames_to_ours,
    positions_to_ours,
    probe_to_ours,
)
from apt_stream.io.scan_check import _fail, check_scan
from apt_stream.io.scan_data import GroundTruth, LazyFrames, ScanData
from apt_stream.io.scan_format import (
    _PROVENANCE_KEYS,
    _SPECS,
    _TRUTH_SPECS,
    ANGLE_INDEX,
    ANGLES,
    DISTANCE,
    ENERGY,
    FIELD_SHAPE,
    FORMAT_NAME,
    FORMAT_VERSION,
    FRAMES,
    GROUPS,
    N_SLICES,
    OBJECT_PIXEL,
    OPTIONAL_GROUPS,
    POSITIONS,
    PROBE,
    PROVENANCE,
    SLICE_SPACING,
    TRUTH,
    UNITS,
    VOLUME_SHAPE,
    X_PIXEL,
    Y_PIXEL,
    _attr_str,
    open_hdf5,
)


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


def _scan_from_file(f: h5py.File, *, load_frames: bool, partial: bool) -> tuple[ScanData, Conventions]:
    """Build a ScanData from an open, layout-checked file (frames as the h5py dataset or loaded).

    Data the file declares in other conventions (apt_stream.io.conventions) are converted to
    ours: probe, positions and (when loaded) frames; returns the declared conventions too.
    """
    has_truth = _check_layout(f)
    conv = conventions_from_attrs(lambda path: f[path].attrs)
    n = len(f[ANGLE_INDEX])  # layout checked: these exist
    if partial:
        # A SWMR writer extends frames, positions and then angle_index; read the complete ones.
        n = min(n, len(f[FRAMES]), len(f[POSITIONS]))
    rows = slice(0, n) if partial else None
    obj_pixel = float(_read(f, OBJECT_PIXEL))
    frames = f[FRAMES]
    if load_frames:
        frames = _read(f, FRAMES, rows=rows).astype(np.float32, copy=False)
        if not conv.is_default:
            frames = np.ascontiguousarray(frames_to_ours(frames, conv), dtype=np.float32)
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
    field_shape = _read(f, FIELD_SHAPE)
    probe = _read(f, PROBE)
    positions = np.asarray(_read(f, POSITIONS, rows=rows), dtype=np.float64) / obj_pixel
    provenance = _read_provenance(f)
    if not conv.is_default:
        probe = probe_to_ours(probe, conv)
        if np.shape(field_shape) == (2,):  # else check_scan names the bad field shape
            positions = positions_to_ours(positions, conv, field_shape, probe.shape[-2:])
        provenance["conventions_converted"] = conv.differences()
    scan = ScanData(
        frames=frames,
        angle_index=_read(f, ANGLE_INDEX, rows=rows),
        positions_px=positions,
        angles_deg=np.asarray(_read(f, ANGLES), dtype=np.float64),
        probe=probe,
        energy_kev=float(_read(f, ENERGY)),
        detector_distance_m=float(_read(f, DISTANCE)),
        detector_pixel_m=float(_read(f, X_PIXEL)),
        object_pixel_m=obj_pixel,
        field_shape=field_shape,
        slice_spacing_m=np.asarray(_read(f, SLICE_SPACING), dtype=np.float64),
        n_slices=_read(f, N_SLICES),
        volume_shape_zyx=_read(f, VOLUME_SHAPE),
        truth=truth,
        provenance=provenance,
        probe_plane=conv.probe_plane,
    )
    return scan, conv


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
        scan, conv = _scan_from_file(f, load_frames=load_frames, partial=partial)
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
        scan.frames = LazyFrames(
            path, n_frames=n_frames, frame_shape=scan.frame_shape, swmr=swmr, conventions=conv
        )
    return scan
