"""Live reconstruction: frame batches -> streaming Approximant -> trigger -> APT volumes -> sink.

The listener thread only *submits* messages (:meth:`LiveReconstructor.submit`, also the object's
``__call__``, so it can be the assembler's ``emit``). A worker thread does the per-angle compute
and calls the sink. Between them is a queue bounded in **frames** (``max_queued_frames``): while
the backlog is below the bound, submitting never blocks; at the bound the listener waits for the
worker (backpressure, counted in ``listener_wait_s``) rather than dropping frames — the 0MQ
receive buffer then absorbs the documents, which are small because frames travel by file.
``metrics()`` reports the backlog (now and at most) for keep-up benchmarks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from apt_stream.errors import ConfigError, ServiceError
from apt_stream.stream.messages import FrameBatch, Message, RunHeader, RunStopped
from apt_stream.stream.problems import ProblemLog, cause_of
from apt_stream.stream.sink import ReconstructionSink, RunStatus
from apt_stream.stream.trigger import StopPolicy, StopState, TriggerPolicy, TriggerState

log = logging.getLogger(__name__)


def accepts_keyword(fn: Callable, name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (by name or through ``**kwargs``)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def accepts_projections(fn: Callable, keyword: str = "projections") -> bool:
    """Whether ``fn`` takes a ``projections`` (or ``keyword``) keyword: the engine's (angles, projections)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params


class StreamingEngine(Protocol):
    """What ``engine_factory(header)`` returns (``apt_stream.physics.engine.StreamingApproximant``)."""

    def add_frames(self, angle_id: int, angle_deg: float, frames: np.ndarray,
                   positions_px: np.ndarray) -> Any: ...

    def finish_angle(self, angle_id: int) -> Any: ...

    def volume(self) -> np.ndarray: ...

    def finished_angles_deg(self) -> list[float]: ...


EngineFactory = Callable[[RunHeader], StreamingEngine]
ReconstructFn = Callable[[np.ndarray, RunHeader], dict[str, np.ndarray]]

_CLOSE = object()


@dataclass
class _LiveRun:
    header: RunHeader
    engine: StreamingEngine | None
    trigger: TriggerState
    started: float = field(default_factory=time.perf_counter)
    angles_with_frames: set[int] = field(default_factory=set)
    volumes: dict[str, np.ndarray] | None = None
    n_at_volumes: int = 0
    failed: bool = False
    #: frames the engine refused (per batch) and angles it could not finish
    frames_failed: int = 0
    angles_short: set[int] = field(default_factory=set)  # angles that lost refused batches
    angles_failed: set[int] = field(default_factory=set)
    #: angles an engine finishes elsewhere (``start_finish``), in the order asked: -> the
    #: arrival time of the angle's last frame
    finishing: dict[int, float | None] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    #: live convergence estimate and stop rule (None: off)
    monitor: Any = None
    stop: StopState | None = None
    #: the newest advice given to the beamline (convergence, stop, next angles)
    advice: dict[str, Any] | None = None


@dataclass(frozen=True)
class _FinishReady:
    """An engine finished an angle elsewhere (a Dask worker): its summary can be taken."""

    run_uid: str
    angle_id: int


