"""Writing scan files: :class:`ScanWriter` (streaming, SWMR) and :func:`write_scan`."""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from apt_stream.errors import InputError
from apt_stream.io.conventions import (
    Conventions,
    frames_from_ours,
    positions_from_ours,
    probe_from_ours,
)
from apt_stream.io.scan_check import (
    _check_angle_index,
    _check_frame_block,
    _check_positions,
    _fail,
    check_scan,
)
from apt_stream.io.scan_data import GroundTruth, LazyFrames, ScanData
from apt_stream.io.scan_format import (
    _PROVENANCE_KEYS,
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
    VOLUME_SHAPE,
    X_PIXEL,
    Y_PIXEL,
)


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


def _write_header(f: h5py.File, scan: ScanData, comp: dict, conv: Conventions) -> None:
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
    probe = _dataset(
        f, PROBE, np.asarray(probe_from_ours(scan.probe, conv), dtype=np.complex64), **comp
    )
    probe.attrs["description"] = (
        "mutually incoherent probe modes (M, h, w) sampled at /entry/object/pixel_size, in the "
        "plane named by 'plane' (entrance: each angle's entrance face; axis: the lab plane through "
        "the rotation axis); sum over modes and pixels of |P|^2 = photons per frame in vacuum"
    )
    # Conventions (apt_stream.io.conventions): ours unless the writer was asked for others.
    probe.attrs.update(
        phase_sign=np.int8(conv.phase_sign), fft_norm=conv.fft_norm, plane=scan.probe_plane
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


def _create_frame_datasets(
    f: h5py.File, frame_shape: tuple[int, int], comp: dict, conv: Conventions
) -> None:
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
        fft_centring=conv.fft_centring,
        description="zero frequency at pixel (h//2, w//2) (numpy.fft.fftshift of an ortho FFT)",
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
        reference=conv.position_reference,
        relative_to=conv.positions_relative_to,
        description="(y, x) of the probe window's top-left corner in the lab-frame object field; "
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
    conventions : apt_stream.io.conventions.Conventions, optional, keyword-only
        Store the data in these conventions (converted from ours, attributes set accordingly),
        e.g. to hand a file to a code that expects them or to test a reader; default: ours.
    """

    def __init__(
        self, path: str | os.PathLike, *, compression: str | None = "gzip", swmr: bool = True,
        conventions: Conventions | None = None,
    ) -> None:
        self.path = Path(path)
        self._comp = _compression_kwargs(compression)
        self._conv = conventions if conventions is not None else Conventions()
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
        probe_plane: str = "entrance",
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
            probe_plane=probe_plane,
        )
        summary = check_scan(header, partial=True)
        self._header = summary
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(self.path, "w", libver=("v110", "latest"))
        try:
            _write_header(f, header, self._comp, self._conv)
            _create_frame_datasets(f, summary["frame_shape"], self._comp, self._conv)
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
        conv = self._conv
        # angle_index last: a SWMR reader trusts the shortest of the three datasets.
        for path, values in (
            (FRAMES, np.asarray(frames_from_ours(np.asarray(frames), conv), dtype=np.float32)),
            (POSITIONS, positions_from_ours(pos, conv, summary["field_shape"],
                                            summary["frame_shape"]) * summary["object_pixel_m"]),
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
    path: str | os.PathLike, scan: ScanData, *, compression: str | None = "gzip",
    conventions: Conventions | None = None,
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
    conventions : Conventions, optional, keyword-only
        As for :class:`ScanWriter` (default: ours).

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
        with ScanWriter(
            tmp, compression=compression, swmr=False, conventions=conventions
        ) as writer:
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
