"""The whole ingestion path in one object: 0MQ source -> pipeline (recovery) -> spool -> assembler.

::

    listener = Listener("tcp://127.0.0.1:5568", emit=live.submit,
                        data_roots=["/data"], spool_dir="/data/spool")
    listener.start()          # a background thread; or listener.run() to block
    ...
    listener.stop()

``emit`` receives RunHeader / FrameBatch / RunStopped on the listener thread, so it must be quick
(a :class:`~apt_stream.stream.live.LiveReconstructor`'s ``submit`` is).

Liveness: no exception from a message, a file or a consumer ends the listener thread (each is
contained where it happens). If the thread ends anyway, :attr:`Listener.alive` turns False and
:attr:`Listener.error` says why, so a supervisor exits non-zero instead of serving nothing;
:meth:`Listener.heartbeat_age_s` and the optional ``health_file`` (JSON, rewritten every few
seconds) show that the loop turns. On start, runs spooled by an earlier listener but never
marked done (it was killed mid-run or after the scan) are replayed first.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from apt_stream.errors import ServiceError
from apt_stream.stream.assembler import RunAssembler
from apt_stream.stream.decode import Serializer
from apt_stream.stream.messages import Message
from apt_stream.stream.paths import DataRoots
from apt_stream.stream.pipeline import DocumentPipeline
from apt_stream.stream.recovery import RunRecovery
from apt_stream.stream.source import ZmqDocumentSource
from apt_stream.stream.spool import RunSpool

log = logging.getLogger(__name__)


class Listener:
    """Subscribe, recover late runs, spool and assemble frames for ``emit``.

    Parameters
    ----------
    address
        The 0MQ proxy's output address.
    emit
        Receives the assembler's messages.
    data_roots
        Folders frames, probes and run journals may be read from.
    spool_dir
        Per-run spool folder (None: no spool; recovery then relies on run journals only).
    serializer, allow_pickle, strict, poll_timeout_s
        Passed to :class:`ZmqDocumentSource`; ``strict`` also makes the pipeline re-raise.
    max_batch_frames, data_wait_s
        Passed to :class:`RunAssembler`.
    recover
        Look up runs whose start this listener missed, and replay at start the spooled runs an
        earlier listener never finished.
    run_idle_timeout_s, max_runs_in_flight
        Passed to :class:`RunAssembler` (runs whose stop never comes; open runs at most).
    health_file
        Rewritten (atomically) every ``health_every_s`` with the counters and the time of the
        last poll: a supervisor's liveness probe.
    consumers
        Further document consumers ``(name, doc)`` (e.g. a
        :class:`~apt_stream.publish.raw.RawRunStore`), after the spool, before the assembler.
    source_options
        Further :class:`ZmqDocumentSource` keywords (``limits``, ``curve_server_key``,
        ``curve_public_key``, ``curve_secret_key``, ...).
    """

    def __init__(
        self,
        address: str,
        *,
        emit: Callable[[Message], object],
        data_roots: Iterable[str | os.PathLike],
        spool_dir: str | os.PathLike | None = None,
        serializer: Serializer = "msgpack",
        allow_pickle: bool = False,
        strict: bool = False,
        poll_timeout_s: float = 0.1,
        max_batch_frames: int = 64,
        data_wait_s: float = 5.0,
        recover: bool = True,
        run_idle_timeout_s: float | None = 600.0,
        max_runs_in_flight: int = 16,
        health_file: str | os.PathLike | None = None,
        health_every_s: float = 5.0,
        consumers: Iterable[Callable[[str, dict], object]] = (),
        **source_options,
    ) -> None:
        self.roots = DataRoots(data_roots)
        self.source = ZmqDocumentSource(
            address, serializer=serializer, allow_pickle=allow_pickle, strict=strict,
            poll_timeout_s=poll_timeout_s, **source_options,
        )
        self.assembler = RunAssembler(
            emit, data_roots=self.roots, max_batch_frames=max_batch_frames, data_wait_s=data_wait_s,
            run_idle_timeout_s=run_idle_timeout_s, max_runs_in_flight=max_runs_in_flight,
        )
        self.strict = strict
        self.health_file = Path(health_file) if health_file is not None else None
        self.health_every_s = float(health_every_s)
        self._health_at = 0.0
        self.recovered_at_start: list[str] = []
        self._recovery_done = not recover
        self.spool = RunSpool(spool_dir) if spool_dir is not None else None
        consumers = ([self.spool] if self.spool else []) + list(consumers) + [self.assembler]
        recovery = RunRecovery(data_roots=self.roots, spool_dir=spool_dir) if recover else None
        self.pipeline = DocumentPipeline(consumers, recovery=recovery, strict=strict)
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _recover_once(self) -> None:
        # After the socket is subscribed (so nothing published meanwhile is missed), before the
        # first live document.
        if self._recovery_done:
            return
        self._recovery_done = True
        try:
            self.recover_unfinished()
        except Exception:
            if self.strict:
                raise
            log.exception("replaying unfinished runs failed; listening anyway")

    def _deliver(self, name: str, doc: dict) -> None:
        self._recover_once()
        self.pipeline(name, doc)

    def _idle(self) -> None:
        for step in (self._recover_once, self.pipeline.retry_orphans, self.assembler.flush, self._write_health):
            try:
                step()
            except Exception:
                if self.strict:
                    raise
                log.exception("listener idle step %s failed; the listener goes on", step.__name__)

    def _write_health(self, *, force: bool = False) -> None:
        if self.health_file is None:
            return
        now = time.time()
        if not force and now - self._health_at < self.health_every_s:
            return
        self._health_at = now
        tmp = self.health_file.with_name(self.health_file.name + ".tmp")
        tmp.write_text(json.dumps({"time": now, "alive": True, "pid": os.getpid(),
                                   "open_runs": self.assembler.open_runs, **self.stats()},
                                  default=str))
        os.replace(tmp, self.health_file)

    def mark_done(self, run_uid: str, status: str = "") -> None:
        """A run was fully processed (``LiveReconstructor(on_run_finished=listener.mark_done)``):
        a restarted listener will not replay it."""
        if self.spool is not None:
            self.spool.mark_done(run_uid, status)

    def recover_unfinished(self) -> list[str]:
        """Replay the runs an earlier listener spooled but never finished (called by :meth:`run`
        before listening). Their journal is used when one is found (it is complete), else the
        spool. Returns the run uids replayed."""
        if self.spool is None or self.pipeline.recovery is None:
            return []
        replayed = []
        for run_uid in self.spool.unfinished():
            docs = self.pipeline.recovery.find(run_uid)
            if not docs:
                continue
            log.warning("replaying run %s, which an earlier listener did not finish (%d documents)",
                        run_uid, len(docs))
            for name, doc in docs:
                self.pipeline(name, doc)
            replayed.append(run_uid)
        self.recovered_at_start = replayed
        return replayed

    @property
    def alive(self) -> bool:
        """False once the listening thread has ended (by :meth:`stop` or by an error)."""
        return self._thread is not None and self._thread.is_alive()

    def heartbeat_age_s(self) -> float | None:
        """Seconds since the 0MQ loop last polled (None before it started)."""
        last = getattr(self.source.stats, "last_poll", 0.0)
        return time.time() - last if last else None

    def run(self) -> None:
        """Listen on this thread until :meth:`stop`."""
        try:
            self.source.run(self._deliver, on_idle=self._idle)
        except BaseException as exc:
            self.error = exc
            log.critical("the listener thread ended: %r", exc)
            raise
        finally:
            if self.spool is not None:
                self.spool.close()
            self.assembler.close()
            if self.health_file is not None:
                try:
                    self.health_file.write_text(json.dumps({"time": time.time(), "alive": False,
                                                            "error": repr(self.error)}))
                except OSError:
                    pass

    def start(self, *, ready_timeout_s: float = 10.0) -> Listener:
        """Listen on a background thread; returns once the socket is subscribed."""
        self._thread = threading.Thread(target=self.run, name="apt-listener", daemon=True)
        self._thread.start()
        if not self.source.ready.wait(ready_timeout_s):
            self.stop()
            raise ServiceError(
                f"listener on {self.source.address} did not start within {ready_timeout_s} s"
                + (f": {self.error!r}" if self.error is not None else "")
            )
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop listening (within one poll timeout) and wait for the thread."""
        self.source.stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict:
        """Counters of the source, pipeline and assembler."""
        s = self.source.stats
        return {
            "received": s.received, "delivered": s.delivered, "dropped": s.dropped,
            "probes": s.probes, "last_error": s.last_error, "pipeline": dict(self.pipeline.stats),
            "assembler": dict(self.assembler.stats), "orphans": self.pipeline.n_orphans,
            "callback_errors": getattr(s, "callback_errors", 0),
            "recovered_at_start": list(self.recovered_at_start),
        }
