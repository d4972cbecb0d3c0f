"""The whole ingestion path in one object: 0MQ source -> pipeline (recovery) -> spool -> assembler.

::

    listener = Listener("tcp://127.0.0.1:5568", emit=live.submit,
                        data_roots=["/data"], spool_dir="/data/spool")
    listener.start()          # a background thread; or listener.run() to block
    ...
    listener.stop()

``emit`` receives RunHeader / FrameBatch / RunStopped on the listener thread, so it must be quick
(a :class:`~apt_stream.stream.live.LiveReconstructor`'s ``submit`` is).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable

from apt_stream.errors import ServiceError
from apt_stream.stream.assembler import RunAssembler
from apt_stream.stream.decode import Serializer
from apt_stream.stream.messages import Message
from apt_stream.stream.paths import DataRoots
from apt_stream.stream.pipeline import DocumentPipeline
from apt_stream.stream.recovery import RunRecovery
from apt_stream.stream.source import ZmqDocumentSource
from apt_stream.stream.spool import RunSpool


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
        Look up runs whose start this listener missed.
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
    ) -> None:
        self.roots = DataRoots(data_roots)
        self.source = ZmqDocumentSource(
            address, serializer=serializer, allow_pickle=allow_pickle, strict=strict,
            poll_timeout_s=poll_timeout_s,
        )
        self.assembler = RunAssembler(
            emit, data_roots=self.roots, max_batch_frames=max_batch_frames, data_wait_s=data_wait_s
        )
        self.spool = RunSpool(spool_dir) if spool_dir is not None else None
        consumers = ([self.spool] if self.spool else []) + [self.assembler]
        recovery = RunRecovery(data_roots=self.roots, spool_dir=spool_dir) if recover else None
        self.pipeline = DocumentPipeline(consumers, recovery=recovery, strict=strict)
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _idle(self) -> None:
        self.pipeline.retry_orphans()
        self.assembler.flush()

    def run(self) -> None:
        """Listen on this thread until :meth:`stop`."""
        try:
            self.source.run(self.pipeline, on_idle=self._idle)
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            if self.spool is not None:
                self.spool.close()

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
        }
