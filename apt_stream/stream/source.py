"""Document sources: a live 0MQ subscription, a document log, or a scan file.

Every source is an iterable of ``(name, doc)`` and has ``run(callback, *, on_idle=None)``. The
0MQ source never lets a bad message escape (``strict=False``): it is logged, counted in
``stats`` and dropped; ``strict=True`` raises :class:`DocumentError` instead (tests).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from apt_stream.errors import DocumentError
from apt_stream.stream.decode import PROBE_NAME, Serializer, decode_message
from apt_stream.stream.paths import file_uri
from apt_stream.stream.schema import (
    ANGLES_STREAM,
    APT_KEY,
    FRAMES_STREAM,
    HDF5_MIMETYPE,
    DataKeyMap,
    build_start_metadata,
)
from apt_stream.stream.spool import replay_spool
from apt_stream.stream.validate import validate_document

log = logging.getLogger(__name__)


@dataclass
class SourceStats:
    """Counters of a source (read them from any thread; they only grow)."""

    received: int = 0
    delivered: int = 0
    dropped: int = 0
    probes: int = 0
    last_error: str = ""
    #: The most recent reasons messages were dropped (newest last).
    errors: deque[str] = field(default_factory=lambda: deque(maxlen=50))

    def drop(self, reason: str) -> None:
        self.dropped += 1
        self.last_error = reason
        self.errors.append(reason)


class ZmqDocumentSource:
    """Subscribe to a 0MQ proxy's output and yield decoded, validated documents.

    Parameters
    ----------
    address
        The proxy's output, e.g. ``"tcp://127.0.0.1:5568"`` (``host:port`` is accepted too).
    serializer
        ``"msgpack"`` (default), ``"json"``, ``"auto"`` (sniff) or ``"pickle"``.
    allow_pickle
        Decode pickled payloads. Off by default: unpickling runs code chosen by the sender.
    strict
        Raise :class:`DocumentError` on a bad message instead of logging and dropping it.
    validate
        Check each document against its event-model schema.
    poll_timeout_s
        How long one poll blocks; it bounds how late :meth:`stop` takes effect and how often
        ``on_idle`` runs while the stream is quiet.
    prefix
        Only messages with this publisher prefix are read (empty: all).
    rcvhwm
        0MQ receive high-water mark (messages buffered before 0MQ drops new ones).
    """

    def __init__(
        self,
        address: str,
        *,
        serializer: Serializer = "msgpack",
        allow_pickle: bool = False,
        strict: bool = False,
        validate: bool = True,
        poll_timeout_s: float = 0.1,
        prefix: bytes = b"",
        rcvhwm: int = 100_000,
    ) -> None:
        if serializer == "pickle" and not allow_pickle:
            raise DocumentError("serializer='pickle' needs allow_pickle=True")
        if poll_timeout_s <= 0:
            raise DocumentError(f"poll_timeout_s must be > 0, got {poll_timeout_s}")
        self.address = address if "://" in address else f"tcp://{address}"
        self.serializer = serializer
        self.allow_pickle = allow_pickle
        self.strict = strict
        self.validate = validate
        self.poll_timeout_s = float(poll_timeout_s)
        self.prefix = bytes(prefix)
        self.rcvhwm = int(rcvhwm)
        self.stats = SourceStats()
        self._stop = threading.Event()
        #: Set when the socket is connected and subscribed (the loop is running).
        self.ready = threading.Event()
        #: Set each time a link probe arrives (see apt_stream.stream.decode.PROBE_NAME).
        self.probe_seen = threading.Event()

    def stop(self) -> None:
        """Ask the loop to end; safe from any thread. It ends within ``poll_timeout_s``."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _handle(self, message: bytes) -> tuple[str, dict] | None:
        self.stats.received += 1
        try:
            decoded = decode_message(
                message, serializer=self.serializer, allow_pickle=self.allow_pickle,
                prefix=self.prefix,
            )
            if decoded is None:
                return None
            name, doc = decoded
            if name == PROBE_NAME:
                self.stats.probes += 1
                self.probe_seen.set()
                return None
            if self.validate:
                validate_document(name, doc)
        except DocumentError as exc:
            self.stats.drop(str(exc))
            if self.strict:
                raise
            log.warning("dropping message from %s: %s", self.address, exc)
            return None
        self.stats.delivered += 1
        return name, doc

    def _messages(self, on_idle: Callable[[], object] | None) -> Iterator[tuple[str, dict]]:
        import zmq  # late import: the rest of apt_stream.stream works without a 0MQ install

        context = zmq.Context()
        socket = context.socket(zmq.SUB)
        try:
            socket.setsockopt(zmq.RCVHWM, self.rcvhwm)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(self.address)
            socket.setsockopt(zmq.SUBSCRIBE, self.prefix)
            poller = zmq.Poller()
            poller.register(socket, zmq.POLLIN)
            timeout_ms = max(1, int(self.poll_timeout_s * 1000))
            self.ready.set()
            while not self._stop.is_set():
                if not poller.poll(timeout_ms):
                    if on_idle is not None:
                        on_idle()
                    continue
                # Drain what is queued before polling again.
                while not self._stop.is_set():
                    try:
                        message = socket.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    item = self._handle(message)
                    if item is not None:
                        yield item
        finally:
            self.ready.clear()
            socket.close(linger=0)
            context.term()

    def __iter__(self) -> Iterator[tuple[str, dict]]:
        return self._messages(None)

    def run(
        self,
        callback: Callable[[str, dict], object],
        *,
        on_idle: Callable[[], object] | None = None,
    ) -> None:
        """Deliver documents to ``callback`` until :meth:`stop`; ``on_idle`` runs after each
        poll that found nothing (e.g. the assembler's flush)."""
        for name, doc in self._messages(on_idle):
            callback(name, doc)


