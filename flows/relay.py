"""Hand a live run's work from the LiveReconstructor's worker thread to that run's flow.

:class:`~apt_stream.stream.live.LiveReconstructor` does each run's work on its worker thread and
reports to a sink. :class:`LiveBridge` is that sink *and* wraps the engine factory and the
reconstruct function, so the worker's per-angle calls — ``engine.finish_angle``, the sink's
``angle_finished`` (publish), ``reconstruct_fn`` and the other sink calls — become
:class:`Call` objects on the run's :class:`RunChannel`. The run's ``reconstruct_scan`` flow takes
them one by one and runs each as a Prefect task; the worker waits for the result, so the
library's order and backpressure are unchanged and nothing runs twice at once.

When no flow takes a run's calls (the listen flow stopped, or a second run overlapped the first
for longer than ``attach_timeout_s``), the worker runs them itself without Prefect: the
reconstruction never depends on the orchestrator being alive. Frame batches
(``engine.add_frames``) always stay on the worker: they are too small to be tasks.

No Prefect import here: a task is anything callable with the original function as ``.fn``.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: The kind of a run's last call; the flow's loop ends after it.
LAST_KIND = "run_stopped"

#: The call whose task is being run (so its body can say it started: see :func:`body_entered`).
_CURRENT: contextvars.ContextVar[Call | None] = contextvars.ContextVar("apt_relay_call",
                                                                     default=None)


def body_entered() -> None:
    """Called first thing by a task's body: from here on, an error is the task's own.

    Before it, an error is the orchestrator's (Prefect's API unreachable, say): the call's work
    never ran, so the worker runs it itself instead of losing it.
    """
    call = _CURRENT.get()
    if call is not None:
        call.body_started = True


def body_returned(result: Any) -> None:
    """Called by a task's body with its result: an error raised after this (the orchestrator
    failing to record the task's end) does not undo the work, whose result is kept."""
    call = _CURRENT.get()
    if call is not None:
        call.body_result, call.body_finished = result, True


def _marks_body(task: Callable) -> bool:
    """Whether the task's body calls :func:`body_entered` (else every error is its own)."""
    return bool(getattr(plain(task), "marks_body", False))


def plain(task: Callable) -> Callable:
    """The undecorated function of a Prefect task (or the callable itself)."""
    return getattr(task, "fn", task)


class Call:
    """One unit of a run's work, waiting for the flow (or, failing that, the worker) to run it.

    ``info`` carries what the flow needs for its artifacts (volumes, the ``final`` flag) without
    reaching into the task's arguments.
    """

    def __init__(self, kind: str, task: Callable, args: tuple, kwargs: dict, info: dict) -> None:
        self.kind = kind
        self.task = task
        self.args = args
        self.kwargs = kwargs
        self.info = info
        self.result: Any = None
        self.error: BaseException | None = None
        #: Set by :func:`body_entered` when the task's own code began, and by
        #: :func:`body_returned` when it ended (with its result).
        self.body_started = False
        self.body_finished = False
        self.body_result: Any = None
        self.done = threading.Event()
        self._claimed = False
        self._lock = threading.Lock()

    def claim(self) -> bool:
        """Take the call; exactly one of the flow and the worker wins."""
        with self._lock:
            if self._claimed:
                return False
            self._claimed = True
            return True

    def execute(self, *, as_task: bool = True) -> Any:
        """Run the task here (in the flow: a Prefect task run); keep its result or error.

        ``as_task=False`` runs the task's plain function (inside another task that groups
        several calls).
        """
        token = _CURRENT.set(self)
        try:
            fn = self.task if as_task else plain(self.task)
            self.result = fn(*self.args, **self.kwargs)
        except Exception as exc:
            self.error = exc
        finally:
            _CURRENT.reset(token)
        return self.result

    @property
    def orchestration_failed(self) -> bool:
        """The call failed before its task's body ran (its work is still to do)."""
        return self.error is not None and not self.body_started

    def __enter__(self) -> Call:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and self.error is None:
            self.error = exc
        # Only now may the worker go on (and touch the engine again).
        self.done.set()


