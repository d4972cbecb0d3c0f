"""Simulated beamline devices: stages, a ptychography detector that writes HDF5, an angle marker.

The detector follows bluesky's stream-asset protocol (``WritesStreamAssets``): frames go into a
file it owns, and ``collect_asset_docs`` yields one StreamResource per run and a StreamDatum per
frame written since the last call. Events then carry only small values (indices, readbacks).
"""

from __future__ import annotations

import datetime as _dt
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np
from event_model import ComposeStreamResource
from ophyd.sim import SynAxis
from ophyd.status import Status

from apt_stream.errors import InputError
from apt_stream.stream.paths import file_uri
from apt_stream.stream.schema import FRAMES_DATASET, FRAMES_FILE, HDF5_MIMETYPE, PROBE_DATASET

from .frames import FrameSource


def make_stages(*, prefix: str = "") -> tuple[SynAxis, SynAxis, SynAxis]:
    """The rotation stage (deg) and the sample x / y stages (object-field pixels).

    Returns ``(rot, stage_x, stage_y)``, named ``rot``, ``sample_x``, ``sample_y`` (plus
    ``prefix``). Moves are instantaneous; readbacks equal setpoints.
    """
    rot = SynAxis(name=f"{prefix}rot", egu="deg", precision=6)
    stage_x = SynAxis(name=f"{prefix}sample_x", egu="px", precision=6)
    stage_y = SynAxis(name=f"{prefix}sample_y", egu="px", precision=6)
    return rot, stage_x, stage_y


def readback_key(device) -> str:
    """The event data key of a positioner's readback (its first hinted field)."""
    hints = getattr(device, "hints", None) or {}
    fields = hints.get("fields") or []
    return fields[0] if fields else device.name


def _finished_status() -> Status:
    status = Status()
    status.set_finished()
    return status


