"""What the run assembler hands downstream: a header per run, frame batches, a stop notice.

:class:`RunHeader` has the attribute names of :class:`apt_stream.io.ScanData`'s geometry
(``probe``, ``field_shape``, ``n_slices``, ``volume_shape_zyx``, ``wavelength_m``,
``object_pixel_m``, ...), so code written for a scan file (for example the physics engine's
``ScanGeometry.from_scan``) accepts a live run's header unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from apt_stream.config import wavelength_m as _wavelength_m


@dataclass(frozen=True, eq=False)
class RunHeader:
    """Geometry and probe of one live run, from its start document and probe file."""

    run_uid: str
    scan_id: int | None
    sample: str
    preset: str | None
    energy_kev: float
    detector_distance_m: float
    detector_pixel_m: float
    object_pixel_m: float
    field_shape: tuple[int, int]
    frame_shape: tuple[int, int]
    n_slices: int
    slice_spacing_m: np.ndarray
    angles_deg: np.ndarray
    frames_per_angle: tuple[int, ...]
    volume_shape_zyx: tuple[int, int, int]
    probe: np.ndarray = field(repr=False)
    run_dir: str = ""
    start: dict = field(default_factory=dict, repr=False)
    #: Where the raw run is stored in Tiled (``{"uid", "tiled_path"[, "tiled_uri"]}``), when
    #: it is: the reconstruction's metadata links back to it.
    raw_run: dict | None = None

    @property
    def wavelength_m(self) -> float:
        return _wavelength_m(self.energy_kev)

    @property
    def n_angles(self) -> int:
        """Planned number of angles."""
        return int(len(self.angles_deg))

    @property
    def voxel_size_m(self) -> float:
        # The Approximant is sampled at the object pixel (docs/conventions.md).
        return self.object_pixel_m

    @property
    def nominal_step_deg(self) -> float | None:
        """Median spacing of the planned angles (None for a single angle)."""
        unique = np.unique(np.asarray(self.angles_deg, dtype=float))
        if unique.size < 2:
            return None
        return float(np.median(np.diff(unique)))


@dataclass(frozen=True, eq=False)
class FrameBatch:
    """Frames of one angle that arrived together.

    ``frames`` is (B, h, w) float32 with the zero frequency at (h//2, w//2); ``positions_px`` is
    (B, 2) float64, (y, x) of the probe window's top-left corner in object-field pixels. B may be 0
    in a batch that only reports ``angle_complete``. ``n_dropped`` counts frames of this angle that
    were refused (bad values, wrong shape, missing data) since the previous batch.
    """

    run_uid: str
    angle_id: int
    angle_deg: float
    frames: np.ndarray = field(repr=False)
    positions_px: np.ndarray = field(repr=False)
    angle_complete: bool = False
    n_dropped: int = 0
    #: wall-clock time (time.time()) the batch was assembled: when its last frame had arrived
    received_at: float = field(default_factory=time.time, compare=False)

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])


@dataclass(frozen=True)
class RunStopped:
    """The run's stop document arrived (``exit_status`` is bluesky's: success / abort / fail)."""

    run_uid: str
    exit_status: str
    reason: str = ""
    n_frames: int = 0
    n_dropped: int = 0
    stats: dict[str, Any] = field(default_factory=dict)


Message = RunHeader | FrameBatch | RunStopped