class RunChannel:
    """The calls of one run, from the worker (``submit``) to the flow (``calls``).

    ``__slots__``: a flow parameter Prefect cannot turn into JSON is recorded by its type name
    only, and the channel holds a client and volumes that must never go to the Prefect API.
    """

    __slots__ = ("header", "run_uid", "engine", "publisher", "published", "attach_timeout_s",
                 "poll_s", "flow_run_id", "summary", "convergence", "_queue", "_attached", "_closed", "_created")

    def __init__(self, header: Any, *, attach_timeout_s: float = 30.0, poll_s: float = 0.1) -> None:
        self.header = header
        self.run_uid: str = header.run_uid
        #: The run's real engine (set by the bridge's engine factory): the flow reads its
        #: volume for previews while the worker waits.
        self.engine: Any = None
        #: The sink behind the bridge (the flow publishes metrics through it).
        self.publisher: Any = None
        #: The summary of the last angle the finish-angle task already published.
        self.published: Any = None
        #: The flow run that took this run, and the summary it ended with (set by the flow): what
        #: a state catch-up needs when Prefect could not record the end.
        self.flow_run_id: str | None = None
        self.summary: dict | None = None
        #: Live convergence rows (closed loop), newest last, and the stop advice if given: the
        #: flow shows them as an artifact with its live updates.
        self.convergence: list[dict] = []
        self.attach_timeout_s = float(attach_timeout_s)
        self.poll_s = float(poll_s)
        self._queue: queue.Queue[Call] = queue.Queue()
        self._attached = threading.Event()
        self._closed = threading.Event()
        self._created = time.monotonic()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """No flow takes calls any more: pending and future calls run on the worker."""
        self._closed.set()

    # -- worker side ---------------------------------------------------------------------------
    def submit(self, kind: str, task: Callable, args: tuple = (), kwargs: dict | None = None,
               *, info: dict | None = None) -> Any:
        """Have the flow run ``task(*args, **kwargs)``; wait and return its result (or raise)."""
        call = Call(kind, task, args, dict(kwargs or {}), dict(info or {}))
        if not self._closed.is_set():
            self._queue.put(call)
            while not call.done.wait(self.poll_s):
                if self._gave_up() and call.claim():
                    break
        if call.done.is_set():
            if call.error is not None and call.body_finished and _marks_body(task):
                log.warning("run %s: %s ran, but the orchestrator failed to record it (%s: %s); "
                            "the rest of the run goes on without Prefect", self.run_uid, kind,
                            type(call.error).__name__, call.error)
                self.close()
                return call.body_result
            if call.orchestration_failed and _marks_body(task):
                # The orchestrator failed around the task, not the task: do the work here and
                # keep the rest of the run off the orchestrator.
                log.warning("run %s: %s could not run as a task (%s: %s); running it and the rest "
                            "of the run without Prefect", self.run_uid, kind,
                            type(call.error).__name__, call.error)
                self.close()
                return plain(task)(*args, **(kwargs or {}))
            if call.error is not None:
                raise call.error
            return call.result
        return plain(task)(*args, **(kwargs or {}))

    def _gave_up(self) -> bool:
        if self._closed.is_set():
            return True
        if not self._attached.is_set() and time.monotonic() - self._created > self.attach_timeout_s:
            log.warning("no flow took run %s within %.0f s; running it without Prefect",
                        self.run_uid, self.attach_timeout_s)
            self.close()
            return True
        return False

    # -- flow side -----------------------------------------------------------------------------
    def calls(self, *, stop: threading.Event | Callable[[], bool] | None = None) -> Iterator[Call]:
        """Yield the run's calls in order until its ``run_stopped`` call (or ``stop``).

        ``stop`` is an event or a predicate. Use each call as a context manager
        (``with call: call.execute()``) so the worker is released even if the flow fails in
        between. Leaving the loop closes the channel.
        """
        self._attached.set()
        try:
            while True:
                call = self.next_call(stop=stop)
                if call is None:
                    return
                yield call
                if call.kind == LAST_KIND:
                    return
        finally:
            self.close()

    def next_call(self, *, stop: threading.Event | Callable[[], bool] | None = None,
                  timeout_s: float | None = None) -> Call | None:
        """The next call, claimed for the flow; None when the channel is closed, ``stop`` is
        set, or none came within ``timeout_s`` (None: wait on).

        What :meth:`calls` uses; a flow that runs several calls in one task takes the next
        ones with it. The caller must end each call (``with call: ...``).
        """
        stopped = getattr(stop, "is_set", stop)
        self._attached.set()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._closed.is_set():
            if stopped is not None and stopped():
                return None
            wait = self.poll_s if deadline is None else min(self.poll_s,
                                                            deadline - time.monotonic())
            if wait <= 0:
                return None
            try:
                call = self._queue.get(timeout=wait)
            except queue.Empty:
                continue
            if call.claim():
                return call
        return None


@dataclass(frozen=True)
class RunTasks:
    """The tasks the bridge hands to a run's flow (Prefect tasks, or plain functions)."""

    publish_run_started: Callable
    finish_angle: Callable
    publish_angle: Callable
    reconstruct: Callable
    publish_volumes: Callable
    publish_run_stopped: Callable