class FileDocumentSource:
    """The documents of a run journal (``documents.jsonl``) or a listener spool, in order."""

    def __init__(self, path: str | os.PathLike, *, validate: bool = True, strict: bool = False):
        self.path = Path(path)
        self.validate = validate
        self.strict = strict
        self.stats = SourceStats()

    def __iter__(self) -> Iterator[tuple[str, dict]]:
        for name, doc in replay_spool(self.path):
            self.stats.received += 1
            if self.validate:
                try:
                    validate_document(name, doc)
                except DocumentError as exc:
                    self.stats.drop(str(exc))
                    if self.strict:
                        raise
                    log.warning("dropping %s document from %s: %s", name, self.path, exc)
                    continue
            self.stats.delivered += 1
            yield name, doc

    def run(self, callback, *, on_idle=None) -> None:
        for name, doc in self:
            callback(name, doc)
        if on_idle is not None:
            on_idle()


class ScanFileSource:
    """The document stream of a scan file, as if the beamline had acquired it.

    The StreamResource points straight at the scan file's ``/entry/data/frames`` and the probe
    reference at its ``/entry/instrument/probe/modes``: nothing is copied, so the scan file must
    lie under the listener's data roots. One event per frame (angles in file order), then one
    ``angles`` event per angle, as :func:`apt_stream.plugins.bluesky.ptycho_tomo_plan` emits.

    Parameters
    ----------
    path
        A scan file (docs/scan-format.md).
    sample
        Sample name for the start document (default: the file's stem).
    md
        Extra top-level start-document metadata.
    """

    def __init__(self, path: str | os.PathLike, *, sample: str | None = None, md: dict | None = None):
        self.path = Path(path).resolve()
        self.sample = sample if sample is not None else self.path.stem
        self.md = dict(md or {})

    def __iter__(self) -> Iterator[tuple[str, dict]]:
        from event_model import compose_run

        from apt_stream.io import scan as scanfile

        scan = scanfile.read_scan(self.path, load_frames=False)
        keys = DataKeyMap()
        h, w = scan.frame_shape
        angle_index = np.asarray(scan.angle_index)
        per_angle = np.bincount(angle_index, minlength=scan.n_angles)
        section = build_start_metadata(
            energy_kev=scan.energy_kev, detector_distance_m=scan.detector_distance_m,
            detector_pixel_m=scan.detector_pixel_m, object_pixel_m=scan.object_pixel_m,
            field_shape=scan.field_shape, frame_shape=(h, w), n_slices=scan.n_slices,
            slice_spacing_m=scan.slice_spacing_m, angles_deg=scan.angles_deg,
            frames_per_angle=per_angle, volume_shape_zyx=scan.volume_shape_zyx,
            probe_uri=file_uri(self.path), probe_dataset=scanfile.PROBE,
            probe_shape=np.shape(scan.probe), run_dir=str(self.path.parent),
            preset=scan.provenance.get("preset"), sample=self.sample, data_keys=keys,
        )
        bundle = compose_run(
            metadata={
                "plan_name": "scan_file", "sample": self.sample, "num_points": int(scan.n_frames),
                "scan_file": str(self.path), **self.md, APT_KEY: section,
            }
        )
        yield "start", bundle.start_doc
        frames_desc = bundle.compose_descriptor(
            name=FRAMES_STREAM,
            data_keys={
                keys.frames: {"source": "file", "dtype": "array", "shape": [h, w],
                              "dtype_numpy": "<f4", "external": "STREAM:"},
                keys.angle_index: {"source": "file", "dtype": "integer", "shape": []},
                keys.angle_deg: {"source": "file", "dtype": "number", "shape": [], "units": "deg"},
                keys.position_y_px: {"source": "file", "dtype": "number", "shape": []},
                keys.position_x_px: {"source": "file", "dtype": "number", "shape": []},
            },
        )
        angles_desc = bundle.compose_descriptor(
            name=ANGLES_STREAM,
            data_keys={
                keys.done_angle_index: {"source": "file", "dtype": "integer", "shape": []},
                keys.done_angle_deg: {"source": "file", "dtype": "number", "shape": []},
                keys.done_n_frames: {"source": "file", "dtype": "integer", "shape": []},
            },
        )
        yield "descriptor", frames_desc.descriptor_doc
        yield "descriptor", angles_desc.descriptor_doc
        resource = bundle.compose_stream_resource(
            mimetype=HDF5_MIMETYPE, uri=file_uri(self.path), data_key=keys.frames,
            parameters={"dataset": scanfile.FRAMES, "chunk_shape": [1, h, w], "swmr": False},
        )
        yield "stream_resource", resource.stream_resource_doc
        positions = np.asarray(scan.positions_px)
        seq = 0
        for n in range(scan.n_angles):
            rows = np.flatnonzero(angle_index == n)
            for k in rows:
                seq += 1
                yield "stream_datum", resource.compose_stream_datum(
                    indices={"start": int(k), "stop": int(k) + 1},
                    seq_nums={"start": seq, "stop": seq + 1},
                    descriptor=frames_desc.descriptor_doc,
                )
                now = time.time()
                yield "event", frames_desc.compose_event(
                    data={
                        keys.angle_index: int(n), keys.angle_deg: float(scan.angles_deg[n]),
                        keys.position_y_px: float(positions[k, 0]),
                        keys.position_x_px: float(positions[k, 1]),
                    },
                    timestamps={key: now for key in (keys.angle_index, keys.angle_deg,
                                                     keys.position_y_px, keys.position_x_px)},
                    seq_num=seq,
                )
            yield "event", angles_desc.compose_event(
                data={keys.done_angle_index: int(n), keys.done_angle_deg: float(scan.angles_deg[n]),
                      keys.done_n_frames: int(rows.size)},
                timestamps=dict.fromkeys(
                    (keys.done_angle_index, keys.done_angle_deg, keys.done_n_frames), time.time()
                ),
                seq_num=n + 1,
            )
        yield "stop", bundle.compose_stop(exit_status="success", reason="end of scan file")

    def run(self, callback, *, on_idle=None) -> None:
        for name, doc in self:
            callback(name, doc)
        if on_idle is not None:
            on_idle()
