"""Documents -> frames: per run, join events with stream datums and read frames from HDF5.

:class:`RunAssembler` is an :class:`event_model.DocumentRouter`. For each run it emits one
:class:`~apt_stream.stream.messages.RunHeader` (start document + probe file), then
:class:`~apt_stream.stream.messages.FrameBatch` es (frames grouped by angle, in whatever batches
arrived), then a :class:`~apt_stream.stream.messages.RunStopped`.

Frames are read through a :class:`~apt_stream.stream.detector_files.FrameReader` (a child
process; a damaged file can neither hang nor crash the listener). A stream datum may arrive before
the writer's flush is visible; such frames stay pending and are retried, and an angle's
completion waits up to ``data_wait_s`` for them before dropping them with a report -- without
blocking other runs. Files are only opened under the configured data roots. A bad frame (wrong
shape, NaN, negative, outside the field) is dropped and reported, never fatal; an angle whose
completion event is lost completes when all its planned frames are in, or at the stop; a run
whose stop never comes is closed as ``abandoned`` after ``run_idle_timeout_s``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np
from event_model import DocumentRouter

from apt_stream.errors import DocumentError
from apt_stream.stream.detector_files import FileRefused, FrameReader
from apt_stream.stream.messages import FrameBatch, Message, RunHeader, RunStopped
from apt_stream.stream.paths import DataRoots
from apt_stream.stream.problems import ProblemLog, cause_of
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
    #: Why the file is given up on ('' while it is usable).
    refused: str = ""
    #: monotonic time of the first failed read in the current streak (None after a success).
    failing_since: float | None = None
    last_reason: str = ""


@dataclass
class _Run:
    header: RunHeader
    info: StartInfo
    descriptors: dict[str, str] = field(default_factory=dict)  # descriptor uid -> stream name
    resources: dict[str, _Resource] = field(default_factory=dict)
    frame_of_seq: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)
    rows_referenced: int = 0
    pending: dict[int, list[_Pending]] = field(default_factory=dict)  # angle_id -> frames
    angle_deg: dict[int, float] = field(default_factory=dict)
    events_per_angle: dict[int, int] = field(default_factory=dict)
    #: frames the angle's completion event announced (it waits until that many events came)
    announced: dict[int, int] = field(default_factory=dict)
    #: events whose stream datum has not arrived: (descriptor, seq) -> (doc, angle, deg, pos)
    awaiting_datum: dict[tuple[str, int], tuple] = field(default_factory=dict)
    dropped_since_batch: dict[int, int] = field(default_factory=dict)
    dropped_by_angle: dict[int, int] = field(default_factory=dict)
    #: angle -> monotonic deadline: completion asked for, frames still being read.
    completing: dict[int, float] = field(default_factory=dict)
    completed: set[int] = field(default_factory=set)
    #: (deadline, exit_status, reason) once the run's stop arrived or the run was abandoned.
    stopping: tuple[float, str, str] | None = None
    last_document_at: float = field(default_factory=time.monotonic)
    n_frames: int = 0
    n_dropped: int = 0

    @property
    def planned_frames(self) -> int:
        return int(sum(self.info.frames_per_angle))


def load_probe(info: StartInfo, roots: DataRoots, reader: FrameReader | None = None) -> np.ndarray:
    """The probe modes (M, h, w) complex64 a start document references (under a data root).

    Read through ``reader`` (a child process, bounded in time) when given, else directly.
    """
    path = roots.resolve(info.probe_uri)
    if reader is not None:
        try:
            probe = np.asarray(reader.read_array(str(path), info.probe_dataset))
        except DocumentError as exc:
            raise DocumentError(f"probe file cannot be read: {exc}") from exc
    else:
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


def header_from_start(
    doc: dict, roots: DataRoots, reader: FrameReader | None = None
) -> tuple[RunHeader, StartInfo]:
    """Build the run header from a start document; the probe is read from its file."""
    info = parse_start_metadata(doc)
    probe = load_probe(info, roots, reader)
    scan_id = doc.get("scan_id")
    header = RunHeader(
        run_uid=str(doc["uid"]),
        scan_id=int(scan_id) if isinstance(scan_id, int) and not isinstance(scan_id, bool) else None,
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


def _index(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DocumentError(f"{what} must be an integer, got {value!r}")
    return value


class RunAssembler(DocumentRouter):
    """Assemble frame batches per run and angle from a run-ordered document stream.

    Nothing here blocks: frames whose data is not readable yet stay pending and are retried on
    the next document of their run or the next :meth:`flush` (call it when the stream is quiet);
    an angle's completion and the run's stop wait up to ``data_wait_s`` for them, then drop them
    with a report. Every problem is reported once per cause (:class:`ProblemLog`) and counted per
    run and angle in the :class:`RunStopped`.

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
        arrived before the data became visible in the file; also how long a file may keep
        failing before it is given up on.
    retry_interval_s
        Pause between retries in :meth:`drain`.
    run_idle_timeout_s
        A run that receives no document for this long (its stop never came) is closed as
        ``abandoned`` with what it had. None: never.
    max_runs_in_flight
        Open runs at most; a start beyond this is refused (stale runs close by the idle timeout).
    max_rows_per_run
        Frames a run's stream datums may reference in all (bounds memory per run); the run's
        planned frame count, doubled, is the other bound.
    reader
        The :class:`~apt_stream.stream.detector_files.FrameReader` (default: a new one, closed by
        :meth:`close`).
    read_timeout_s
        Per-read time limit of the default reader.
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
        run_idle_timeout_s: float | None = 600.0,
        max_runs_in_flight: int = 16,
        max_rows_per_run: int = 500_000,
        reader: FrameReader | None = None,
        read_timeout_s: float = 10.0,
    ) -> None:
        super().__init__()
        if max_batch_frames < 1:
            raise DocumentError(f"max_batch_frames must be >= 1, got {max_batch_frames}")
        if run_idle_timeout_s is not None and not run_idle_timeout_s > 0:
            raise DocumentError(f"run_idle_timeout_s must be > 0 or None, got {run_idle_timeout_s}")
        self._emit_message = emit
        self.roots = data_roots if isinstance(data_roots, DataRoots) else DataRoots(data_roots)
        self.max_batch_frames = int(max_batch_frames)
        self.data_wait_s = float(data_wait_s)
        self.retry_interval_s = float(retry_interval_s)
        self.run_idle_timeout_s = run_idle_timeout_s
        self.max_runs_in_flight = int(max_runs_in_flight)
        self.max_rows_per_run = int(max_rows_per_run)
        self._own_reader = reader is None
        self.reader = reader if reader is not None else FrameReader(timeout_s=read_timeout_s)
        self._runs: dict[str, _Run] = {}
        self._run_of_descriptor: dict[str, str] = {}
        self._run_of_resource: dict[str, str] = {}
        self._ignored_runs: set[str] = set()
        self._log = ProblemLog(log, keep=max_problems)
        self.stats = {"frames_emitted": 0, "frames_dropped": 0, "batches": 0, "runs": 0,
                      "runs_abandoned": 0, "files_refused": 0}

    @property
    def problems(self):
        """Human-readable reports of dropped frames and refused documents (most recent last)."""
        return self._log.recent

    @property
    def open_runs(self) -> list[str]:
        return list(self._runs)

    def close(self) -> None:
        """Stop the reader process (when this assembler made it)."""
        if self._own_reader:
            self.reader.close()

    # -- reporting ---------------------------------------------------------------------------
    def _problem(self, run: _Run | None, message: str, *, angle_id: int | None = None,
                 frames: int = 1) -> None:
        scope = f"run {run.header.run_uid}" if run is not None else "listener"
        self._log.report(scope, cause_of(message), message)
        if run is not None and frames:
            run.n_dropped += frames
            if angle_id is not None:
                run.dropped_since_batch[angle_id] = run.dropped_since_batch.get(angle_id, 0) + frames
                run.dropped_by_angle[angle_id] = run.dropped_by_angle.get(angle_id, 0) + frames
        self.stats["frames_dropped"] += frames

    def _refuse(self, message: str, run: _Run | None = None) -> DocumentError:
        """Record a refused document (no frames lost by itself) and return the error to raise."""
        self._problem(run, message, frames=0)
        return DocumentError(message)

    # -- documents ---------------------------------------------------------------------------
    def start(self, doc):
        uid = doc.get("uid")
        if uid in self._runs:
            raise self._refuse(f"run {uid}: a second start document for an open run; ignored")
        if len(self._runs) >= self.max_runs_in_flight:
            self._ignored_runs.add(uid)
            raise self._refuse(
                f"run {uid}: refused, {len(self._runs)} runs are already open "
                f"(max_runs_in_flight={self.max_runs_in_flight}): {sorted(self._runs)}"
            )
        try:
            header, info = header_from_start(doc, self.roots, self.reader)
        except DocumentError as exc:
            self._ignored_runs.add(uid)
            raise self._refuse(f"run {uid}: start document refused: {exc}") from exc
        self._runs[header.run_uid] = _Run(header=header, info=info)
        self.stats["runs"] += 1
        self._emit_message(header)

    def _touch(self, run_uid: str | None) -> _Run | None:
        run = self._runs.get(run_uid)
        if run is not None:
            run.last_document_at = time.monotonic()
        return run

    def descriptor(self, doc):
        run = self._touch(doc.get("run_start"))
        if run is None:
            return
        name = doc.get("name", "primary")
        if name == run.info.streams["frames"]:
            key = run.info.data_keys.frames
            data_keys = doc.get("data_keys")
            dk = data_keys.get(key) if isinstance(data_keys, dict) else None
            if not isinstance(dk, dict) or dk.get("external") != "STREAM:":
                raise self._refuse(
                    f"run {run.header.run_uid}: stream {name!r} lacks the external frames data key "
                    f"{key!r} (external='STREAM:')", run
                )
        run.descriptors[doc["uid"]] = name
        self._run_of_descriptor[doc["uid"]] = run.header.run_uid

    def stream_resource(self, doc):
        run = self._touch(doc.get("run_start"))
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
            params = doc.get("parameters")
            dataset = params.get("dataset") if isinstance(params, dict) else None
            if not isinstance(dataset, str) or not dataset.startswith("/"):
                raise DocumentError(f"stream resource {uid} has no absolute 'dataset' parameter")
            path = self.roots.resolve(doc.get("uri"))
        except DocumentError as exc:
            run.resources[uid] = _Resource(path=str(doc.get("uri")), dataset="", refused=str(exc))
            raise self._refuse(f"run {run.header.run_uid}: {exc}", run) from exc
        run.resources[uid] = _Resource(path=str(path), dataset=dataset)

    def stream_datum(self, doc):
        run_uid = self._run_of_resource.get(doc.get("stream_resource"))
        run = self._touch(run_uid)
        if run is None:
            return
        where = f"run {run.header.run_uid} stream datum {doc.get('uid')}"
        seq, idx = doc.get("seq_nums"), doc.get("indices")
        if not isinstance(seq, dict) or not isinstance(idx, dict):
            raise self._refuse(f"{where}: seq_nums and indices must be mappings", run)
        s0, s1 = _index(seq.get("start"), "seq_nums.start"), _index(seq.get("stop"), "seq_nums.stop")
        i0, i1 = _index(idx.get("start"), "indices.start"), _index(idx.get("stop"), "indices.stop")
        if i0 < 0 or s0 < 0 or i1 <= i0 or s1 <= s0:
            raise self._refuse(
                f"{where}: rows [{i0}, {i1}) / seq_nums [{s0}, {s1}) are not a non-empty range of "
                "non-negative numbers; refused", run
            )
        if s1 - s0 != i1 - i0:
            raise self._refuse(
                f"{where}: maps {s1 - s0} events onto {i1 - i0} frames; one frame per event is "
                "expected", run
            )
        limit = min(self.max_rows_per_run, max(2 * run.planned_frames, 1024))
        if run.rows_referenced + (i1 - i0) > limit:
            raise self._refuse(
                f"{where}: references {i1 - i0} more rows; the run would hold more than {limit} "
                f"(planned frames: {run.planned_frames}); refused", run
            )
        run.rows_referenced += i1 - i0
        descriptor = doc.get("descriptor", "")
        for i in range(s1 - s0):
            run.frame_of_seq[(descriptor, s0 + i)] = (doc["stream_resource"], i0 + i)
        for i in range(s1 - s0):
            waiting = run.awaiting_datum.pop((descriptor, s0 + i), None)
            if waiting is not None:  # its event came first
                self._accept_frame(run, *waiting)
        self._service(run)

    def event(self, doc):
        run = self._touch(self._run_of_descriptor.get(doc.get("descriptor")))
        if run is None:
            return doc
        stream = run.descriptors.get(doc["descriptor"])
        if stream == run.info.streams["frames"]:
            self._frame_event(run, doc)
        elif stream == run.info.streams["angles"]:
            keys = run.info.data_keys
            data = doc.get("data") if isinstance(doc.get("data"), dict) else {}
            angle_id = data.get(keys.done_angle_index)
            if isinstance(angle_id, bool) or not isinstance(angle_id, int):
                raise self._refuse(
                    f"run {run.header.run_uid}: angles event {doc.get('uid')} lacks an integer "
                    f"{keys.done_angle_index!r}; the angle completes at the run's stop", run
                )
            if angle_id not in run.angle_deg:
                deg = data.get(keys.done_angle_deg)
                if isinstance(deg, int | float) and math.isfinite(deg):
                    run.angle_deg[angle_id] = float(deg)
            n_done = data.get(keys.done_n_frames)
            if (isinstance(n_done, int) and not isinstance(n_done, bool)
                    and run.events_per_angle.get(angle_id, 0) < n_done):
                # Some of its events have not come (lost on the wire, or still in flight): the
                # angle completes when they have, or at the stop (after the journal filled in).
                run.announced[angle_id] = n_done
            else:
                self._request_completion(run, angle_id)
        self._service(run)
        return doc

    def stop(self, doc):
        run_uid = doc.get("run_start")
        self._ignored_runs.discard(run_uid)
        run = self._touch(run_uid)
        if run is None or run.stopping is not None:
            return
        self._begin_stop(run, str(doc.get("exit_status", "")), str(doc.get("reason", "")))

    # -- run lifecycle -----------------------------------------------------------------------
    def _begin_stop(self, run: _Run, exit_status: str, reason: str) -> None:
        # Angles whose completion event never came (lost or garbled) complete now, so their
        # frames are used rather than lost.
        for angle_id in sorted(set(run.pending) | set(run.angle_deg) | set(run.announced)):
            self._request_completion(run, angle_id, service=False)
        run.stopping = (time.monotonic() + self.data_wait_s, exit_status, reason)
        self._service(run)

    def _finish_run(self, run: _Run) -> None:
        _, exit_status, reason = run.stopping
        run_uid = run.header.run_uid
        self._runs.pop(run_uid, None)
        for res in run.resources.values():
            if res.dataset and not res.refused:
                self.reader.release(res.path)
        for uid in list(run.descriptors):
            self._run_of_descriptor.pop(uid, None)
        for uid in list(run.resources):
            self._run_of_resource.pop(uid, None)
        problems = self._log.summarise(f"run {run_uid}")
        self._emit_message(
            RunStopped(
                run_uid=run_uid,
                exit_status=exit_status,
                reason=reason,
                n_frames=run.n_frames,
                n_dropped=run.n_dropped,
                stats={
                    "angles_completed": len(run.completed),
                    "frames_dropped_by_angle": {int(k): int(v)
                                                for k, v in sorted(run.dropped_by_angle.items())},
                    "problems": problems,
                },
            )
        )

    def flush(self) -> None:
        """Emit every frame readable now, finish what waited long enough, close idle runs."""
        now = time.monotonic()
        for run in list(self._runs.values()):
            if (self.run_idle_timeout_s is not None and run.stopping is None
                    and now - run.last_document_at > self.run_idle_timeout_s):
                self.stats["runs_abandoned"] += 1
                self._problem(run, f"run {run.header.run_uid}: no document for "
                                   f"{self.run_idle_timeout_s:g} s and no stop; closed as "
                                   "abandoned with what it had", frames=0)
                self._begin_stop(run, "abandoned", "no stop document arrived")
            else:
                self._service(run, force_read=True)

    def drain(self, timeout_s: float | None = None) -> bool:
        """Flush until no run waits for frames or a stop (``timeout_s``: give up; False)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            self.flush()
            if not any(r.completing or r.stopping for r in self._runs.values()):
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(self.retry_interval_s)

    def _request_completion(self, run: _Run, angle_id: int, *, service: bool = True) -> None:
        if angle_id in run.completed or angle_id in run.completing:
            return
        run.completing[angle_id] = time.monotonic() + self.data_wait_s
        if service:
            self._service(run, force_read=True)

    def _service(self, run: _Run, *, force_read: bool = False) -> None:
        """Read what is readable, complete angles and the run when nothing (or time) is left."""
        n_pending = sum(len(v) for v in run.pending.values())
        if n_pending and (force_read or run.completing or run.stopping
                          or n_pending >= self.max_batch_frames):
            self._read_pending(run)
        now = time.monotonic()
        awaiting = {w[2] for w in run.awaiting_datum.values()}
        for angle_id, deadline in sorted(run.completing.items()):
            if (run.pending.get(angle_id) or angle_id in awaiting) and now < deadline:
                continue
            for p in run.pending.pop(angle_id, []):
                res = run.resources[p.resource]
                why = res.refused or res.last_reason or "its row is not in the file"
                self._problem(
                    run, f"run {run.header.run_uid} frame seq {p.seq_num}: data not readable in "
                         f"{res.path} within {self.data_wait_s:g} s ({why}); dropped",
                    angle_id=angle_id,
                )
            for key in [k for k, w in run.awaiting_datum.items() if w[2] == angle_id]:
                _, where, *_ = run.awaiting_datum.pop(key)
                self._problem(run, f"{where}: no stream datum references this event; dropped",
                              angle_id=angle_id)
            del run.completing[angle_id]
            run.completed.add(angle_id)
            self._emit_batch(run, angle_id, [], complete=True)
        if run.stopping is not None and not run.completing:
            self._finish_run(run)

    # -- frames ------------------------------------------------------------------------------
    def _frame_event(self, run: _Run, doc: dict) -> None:
        keys = run.info.data_keys
        seq = doc.get("seq_num")
        data = doc.get("data") if isinstance(doc.get("data"), dict) else {}
        where = f"run {run.header.run_uid} frame seq {seq}"
        try:
            angle_id = _index(data[keys.angle_index], "angle index")
            angle_deg = float(data[keys.angle_deg])
            pos = (float(data[keys.position_y_px]), float(data[keys.position_x_px]))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            self._problem(run, f"{where}: event lacks angle/position data ({exc}); dropped")
            return
        run.events_per_angle[angle_id] = run.events_per_angle.get(angle_id, 0) + 1
        try:
            self._accept_frame(run, doc, where, angle_id, angle_deg, pos)
        finally:
            planned = run.info.frames_per_angle
            seen = run.events_per_angle[angle_id]
            if ((0 <= angle_id < len(planned) and planned[angle_id] and seen >= planned[angle_id])
                    or seen >= run.announced.get(angle_id, math.inf)):
                # Every planned (or announced) frame of this angle has arrived: no need to wait
                # for its completion event (which may be lost).
                self._request_completion(run, angle_id, service=False)

    def _accept_frame(self, run, doc, where, angle_id, angle_deg, pos) -> None:
        if not (math.isfinite(angle_deg) and all(math.isfinite(p) for p in pos)):
            self._problem(run, f"{where}: non-finite angle or position; dropped", angle_id=angle_id)
            return
        (h, w), (ny, nx) = run.header.frame_shape, run.header.field_shape
        tol = 1e-6
        if not (-tol <= pos[0] <= ny - h + tol and -tol <= pos[1] <= nx - w + tol):
            self._problem(run, f"{where}: position {pos} puts the {h}x{w} window outside the "
                               f"{ny}x{nx} object field; dropped", angle_id=angle_id)
            return
        key = (doc.get("descriptor"), seq := doc.get("seq_num"))
        ref = run.frame_of_seq.pop(key, None)
        if ref is None:
            if len(run.awaiting_datum) < max(2 * run.planned_frames, 1024):
                # Its stream datum may still come (documents can arrive out of order).
                run.awaiting_datum[key] = (doc, where, angle_id, angle_deg, pos)
                run.angle_deg.setdefault(angle_id, angle_deg)
            else:
                self._problem(run, f"{where}: no stream datum references this event; dropped",
                              angle_id=angle_id)
            return
        resource, index = ref
        res = run.resources.get(resource)
        if res is None or res.refused:
            why = res.refused if res is not None else "unknown stream resource"
            self._problem(run, f"{where}: its file was refused ({why}); dropped", angle_id=angle_id)
            return
        if angle_id in run.completed:
            self._problem(run, f"{where}: angle {angle_id} was already complete; dropped",
                          angle_id=angle_id)
            return
        run.angle_deg.setdefault(angle_id, angle_deg)
        run.pending.setdefault(angle_id, []).append(
            _Pending(seq, angle_id, angle_deg, pos, resource, index)
        )

    def _read_pending(self, run: _Run) -> None:
        by_resource: dict[str, list[_Pending]] = {}
        for items in run.pending.values():
            for p in items:
                by_resource.setdefault(p.resource, []).append(p)
        ready: dict[int, list[tuple[_Pending, np.ndarray]]] = {}
        done: set[int] = set()  # id() of pendings read or dropped
        for uid, items in by_resource.items():
            res = run.resources[uid]
            if res.refused:
                for p in items:
                    done.add(id(p))
                    self._problem(run, f"run {run.header.run_uid} frame seq {p.seq_num}: its file "
                                       f"was refused ({res.refused}); dropped", angle_id=p.angle_id)
                continue
            try:
                n_rows, rows, block = self.reader.read_rows(
                    res.path, res.dataset, [p.index for p in items], run.header.frame_shape
                )
            except FileRefused as exc:
                self._give_up(run, res, str(exc))
                continue
            except DocumentError as exc:  # FileNotReady: retried until data_wait_s has passed
                now = time.monotonic()
                res.last_reason = str(exc)
                if res.failing_since is None:
                    res.failing_since = now
                elif now - res.failing_since > self.data_wait_s:
                    self._give_up(run, res, f"{exc} (for more than {self.data_wait_s:g} s)")
                continue
            res.failing_since, res.last_reason = None, ""
            if n_rows < max(p.index for p in items) + 1:
                res.last_reason = f"the file has {n_rows} rows so far"
            row_of = {r: i for i, r in enumerate(rows)}
            for p in items:
                if p.index in row_of:
                    ready.setdefault(p.angle_id, []).append((p, block[row_of[p.index]]))
                    done.add(id(p))
        for angle_id in list(run.pending):
            left = [p for p in run.pending[angle_id] if id(p) not in done]
            if left:
                run.pending[angle_id] = left
            else:
                del run.pending[angle_id]
        for angle_id in sorted(ready):
            self._emit_batch(run, angle_id, ready[angle_id], complete=False)

    def _give_up(self, run: _Run, res: _Resource, why: str) -> None:
        res.refused = why
        self.stats["files_refused"] += 1
        self._problem(run, f"run {run.header.run_uid}: giving up on {res.path}: {why}", frames=0)

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
