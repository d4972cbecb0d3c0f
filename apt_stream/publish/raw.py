"""Raw Bluesky runs into Tiled with bluesky-tiled-plugins' ``TiledWriter``.

Layout on the server (beside the reconstructions, which are top-level containers keyed by run
uid)::

    raw/                       container, spec CatalogOfBlueskyRuns (databroker's catalog)
        <run_uid>/             one BlueskyRun per run, written by TiledWriter: start and stop
                               documents in its metadata, streams ``primary`` (events table +
                               ``ptycho_det_frames``, which points at the detector's HDF5 file)
                               and ``angles``

The frames are not copied: the array node references ``<run_dir>/frames.h5``, so the Tiled
server must be allowed to read the run folders (``readable_storage``:
:func:`~apt_stream.publish.server.local_tiled_server` takes it, deploy/tiled-config.yml lists
it). Every reconstruction records ``raw_run = {"uid", "tiled_path"}`` in its metadata
(:func:`apt_stream.stream.tiled_source.with_raw_run`).

:class:`RawRunStore` is a document consumer (``store(name, doc)``) that never blocks its caller
and never raises: documents go into a queue and a thread feeds ``TiledWriter``. A run already in
``raw/`` (a listener replaying its spool) is not written twice. When Tiled fails mid-run the
run's documents are kept as JSON lines in ``backup_dir`` (``TiledWriter``'s own backup).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

from apt_stream.publish.server import TABLE_WRITE_LOCK
from apt_stream.stream.tiled_source import RAW_CONTAINER, raw_run_link

log = logging.getLogger(__name__)

_CLOSE = object()


def raw_container(root: Any, key: str = RAW_CONTAINER) -> Any:
    """The ``raw`` container under ``root`` (created, spec CatalogOfBlueskyRuns, if absent)."""
    try:
        return root[key]
    except KeyError:
        from tiled.structures.core import Spec

        try:
            return root.create_container(
                key=key, metadata={"purpose": "raw Bluesky runs (TiledWriter)"},
                specs=[Spec("CatalogOfBlueskyRuns", version="3.0")])
        except Exception:
            return root[key]  # created meanwhile by another writer


def open_raw_store(root: Any, *, backup_dir: str | os.PathLike | None = None,
                   container: str = RAW_CONTAINER) -> RawRunStore | None:
    """A :class:`RawRunStore` on ``root``, or None (logged) when there is no Tiled to write to."""
    if root is None:
        log.warning("no Tiled to store raw runs in; raw runs are not stored")
        return None
    try:
        return RawRunStore(root, container=container, backup_dir=backup_dir)
    except Exception as exc:  # noqa: BLE001 - storing raw runs is never worth failing a listener
        log.warning("raw runs are not stored in Tiled: %s: %s", type(exc).__name__, exc)
        return None


class RawRunStore:
    """Write every run's documents to ``<root>/raw/<uid>`` with ``TiledWriter``, off-thread.

    Parameters
    ----------
    root
        A Tiled client on the server's root container (writable).
    container
        Key of the container that holds the raw runs.
    backup_dir
        ``TiledWriter``'s JSON-lines backup of runs it could not write (None: none).
    batch_size
        Events (and stream datums) ``TiledWriter`` collects before one write.
    max_queued
        Documents waiting at most; beyond that new runs are not stored (logged), so a slow
        Tiled never holds up the listener.
    """

    def __init__(self, root: Any, *, container: str = RAW_CONTAINER,
                 backup_dir: str | os.PathLike | None = None, batch_size: int = 200,
                 max_queued: int = 200_000) -> None:
        from bluesky_tiled_plugins import TiledWriter

        self.container_key = container
        self.api_uri = getattr(getattr(root, "context", None), "api_uri", None)
        self.api_uri = str(self.api_uri).rstrip("/") if self.api_uri else None
        self.container = raw_container(root, container)
        if backup_dir is not None:
            Path(backup_dir).mkdir(parents=True, exist_ok=True)
        self._writer = TiledWriter(self.container, batch_size=batch_size,
                                   backup_directory=str(backup_dir) if backup_dir else None)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued)
        self._skipped: set[str] = set()  # runs not written (already there, or queue full)
        self._failed: dict[str, str] = {}
        self._stored: list[str] = []
        self._open: set[str] = set()
        self._owner: dict[str, str] = {}  # descriptor / stream resource uid -> run uid
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="apt-raw-runs", daemon=True)
        self._thread.start()

    # -- the consumer --------------------------------------------------------------------------
    def __call__(self, name: str, doc: dict) -> None:
        """Queue one document (cheap; never raises, never blocks)."""
        if name == "start":
            uid = doc.get("uid")
            if self._queue.full():
                log.warning("raw run %s not stored in Tiled: %d documents already wait",
                            uid, self._queue.qsize())
                self._skipped.add(uid)
                return
        try:
            self._queue.put_nowait((name, doc))
        except queue.Full:
            pass  # the run it belongs to is cut short; TiledWriter's stop notes what it got

    def link(self, run_uid: str) -> dict[str, Any] | None:
        """``raw_run`` metadata for a run this store writes (None if it does not)."""
        if run_uid in self._skipped:
            return None
        return raw_run_link(run_uid, f"{self.container_key}/{run_uid}", self.api_uri)

    # -- the worker ----------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _CLOSE:
                    return
                self._write(*item)
            finally:
                self._queue.task_done()

    def _run_of(self, name: str, doc: dict) -> str | None:
        if name == "start":
            return doc.get("uid")
        if name in ("stop", "descriptor", "stream_resource", "resource"):
            return doc.get("run_start")
        if name == "event":
            return self._owner.get(doc.get("descriptor"))
        if name == "stream_datum":
            return self._owner.get(doc.get("stream_resource"))
        return None

    def _write(self, name: str, doc: dict) -> None:
        uid = self._run_of(name, doc)
        if name == "start":
            if uid in self._skipped:
                return
            if uid in self.container:
                log.info("raw run %s is already in Tiled (%s/%s); not written again", uid,
                         self.container_key, uid)
                self._skipped.add(uid)
                return
            self._open.add(uid)
        elif uid not in self._open:
            return  # a run not being written (skipped, or its start never came)
        if name in ("descriptor", "stream_resource"):
            self._owner[doc.get("uid")] = uid
        try:
            with TABLE_WRITE_LOCK:  # its event tables are appendable tables too
                self._writer(name, doc)
        except Exception as exc:  # noqa: BLE001 - Tiled trouble must not reach the listener
            run = uid or "?"
            with self._lock:
                first = run not in self._failed
                self._failed[run] = f"{type(exc).__name__}: {exc}"
            if first:
                log.warning("storing raw run %s in Tiled failed on a %s document: %s", run, name,
                            self._failed[run])
        if name == "stop" and uid in self._open:
            self._open.discard(uid)
            for key in [k for k, v in self._owner.items() if v == uid]:
                del self._owner[key]
            if uid not in self._failed:
                self._stored.append(uid)

    # -- control ---------------------------------------------------------------------------------
    def flush(self, timeout_s: float = 60.0) -> bool:
        """Wait until every queued document is written; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self, timeout_s: float = 60.0) -> None:
        """Write what is queued, then stop the thread."""
        if self._thread.is_alive():
            self.flush(timeout_s)
            self._queue.put(_CLOSE)
            self._thread.join(timeout_s)

    def stats(self) -> dict[str, Any]:
        return {"stored": list(self._stored), "skipped": sorted(str(s) for s in self._skipped),
                "failed": dict(self._failed), "queued": self._queue.qsize()}
