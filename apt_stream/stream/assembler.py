"""Documents -> frames: per run, join events with stream datums and read frames from HDF5.

:class:`RunAssembler` is an :class:`event_model.DocumentRouter`. For each run it emits one
:class:`~apt_stream.stream.messages.RunHeader` (start document + probe file), then
:class:`~apt_stream.stream.messages.FrameBatch` es (frames grouped by angle, in whatever batches
arrived), then a :class:`~apt_stream.stream.messages.RunStopped`.

Frames are read from the detector's HDF5 file in SWMR mode. A stream datum may arrive before the
writer's flush is visible to this reader; such frames stay pending and are retried at the next
flush, and an angle's completion waits up to ``data_wait_s`` for them before dropping them with a
report. Files are only opened under the configured data roots. A bad frame (wrong shape, NaN,
negative) is dropped and reported, never fatal.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import h5py
import numpy as np
from event_model import DocumentRouter

from apt_stream.errors import DocumentError
from apt_stream.stream.messages import FrameBatch, Message, RunHeader, RunStopped
from apt_stream.stream.paths import DataRoots
from apt_stream.stream.schema import HDF5_MIMETYPE, StartInfo, parse_start_metadata

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    seq_num: int
    angle_id: int
    angle_deg: float
    position_px: tuple[float, float]
    resource: str
    index: int


@dataclass
class _Resource:
    path: str
    dataset: str
    file: h5py.File | None = None


@dataclass
class _Run:
    header: RunHeader
    info: StartInfo
    descriptors: dict[str, str] = field(default_factory=dict)  # descriptor uid -> stream name
    resources: dict[str, _Resource] = field(default_factory=dict)
    refused_resources: dict[str, str] = field(default_factory=dict)  # uid -> reason
    frame_of_seq: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)
    pending: dict[int, list[_Pending]] = field(default_factory=dict)  # angle_id -> frames
    angle_deg: dict[int, float] = field(default_factory=dict)
    dropped_since_batch: dict[int, int] = field(default_factory=dict)
    completed: set[int] = field(default_factory=set)
    n_frames: int = 0
    n_dropped: int = 0


def load_probe(info: StartInfo, roots: DataRoots) -> np.ndarray:
    """The probe modes (M, h, w) complex64 a start document references (under a data root)."""
    path = roots.resolve(info.probe_uri)
    try:
        with h5py.File(path, "r") as fh:
            if info.probe_dataset not in fh:
                raise DocumentError(f"probe file {path} has no dataset {info.probe_dataset!r}")
            probe = np.asarray(fh[info.probe_dataset][()])
    except OSError as exc:
        raise DocumentError(f"probe file {path} cannot be read: {exc}") from exc
    if tuple(probe.shape) != info.probe_shape:
        raise DocumentError(
            f"probe in {path} has shape {probe.shape}, the start document says {info.probe_shape}"
        )
    if not np.iscomplexobj(probe) or not np.all(np.isfinite(probe)):
        raise DocumentError(f"probe in {path} must be finite complex values")
    return probe.astype(np.complex64)


def header_from_start(doc: dict, roots: DataRoots) -> tuple[RunHeader, StartInfo]:
    """Build the run header from a start document; the probe is read from its file."""
    info = parse_start_metadata(doc)
    probe = load_probe(info, roots)
    scan_id = doc.get("scan_id")
    header = RunHeader(
        run_uid=str(doc["uid"]),
        scan_id=int(scan_id) if isinstance(scan_id, int) else None,
        sample=info.sample,
        preset=info.preset,
        energy_kev=info.energy_kev,
        detector_distance_m=info.detector_distance_m,
        detector_pixel_m=info.detector_pixel_m,
        object_pixel_m=info.object_pixel_m,
        field_shape=info.field_shape,
        frame_shape=info.frame_shape,
        n_slices=info.n_slices,
        slice_spacing_m=np.asarray(info.slice_spacing_m, dtype=np.float64),
        angles_deg=np.asarray(info.angles_deg, dtype=np.float64),
        frames_per_angle=info.frames_per_angle,
        volume_shape_zyx=info.volume_shape_zyx,
        probe=probe,
        run_dir=info.run_dir,
        start=dict(doc),
    )
    return header, info


class RunAssembler(DocumentRouter):
    """Assemble frame batches per run and angle from a run-ordered document stream.

    Parameters
    ----------
    emit
        Called with each RunHeader / FrameBatch / RunStopped, on the caller's thread.
    data_roots
        Folders frames and probe files may be read from (anything else is refused).
    max_batch_frames
        Emit a run's pending frames once this many are waiting (angle completion, stop and
        :meth:`flush` emit earlier).
    data_wait_s
        How long an angle's completion or the run's stop waits for frames whose stream datum
        arrived before the data became visible in the file.
    retry_interval_s
        Pause between SWMR refreshes while waiting.
    """

    def __init__(
        self,
        emit: Callable[[Message], object],
        *,
        data_roots: DataRoots | Iterable[str],
        max_batch_frames: int = 64,
        data_wait_s: float = 5.0,
        retry_interval_s: float = 0.02,
        max_problems: int = 1000,
    ) -> None:
        super().__init__()
        if max_batch_frames < 1:
            raise DocumentError(f"max_batch_frames must be >= 1, got {max_batch_frames}")
        self._emit_message = emit
        self.roots = data_roots if isinstance(data_roots, DataRoots) else DataRoots(data_roots)
        self.max_batch_frames = int(max_batch_frames)
        self.data_wait_s = float(data_wait_s)
        self.retry_interval_s = float(retry_interval_s)
        self._runs: dict[str, _Run] = {}
        self._run_of_descriptor: dict[str, str] = {}
        self._run_of_resource: dict[str, str] = {}
        self._ignored_runs: set[str] = set()
        #: Human-readable reports of dropped frames and refused documents (most recent last).
        self.problems: deque[str] = deque(maxlen=max_problems)
        self.stats = {"frames_emitted": 0, "frames_dropped": 0, "batches": 0, "runs": 0}

    # -- reporting ---------------------------------------------------------------------------
    def _problem(self, run: _Run | None, message: str, *, angle_id: int | None = None) -> None:
        self.problems.append(message)
        log.warning("%s", message)
        if run is not None:
            run.n_dropped += 1
            if angle_id is not None:
                run.dropped_since_batch[angle_id] = run.dropped_since_batch.get(angle_id, 0) + 1
        self.stats["frames_dropped"] += 1

    # -- documents ---------------------------------------------------------------------------
    def start(self, doc):
        uid = doc.get("uid")
        try:
            header, info = header_from_start(doc, self.roots)
        except DocumentError as exc:
            self._ignored_runs.add(uid)
            self.problems.append(f"run {uid}: start refused: {exc}")
            raise DocumentError(f"run {uid}: start document refused: {exc}") from exc
        self._runs[header.run_uid] = _Run(header=header, info=info)
        self.stats["runs"] += 1
        self._emit_message(header)

    def descriptor(self, doc):
        run = self._runs.get(doc.get("run_start"))
        if run is None:
            return
        name = doc.get("name", "primary")
        if name == run.info.streams["frames"]:
            key = run.info.data_keys.frames
            dk = doc.get("data_keys", {}).get(key)
            if dk is None or dk.get("external") != "STREAM:":
                raise DocumentError(
                    f"run {run.header.run_uid}: stream {name!r} lacks the external frames data key "
                    f"{key!r} (external='STREAM:')"
                )
        run.descriptors[doc["uid"]] = name
        self._run_of_descriptor[doc["uid"]] = run.header.run_uid

    def stream_resource(self, doc):
        run = self._runs.get(doc.get("run_start"))
        if run is None:
            return
        uid = doc["uid"]
        self._run_of_resource[uid] = run.header.run_uid
        try:
            if doc.get("mimetype") != HDF5_MIMETYPE:
                raise DocumentError(
                    f"stream resource {uid} has mimetype {doc.get('mimetype')!r}; only "
                    f"{HDF5_MIMETYPE!r} is read"
                )
            dataset = doc.get("parameters", {}).get("dataset")
            if not isinstance(dataset, str) or not dataset.startswith("/"):
                raise DocumentError(f"stream resource {uid} has no absolute 'dataset' parameter")
            path = self.roots.resolve(doc.get("uri"))
        except DocumentError as exc:
            run.refused_resources[uid] = str(exc)
            self.problems.append(f"run {run.header.run_uid}: {exc}")
            raise
        run.resources[uid] = _Resource(path=str(path), dataset=dataset)

    def stream_datum(self, doc):
        run_uid = self._run_of_resource.get(doc.get("stream_resource"))
        run = self._runs.get(run_uid)
        if run is None:
            return
        seq, idx = doc["seq_nums"], doc["indices"]
        n_seq, n_idx = seq["stop"] - seq["start"], idx["stop"] - idx["start"]
        if n_seq != n_idx:
            raise DocumentError(
                f"stream datum {doc.get('uid')} maps {n_seq} events onto {n_idx} frames; "
                "one frame per event is expected"
            )
        for i in range(n_seq):
            key = (doc.get("descriptor", ""), seq["start"] + i)
            run.frame_of_seq[key] = (doc["stream_resource"], idx["start"] + i)

    def event(self, doc):
        run = self._runs.get(self._run_of_descriptor.get(doc.get("descriptor")))
        if run is None:
            return doc
        stream = run.descriptors.get(doc["descriptor"])
        if stream == run.info.streams["frames"]:
            self._frame_event(run, doc)
        elif stream == run.info.streams["angles"]:
            keys = run.info.data_keys
            try:
                angle_id = int(doc["data"][keys.done_angle_index])
            except (KeyError, TypeError, ValueError):
                raise DocumentError(
                    f"run {run.header.run_uid}: angles event {doc.get('uid')} lacks "
                    f"{keys.done_angle_index!r}"
                ) from None
            if angle_id not in run.angle_deg:
                deg = doc["data"].get(keys.done_angle_deg)
                if isinstance(deg, int | float):
                    run.angle_deg[angle_id] = float(deg)
            self._complete_angle(run, angle_id)
        return doc

    def stop(self, doc):
        run_uid = doc.get("run_start")
        self._ignored_runs.discard(run_uid)
        run = self._runs.pop(run_uid, None)
        if run is None:
            return
        # Emit what is left, waiting for frames still being flushed; open angles stay incomplete.
        self._flush_run(run, wait=True)
        for angle_id, left in sorted(run.pending.items()):
            for p in left:
                self._problem(
                    run,
                    f"run {run_uid} frame seq {p.seq_num}: data not readable in "
                    f"{run.resources[p.resource].path} by the stop; dropped",
                    angle_id=angle_id,
                )
        for res in run.resources.values():
            if res.file is not None:
                res.file.close()
        for uid in list(run.descriptors):
            self._run_of_descriptor.pop(uid, None)
        for uid in list(run.resources) + list(run.refused_resources):
            self._run_of_resource.pop(uid, None)
        self._emit_message(
            RunStopped(
                run_uid=run_uid,
                exit_status=str(doc.get("exit_status", "")),
                reason=str(doc.get("reason", "")),
                n_frames=run.n_frames,
                n_dropped=run.n_dropped,
                stats={"angles_completed": len(run.completed)},
            )
        )

    # -- frames ------------------------------------------------------------------------------
    def _frame_event(self, run: _Run, doc: dict) -> None:
        keys = run.info.data_keys
        seq = doc["seq_num"]
        data = doc.get("data", {})
        where = f"run {run.header.run_uid} frame seq {seq}"
        try:
            angle_id = int(data[keys.angle_index])
            angle_deg = float(data[keys.angle_deg])
            pos = (float(data[keys.position_y_px]), float(data[keys.position_x_px]))
        except (KeyError, TypeError, ValueError) as exc:
            self._problem(run, f"{where}: event lacks angle/position data ({exc!r}); dropped")
            return
        if not (math.isfinite(angle_deg) and all(math.isfinite(p) for p in pos)):
            self._problem(run, f"{where}: non-finite angle or position; dropped", angle_id=angle_id)
            return
        ref = run.frame_of_seq.pop((doc["descriptor"], seq), None)
        if ref is None:
            self._problem(run, f"{where}: no stream datum references this event; dropped",
                          angle_id=angle_id)
            return
        resource, index = ref
        if resource in run.refused_resources:
            self._problem(run, f"{where}: its file was refused ({run.refused_resources[resource]})",
                          angle_id=angle_id)
            return
        if angle_id in run.completed:
            self._problem(run, f"{where}: angle {angle_id} was already complete; dropped",
                          angle_id=angle_id)
            return
        run.angle_deg.setdefault(angle_id, angle_deg)
        run.pending.setdefault(angle_id, []).append(
            _Pending(seq, angle_id, angle_deg, pos, resource, index)
        )
        if sum(len(v) for v in run.pending.values()) >= self.max_batch_frames:
            self._flush_run(run, wait=False)

    def _complete_angle(self, run: _Run, angle_id: int) -> None:
        if angle_id in run.completed:
            return
        self._flush_angle(run, angle_id, wait=True)
        # Whatever is still pending after the wait never became readable.
        for p in run.pending.pop(angle_id, []):
            self._problem(
                run,
                f"run {run.header.run_uid} frame seq {p.seq_num}: data not readable in "
                f"{run.resources[p.resource].path} within {self.data_wait_s} s; dropped",
                angle_id=angle_id,
            )
        run.completed.add(angle_id)
        self._emit_batch(run, angle_id, [], complete=True)

    def flush(self) -> None:
        """Emit every frame that is readable now (call when the stream goes quiet)."""
        for run in list(self._runs.values()):
            self._flush_run(run, wait=False)

    def _flush_run(self, run: _Run, *, wait: bool) -> None:
        for angle_id in sorted(run.pending):
            self._flush_angle(run, angle_id, wait=wait)

    def _flush_angle(self, run: _Run, angle_id: int, *, wait: bool) -> None:
        pending = run.pending.get(angle_id, [])
        if not pending:
            return
        deadline = time.monotonic() + (self.data_wait_s if wait else 0.0)
        ready, waiting = self._readable(run, pending)
        while waiting and time.monotonic() < deadline:
            time.sleep(self.retry_interval_s)
            more, waiting = self._readable(run, waiting)
            ready.extend(more)
        run.pending[angle_id] = waiting
        if not waiting:
            del run.pending[angle_id]
        if ready:
            self._emit_batch(run, angle_id, ready, complete=False)

    def _dataset(self, res: _Resource):
        if res.file is None:
            res.file = h5py.File(res.path, "r", swmr=True)
        ds = res.file[res.dataset]
        ds.refresh()
        return ds

    def _readable(self, run: _Run, pending: list[_Pending]):
        """Split pending frames into (read frames, still waiting)."""
        ready: list[tuple[_Pending, np.ndarray]] = []
        waiting: list[_Pending] = []
        by_resource: dict[str, list[_Pending]] = {}
        for p in pending:
            by_resource.setdefault(p.resource, []).append(p)
        for uid, items in by_resource.items():
            res = run.resources[uid]
            try:
                ds = self._dataset(res)
            except (OSError, KeyError) as exc:
                # The writer may not have created or flushed the file yet; retried later.
                log.debug("frames file %s not readable yet: %s", res.path, exc)
                waiting.extend(items)
                continue
            n_rows = ds.shape[0]
            now = [p for p in items if p.index < n_rows]
            waiting.extend(p for p in items if p.index >= n_rows)
            if not now:
                continue
            rows = sorted({p.index for p in now})
            block = ds[rows]
            row_of = {r: i for i, r in enumerate(rows)}
            ready.extend((p, block[row_of[p.index]]) for p in now)
        return ready, waiting

    def _emit_batch(self, run: _Run, angle_id: int, ready, *, complete: bool) -> None:
        h, w = run.header.frame_shape
        frames, positions = [], []
        for p, frame in sorted(ready, key=lambda item: item[0].seq_num):
            reason = _frame_problem(frame, (h, w))
            if reason:
                self._problem(run, f"run {run.header.run_uid} frame seq {p.seq_num}: {reason}; "
                              "dropped", angle_id=angle_id)
                continue
            frames.append(np.asarray(frame, dtype=np.float32))
            positions.append(p.position_px)
        n_dropped = run.dropped_since_batch.pop(angle_id, 0)
        if not frames and not complete:
            if n_dropped:
                run.dropped_since_batch[angle_id] = n_dropped
            return
        batch = FrameBatch(
            run_uid=run.header.run_uid,
            angle_id=int(angle_id),
            angle_deg=float(run.angle_deg.get(angle_id, math.nan)),
            frames=np.stack(frames) if frames else np.zeros((0, h, w), np.float32),
            positions_px=np.asarray(positions, dtype=np.float64).reshape(-1, 2),
            angle_complete=complete,
            n_dropped=n_dropped,
        )
        run.n_frames += batch.n_frames
        self.stats["frames_emitted"] += batch.n_frames
        self.stats["batches"] += 1
        self._emit_message(batch)


def _frame_problem(frame: np.ndarray, shape: tuple[int, int]) -> str:
    """Why a frame is unusable, or '' when it is fine."""
    if frame.shape != shape:
        return f"frame shape {frame.shape} differs from the run's frame shape {shape}"
    if not np.all(np.isfinite(frame)):
        return "frame holds NaN or infinite values"
    if np.any(frame < 0):
        return "frame holds negative intensities"
    return ""