class LiveReconstructor:
    """Consume RunHeader / FrameBatch / RunStopped messages and drive one engine per run.

    Parameters
    ----------
    sink
        Receives results (:class:`~apt_stream.stream.sink.ReconstructionSink`).
    engine_factory
        ``engine_factory(header)`` -> a streaming engine for that run.
    reconstruct_fn
        ``reconstruct_fn(approximant_volume, header)`` -> dict of named volumes (z, y, x).
    policy
        When to reconstruct (default: N* = 29 angles covering ±17°).
    max_queued_frames
        Backlog bound in frames (one oversized batch is still accepted when the queue is empty).
    start
        Start the worker thread now (else call :meth:`start`).
    on_run_finished
        ``on_run_finished(run_uid, status)`` after a run's last sink call (e.g. mark its spool
        done so a restarted listener does not replay it).

    A batch the engine refuses loses only its frames and an angle it cannot finish only that
    angle: the run goes on, and ends ``done_with_gaps`` (with ``frames_missing`` and
    ``angles_with_gaps`` in its stats) instead of ``done``. A run closed without a stop document
    ends ``abandoned`` (reconstructed with what it had if the trigger had fired).
    """

    def __init__(
        self,
        sink: ReconstructionSink,
        *,
        engine_factory: EngineFactory,
        reconstruct_fn: ReconstructFn,
        policy: TriggerPolicy | None = None,
        max_queued_frames: int = 8192,
        start: bool = True,
        on_run_finished: Callable[[str, str], object] | None = None,
        convergence: Any = None,
        stop_policy: StopPolicy | None = None,
        on_advice: Callable[[str, dict], object] | None = None,
        suggest: int = 0,
    ) -> None:
        if max_queued_frames < 1:
            raise ConfigError(f"max_queued_frames must be >= 1, got {max_queued_frames}")
        self.sink = sink
        self.engine_factory = engine_factory
        self.reconstruct_fn = reconstruct_fn
        self.policy = policy or TriggerPolicy()
        self.max_queued_frames = int(max_queued_frames)
        self.on_run_finished = on_run_finished
        if stop_policy is not None and convergence is None:
            from apt_stream.physics.convergence import ConvergenceOptions

            convergence = ConvergenceOptions()
        self.convergence = convergence
        self.stop_policy = stop_policy
        self.on_advice = on_advice
        self.suggest = int(suggest)
        #: How many finished runs' stats :attr:`run_stats` keeps (the oldest go first).
        self.keep_run_stats = 1000
        self._problems = ProblemLog(log)
        self._queue: deque = deque()
        self._cond = threading.Condition()
        self._queued_frames = 0
        self._busy = False
        self._closed = False
        self._finishing = 0  # angles an engine is finishing elsewhere, not yet taken back
        self._runs: dict[str, _LiveRun] = {}
        #: Final status and numbers of every run seen, by run uid.
        self.run_stats: dict[str, dict[str, Any]] = {}
        self._metrics = {
            "max_backlog_frames": 0, "max_backlog_messages": 0, "frames_processed": 0,
            "batches_processed": 0, "angles_finished": 0, "reconstructions": 0,
            "listener_wait_s": 0.0, "worker_busy_s": 0.0, "sink_errors": 0, "worker_errors": 0,
            "frames_failed": 0, "angles_failed": 0, "last_activity": time.time(),
        }
        self._thread = threading.Thread(target=self._work, name="apt-live-worker", daemon=True)
        if start:
            self.start()

    # -- listener side -----------------------------------------------------------------------
    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def submit(self, message: Message) -> None:
        """Queue a message for the worker; blocks only while the frame backlog is at its bound."""
        if not isinstance(message, RunHeader | FrameBatch | RunStopped):
            raise ConfigError(f"cannot submit {type(message).__name__}; expected a stream message")
        n = message.n_frames if isinstance(message, FrameBatch) else 0
        with self._cond:
            if self._closed:
                raise ServiceError("LiveReconstructor is closed")
            t0 = None
            while n and self._queued_frames and self._queued_frames + n > self.max_queued_frames:
                t0 = t0 if t0 is not None else time.perf_counter()
                self._cond.wait(0.1)
            if t0 is not None:
                self._metrics["listener_wait_s"] += time.perf_counter() - t0
            self._queue.append(message)
            self._queued_frames += n
            m = self._metrics
            m["max_backlog_frames"] = max(m["max_backlog_frames"], self._queued_frames)
            m["max_backlog_messages"] = max(m["max_backlog_messages"], len(self._queue))
            self._cond.notify_all()

    __call__ = submit

    def metrics(self) -> dict[str, Any]:
        """Backlog and throughput counters (a snapshot; safe from any thread)."""
        with self._cond:
            out = dict(self._metrics)
            out.update(queued_frames=self._queued_frames, queued_messages=len(self._queue),
                       active_runs=len(self._runs), busy=self._busy)
        return out

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every submitted message is processed; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy or self._finishing:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 0.5)
        return True

    def close(self, timeout: float | None = 30.0) -> None:
        """Process what is queued, then stop the worker."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._queue.append(_CLOSE)
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def __enter__(self) -> LiveReconstructor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- worker side -------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                item = self._queue.popleft()
                if item is _CLOSE:
                    self._cond.notify_all()
                    return
                self._busy = True
            t0 = time.perf_counter()
            self._metrics["last_activity"] = time.time()
            try:
                self._handle(item)
            except Exception:
                self._metrics["worker_errors"] += 1
                log.exception("live reconstruction failed on %s", type(item).__name__)
            finally:
                with self._cond:
                    if isinstance(item, FrameBatch):
                        self._queued_frames -= item.n_frames
                    self._busy = False
                    self._metrics["worker_busy_s"] += time.perf_counter() - t0
                    self._cond.notify_all()

    def _sink(self, method: str, *args, **kwargs) -> None:
        try:
            getattr(self.sink, method)(*args, **kwargs)
        except Exception as exc:
            self._metrics["sink_errors"] += 1
            message = f"sink {type(self.sink).__name__}.{method} failed: {type(exc).__name__}: {exc}"
            if self._problems.report("sink", cause_of(message), message):
                log.debug("traceback of the first such failure", exc_info=True)

    def _handle(self, item: Message) -> None:
        if isinstance(item, RunHeader):
            self._start_run(item)
        elif isinstance(item, _FinishReady):
            self._finish_ready(item)
        elif isinstance(item, FrameBatch):
            self._batch(item)
        else:
            self._stop_run(item)

    def _start_run(self, header: RunHeader) -> None:
        if header.run_uid in self._runs:
            log.warning("run %s started twice; the second header is ignored", header.run_uid)
            return
        run = _LiveRun(header=header, engine=None,
                       trigger=self.policy.new_run(nominal_step_deg=header.nominal_step_deg))
        self._runs[header.run_uid] = run
        self._sink("run_started", header)
        try:
            run.engine = self.engine_factory(header)
        except Exception as exc:
            self._fail(run, f"engine could not be built: {exc!r}")
            return
        if self.convergence is not None and header.volume_shape_zyx is not None:
            from apt_stream.physics.convergence import ConvergenceMonitor

            run.monitor = ConvergenceMonitor(header.volume_shape_zyx, self.convergence)
            if self.stop_policy is not None:
                run.stop = self.stop_policy.new_run(self.policy,
                                                    nominal_step_deg=header.nominal_step_deg)

    def _fail(self, run: _LiveRun, why: str) -> None:
        log.error("run %s failed: %s", run.header.run_uid, why)
        run.failed = True
        run.stats["error"] = why
        self._record(run, "failed")
        self._sink("run_stopped", run.header.run_uid, "failed")

    def _batch(self, batch: FrameBatch) -> None:
        run = self._runs.get(batch.run_uid)
        if run is None:
            self._problems.report("live", "frames for unknown run",
                                  f"frames for unknown run {batch.run_uid} ignored")
            return
        if run.failed or run.engine is None:
            return
        engine = run.engine
        scope = f"run {batch.run_uid}"
        if batch.n_frames:
            try:
                engine.add_frames(batch.angle_id, batch.angle_deg, batch.frames, batch.positions_px)
                run.angles_with_frames.add(batch.angle_id)
                self._metrics["frames_processed"] += batch.n_frames
            except Exception as exc:
                # One bad batch costs its frames, not the run.
                run.frames_failed += batch.n_frames
                run.angles_short.add(batch.angle_id)
                self._metrics["frames_failed"] += batch.n_frames
                message = (f"{scope} angle {batch.angle_id}: the engine refused {batch.n_frames} "
                           f"frames ({type(exc).__name__}: {exc}); they count as missing")
                self._problems.report(scope, cause_of(message), message)
        self._metrics["batches_processed"] += 1
        if not batch.angle_complete:
            return
        if batch.angle_id not in run.angles_with_frames:
            run.angles_failed.add(batch.angle_id)
            self._problems.report(scope, "angle without usable frames",
                                  f"{scope} angle {batch.angle_id} completed without usable "
                                  "frames; skipped")
            return
        start_finish = getattr(engine, "start_finish", None)
        if callable(start_finish):
            # The engine finishes the angle elsewhere (a Dask worker): go on with the next
            # frames now and take the angle's summary when it is ready.
            try:
                future = start_finish(batch.angle_id)
            except Exception as exc:
                self._angle_failed(run, batch.angle_id, exc)
                return
            run.finishing[batch.angle_id] = batch.received_at
            with self._cond:
                self._finishing += 1
            future.add_done_callback(
                lambda _f, uid=batch.run_uid, a=batch.angle_id: self._post(_FinishReady(uid, a)))
            return
        self._complete_angle(run, batch.angle_id, batch.received_at)

    def _post(self, item: _FinishReady) -> None:
        """From an engine's thread: queue an internal message for the worker (never blocks)."""
        with self._cond:
            self._queue.append(item)
            self._cond.notify_all()

    def _finish_ready(self, item: _FinishReady) -> None:
        with self._cond:
            self._finishing -= 1
        run = self._runs.get(item.run_uid)
        if run is None or item.angle_id not in run.finishing:
            return  # taken already (the run's stop waited for it)
        self._complete_angle(run, item.angle_id, run.finishing.pop(item.angle_id))

    def _angle_failed(self, run: _LiveRun, angle_id: int, exc: BaseException) -> None:
        scope = f"run {run.header.run_uid}"
        run.angles_failed.add(angle_id)
        self._metrics["angles_failed"] += 1
        message = (f"{scope} angle {angle_id} could not be finished "
                   f"({type(exc).__name__}: {exc}); skipped")
        self._problems.report(scope, cause_of(message), message)

    def _complete_angle(self, run: _LiveRun, angle_id: int, received_at: float | None) -> None:
        """Finish the angle (or take its summary), publish it and ask the trigger."""
        if run.failed or run.engine is None:
            return
        engine = run.engine
        try:
            summary = engine.finish_angle(angle_id)
        except Exception as exc:
            self._angle_failed(run, angle_id, exc)
            return
        self._metrics["angles_finished"] += 1
        self._sink("angle_finished", run.header.run_uid, summary, engine)
        try:
            finished = engine.finished_angles_deg()
            decision = run.trigger.update(finished)
            if decision is not None:
                if decision == "fire":
                    run.stats["fired_after_s"] = time.perf_counter() - run.started
                    run.stats["fired_at_n"] = run.trigger.fired_at_n
                    # Latency is measured from here: the last frame the trigger needed had arrived.
                    run.stats["trigger_frame_received_at"] = received_at
                self._reconstruct(run, len(finished), final=False)
        except Exception as exc:
            self._fail(run, f"{type(exc).__name__}: {exc}")
            return
        if run.monitor is not None:
            try:
                self._assess(run, finished, summary)
            except Exception as exc:  # the estimate is advice: it never costs the run
                message = f"run {run.header.run_uid}: convergence estimate failed ({exc!r})"
                self._problems.report(f"run {run.header.run_uid}", cause_of(message), message)

    def _assess(self, run: _LiveRun, finished: list[float], summary: Any) -> None:
        """Convergence estimate, stop rule and next-angle suggestions after a finished angle."""
        engine = run.engine
        if not hasattr(engine, "projections") or not run.monitor.due(len(finished)):
            return
        angles, proj = engine.projections()
        row = run.monitor.update(angles, proj, newest_deg=getattr(summary, "angle_deg", None),
                                 force=True)
        if row is None:
            return
        data = row.as_row()
        advice: dict[str, Any] = {"run_uid": run.header.run_uid, "n_angles": data["n_angles"],
                                  "stop": False, "reason": None, "convergence": data}
        stop = run.stop.update(data, finished) if run.stop is not None else None
        if stop is not None:
            advice.update(stop=True, reason=stop["reason"])
            run.stats["stop_advised_at_n"] = stop["n_angles"]
        elif run.stop is not None and run.stop.advised:
            advice.update(stop=True, reason="advised earlier")
        if self.suggest > 0:
            from apt_stream.physics.next_angle import suggest_angles

            ranked = suggest_angles(angles, run.header.angles_deg, projections=(angles, proj),
                                    volume_shape_zyx=run.header.volume_shape_zyx, k=self.suggest)
            advice["next_angles"] = [s.as_dict() for s in ranked]
        run.advice = advice
        if accepts_keyword(getattr(self.sink, "convergence_ready", None) or (lambda: None),
                           "advice"):
            self._sink("convergence_ready", run.header.run_uid, data,
                       advice if stop is not None else None)
        if self.on_advice is not None:
            try:
                self.on_advice(run.header.run_uid, dict(advice))
            except Exception:
                log.exception("on_advice failed for run %s", run.header.run_uid)
        if stop is not None and self.stop_policy is not None and self.stop_policy.act:
            # Fire the final reconstruction now: more angles are unlikely to change it.
            if not run.trigger.fired:
                run.trigger.fired, run.trigger.fired_at_n = True, len(finished)
                run.stats["fired_at_n"] = len(finished)
                run.stats["fired_after_s"] = time.perf_counter() - run.started
            run.stats["fired_early"] = True
            self._reconstruct(run, len(finished), final=True)

    def _reconstruct(self, run: _LiveRun, n_finished: int, *, final: bool) -> None:
        extra = {}
        # Data consistency needs the finished angles' projections; only functions that ask for
        # them (a `projections` keyword) get them, so simple reconstruct_fn(volume, header) work.
        if accepts_projections(self.reconstruct_fn) and hasattr(run.engine, "projections"):
            extra["projections"] = run.engine.projections()
            # A physics-in-the-loop network reads the Approximant-iteration projections, as trained.
            if accepts_projections(self.reconstruct_fn, "input_projections"):
                extra["input_projections"] = run.engine.projections(refined=False)
        volumes = self.reconstruct_fn(run.engine.volume(), run.header, **extra)
        if not isinstance(volumes, dict):
            raise ConfigError(f"reconstruct_fn must return a dict of volumes, got {type(volumes)}")
        run.volumes, run.n_at_volumes = volumes, n_finished
        self._metrics["reconstructions"] += 1
        self._sink("reconstruction_ready", run.header.run_uid, volumes, final=final)

    def _stop_run(self, stopped: RunStopped) -> None:
        run = self._runs.get(stopped.run_uid)
        if run is None:
            self._problems.report("live", "stop for unknown run",
                                  f"stop for unknown run {stopped.run_uid} ignored")
            return
        # Angles still finishing elsewhere belong to the run: take them first, in order.
        while run.finishing:
            angle_id = next(iter(run.finishing))
            self._complete_angle(run, angle_id, run.finishing.pop(angle_id))
        self._runs.pop(stopped.run_uid, None)
        gaps = self._gaps(run, stopped)
        if run.monitor is not None:
            run.stats.update(convergence=run.monitor.table(),
                             convergence_s=round(run.monitor.spent_s, 3),
                             convergence_skipped=run.monitor.skipped)
        run.stats.update(exit_status=stopped.exit_status, reason=stopped.reason,
                         frames_dropped=stopped.n_dropped, **gaps)
        if run.failed:
            self._finished(run, "failed")
            return
        status: RunStatus = "stopped_before_trigger"
        if run.trigger.fired:
            try:
                n = len(run.engine.finished_angles_deg())
                if run.volumes is None or n > run.n_at_volumes:
                    self._reconstruct(run, n, final=True)
                else:
                    # Nothing new since the triggered reconstruction: re-announce it as final.
                    self._sink("reconstruction_ready", run.header.run_uid, run.volumes, final=True)
                status = "done_with_gaps" if gaps["frames_missing"] or gaps["angles_with_gaps"] \
                    else "done"
            except Exception as exc:
                self._fail(run, f"final reconstruction: {type(exc).__name__}: {exc}")
                self._finished(run, "failed")
                return
        if stopped.exit_status == "abandoned":
            status = "abandoned"
        self._record(run, status)
        if accepts_keyword(self.sink.run_stopped, "metadata"):
            self._sink("run_stopped", run.header.run_uid, status, metadata=dict(gaps))
        else:
            self._sink("run_stopped", run.header.run_uid, status)
        self._finished(run, status)

    @staticmethod
    def _gaps(run: _LiveRun, stopped: RunStopped) -> dict[str, Any]:
        by_angle = dict(stopped.stats.get("frames_dropped_by_angle", {}))
        angles = set(by_angle) | run.angles_failed | run.angles_short
        return {
            "frames_missing": int(stopped.n_dropped + run.frames_failed),
            "angles_with_gaps": sorted(int(a) for a in angles),
        }

    def _finished(self, run: _LiveRun, status: str) -> None:
        self._problems.summarise(f"run {run.header.run_uid}")
        close = getattr(run.engine, "close", None)
        if callable(close):  # an engine on a cluster frees the run's state on its workers
            try:
                close()
            except Exception:
                log.exception("closing the engine of run %s failed", run.header.run_uid)
        if self.on_run_finished is not None:
            try:
                self.on_run_finished(run.header.run_uid, status)
            except Exception:
                log.exception("on_run_finished failed for run %s", run.header.run_uid)

    def _record(self, run: _LiveRun, status: RunStatus) -> None:
        engine = run.engine
        n_angles = len(engine.finished_angles_deg()) if engine is not None else 0
        self.run_stats[run.header.run_uid] = {
            **run.stats, "status": status, "angles_finished": n_angles,
            "seconds": time.perf_counter() - run.started,
        }
        while len(self.run_stats) > self.keep_run_stats:  # a listener serves for months
            self.run_stats.pop(next(iter(self.run_stats)))

    def advice(self, run_uid: str) -> dict[str, Any] | None:
        """The newest advice for a running run (None when none was given or the run is over)."""
        run = self._runs.get(run_uid)
        return None if run is None or run.advice is None else dict(run.advice)

    def status(self, run_uid: str) -> str | None:
        """The final status of a stopped (or failed) run, None while it runs or if unknown."""
        stats = self.run_stats.get(run_uid)
        return None if stats is None else stats["status"]
