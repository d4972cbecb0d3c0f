"""TiledPublisher: one Tiled container per scan, updated live, never fatal to the run.

Layout (docs/querying.md shows how to search and slice it)::

    <run_uid>/                 container; metadata: run_uid, scan_id, sample, status, angles_used,
                               n_star, theta_star_deg, model_name, model_checksum,
                               software_version, timings, and the run header's short fields
        approximant            (z, y, x) float32, rewritten in place as angles finish
        angles                 table: angle_id, angle_deg, frames, seconds, loss, loss_pass1
        apt                    (z, y, x) float32, the network's volume
        apt-raw                (z, y, x) float32, the network's output before data consistency
        apt-metal              (z, y, x) uint8, 1 = metal: apt cut by the model's calibrated rule
        baselines/<name>       (z, y, x) float32, e.g. fbp, sirt (any other volume name)
        metrics                table: one row per volume scored against ground truth
        convergence            table: one row per live convergence estimate (n_angles, angle_deg,
                               frc_half, resolution, change, heldout_residual, seconds); the
                               newest row and any stop advice also in the metadata

Arrays carry ``dims = ["z", "y", "x"]`` and ``voxel_size_m = [vz, vy, vx]`` in their metadata.

Tiled's client already retries a failed request with exponential backoff and jitter (up to
``TILED_RETRY_ATTEMPTS`` = 10 tries within ``TILED_RETRY_TIMEOUT`` = 45 s, environment variables
read when tiled is imported), which rides out a server blip. If a call still fails, the run is
*degraded*: that call and every later call of the run go to a JSON-lines backup
(:mod:`apt_stream.publish.backup`) instead of Tiled, so an outage costs at most one retry window
per run. The publisher then checks every ``retry_every_s`` (one plain request, no retries: a
refused connection costs nothing) whether Tiled is back, from the next call or, when no call
comes (the run is over), from a background thread; once it is, it replays the backup into Tiled
in order and a degraded run that is still going carries on live. Backups of an earlier process
found in ``backup_dir`` are replayed the same way. A replayed file moves to
``<backup_dir>/replayed/<time>/``.

Publishing is idempotent per run and angle, so a replay (the listener restarting and replaying
its spool, the backup replayed twice) never duplicates anything: reopening a scan reads back
the angle rows it has; an angle published again with the same ``angle_deg`` and ``frames`` is
skipped (its row stands, the Approximant is not re-uploaded), one whose data changed replaces its
row (the table is rewritten); ``angles_used`` counts distinct angles. Volumes, metadata and the
``metrics`` table are overwritten anyway.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apt_stream import __version__
from apt_stream.errors import InputError, ServiceError
from apt_stream.publish._metadata import (
    ANGLE_COLUMNS,
    angle_row,
    check_run_uid,
    check_status,
    header_metadata,
    json_safe,
    resolve_status,
    same_angle,
    volume_array,
    voxel_sizes_m,
)
from apt_stream.publish.backup import BackupLog, replay_backup
from apt_stream.publish.server import TABLE_WRITE_LOCK

log = logging.getLogger(__name__)

DIMS_ZYX = ["z", "y", "x"]

#: Longest wait between two checks for Tiled after replays kept failing.
_MAX_RETRY_S = 300.0


@dataclass
class _Run:
    uid: str
    header: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)
    started_at: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat()
    )
    node: Any = None
    children: dict[str, Any] = field(default_factory=dict)
    child_metadata: dict[str, dict] = field(default_factory=dict)
    #: angle_id -> its row of the ``angles`` table, in table order (one row per angle).
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    has_final: bool = False
    #: n_angles -> its row of the ``convergence`` table
    convergence: dict[int, dict[str, Any]] = field(default_factory=dict)
    volumes: set[str] = field(default_factory=set)
    #: The newest Approximant source (engine or array) and when/at how many angles it went up.
    pending: Any = None
    uploaded_at: float = -math.inf
    uploaded_n: int = 0
    degraded: bool = False
    tiled_s: float = 0.0
    timings: dict[str, float | str] = field(default_factory=dict)

    def elapsed_s(self) -> float:
        return round(time.perf_counter() - self.started, 3)

    @property
    def angles_used(self) -> int:
        return len(self.rows)

    def angles_finished_deg(self) -> list[float]:
        return sorted(row["angle_deg"] for row in self.rows.values())

    def merge_row(self, row: dict[str, Any]) -> str:
        """Take an angle's row: ``append`` (new angle), ``skip`` (same data again) or
        ``replace`` (the angle's data changed)."""
        old = self.rows.get(row["angle_id"])
        if old is not None and same_angle(old, row):
            return "skip"
        self.rows[row["angle_id"]] = row
        return "append" if old is None else "replace"


class TiledPublisher:
    """A :class:`~apt_stream.stream.sink.ReconstructionSink` that writes scans to Tiled.

    Parameters
    ----------
    root
        Tiled container that holds one child container per scan (e.g.
        :func:`~apt_stream.publish.server.connect`'s result). None: start offline (every call
        to the backup) unless ``reconnect`` succeeds later.
    backup_dir
        Folder of the JSON-lines backups. Backups already in it (an earlier process's) are
        replayed once Tiled is reachable.
    run_metadata
        Added to every scan's metadata (e.g. ``n_star``, ``theta_star_deg``, ``model_name``,
        ``model_checksum``).
    reconnect
        Called while ``root`` is None (at ``run_started`` and when checking for Tiled); returns
        a root container or raises.
    approximant_every_s
        Least time between two Approximant uploads of a run (0: every angle). Rows of the
        ``angles`` table always go up at once; a skipped Approximant goes up with the next one,
        before any reconstruction and at the run's end. Each upload is one PUT of the whole
        volume plus a metadata PATCH, so on fast angles this bounds Tiled's share of the time.
    retry_every_s
        While a backup waits for replay, how often to check whether Tiled is back (doubling,
        up to 300 s, while replays fail although Tiled answers). None: never replay
        automatically (use :func:`~apt_stream.publish.backup.replay_backup` or
        :meth:`replay_pending`).

    Notes
    -----
    ``tiled_seconds`` is the wall time spent inside Tiled calls, over ``tiled_ops`` publisher
    operations (for the "Tiled share of wall time" benchmark); ``stats()`` has both. Methods are
    thread-safe. :meth:`close` stops the background check (a daemon thread, running only while
    a backup waits).
    """

    def __init__(
        self,
        root: Any,
        *,
        backup_dir: str | os.PathLike,
        run_metadata: Mapping[str, Any] | None = None,
        reconnect: Callable[[], Any] | None = None,
        approximant_every_s: float = 0.0,
        retry_every_s: float | None = 5.0,
    ) -> None:
        if not approximant_every_s >= 0:
            raise InputError(f"approximant_every_s must be >= 0, got {approximant_every_s!r}")
        if retry_every_s is not None and not retry_every_s > 0:
            raise InputError(f"retry_every_s must be > 0 or None, got {retry_every_s!r}")
        self.approximant_every_s = float(approximant_every_s)
        self.retry_every_s = None if retry_every_s is None else float(retry_every_s)
        self.root = root
        self.backup = BackupLog(backup_dir)
        self.run_metadata = json_safe(dict(run_metadata or {}))
        self.reconnect = reconnect
        self.tiled_seconds = 0.0
        self.tiled_ops = 0
        #: run uid -> time.time() at which its first APT volume was written to Tiled
        self.apt_readable_at: dict[str, float] = {}
        self.failures = 0
        #: Backup files replayed into Tiled by this publisher, and the records they held.
        self.replayed_files = 0
        self.replayed_records = 0
        self._runs: dict[str, _Run] = {}
        self._lock = threading.RLock()
        #: A replaying publisher: Tiled errors raise instead of going to a backup.
        self._strict = False
        #: run uid -> its backup file, waiting for replay.
        self._pending: dict[str, Path] = {}
        self._retry_wait_s = self.retry_every_s or 0.0
        self._next_retry = time.monotonic()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        if self._can_retry():
            for path in self.backup.files():
                self._pending[path.stem] = path
            if self._pending:
                log.info("backups waiting for replay in %s: %s", self.backup.directory,
                         ", ".join(sorted(self._pending)))
                self._ensure_thread()

    @classmethod
    def from_endpoint(
        cls,
        endpoint: Any,
        *,
        backup_dir: str | os.PathLike,
        run_metadata: Mapping[str, Any] | None = None,
        timeout_s: float = 10.0,
        approximant_every_s: float = 0.0,
        retry_every_s: float | None = 5.0,
    ) -> TiledPublisher:
        """Connect to ``endpoint`` (a :class:`~apt_stream.publish.server.TiledEndpoint`).

        An unreachable server is logged, not raised: the publisher starts offline and tries
        again at the next run (and every ``retry_every_s`` while a backup waits).
        """
        from apt_stream.publish.server import connect

        def _connect():
            return connect(endpoint, timeout_s=timeout_s)

        try:
            root = _connect()
        except Exception as exc:
            log.warning("Tiled not reachable (%s); publishing to the backup in %s", exc, backup_dir)
            root = None
        return cls(root, backup_dir=backup_dir, run_metadata=run_metadata, reconnect=_connect,
                   approximant_every_s=approximant_every_s, retry_every_s=retry_every_s)

    # -- the sink protocol ---------------------------------------------------------------------
    def run_started(self, header: Any) -> None:
        """Create (or reopen) the scan's container with status ``acquiring``.

        Reopening keeps the scan's angle rows (``angles_used`` counts them) and volumes.
        """
        md = header_metadata(header)
        with self._lock:
            if self.root is None and self.reconnect is not None:
                self._try_reconnect()
            run = _Run(uid=md["run_uid"], header=md)
            run.timings["started_at"] = run.started_at
            meta = {
                **self.run_metadata, **md, "status": "acquiring", "angles_used": 0,
                "software_version": __version__, "timings": dict(run.timings),
            }
            self._start(run, meta)

    def angle_finished(self, run_uid: str, summary: Any, approximant: Any) -> None:
        """Add the angle's row (once per angle id); rewrite the Approximant and bump
        ``angles_used`` (at most every ``approximant_every_s``).

        ``approximant`` is the run's engine (its ``volume()`` is read) or an array. An angle
        published again with the same data is skipped; with other data its row is replaced.
        """
        with self._lock:
            run = self._run(run_uid)
            row = angle_row(summary, default_id=run.angles_used)
            action = run.merge_row(row)
            run.pending = approximant
            if action == "skip" and not run.degraded:
                # Tiled has this angle already (a replay): nothing to write. A degraded run still
                # records it, so its backup's Approximant stays the newest.
                log.debug("run %s: angle %s published already; skipped", run.uid, row["angle_id"])
                return
            run.timings["last_angle_s"] = run.elapsed_s()
            due = action != "skip" and (
                time.monotonic() - run.uploaded_at >= self.approximant_every_s
            )
            volume = volume_array(approximant, name="approximant") if due else None

            def write() -> None:
                if action == "append":
                    self._append_angle(run, row)
                elif action == "replace":
                    self._rewrite_angles(run)
                if volume is not None:
                    self._upload_approximant(run, volume)

            def backup_arrays() -> dict[str, np.ndarray]:
                arr = volume if volume is not None else volume_array(approximant, name="approximant")
                return {"approximant": arr}

            self._call(run, "angle_finished", {"summary": row}, write, arrays=backup_arrays)

    def reconstruction_ready(
        self,
        run_uid: str,
        volumes: Mapping[str, Any],
        *,
        final: bool,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Write (or overwrite) reconstructed volumes: ``apt`` and ``baselines/<name>``.

        ``final=False`` marks the scan ``reconstructing``; ``metadata`` (e.g. the model's name
        and checksum) is merged into the scan's metadata.
        """
        if not isinstance(volumes, Mapping) or not volumes:
            raise InputError("volumes must be a non-empty mapping of name -> (z, y, x) array")
        arrays = {self._volume_key(name): volume_array(v, name=str(name)) for name, v in volumes.items()}
        with self._lock:
            run = self._run(run_uid)
            self._flush_approximant(run)
            run.has_final = run.has_final or bool(final)
            run.volumes.update(arrays)
            timing = "final_reconstruction_s" if final else "first_reconstruction_s"
            run.timings.setdefault(timing, run.elapsed_s())
            meta = {
                **json_safe(dict(metadata or {})),
                "volumes": sorted(run.volumes),
                "final": run.has_final,
                "timings": dict(run.timings),
            }
            if not final:
                meta["status"] = "reconstructing"

            def write() -> None:
                for name, arr in arrays.items():
                    self._write_volume(run, name, arr, {"final": bool(final),
                                                       "angles_used": run.angles_used})
                run.node.update_metadata(metadata=meta)
                if "apt" in arrays:
                    # Wall clock when the APT volume became readable: the end of the latency.
                    self.apt_readable_at.setdefault(run.uid, time.time())

            self._call(run, "reconstruction_ready",
                       {"final": bool(final), "metadata": json_safe(dict(metadata or {}))},
                       write, arrays=arrays)

    def run_stopped(
        self,
        run_uid: str,
        status: str,
        metadata: Mapping[str, Any] | None = None,
        **extra: Any,
    ) -> None:
        """Set the final status and the run's timings; forget the run.

        ``status`` is any status text: ours (``done``, ``done_with_gaps``, ``abandoned``,
        ``failed``, ``stopped_before_trigger``, or one added later, stored as given) or
        bluesky's ``success`` / ``abort`` / ``fail`` (mapped). ``metadata`` and keyword
        arguments (e.g. ``frames_missing=3, angles_with_gaps=[4]``) are merged into the scan's
        metadata; a ``timings`` mapping among them is merged into the run's timings.
        """
        with self._lock:
            run = self._run(run_uid)
            final_status = resolve_status(status, has_final=run.has_final)
            given = json_safe({**dict(metadata or {}), **extra})
            self._flush_approximant(run)
            run.timings["total_s"] = run.elapsed_s()
            run.timings["tiled_s"] = round(run.tiled_s, 3)
            timings = {**run.timings, **(given.pop("timings", None) or {})}
            meta = {**given, "status": final_status, "timings": timings}
            self._call(run, "run_stopped",
                       {"status": final_status, "metadata": {**given, "timings": timings}},
                       lambda: run.node.update_metadata(metadata=meta))
            if run.degraded:
                log.warning("run %s was published to the backup %s; it is replayed once Tiled "
                            "is back%s", run.uid, self.backup.path_for(run.uid),
                            "" if self._can_retry() else
                            " (not automatically here: use apt_stream.publish.replay_backup)")
            self._runs.pop(run.uid, None)

    # -- beyond the protocol -------------------------------------------------------------------
    def metrics_ready(self, run_uid: str, metrics: Mapping[str, Mapping[str, float]]) -> None:
        """Quality metrics against ground truth, ``{volume: {metric: value}}``: a ``metrics``
        table (one row per volume) and the same numbers in the scan's metadata."""
        if not isinstance(metrics, Mapping) or not metrics:
            raise InputError("metrics must be a non-empty mapping volume -> {metric: value}")
        names = sorted({m for row in metrics.values() for m in row})
        table: dict[str, list] = {"volume": [str(v) for v in metrics]}
        for m in names:
            table[m] = [float(row.get(m, np.nan)) for row in metrics.values()]
        with self._lock:
            run = self._run(run_uid)

            def write() -> None:
                old = self._child(run, "metrics")
                if old is not None:
                    old.delete(external_only=False)
                run.children["metrics"] = run.node.write_table(table, key="metrics")
                run.node.update_metadata(metadata={"metrics": json_safe(dict(metrics))})

            self._call(run, "metrics_ready", {"metrics": json_safe(dict(metrics))}, write)

    def convergence_ready(
        self, run_uid: str, row: Mapping[str, Any], advice: Mapping[str, Any] | None = None
    ) -> None:
        """One live convergence estimate (``apt_stream.physics.convergence.ConvergenceRow``
        ``.as_row()``): the ``convergence`` table (one row per ``n_angles``, rewritten: it is
        small) and ``convergence`` (the newest row) plus ``stop_advice`` in the metadata."""
        from apt_stream.physics.convergence import CONVERGENCE_COLUMNS

        clean = {name: (int if kind == "int64" else float)(row[name])
                 for name, kind in CONVERGENCE_COLUMNS}
        with self._lock:
            run = self._run(run_uid)
            run.convergence[clean["n_angles"]] = clean
            rows = [run.convergence[n] for n in sorted(run.convergence)]
            table = {name: [r[name] for r in rows] for name, _ in CONVERGENCE_COLUMNS}
            meta: dict[str, Any] = {"convergence": json_safe(clean)}
            if advice is not None:
                meta["stop_advice"] = json_safe(dict(advice))

            def write() -> None:
                old = self._child(run, "convergence")
                if old is not None:
                    old.delete(external_only=False)
                    run.children.pop("convergence", None)
                run.children["convergence"] = run.node.write_table(table, key="convergence")
                run.node.update_metadata(metadata=meta)

            self._call(run, "convergence_ready",
                       {"row": json_safe(clean),
                        "advice": None if advice is None else json_safe(dict(advice))}, write)

    def update_approximant(self, run_uid: str, approximant: Any) -> None:
        """Upload the Approximant (engine or array) now, without an angle row."""
        volume = volume_array(approximant, name="approximant")
        with self._lock:
            run = self._run(run_uid)
            self._call(run, "update_approximant", {}, lambda: self._upload_approximant(run, volume),
                       arrays={"approximant": volume})

    def update_status(self, run_uid: str, status: str, **metadata: Any) -> None:
        """Set the scan's status (any status text; :data:`apt_stream.publish.STATUSES` are the
        known ones) and merge ``metadata`` into its metadata, e.g. ``reconstructing`` before
        inference starts."""
        check_status(status)
        with self._lock:
            run = self._run(run_uid)
            meta = {**json_safe(metadata), "status": status}
            self._call(run, "update_status", {"status": status, "metadata": json_safe(metadata)},
                       lambda: run.node.update_metadata(metadata=meta))

    def replay_pending(self, *, only: str | None = None) -> int:
        """Replay the backups waiting for Tiled, if it answers; returns the files replayed.

        The publisher calls this itself (every ``retry_every_s`` while a backup waits); call it
        to flush them now, e.g. before exiting. A run that starts while an earlier backup of it
        waits joins that backup, so the two land in order. A file whose replay fails (Tiled
        answers but refuses a write) stays pending and the checks space out, doubling up to
        300 s; checks that find Tiled still down keep the interval.
        """
        with self._lock:
            if not self._pending or (only is not None and only not in self._pending):
                return 0
        if not self._tiled_answers():
            # A refused check costs nothing: the next one comes after the usual interval.
            with self._lock:
                self._next_retry = time.monotonic() + self._retry_wait_s
            return 0
        replayed = 0
        with self._lock:
            for uid, path in list(self._pending.items()):
                if only is not None and uid != only:
                    continue
                run = self._runs.get(uid)
                if run is not None and not run.degraded:
                    continue
                if not self._replay_file(path):
                    self._backoff()
                    break
                del self._pending[uid]
                replayed += 1
                if run is not None:
                    self._reattach(run)
            else:
                self._retry_wait_s = self.retry_every_s or 0.0
                self._next_retry = time.monotonic() + self._retry_wait_s
        return replayed

    def close(self) -> None:
        """Stop checking for Tiled in the background (backups still waiting stay on disk)."""
        self._closed.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)

    def stats(self) -> dict[str, Any]:
        """Time and calls spent in Tiled, failures, backup lines written and replayed."""
        with self._lock:
            return {
                "tiled_s": round(self.tiled_seconds, 4),
                "tiled_ops": self.tiled_ops,
                "failures": self.failures,
                "backup_records": self.backup.n_records,
                "pending_backups": sorted(self._pending),
                "replayed_files": self.replayed_files,
                "replayed_records": self.replayed_records,
                "online": self.root is not None,
                "open_runs": sorted(self._runs),
                "apt_readable_at": dict(self.apt_readable_at),
            }

    def scan_uri(self, run_uid: str) -> str | None:
        """The scan container's Tiled URI (no key in it), if the container exists."""
        with self._lock:
            run = self._runs.get(run_uid)
            node = run.node if run is not None else None
            return None if node is None else str(node.uri)

    # -- internals -----------------------------------------------------------------------------
    def _run(self, run_uid: str) -> _Run:
        check_run_uid(run_uid)
        run = self._runs.get(run_uid)
        if run is None:
            # A publisher restarted mid-run, a backup replay, or results added after the run (the
            # demo's baselines) reopen the existing container: normal, so not a warning.
            log.info("run %s is not open on this publisher; reopening its container", run_uid)
            run = _Run(uid=run_uid, header={"run_uid": run_uid})
            self._start(run, {"run_uid": run_uid})
        return run

    def _start(self, run: _Run, meta: dict[str, Any]) -> None:
        """Open ``run`` (its container, with ``meta``) after any earlier backup of it."""
        if run.uid in self._pending and self.root is not None:
            # An earlier backup of this very run lands first, so this run's calls win.
            self.replay_pending(only=run.uid)
        self._runs[run.uid] = run
        if run.uid in self._pending:
            # That backup is not in Tiled yet: this run's calls go after it, into the same file,
            # so one replay lands both in order (the newest last).
            self._to_backup(run, "run_started", {"header": run.header}, None,
                            "an earlier backup of this run is not replayed yet")
            return
        self._call(run, "run_started", {"header": run.header}, lambda: self._open(run, meta))

    def _try_reconnect(self) -> None:
        t0 = time.perf_counter()
        try:
            self.root = self.reconnect()
            log.info("Tiled reachable again")
        except Exception as exc:
            log.warning("Tiled still not reachable: %s", exc)
        finally:
            self.tiled_seconds += time.perf_counter() - t0

    def _call(
        self,
        run: _Run,
        call: str,
        args: Mapping[str, Any],
        write: Callable[[], None],
        *,
        arrays: Mapping[str, np.ndarray] | Callable[[], Mapping[str, np.ndarray]] | None = None,
    ) -> None:
        """Run ``write`` against Tiled, or log the call to the backup when the run is degraded.

        ``arrays`` (or a function returning them, so they are only computed when needed) go
        into the backup with the call. Before that, a due check for Tiled replays the backups
        waiting (and so may bring this run back online).
        """
        if (self._pending and not self._strict and self.root is not None
                and time.monotonic() >= self._next_retry and self.retry_every_s is not None):
            self.replay_pending()
        online = not run.degraded and self.root is not None and (
            run.node is not None or call == "run_started"
        )
        if online:
            t0 = time.perf_counter()
            try:
                write()
                return
            except Exception as exc:
                if self._strict:
                    raise
                self.failures += 1
                error = f"{type(exc).__name__}: {exc}"
                log.warning("Tiled %s failed for run %s (%s); this run now goes to the backup %s",
                            call, run.uid, error.splitlines()[0], self.backup.path_for(run.uid))
            finally:
                dt = time.perf_counter() - t0
                self.tiled_seconds += dt
                self.tiled_ops += 1
                run.tiled_s += dt
        elif self._strict:
            raise ServiceError(f"cannot replay {call} of run {run.uid}: its container is not open")
        else:
            error = "Tiled offline" if self.root is None else None
        self._to_backup(run, call, args, arrays, error)

    def _to_backup(self, run, call, args, arrays, error) -> None:
        try:
            if not run.degraded:
                run.degraded = True
                # Wait a full interval before checking for Tiled: it just failed.
                self._next_retry = max(self._next_retry, time.monotonic() + self._retry_wait_s)
                if call != "run_started":
                    # The replay must be able to (re)open the container first.
                    self.backup.record(run.uid, "run_started", {"header": run.header})
            path = self.backup.record(run.uid, call, args, error=error,
                                      arrays=arrays() if callable(arrays) else arrays)
        except Exception:
            # Even the backup failing (disk full) must not stop the reconstruction.
            log.exception("could not write the backup of %s for run %s", call, run.uid)
            return
        if self._can_retry() and run.uid not in self._pending:
            self._pending[run.uid] = path
            self._ensure_thread()

    # -- replaying the backup --------------------------------------------------------------------
    def _can_retry(self) -> bool:
        return self.retry_every_s is not None and not self._strict and (
            self.root is not None or self.reconnect is not None
        )

    def _backoff(self) -> None:
        with self._lock:
            self._retry_wait_s = min(max(self._retry_wait_s * 2, self.retry_every_s or 0.0),
                                     _MAX_RETRY_S)
            self._next_retry = time.monotonic() + self._retry_wait_s

    def _tiled_answers(self) -> bool:
        """One plain request to Tiled (no retries), or a reconnect while offline."""
        root = self.root
        if root is None:
            if self.reconnect is None:
                return False
            try:
                root = self.reconnect()
            except Exception as exc:
                log.info("Tiled still not reachable: %s", exc)
                return False
            with self._lock:
                if self.root is None:
                    self.root = root
            log.info("Tiled reachable again")
            return True
        try:
            context = root.context
            response = context.http_client.get(context.api_uri, timeout=5.0)
        except Exception as exc:
            log.debug("Tiled not back yet: %s", exc)
            return False
        return response.status_code < 500

    def _replay_file(self, path: Path) -> bool:
        """Replay one backup file through a strict publisher; archive it when all went in."""
        replayer = TiledPublisher(
            self.root, backup_dir=self.backup.directory, run_metadata=self.run_metadata,
            # The backup keeps only the newest Approximant: upload it once, not once per angle.
            approximant_every_s=math.inf, retry_every_s=None,
        )
        replayer._strict = True
        t0 = time.perf_counter()
        try:
            n = replay_backup(path, replayer)
            for run in list(replayer._runs.values()):
                # A run still going (no run_stopped in its backup): its Approximant goes up now.
                replayer._flush_approximant(run)
        except Exception as exc:
            log.warning("replaying the backup %s failed (%s: %s); trying again later", path,
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return False
        finally:
            self.tiled_seconds += time.perf_counter() - t0
            self.tiled_ops += replayer.tiled_ops
        for uid, at in replayer.apt_readable_at.items():
            self.apt_readable_at.setdefault(uid, at)
        self.replayed_files += 1
        self.replayed_records += n
        where = self.backup.archive(path)
        log.info("replayed the backup of run %s into Tiled (%d calls); moved to %s",
                 path.stem, n, where)
        return True

    def _reattach(self, run: _Run) -> None:
        """A degraded run whose backup is in Tiled now: publish it live again."""
        run.degraded = False
        run.node = None
        run.children.clear()
        run.child_metadata.clear()
        try:
            run.node = self.root[run.uid]
        except Exception as exc:
            log.warning("run %s: reopening its container after the replay failed (%s)",
                        run.uid, exc)
            self._to_backup(run, "run_started", {"header": run.header}, None,
                            f"{type(exc).__name__}: {exc}")
            return
        # The replay uploaded the backup's Approximant: the newest one this run had.
        run.uploaded_n = run.angles_used
        run.uploaded_at = time.monotonic()
        log.info("run %s publishes to Tiled again", run.uid)

    def _ensure_thread(self) -> None:
        if self._thread is not None or self._closed.is_set() or not self._can_retry():
            return
        self._thread = threading.Thread(
            target=_retry_loop, args=(weakref.ref(self),), name="tiled-backup-replay", daemon=True
        )
        self._thread.start()

    # -- writing -----------------------------------------------------------------------------------
    def _upload_approximant(self, run: _Run, volume: np.ndarray) -> None:
        self._write_volume(run, "approximant", volume, {})
        meta = {
            "angles_used": run.angles_used,
            "angles_finished_deg": run.angles_finished_deg(),
            "timings": dict(run.timings),
        }
        # Per-angle progress is not worth a metadata revision each (status changes are).
        run.node.update_metadata(metadata=meta, drop_revision=True)
        run.uploaded_at = time.monotonic()
        run.uploaded_n = run.angles_used

    def _flush_approximant(self, run: _Run) -> None:
        """Upload an Approximant the throttle held back (nothing when up to date or offline)."""
        if run.pending is None or run.uploaded_n == run.angles_used or run.degraded:
            return
        if self.root is not None and run.node is not None:
            self.update_approximant(run.uid, run.pending)

    def _open(self, run: _Run, meta: dict[str, Any]) -> None:
        try:
            node = self.root[run.uid]
        except KeyError:
            run.node = self.root.create_container(key=run.uid, metadata=meta)
            return
        self._load_existing(run, node)
        meta = {**meta, "angles_used": run.angles_used,
                "angles_finished_deg": run.angles_finished_deg(), "timings": dict(run.timings)}
        node.update_metadata(metadata=meta)
        run.node = node

    def _load_existing(self, run: _Run, node: Any) -> None:
        """What a reopened scan already holds: its angle rows, volumes and final flag."""
        md = dict(node.metadata or {})
        self._keep_timings(run, md.get("timings"))
        run.volumes.update(str(v) for v in md.get("volumes") or [])
        run.has_final = run.has_final or bool(md.get("final"))
        run.node = node
        table = self._child(run, "angles")
        if table is None:
            return
        frame = table.read()
        stored = 0
        for record in frame.to_dict("records"):
            stored += 1
            row = {name: (int if kind == "int64" else float)(record[name])
                   for name, kind in ANGLE_COLUMNS}
            run.merge_row(row)
        # What Tiled shows is built from these rows: no flush needed until a new angle comes.
        run.uploaded_n = run.angles_used
        if stored != run.angles_used:
            # A table from before publishing was idempotent: one row per angle again.
            log.info("run %s: angles table had %d rows for %d angles; rewriting it", run.uid,
                     stored, run.angles_used)
            self._rewrite_angles(run)

    @staticmethod
    def _keep_timings(run: _Run, stored: Any) -> None:
        """A reopened scan keeps the timings it has and its original start: they are seconds
        since the run started (docs/querying.md), not since this publisher reopened it."""
        if not isinstance(stored, Mapping):
            return
        started_at = stored.get("started_at")
        if isinstance(started_at, str):
            try:
                then = _dt.datetime.fromisoformat(started_at)
            except ValueError:
                then = None
            if then is not None and then.tzinfo is not None:
                ago = (_dt.datetime.now(_dt.UTC) - then).total_seconds()
                if ago >= 0:
                    run.started = time.perf_counter() - ago
                    run.started_at = started_at
        run.timings = {**run.timings, **json_safe(dict(stored))}

    def _child(self, run: _Run, key: str) -> Any:
        if key in run.children:
            return run.children[key]
        try:
            child = run.node[key]
        except KeyError:
            return None
        run.children[key] = child
        return child

    @staticmethod
    def _volume_key(name: Any) -> str:
        name = str(name)
        parts = name.split("/")
        if not name or any(not p for p in parts) or len(parts) > 2 or (
            len(parts) == 2 and parts[0] != "baselines"
        ):
            raise InputError(f"volume name must be 'apt', a baseline name or 'baselines/<name>', "
                             f"got {name!r}")
        if name in ("approximant", "angles", "metrics", "baselines", "convergence"):
            raise InputError(f"volume name {name!r} is reserved")
        return name if name in ("apt", "apt-raw", "apt-metal") or len(parts) == 2 else f"baselines/{name}"

    def _write_volume(self, run: _Run, key: str, arr: np.ndarray, extra: dict[str, Any]) -> None:
        """Overwrite the array in place when its shape is unchanged (one PUT), else recreate."""
        md = {
            "voxel_size_m": voxel_sizes_m(
                arr.shape,
                reference_shape_zyx=run.header.get("volume_shape_zyx"),
                reference_voxel_m=run.header.get("voxel_size_m"),
            ),
            "dims": DIMS_ZYX,
            **extra,
        }
        node = self._child(run, key)
        if node is not None and tuple(node.shape) == arr.shape and node.dtype == arr.dtype:
            node.write(arr)
            if run.child_metadata.get(key) != md:
                node.update_metadata(metadata=md)
                run.child_metadata[key] = md
            return
        if node is not None:
            # Arrays we wrote are managed by the server: it must delete their files too.
            node.delete(external_only=False)
        parent, _, leaf = key.rpartition("/")
        container = run.node
        if parent:
            container = self._child(run, parent)
            if container is None:
                container = run.node.create_container(key=parent)
                run.children[parent] = container
        run.children[key] = container.write_array(arr, key=leaf, dims=DIMS_ZYX, metadata=md)
        run.child_metadata[key] = md

    @staticmethod
    def _angles_schema() -> Any:
        import pyarrow as pa

        return pa.schema([(name, getattr(pa, kind)()) for name, kind in ANGLE_COLUMNS])

    def _append_angle(self, run: _Run, row: dict[str, Any]) -> None:
        import pyarrow as pa

        table = self._child(run, "angles")
        if table is None:
            table = run.node.create_appendable_table(self._angles_schema(), key="angles")
            run.children["angles"] = table
        # A pyarrow table, not pandas: a DataFrame would add an index column the schema lacks.
        with TABLE_WRITE_LOCK:
            table.append_partition(0, pa.table({name: [row[name]] for name, _ in ANGLE_COLUMNS}))

    def _rewrite_angles(self, run: _Run) -> None:
        """The ``angles`` table anew from ``run.rows`` (an appendable table has no update)."""
        import pyarrow as pa

        old = self._child(run, "angles")
        if old is not None:
            old.delete(external_only=False)
            run.children.pop("angles", None)
        table = run.node.create_appendable_table(self._angles_schema(), key="angles")
        run.children["angles"] = table
        rows = list(run.rows.values())
        if rows:
            with TABLE_WRITE_LOCK:
                table.append_partition(
                    0, pa.table({name: [r[name] for r in rows] for name, _ in ANGLE_COLUMNS})
                )


def _retry_loop(ref: weakref.ReferenceType) -> None:
    """While backups wait: check for Tiled every so often and replay them (daemon thread)."""
    while True:
        publisher = ref()
        if publisher is None:
            return
        closed = publisher._closed
        wait = max(0.05, publisher._next_retry - time.monotonic())
        del publisher
        if closed.wait(wait):
            return
        publisher = ref()
        if publisher is None:
            return
        try:
            if time.monotonic() >= publisher._next_retry:
                publisher.replay_pending()
        except Exception:
            log.exception("replaying the Tiled backup failed")
            publisher._backoff()
        with publisher._lock:
            if not publisher._pending or publisher._closed.is_set():
                publisher._thread = None
                return
        del publisher
