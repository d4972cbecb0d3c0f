"""In-memory scans: :class:`ScanData`, :class:`GroundTruth` and :class:`LazyFrames`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from apt_stream.config import wavelength_m as _wavelength_m
from apt_stream.errors import InputError
from apt_stream.io.scan_format import FRAMES, open_hdf5


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
        Probe modes sampled at ``object_pixel_m``, in the plane ``probe_plane`` names.
    field_shape : (Ny, Nx)
        The lab-frame object field shared by all angles.
    slice_spacing_m : (N,) float64
        Distance between the L Approximant slices at each angle.
    volume_shape_zyx : (nz, ny, nx)
        The reconstruction grid (sample frame).
    probe_plane : {"entrance", "axis"}
        Where the probe is given: at each angle's entrance face z′ = −D(θ)/2 (default: applied
        to slice 1 as it is) or in the lab plane through the rotation axis (z′ = 0; the engine
        propagates it by −D(θ)/2 to the entrance face at every angle).
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
    probe_plane: str = "entrance"

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
            probe_plane=self.probe_plane,
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
        conventions=None,
    ) -> None:
        self.path = Path(path)
        #: the file's declared conventions (apt_stream.io.conventions); frames are converted
        #: to ours as they are read
        self.conventions = conventions
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
            conventions=self.conventions,
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
        if self.conventions is not None and not self.conventions.is_default:
            from apt_stream.io.conventions import frames_to_ours

            out = np.ascontiguousarray(frames_to_ours(out, self.conventions), dtype=np.float32)
        data = out[inverse.reshape(-1)]
        data = data[0] if scalar else data
        return data[(slice(None),) * (0 if scalar else 1) + tuple(rest)] if rest else data

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        data = self[:]
        return data if dtype is None else data.astype(dtype)

    def __repr__(self) -> str:
        return f"LazyFrames({str(self.path)!r}, shape={self.shape})"