class RelayedEngine:
    """A streaming engine whose ``finish_angle`` runs as a task of the run's flow."""

    def __init__(self, inner: Any, channel: RunChannel, finish_task: Callable) -> None:
        self._inner = inner
        self._channel = channel
        self._finish_task = finish_task

    def add_frames(self, angle_id: int, angle_deg: float, frames: Any, positions_px: Any) -> Any:
        return self._inner.add_frames(angle_id, angle_deg, frames, positions_px)

    def finish_angle(self, angle_id: int) -> Any:
        # The task publishes too (one task per angle); the sink call that follows is a no-op.
        channel = self._channel
        summary = channel.submit(
            "finish_angle", self._finish_task,
            (self._inner, angle_id, channel.publisher, channel.run_uid), info={"angle_id": angle_id},
        )
        channel.published = summary
        return summary

    def volume(self) -> Any:
        return self._inner.volume()

    def finished_angles_deg(self) -> list[float]:
        return self._inner.finished_angles_deg()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class LiveBridge:
    """Sink and wrappers for a LiveReconstructor that route each run through a flow.

    Parameters
    ----------
    publisher
        The real sink (a :class:`~apt_stream.publish.TiledPublisher`).
    engine_factory, reconstruct_fn
        What the LiveReconstructor would otherwise get directly.
    tasks
        The tasks each call runs as.
    attach_timeout_s
        How long a new run waits for a flow to take it before running without one.

    Give the LiveReconstructor ``sink=bridge``, ``engine_factory=bridge.engine_factory`` and
    ``reconstruct_fn=bridge.reconstruct_fn``; the flow loop takes runs from :meth:`next_run`.
    """

    def __init__(self, publisher: Any, *, engine_factory: Callable, reconstruct_fn: Callable,
                 tasks: RunTasks, attach_timeout_s: float = 30.0) -> None:
        self.publisher = publisher
        self._engine_factory = engine_factory
        self._reconstruct_fn = reconstruct_fn
        self.tasks = tasks
        self.attach_timeout_s = attach_timeout_s
        self._new_runs: queue.Queue[RunChannel] = queue.Queue()
        self._channels: dict[str, RunChannel] = {}
        self._closed = False
        self._lock = threading.Lock()

    def next_run(self, timeout_s: float | None = None) -> RunChannel | None:
        """The next run waiting for a flow, or None after ``timeout_s``."""
        while True:
            try:
                channel = self._new_runs.get(timeout=timeout_s)
            except queue.Empty:
                return None
            if not channel.closed:
                return channel

    def close(self) -> None:
        """Stop routing: every open and future run is done on the worker without Prefect."""
        with self._lock:
            self._closed = True
            for channel in self._channels.values():
                channel.close()

    def _channel(self, run_uid: str) -> RunChannel:
        with self._lock:
            return self._channels[run_uid]

    # -- wrappers for the LiveReconstructor ------------------------------------------------------
    def engine_factory(self, header: Any) -> RelayedEngine:
        channel = self._channel(header.run_uid)
        channel.engine = self._engine_factory(header)
        return RelayedEngine(channel.engine, channel, self.tasks.finish_angle)

    def reconstruct_fn(self, volume: Any, header: Any, projections: Any = None,
                       input_projections: Any = None) -> Any:
        args = (self._reconstruct_fn, volume, header)
        if projections is not None:  # data consistency and physics-in-the-loop models need them
            args = (*args, projections, input_projections)
        return self._channel(header.run_uid).submit("reconstruct", self.tasks.reconstruct, args)

    # -- the sink protocol -----------------------------------------------------------------------
    def run_started(self, header: Any) -> None:
        channel = RunChannel(header, attach_timeout_s=self.attach_timeout_s)
        channel.publisher = self.publisher
        with self._lock:
            if self._closed:
                channel.close()
            self._channels[header.run_uid] = channel
        self._new_runs.put(channel)
        channel.submit("run_started", self.tasks.publish_run_started, (self.publisher, header))

    def angle_finished(self, run_uid: str, summary: Any, approximant: Any) -> None:
        channel = self._channel(run_uid)
        if summary is not None and summary is channel.published:
            return
        channel.submit(
            "angle_finished", self.tasks.publish_angle,
            (self.publisher, run_uid, summary, approximant), info={"summary": summary},
        )

    def reconstruction_ready(self, run_uid: str, volumes: dict, *, final: bool) -> None:
        self._channel(run_uid).submit(
            "reconstruction_ready", self.tasks.publish_volumes,
            (self.publisher, run_uid, volumes), {"final": final},
            info={"volumes": volumes, "final": final},
        )

    def convergence_ready(self, run_uid: str, row: dict, advice: dict | None = None) -> None:
        """A live convergence estimate: straight to the publisher (no task: a small table row,
        every angle, would cost more in Prefect overhead than it does), and onto the run's
        channel for the flow's convergence artifact."""
        forward = getattr(self.publisher, "convergence_ready", None)
        if callable(forward):
            forward(run_uid, row, advice)
        with self._lock:
            channel = self._channels.get(run_uid)
        if channel is not None:
            channel.convergence.append({**row, "stop": bool(advice and advice.get("stop"))})

    def run_stopped(self, run_uid: str, status: str, metadata: dict | None = None) -> None:
        args = (self.publisher, run_uid, status)
        if metadata:  # gaps of a done_with_gaps run; old task signatures keep working without
            args = (*args, dict(metadata))
        try:
            self._channel(run_uid).submit(
                LAST_KIND, self.tasks.publish_run_stopped, args,
                info={"status": status, **(metadata or {})},
            )
        finally:
            with self._lock:
                self._channels.pop(run_uid, None)