def write_probe(path: str | os.PathLike, probe: np.ndarray) -> Path:
    """Write probe modes (M, h, w) complex64 to ``path`` at ``/probe/modes``; returns the path."""
    probe = np.asarray(probe)
    if probe.ndim != 3 or not np.iscomplexobj(probe):
        raise InputError(f"probe must be complex (M, h, w), got {probe.dtype} {probe.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as fh:
        ds = fh.create_dataset(PROBE_DATASET, data=probe.astype(np.complex64))
        ds.attrs["description"] = "probe modes (M, h, w) in the sample entrance plane"
    return path


class SimPtychoDetector:
    """A simulated ptychography detector.

    On each trigger it takes the next frame from its :class:`FrameSource` (in the order the plan
    armed it with), appends it to ``<run_dir>/frames.h5:/entry/data/frames`` (resizable, chunked
    one frame per chunk, SWMR, flushed after every frame) and remembers it for
    ``collect_asset_docs``.

    Parameters
    ----------
    name
        Device name; event data keys are ``<name>_frames`` (external), ``<name>_angle_index``
        and ``<name>_frame_index``.
    root
        Folder under which each run gets its own sub-folder (a listener's data root).
    """

    def __init__(self, name: str = "ptycho_det", *, root: str | os.PathLike) -> None:
        self.name = name
        self.parent = None
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._source: FrameSource | None = None
        self._order: list[int] = []
        self._run_dir: Path | None = None
        self._file: h5py.File | None = None
        self._dataset: h5py.Dataset | None = None
        self._cursor = 0
        self._written = 0
        self._emitted = 0
        self._last: tuple[int, int] = (-1, -1)  # (frame index, angle index) of the last trigger
        self._bundle = None
        self._resource_sent = False

    # -- data keys ---------------------------------------------------------------------------
    @property
    def frames_key(self) -> str:
        return f"{self.name}_frames"

    @property
    def angle_index_key(self) -> str:
        return f"{self.name}_angle_index"

    @property
    def frame_index_key(self) -> str:
        return f"{self.name}_frame_index"

    @property
    def file_path(self) -> Path | None:
        return None if self._run_dir is None else self._run_dir / FRAMES_FILE

    # -- run set-up --------------------------------------------------------------------------
    def new_run_dir(self) -> Path:
        """A fresh, empty folder for one run under ``root`` (time-stamped, unique)."""
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = self.root / f"{stamp}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def arm(self, source: FrameSource, order: Sequence[int], run_dir: str | os.PathLike) -> None:
        """Choose the frames (rows of ``source``, in trigger order) and the folder of the next run."""
        if self._file is not None:
            raise InputError(f"{self.name} is staged; unstage before arming another run")
        order = [int(k) for k in order]
        if order and (min(order) < 0 or max(order) >= source.n_frames):
            raise InputError(f"frame order holds rows outside 0..{source.n_frames - 1}")
        self._source, self._order, self._run_dir = source, order, Path(run_dir).resolve()

    def queue_next(self, rows: Sequence[int]) -> None:
        """Acquire these armed rows next (a closed-loop plan choosing its next angle)."""
        rows = [int(k) for k in rows]
        ahead = self._order[self._cursor:]
        if not set(rows) <= set(ahead):
            raise InputError(f"{self.name}: rows {rows} are not among the armed rows still to come")
        chosen = set(rows)
        self._order = self._order[: self._cursor] + rows + [k for k in ahead if k not in chosen]

    # -- bluesky protocols -------------------------------------------------------------------
    def stage(self) -> list:
        if self._source is None or self._run_dir is None:
            raise InputError(f"{self.name} must be armed (arm(source, order, run_dir)) before staging")
        h, w = self._source.frame_shape
        path = self._run_dir / FRAMES_FILE
        fh = h5py.File(path, "w", libver="latest")
        try:
            ds = fh.create_dataset(
                FRAMES_DATASET, shape=(0, h, w), maxshape=(None, h, w), dtype=np.float32,
                chunks=(1, h, w),
            )
            ds.attrs["units"] = "counts"
            fh.swmr_mode = True  # readers may open the file from here on
        except BaseException:
            fh.close()
            raise
        self._file, self._dataset = fh, ds
        self._cursor = self._written = self._emitted = 0
        self._resource_sent = False
        self._bundle = ComposeStreamResource()(
            mimetype=HDF5_MIMETYPE,
            uri=file_uri(path),
            data_key=self.frames_key,
            parameters={"dataset": FRAMES_DATASET, "chunk_shape": [1, h, w], "swmr": True},
        )
        return [self]

    def unstage(self) -> list:
        if self._file is not None:
            self._file.close()
        self._file = self._dataset = None
        self._source, self._order = None, []
        return [self]

    def trigger(self) -> Status:
        if self._dataset is None or self._source is None:
            raise InputError(f"{self.name} triggered while not staged")
        if self._cursor >= len(self._order):
            raise InputError(f"{self.name} has no frames left ({len(self._order)} armed)")
        k = self._order[self._cursor]
        frame = self._source.frame(k)
        n = self._written
        self._dataset.resize(n + 1, axis=0)
        self._dataset[n] = frame
        self._dataset.flush()  # SWMR readers see the frame once this returns
        self._written = n + 1
        self._cursor += 1
        self._last = (k, int(self._source.angle_index[k]))
        return _finished_status()

    def describe(self) -> dict:
        h, w = self._source.frame_shape if self._source is not None else (0, 0)
        source = f"file:{self.file_path}" if self.file_path else "sim"
        return {
            self.frames_key: {
                "source": source, "dtype": "array", "shape": [h, w], "dtype_numpy": "<f4",
                "external": "STREAM:",
            },
            self.frame_index_key: {"source": "sim", "dtype": "integer", "shape": []},
            self.angle_index_key: {"source": "sim", "dtype": "integer", "shape": []},
        }

    def read(self) -> dict:
        now = time.time()
        k, n = self._last
        return {
            self.frame_index_key: {"value": int(k), "timestamp": now},
            self.angle_index_key: {"value": int(n), "timestamp": now},
        }

    def collect_asset_docs(self, index: int | None = None) -> Iterator[tuple[str, dict]]:
        """The StreamResource (first call of a run) and a StreamDatum for unreported frames."""
        if self._bundle is None:
            return
        stop = self._written if index is None else min(int(index), self._written)
        if not self._resource_sent:
            self._resource_sent = True
            yield "stream_resource", self._bundle.stream_resource_doc
        if stop > self._emitted:
            yield "stream_datum", self._bundle.compose_stream_datum(
                indices={"start": self._emitted, "stop": stop}
            )
            self._emitted = stop

    def get_index(self) -> int:
        """Frames written in this run."""
        return self._written


class AngleMarker:
    """A readable that reports one finished angle per event in the ``angles`` stream."""

    def __init__(self, name: str = "angle_done") -> None:
        self.name = name
        self.parent = None
        self._values = (-1, float("nan"), 0)

    @property
    def keys(self) -> tuple[str, str, str]:
        return (f"{self.name}_index", f"{self.name}_deg", f"{self.name}_n_frames")

    def mark(self, angle_index: int, angle_deg: float, n_frames: int) -> None:
        self._values = (int(angle_index), float(angle_deg), int(n_frames))

    def describe(self) -> dict:
        k_index, k_deg, k_n = self.keys
        return {
            k_index: {"source": "plan", "dtype": "integer", "shape": []},
            k_deg: {"source": "plan", "dtype": "number", "shape": [], "units": "deg"},
            k_n: {"source": "plan", "dtype": "integer", "shape": []},
        }

    def read(self) -> dict:
        now = time.time()
        return {k: {"value": v, "timestamp": now} for k, v in zip(self.keys, self._values, strict=True)}
