"""Where the simulated detector's frames come from: a ScanData in memory or a scan file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apt_stream.errors import InputError

_REQUIRED = (
    "frames", "angle_index", "positions_px", "angles_deg", "probe", "energy_kev",
    "detector_distance_m", "detector_pixel_m", "object_pixel_m", "field_shape", "n_slices",
    "slice_spacing_m", "volume_shape_zyx",
)


class FrameSource:
    """A scan to acquire: frames (K, h, w), their angle index (K,) and positions (K, 2) px.

    Frames are fetched one angle at a time (a scan file opened lazily is read in one block per
    angle), so replaying a big file needs memory for one angle only.

    Parameters
    ----------
    scan
        An :class:`apt_stream.io.ScanData` or any object with its fields.
    sample
        Sample name for the start document (default: the scan's provenance ``sample``/``preset``).
    """

    def __init__(self, scan: Any, *, sample: str | None = None) -> None:
        missing = [name for name in _REQUIRED if not hasattr(scan, name)]
        if missing:
            raise InputError(f"scan source lacks the fields {missing}")
        self.scan = scan
        self.angle_index = np.asarray(scan.angle_index, dtype=np.int64)
        self.positions_px = np.asarray(scan.positions_px, dtype=np.float64)
        self.angles_deg = np.asarray(scan.angles_deg, dtype=np.float64)
        k = int(self.angle_index.shape[0])
        if self.positions_px.shape != (k, 2):
            raise InputError(f"positions_px must be ({k}, 2), got {self.positions_px.shape}")
        if tuple(np.shape(scan.frames))[:1] != (k,) or len(np.shape(scan.frames)) != 3:
            raise InputError(f"frames must be ({k}, h, w), got {tuple(np.shape(scan.frames))}")
        if k and (self.angle_index.min() < 0 or self.angle_index.max() >= len(self.angles_deg)):
            raise InputError("angle_index points outside angles_deg")
        provenance = getattr(scan, "provenance", {}) or {}
        self.preset = provenance.get("preset")
        self.sample = sample or str(provenance.get("sample") or self.preset or "sample")
        self._cached_angle: int | None = None
        self._cache: dict[int, np.ndarray] = {}

    @classmethod
    def coerce(cls, obj: Any, *, sample: str | None = None) -> FrameSource:
        """A FrameSource from a FrameSource, a ScanData-like object or a scan file path."""
        if isinstance(obj, FrameSource):
            return obj
        if isinstance(obj, str | os.PathLike):
            from apt_stream.io import read_scan

            path = Path(obj)
            scan = read_scan(path, load_frames=False)
            return cls(scan, sample=sample or path.stem)
        return cls(obj, sample=sample)

    @property
    def n_frames(self) -> int:
        return int(self.angle_index.shape[0])

    @property
    def n_angles(self) -> int:
        return int(self.angles_deg.shape[0])

    @property
    def frame_shape(self) -> tuple[int, int]:
        return tuple(int(v) for v in np.shape(self.scan.frames)[1:])

    @property
    def probe(self) -> np.ndarray:
        return np.asarray(self.scan.probe, dtype=np.complex64)

    def frames_per_angle(self) -> np.ndarray:
        return np.bincount(self.angle_index, minlength=self.n_angles)

    def frame(self, k: int) -> np.ndarray:
        """Frame ``k`` (h, w) float32; its angle's frames are read together and cached."""
        n = int(self.angle_index[k])
        if n != self._cached_angle:
            rows = np.flatnonzero(self.angle_index == n)
            block = np.asarray(self.scan.frames[rows], dtype=np.float32)
            self._cache = {int(r): block[i] for i, r in enumerate(rows)}
            self._cached_angle = n
        return self._cache[int(k)]

    def acquisition_order(
        self,
        *,
        angle_order: Sequence[int] | None = None,
        max_angles: int | None = None,
    ) -> list[tuple[int, np.ndarray]]:
        """``[(angle n, frame rows), ...]`` in acquisition order.

        ``angle_order`` chooses (and may reorder) the angles; ``max_angles`` stops early, as a
        beamline that ends the scan before all planned angles.
        """
        order = list(range(self.n_angles)) if angle_order is None else [int(n) for n in angle_order]
        for n in order:
            if not 0 <= n < self.n_angles:
                raise InputError(f"angle_order holds {n}, outside 0..{self.n_angles - 1}")
        if len(set(order)) != len(order):
            raise InputError(f"angle_order repeats an angle: {order}")
        if max_angles is not None:
            if max_angles < 0:
                raise InputError(f"max_angles must be >= 0, got {max_angles}")
            order = order[:max_angles]
        return [(n, np.flatnonzero(self.angle_index == n)) for n in order]

    def geometry(self) -> dict:
        """Keyword arguments for :func:`apt_stream.stream.schema.build_start_metadata`."""
        scan = self.scan
        return {
            "energy_kev": float(scan.energy_kev),
            "detector_distance_m": float(scan.detector_distance_m),
            "detector_pixel_m": float(scan.detector_pixel_m),
            "object_pixel_m": float(scan.object_pixel_m),
            "field_shape": [int(v) for v in scan.field_shape],
            "frame_shape": list(self.frame_shape),
            "n_slices": int(scan.n_slices),
            "slice_spacing_m": [float(v) for v in np.asarray(scan.slice_spacing_m)],
            "angles_deg": [float(v) for v in self.angles_deg],
            "frames_per_angle": [int(v) for v in self.frames_per_angle()],
            "volume_shape_zyx": [int(v) for v in scan.volume_shape_zyx],
            "preset": self.preset,
            "sample": self.sample,
        }


def synthetic_scan(
    *,
    n_angles: int = 3,
    frames_per_angle: int = 4,
    frame_px: int = 16,
    range_deg: float = 17.0,
    n_modes: int = 2,
    seed: int = 0,
):
    """A small ScanData of random non-negative frames, for transport tests and demos.

    The numbers are not a physical simulation (use :mod:`apt_stream.sim` for that); geometry
    fields are consistent (field large enough for the positions, one slice spacing per angle).
    """
    from apt_stream.io import ScanData
    from apt_stream.physics.geometry import slice_spacing_m

    if n_angles < 1 or frames_per_angle < 1 or frame_px < 2:
        raise InputError("synthetic_scan needs n_angles, frames_per_angle >= 1 and frame_px >= 2")
    rng = np.random.default_rng(seed)
    k = n_angles * frames_per_angle
    field = (frame_px + 8, frame_px + 8)
    probe = rng.normal(size=(n_modes, frame_px, frame_px)) + 1j * rng.normal(
        size=(n_modes, frame_px, frame_px)
    )
    angles = np.linspace(-range_deg, range_deg, n_angles) if n_angles > 1 else np.zeros(1)
    return ScanData(
        frames=rng.poisson(50.0, size=(k, frame_px, frame_px)).astype(np.float32),
        angle_index=np.repeat(np.arange(n_angles), frames_per_angle).astype(np.int32),
        positions_px=rng.uniform(0, 8, size=(k, 2)),
        angles_deg=angles,
        probe=probe.astype(np.complex64),
        energy_kev=8.8,
        detector_distance_m=1.92,
        detector_pixel_m=1.239841984e-9 / 8.8 * 1.92 / (frame_px * 14e-9),
        object_pixel_m=14e-9,
        field_shape=field,
        # What the engine uses (it refuses any other stored spacing): D(θ)·voxel/L.
        slice_spacing_m=np.array([slice_spacing_m((4, frame_px, frame_px), 14e-9, a, 2)
                                  for a in angles]),
        n_slices=2,
        volume_shape_zyx=(4, frame_px, frame_px),
        provenance={"preset": "synthetic", "seed": int(seed), "sample": "synthetic"},
    )
