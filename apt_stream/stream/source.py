"""Document sources: a live 0MQ subscription, a document log, or a scan file.

Every source is an iterable of ``(name, doc)`` and has ``run(callback, *, on_idle=None)``. The
0MQ source never lets a bad message escape (``strict=False``): whatever goes wrong while decoding
or validating one (a :class:`DocumentError`, but also ``RecursionError``, ``MemoryError`` or any
other exception) drops that message, counts it in ``stats`` and is logged once per cause, with a
running count, not once per message. Exceptions from the callback or ``on_idle`` are logged and
counted the same way and the loop goes on. ``strict=True`` re-raises instead (tests).
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

from apt_stream.errors import ConfigError, DocumentError
from apt_stream.stream.decode import PROBE_NAME, Serializer, decode_message
from apt_stream.stream.limits import MessageLimits, check_structure
from apt_stream.stream.paths import file_uri
from apt_stream.stream.problems import cause_of as message_cause
from apt_stream.stream.schema import (
    ANGLES_STREAM,
    APT_KEY,
    FRAMES_STREAM,
    HDF5_MIMETYPE,
    DataKeyMap,
    angles_data_keys,
    build_start_metadata,
    frames_data_keys,
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
    #: Dropped messages per cause (the reason with its quoted values and numbers blanked out,
    #: e.g. ``"DocumentError: document nests deeper than … levels (at …)"``); at most
    #: :data:`MAX_CAUSES` causes, the rest counted under ``"other"``. Copy it to read it.
    drop_causes: dict[str, int] = field(default_factory=dict)
    #: Exceptions raised by the ``run`` callback or ``on_idle`` (the loop went on).
    callback_errors: int = 0
    last_callback_error: str = ""
    #: ``time.time()`` of the loop's last poll or received message: a heartbeat for a watchdog
    #: (0.0 until the loop runs). It goes stale only if the loop is gone or a callback hangs.
    last_poll: float = 0.0

    def drop(self, reason: str) -> None:
        self.dropped += 1
        self.last_error = reason
        self.errors.append(reason)


#: Distinct causes a :class:`CauseLog` tracks before it counts new ones as ``"other"``.
MAX_CAUSES = 256

def cause_of(exc: BaseException) -> str:
    """The class of a failure: exception type and message with quoted values and numbers blanked,
    so ``invalid start document (uid 'a1'): ...`` and ``... (uid 'b2'): ...`` are one cause."""
    return f"{type(exc).__name__}: {message_cause(str(exc)[:400])}"


class CauseLog:
    """Log a failure the first time its cause (:func:`cause_of`) is seen, then only when that
    cause's count reaches 10, 100, 1000, ... so a flood of bad messages costs a few log lines.

    ``counts`` maps cause -> occurrences. Causes that are not :class:`DocumentError` are
    unexpected (a bug, or a decoder tripping), so their first occurrence is logged with its
    traceback.
    """

    def __init__(self, logger: logging.Logger, what: str, counts: dict[str, int] | None = None):
        self.log = logger
        self.what = what
        self.counts = counts if counts is not None else {}

    def __call__(self, exc: BaseException, where: str) -> None:
        cause = cause_of(exc)
        if cause not in self.counts and len(self.counts) >= MAX_CAUSES:
            cause = "other"
        n = self.counts[cause] = self.counts.get(cause, 0) + 1
        if n == 1:
            self.log.warning(
                "%s from %s: %s (further ones of this kind are counted, logged at 10, 100, ...)",
                self.what, where, exc, exc_info=not isinstance(exc, DocumentError),
            )
        elif _power_of_ten(n):
            self.log.warning("%s from %s: %d so far of %r; latest: %s", self.what, where, n,
                             cause, exc)


def _power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


def _z85_key(value: str | bytes, what: str) -> bytes:
    """A CURVE key as the 40 Z85 characters libzmq takes; never echoes the key in errors."""
    if isinstance(value, str):
        value = value.encode("ascii", "replace")
    if not isinstance(value, bytes) or len(value) != 40:
        raise ConfigError(
            f"{what} must be a 40-character Z85 CURVE key (as zmq.curve_keypair() or "
            f"zmq.auth.load_certificate() returns), got {type(value).__name__} of length "
            f"{len(value) if isinstance(value, bytes) else '?'}"
        )
    from zmq.utils import z85

    try:
        z85.decode(value)
    except Exception:
        raise ConfigError(f"{what} is not valid Z85 text") from None
    return value


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
        Re-raise instead of logging and dropping: a bad message's error (:class:`DocumentError`
        or whatever else decoding or validation raised) and the callback's or ``on_idle``'s.
    validate
        Check each document against its event-model schema.
    poll_timeout_s
        How long one poll blocks; it bounds how late :meth:`stop` takes effect and how often
        ``on_idle`` runs while the stream is quiet.
    prefix
        Only messages with this publisher prefix are read (empty: all).
    rcvhwm
        0MQ receive high-water mark (messages buffered before 0MQ drops new ones).
    limits
        Caps on a message's size, nesting, item count and string/list lengths
        (:class:`~apt_stream.stream.limits.MessageLimits`; None: the defaults). Messages beyond
        them are dropped before or while decoding. The socket's ``ZMQ_MAXMSGSIZE`` is set to
        ``limits.max_message_bytes`` so libzmq never allocates a bigger one: it drops the
        connection to a peer that sends one instead (the SUB socket reconnects by itself).
    curve_server_key, curve_public_key, curve_secret_key
        Optional 0MQ CURVE encryption and server authentication: the publishing socket's
        (the proxy's output) public key, and this subscriber's key pair, all as 40-character Z85
        text (``str`` or ``bytes``, as :func:`zmq.curve_keypair` returns). With
        ``curve_server_key`` set the SUB socket is a CURVE client and only talks to a server
        holding the matching secret key; a server with another key is never heard from. Without
        a client key pair an ephemeral one is made (enough unless the server checks client keys
        with a ZAP authenticator). bluesky's own 0MQ classes do CURVE with key *files*:
        ``Publisher(curve_config=ClientCurve(secret_path, server_public_key))``,
        ``Proxy(in_curve=..., out_curve=ServerCurve(secret_path, client_public_keys, allow))``
        (a ZAP authenticator admitting any client or those in a public-key folder, optionally by
        IP) and ``RemoteDispatcher(curve_config=ClientCurve(...))``; to subscribe to such a
        proxy pass ``zmq.auth.load_certificate(server_public_file)[0]`` as ``curve_server_key``
        and ``zmq.auth.load_certificate(client_secret_file)`` as the client pair.

    ``stats`` (:class:`SourceStats`) counts what was received, delivered and dropped (per cause),
    callback errors, and carries the loop's heartbeat ``last_poll``.
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
        limits: MessageLimits | None = None,
        curve_server_key: str | bytes | None = None,
        curve_public_key: str | bytes | None = None,
        curve_secret_key: str | bytes | None = None,
    ) -> None:
        if serializer == "pickle" and not allow_pickle:
            raise DocumentError("serializer='pickle' needs allow_pickle=True")
        if poll_timeout_s <= 0:
            raise DocumentError(f"poll_timeout_s must be > 0, got {poll_timeout_s}")
        if limits is not None and not isinstance(limits, MessageLimits):
            raise ConfigError(f"limits must be a MessageLimits, got {type(limits).__name__}")
        self.address = address if "://" in address else f"tcp://{address}"
        self.serializer = serializer
        self.allow_pickle = allow_pickle
        self.strict = strict
        self.validate = validate
        self.poll_timeout_s = float(poll_timeout_s)
        self.prefix = bytes(prefix)
        self.rcvhwm = int(rcvhwm)
        self.limits = limits if limits is not None else MessageLimits()
        self._curve = self._curve_keys(curve_server_key, curve_public_key, curve_secret_key)
        self.stats = SourceStats()
        self._drop_log = CauseLog(log, "dropped message", self.stats.drop_causes)
        self._callback_log = CauseLog(log, "document callback failed")
        self._stop = threading.Event()
        #: Set when the socket is connected and subscribed (the loop is running).
        self.ready = threading.Event()
        #: Set each time a link probe arrives (see apt_stream.stream.decode.PROBE_NAME).
        self.probe_seen = threading.Event()

    @staticmethod
    def _curve_keys(server, public, secret) -> tuple[bytes, bytes, bytes] | None:
        if server is None:
            if public is not None or secret is not None:
                raise ConfigError("CURVE client keys given without curve_server_key")
            return None
        if (public is None) != (secret is None):
            raise ConfigError("give both curve_public_key and curve_secret_key, or neither")
        import zmq

        if not zmq.has("curve"):
            raise ConfigError("this libzmq was built without CURVE support")
        server = _z85_key(server, "curve_server_key")
        if public is None:
            public, secret = zmq.curve_keypair()
        return (server, _z85_key(public, "curve_public_key"),
                _z85_key(secret, "curve_secret_key"))

    @property
    def curve(self) -> bool:
        """Whether the subscription is CURVE-encrypted."""
        return self._curve is not None

    def stop(self) -> None:
        """Ask the loop to end; safe from any thread. It ends within ``poll_timeout_s``."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _handle(self, message: bytes) -> tuple[str, dict] | None:
        """Decode and validate one message: ``(name, doc)``, or None when it is not a document
        (another prefix, a probe) or was dropped. Never raises unless ``strict``."""
        self.stats.received += 1
        try:
            decoded = decode_message(
                message, serializer=self.serializer, allow_pickle=self.allow_pickle,
                prefix=self.prefix, limits=self.limits,
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
        except Exception as exc:  # noqa: BLE001 - a hostile message must not end the loop
            reason = str(exc)[:500] if isinstance(exc, DocumentError) else (
                f"{type(exc).__name__} while decoding: {str(exc)[:400]}"
            )
            self.stats.drop(reason)
            if self.strict:
                raise
            self._drop_log(exc, self.address)
            return None
        self.stats.delivered += 1
        return name, doc

    def _callback_failed(self, exc: Exception, what: str) -> None:
        self.stats.callback_errors += 1
        self.stats.last_callback_error = f"{what}: {type(exc).__name__}: {str(exc)[:400]}"
        if self.strict:
            raise exc
        self._callback_log(exc, what)

    def _messages(self, on_idle: Callable[[], object] | None) -> Iterator[tuple[str, dict]]:
        import zmq  # late import: the rest of apt_stream.stream works without a 0MQ install

        context = zmq.Context()
        socket = context.socket(zmq.SUB)
        try:
            socket.setsockopt(zmq.RCVHWM, self.rcvhwm)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
            if self._curve is not None:
                server, public, secret = self._curve
                socket.curve_serverkey = server
                socket.curve_publickey = public
                socket.curve_secretkey = secret
            socket.connect(self.address)
            socket.setsockopt(zmq.SUBSCRIBE, self.prefix)
            poller = zmq.Poller()
            poller.register(socket, zmq.POLLIN)
            timeout_ms = max(1, int(self.poll_timeout_s * 1000))
            self.ready.set()
            while not self._stop.is_set():
                self.stats.last_poll = time.time()
                if not poller.poll(timeout_ms):
                    if on_idle is not None:
                        try:
                            on_idle()
                        except Exception as exc:  # noqa: BLE001
                            self._callback_failed(exc, "on_idle")
                    continue
                # Drain what is queued before polling again.
                while not self._stop.is_set():
                    try:
                        message = socket.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.stats.last_poll = time.time()
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
        poll that found nothing (e.g. the assembler's flush).

        An exception from ``callback`` or ``on_idle`` is counted in ``stats.callback_errors``,
        logged once per cause and the loop goes on (``strict=True``: it ends the loop)."""
        for name, doc in self._messages(on_idle):
            try:
                callback(name, doc)
            except Exception as exc:  # noqa: BLE001 - one bad document must not end the loop
                self._callback_failed(exc, f"callback on a {name} document")


class FileDocumentSource:
    """The documents of a run journal (``documents.jsonl``) or a listener spool, in order.

    Each document passes :func:`~apt_stream.stream.limits.check_structure` (``limits``) and,
    with ``validate``, its schema; one that fails, in any way, is dropped, counted and logged
    once per cause (``strict=True``: raised).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        validate: bool = True,
        strict: bool = False,
        limits: MessageLimits | None = None,
    ):
        self.path = Path(path)
        self.validate = validate
        self.strict = strict
        self.limits = limits if limits is not None else MessageLimits()
        self.stats = SourceStats()
        self._drop_log = CauseLog(log, "dropped document", self.stats.drop_causes)

    def __iter__(self) -> Iterator[tuple[str, dict]]:
        docs = replay_spool(self.path)
        while True:
            try:
                name, doc = next(docs)
            except StopIteration:
                return
            except DocumentError:
                raise  # the file itself is missing: not one bad document
            except Exception as exc:  # noqa: BLE001 - the reader died on a hostile line
                self.stats.drop(f"reading {self.path} failed: {type(exc).__name__}: {exc}")
                if self.strict:
                    raise
                self._drop_log(exc, str(self.path))
                return
            self.stats.received += 1
            try:
                check_structure(doc, self.limits)
                if self.validate:
                    validate_document(name, doc)
            except Exception as exc:  # noqa: BLE001
                self.stats.drop(str(exc)[:500])
                if self.strict:
                    raise
                self._drop_log(exc, f"{self.path} ({name})")
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
        declared = getattr(scan.frames, "conventions", None)
        if declared is not None and not declared.is_default:
            # The documents point at the file's own datasets, which hold the data as stored.
            from apt_stream.errors import ScanFormatError

            raise ScanFormatError(
                f"{self.path}: stores its data in other conventions ({declared.differences()}); "
                "a scan-file source publishes the datasets as stored: write it in ours first "
                "(apt_stream.io.write_scan(out, read_scan(path)))"
            )
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
            name=FRAMES_STREAM, data_keys=frames_data_keys(keys, (h, w))
        )
        angles_desc = bundle.compose_descriptor(name=ANGLES_STREAM, data_keys=angles_data_keys(keys))
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
