"""TiledPublisher: one Tiled container per scan, updated live, never fatal to the run.

Layout (docs/querying.md shows how to search and slice it)::

    <run_uid>/                 container; metadata: run_uid, scan_id, sample, status, angles_used,
                               n_star, theta_star_deg, model_name, model_checksum,
                               software_version, timings, and the run header's short fields
        approximant            (z, y, x) float32, rewritten in place as angles finish
        angles                 table: angle_id, angle_deg, frames, seconds, loss, loss_pass1
        apt                    (z, y, x) float32, the network's volume
        apt-raw                (z, y, x) float32, the network's output before data consistency
        baselines/<name>       (z, y, x) float32, e.g. fbp, sirt (any other volume name)
        metrics                table: one row per volume scored against ground truth

Arrays carry ``dims = ["z", "y", "x"]`` and ``voxel_size_m = [vz, vy, vx]`` in their metadata.

Tiled's client already retries a failed request with exponential backoff and jitter (up to
``TILED_RETRY_ATTEMPTS`` = 10 tries within ``TILED_RETRY_TIMEOUT`` = 45 s, environment variables
read when tiled is imported), which rides out a server blip. If a call still fails, the run is
*degraded*: that call and every later call of the run go to a JSON-lines backup
(:mod:`apt_stream.publish.backup`) instead of Tiled, so an outage costs at most one retry window
per run, and :func:`~apt_stream.publish.backup.replay_backup` fills Tiled in afterwards. The
next run tries Tiled again.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from apt_stream import __version__
from apt_stream.errors import InputError
from apt_stream.publish._metadata import (
    ANGLE_COLUMNS,
    STATUSES,
    angle_row,
    check_run_uid,
    header_metadata,
    json_safe,
    resolve_status,
    volume_array,
    voxel_sizes_m,
)
from apt_stream.publish.backup import BackupLog

log = logging.getLogger(__name__)

DIMS_ZYX = ["z", "y", "x"]


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
    angles_deg: list[float] = field(default_factory=list)
    has_final: bool = False
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


class TiledPublisher:
    """A :class:`~apt_stream.stream.sink.ReconstructionSink` that writes scans to Tiled.

    Parameters
    ----------
    root
        Tiled container that holds one child container per scan (e.g.
        :func:`~apt_stream.publish.server.connect`'s result). None: start offline (every call
        to the backup) unless ``reconnect`` succeeds at the next run.
    backup_dir
        Folder of the JSON-lines backups.
    run_metadata
        Added to every scan's metadata (e.g. ``n_star``, ``theta_star_deg``, ``model_name``,
        ``model_checksum``).
    reconnect
        Called at ``run_started`` while ``root`` is None; returns a root container or raises.
    approximant_every_s
        Least time between two Approximant uploads of a run (0: every angle). Rows of the
        ``angles`` table always go up at once; a skipped Approximant goes up with the next one,
        before any reconstruction and at the run's end. Each upload is one PUT of the whole
        volume plus a metadata PATCH, so on fast angles this bounds Tiled's share of the time.

    Notes
    -----
    ``tiled_seconds`` is the wall time spent inside Tiled calls, over ``tiled_ops`` publisher
    operations (for the "Tiled share of wall time" benchmark); ``stats()`` has both. Methods are
    thread-safe.
    """

    def __init__(
        self,
        root: Any,
        *,
        backup_dir: str | os.PathLike,
        run_metadata: Mapping[str, Any] | None = None,
        reconnect: Callable[[], Any] | None = None,
        approximant_every_s: float = 0.0,
    ) -> None:
        if not approximant_every_s >= 0:
            raise InputError(f"approximant_every_s must be >= 0, got {approximant_every_s!r}")
        self.approximant_every_s = float(approximant_every_s)
        self.root = root
        self.backup = BackupLog(backup_dir)
        self.run_metadata = json_safe(dict(run_metadata or {}))
        self.reconnect = reconnect
        self.tiled_seconds = 0.0
        self.tiled_ops = 0
        #: run uid -> time.time() at which its first APT volume was written to Tiled
        self.apt_readable_at: dict[str, float] = {}
        self.failures = 0
        self._runs: dict[str, _Run] = {}
        self._lock = threading.RLock()

    @classmethod
    def from_endpoint(
        cls,
        endpoint: Any,
        *,
        backup_dir: str | os.PathLike,
        run_metadata: Mapping[str, Any] | None = None,
        timeout_s: float = 10.0,
        approximant_every_s: float = 0.0,
    ) -> TiledPublisher:
        """Connect to ``endpoint`` (a :class:`~apt_stream.publish.server.TiledEndpoint`).

        An unreachable server is logged, not raised: the publisher starts offline and tries
        again at the next run.
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
                   approximant_every_s=approximant_every_s)

    # -- the sink protocol ---------------------------------------------------------------------
    def run_started(self, header: Any) -> None:
        """Create (or reopen) the scan's container with status ``acquiring``."""
        md = header_metadata(header)
        with self._lock:
            run = _Run(uid=md["run_uid"], header=md)
            self._runs[run.uid] = run
            run.timings["started_at"] = run.started_at
            if self.root is None and self.reconnect is not None:
                self._try_reconnect()
            meta = {
                **self.run_metadata, **md, "status": "acquiring", "angles_used": 0,
                "software_version": __version__, "timings": dict(run.timings),
            }
            self._call(run, "run_started", {"header": md}, lambda: self._open(run, meta))

    def angle_finished(self, run_uid: str, summary: Any, approximant: Any) -> None:
        """Append the angle's row; rewrite the Approximant and bump ``angles_used`` (at most
        every ``approximant_every_s``).

        ``approximant`` is the run's engine (its ``volume()`` is read) or an array.
        """
        with self._lock:
            run = self._run(run_uid)
            row = angle_row(summary, default_id=len(run.angles_deg))
            run.angles_deg.append(row["angle_deg"])
            run.timings["last_angle_s"] = run.elapsed_s()
            run.pending = approximant
            due = time.monotonic() - run.uploaded_at >= self.approximant_every_s
            volume = volume_array(approximant, name="approximant") if due else None

            def write() -> None:
                self._append_angle(run, row)
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
                "final": bool(final),
                "timings": dict(run.timings),
            }
            if not final:
                meta["status"] = "reconstructing"

            def write() -> None:
                for name, arr in arrays.items():
                    self._write_volume(run, name, arr, {"final": bool(final),
                                                       "angles_used": len(run.angles_deg)})
                run.node.update_metadata(metadata=meta)
                if "apt" in arrays:
                    # Wall clock when the APT volume became readable: the end of the latency.
                    self.apt_readable_at.setdefault(run.uid, time.time())

            self._call(run, "reconstruction_ready",
                       {"final": bool(final), "metadata": json_safe(dict(metadata or {}))},
                       write, arrays=arrays)

    def run_stopped(self, run_uid: str, status: str) -> None:
        """Set the final status (``done`` | ``failed`` | ``stopped_before_trigger``, or bluesky's
        ``success`` / ``abort`` / ``fail``) and the run's timings; forget the run."""
        with self._lock:
            run = self._run(run_uid)
            final_status = resolve_status(status, has_final=run.has_final)
            self._flush_approximant(run)
            run.timings["total_s"] = run.elapsed_s()
            run.timings["tiled_s"] = round(run.tiled_s, 3)
            meta = {"status": final_status, "timings": dict(run.timings)}
            self._call(run, "run_stopped", {"status": final_status},
                       lambda: run.node.update_metadata(metadata=meta))
            if run.degraded:
                log.warning("run %s was published to the backup %s; replay it with "
                            "apt_stream.publish.replay_backup", run.uid, self.backup.path_for(run.uid))
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

    def update_approximant(self, run_uid: str, approximant: Any) -> None:
        """Upload the Approximant (engine or array) now, without an angle row."""
        volume = volume_array(approximant, name="approximant")
        with self._lock:
            run = self._run(run_uid)
            self._call(run, "update_approximant", {}, lambda: self._upload_approximant(run, volume),
                       arrays={"approximant": volume})

    def update_status(self, run_uid: str, status: str, **metadata: Any) -> None:
        """Set the scan's status (one of :data:`apt_stream.publish.STATUSES`) and
        merge ``metadata`` into its metadata, e.g. ``reconstructing`` before inference starts."""
        if status not in STATUSES:
            raise InputError(f"status must be one of {STATUSES}, got {status!r}")
        with self._lock:
            run = self._run(run_uid)
            meta = {**json_safe(metadata), "status": status}
            self._call(run, "update_status", {"status": status, "metadata": json_safe(metadata)},
                       lambda: run.node.update_metadata(metadata=meta))

    def stats(self) -> dict[str, Any]:
        """Time and calls spent in Tiled, failures, backup lines written."""
        with self._lock:
            return {
                "tiled_s": round(self.tiled_seconds, 4),
                "tiled_ops": self.tiled_ops,
                "failures": self.failures,
                "backup_records": self.backup.n_records,
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
            self._runs[run_uid] = run
            self._call(run, "run_started", {"header": run.header},
                       lambda: self._open(run, {"run_uid": run_uid}))
        return run

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
        into the backup with the call.
        """
        if not run.degraded and self.root is not None and (run.node is not None or call == "run_started"):
            t0 = time.perf_counter()
            try:
                write()
                return
            except Exception as exc:
                self.failures += 1
                error = f"{type(exc).__name__}: {exc}"
                log.warning("Tiled %s failed for run %s (%s); this run now goes to the backup %s",
                            call, run.uid, error.splitlines()[0], self.backup.path_for(run.uid))
            finally:
                dt = time.perf_counter() - t0
                self.tiled_seconds += dt
                self.tiled_ops += 1
                run.tiled_s += dt
        else:
            error = "Tiled offline" if self.root is None else None
        self._to_backup(run, call, args, arrays, error)

    def _to_backup(self, run, call, args, arrays, error) -> None:
        try:
            if not run.degraded:
                run.degraded = True
                if call != "run_started":
                    # The replay must be able to (re)open the container first.
                    self.backup.record(run.uid, "run_started", {"header": run.header})
            self.backup.record(run.uid, call, args, error=error,
                               arrays=arrays() if callable(arrays) else arrays)
        except Exception:
            # Even the backup failing (disk full) must not stop the reconstruction.
            log.exception("could not write the backup of %s for run %s", call, run.uid)

    def _upload_approximant(self, run: _Run, volume: np.ndarray) -> None:
        self._write_volume(run, "approximant", volume, {})
        meta = {
            "angles_used": len(run.angles_deg),
            "angles_finished_deg": sorted(run.angles_deg),
            "timings": dict(run.timings),
        }
        # Per-angle progress is not worth a metadata revision each (status changes are).
        run.node.update_metadata(metadata=meta, drop_revision=True)
        run.uploaded_at = time.monotonic()
        run.uploaded_n = len(run.angles_deg)

    def _flush_approximant(self, run: _Run) -> None:
        """Upload an Approximant the throttle held back (nothing when up to date or offline)."""
        if run.pending is None or run.uploaded_n == len(run.angles_deg) or run.degraded:
            return
        if self.root is not None and run.node is not None:
            self.update_approximant(run.uid, run.pending)

    def _open(self, run: _Run, meta: dict[str, Any]) -> None:
        try:
            node = self.root[run.uid]
        except KeyError:
            run.node = self.root.create_container(key=run.uid, metadata=meta)
            return
        node.update_metadata(metadata=meta)
        run.node = node

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
        if name in ("approximant", "angles", "metrics", "baselines"):
            raise InputError(f"volume name {name!r} is reserved")
        return name if name in ("apt", "apt-raw") or len(parts) == 2 else f"baselines/{name}"

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

    def _append_angle(self, run: _Run, row: dict[str, Any]) -> None:
        import pyarrow as pa

        table = self._child(run, "angles")
        if table is None:
            schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in ANGLE_COLUMNS])
            table = run.node.create_appendable_table(schema, key="angles")
            run.children["angles"] = table
        # A pyarrow table, not pandas: a DataFrame would add an index column the schema lacks.
        table.append_partition(0, pa.table({name: [row[name]] for name, _ in ANGLE_COLUMNS}))

