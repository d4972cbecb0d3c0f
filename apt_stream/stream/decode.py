"""Wire format of documents on 0MQ: safe encoders for the publisher, safe decoding for subscribers.

A message is what :class:`bluesky.callbacks.zmq.Publisher` sends: ``prefix b" " name b" " payload``.
The payload is **msgpack** by default (compact, fast, cannot execute code); JSON is the readable
alternative. Pickle is what bluesky uses when nobody chooses, and unpickling runs arbitrary code,
so a subscriber only accepts it with an explicit ``allow_pickle=True`` (a trusted, private link).

Numpy values inside documents (``numpy.float64`` readbacks, small arrays) are turned into built-in
numbers and lists on the way out, so both codecs carry them. Big arrays never travel in documents:
frames and probe modes live in HDF5 files that documents reference.

Decoding is bounded (:mod:`apt_stream.stream.limits`): the message size is checked before
anything else, msgpack headers cannot claim more than the limits allow, JSON is scanned for depth
and size before it is parsed, and every decoded document passes
:func:`~apt_stream.stream.limits.check_structure`. Whatever goes wrong while decoding is raised as
:class:`DocumentError` (never ``RecursionError``, ``MemoryError`` or a codec's own exception).

``PROBE_NAME`` messages are link probes (see :func:`probe_message`): a publisher sends them until a
subscriber reports one, which proves the publisher -> proxy -> subscriber path is up. They are never
documents and never reach document consumers.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from typing import Any, Literal

import msgpack
import numpy as np

from apt_stream.errors import DocumentError
from apt_stream.stream.limits import (
    DEFAULT_LIMITS,
    MessageLimits,
    check_structure,
    msgpack_caps,
    msgpack_hooks,
    precheck_json,
)

Serializer = Literal["msgpack", "json", "pickle", "auto"]

#: Document names a subscriber accepts (the deprecated bulk_* names are refused).
DOCUMENT_NAMES = frozenset(
    {
        "start", "stop", "descriptor", "event", "event_page", "resource", "datum", "datum_page",
        "stream_resource", "stream_datum",
    }
)

#: Name of a link-probe message; not a document.
PROBE_NAME = "apt_stream_probe"

_PICKLE_PROTOCOLS = frozenset(range(2, 6))


def to_builtin(obj: Any) -> Any:
    """``default`` hook for both encoders: numpy scalars/arrays become Python numbers/lists."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot serialise object of type {type(obj).__name__} in a document")


def encode_msgpack(doc: dict) -> bytes:
    """Serialise a document with msgpack (the default wire format)."""
    return msgpack.packb(doc, default=to_builtin, use_bin_type=True)


def encode_json(doc: dict) -> bytes:
    """Serialise a document as UTF-8 JSON (readable; NaN is written as ``NaN``)."""
    return json.dumps(doc, default=to_builtin, separators=(",", ":")).encode("utf-8")


_ENCODERS: dict[str, Callable[[dict], bytes]] = {"msgpack": encode_msgpack, "json": encode_json}


def encoder_for(serializer: str) -> Callable[[dict], bytes]:
    """The publisher-side encoder for ``"msgpack"`` or ``"json"`` (we never publish pickle)."""
    try:
        return _ENCODERS[serializer]
    except KeyError:
        raise DocumentError(
            f"unknown serializer {serializer!r}; choose one of {sorted(_ENCODERS)}"
        ) from None


def _looks_like_pickle(payload: bytes) -> bool:
    # Protocol >= 2 pickles start with the PROTO opcode 0x80 and the protocol number. A msgpack
    # empty map is the single byte 0x80, so a second byte tells the two apart.
    return len(payload) > 1 and payload[0] == 0x80 and payload[1] in _PICKLE_PROTOCOLS


def _sniff(payload: bytes) -> str:
    if _looks_like_pickle(payload):
        return "pickle"
    if payload[:1] in (b"{", b"[", b" ", b"\n"):
        return "json"
    return "msgpack"


def decode_payload(
    payload: bytes,
    *,
    serializer: Serializer = "msgpack",
    allow_pickle: bool = False,
    limits: MessageLimits | None = None,
) -> Any:
    """Decode one payload with the chosen codec; raise :class:`DocumentError` when it fails.

    ``serializer="auto"`` sniffs the first bytes (JSON object, pickle header, else msgpack); even
    then pickle is only decoded with ``allow_pickle=True``. ``limits`` (default
    :class:`MessageLimits`) bound the payload size and, for msgpack and JSON, the lengths, item
    count and nesting depth before or while decoding. The decoded object is returned as is:
    :func:`decode_message` runs :func:`check_structure` on it.
    """
    limits = limits or DEFAULT_LIMITS
    if len(payload) > limits.max_message_bytes:
        raise DocumentError(
            f"payload of {len(payload)} bytes exceeds the {limits.max_message_bytes}-byte limit"
        )
    kind = _sniff(payload) if serializer == "auto" else serializer
    if kind == "pickle" or _looks_like_pickle(payload):
        if not allow_pickle:
            raise DocumentError(
                "payload looks like a pickle; pickle is refused unless allow_pickle=True "
                "(unpickling can run arbitrary code)"
            )
    if kind == "pickle":
        try:
            return pickle.loads(payload)  # noqa: S301 - explicitly allowed by the caller
        except Exception as exc:
            raise DocumentError(f"pickle payload could not be decoded: {_describe(exc)}") from exc
    if kind == "msgpack":
        try:
            return msgpack.unpackb(
                payload, raw=False, **msgpack_caps(limits), **msgpack_hooks(limits)
            )
        except DocumentError:
            raise
        except msgpack.StackError:
            raise DocumentError(
                "msgpack payload nests deeper than the decoder's stack (1024 levels)"
            ) from None
        except Exception as exc:
            raise DocumentError(f"msgpack payload could not be decoded: {_describe(exc)}") from exc
    if kind == "json":
        precheck_json(payload, limits)
        try:
            return json.loads(payload.decode("utf-8"))
        except RecursionError:
            raise DocumentError("JSON payload nests too deeply to decode") from None
        except Exception as exc:
            raise DocumentError(f"JSON payload could not be decoded: {_describe(exc)}") from exc
    raise DocumentError(
        f"unknown serializer {serializer!r}; choose msgpack, json, auto or pickle"
    )


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if len(text) > 200:
        text = text[:200] + "..."
    return text or type(exc).__name__


def decode_message(
    message: bytes,
    *,
    serializer: Serializer = "msgpack",
    allow_pickle: bool = False,
    prefix: bytes = b"",
    limits: MessageLimits | None = None,
) -> tuple[str, dict] | None:
    """Split and decode one 0MQ message into ``(name, doc)``.

    Returns ``None`` for a message whose prefix differs from a non-empty ``prefix`` (another
    publisher's traffic, not an error). Raises :class:`DocumentError` naming the problem for
    anything that is not a well-formed ``prefix name payload`` message within ``limits``
    (default :class:`MessageLimits`) with a mapping payload of JSON types and a known document
    name (or the probe name).
    """
    limits = limits or DEFAULT_LIMITS
    if not isinstance(message, bytes | bytearray | memoryview):
        raise DocumentError(f"message must be bytes, got {type(message).__name__}")
    size = message.nbytes if isinstance(message, memoryview) else len(message)
    if size > limits.max_message_bytes:
        raise DocumentError(
            f"message of {size} bytes exceeds the {limits.max_message_bytes}-byte limit"
        )
    message = bytes(message)
    parts = message.split(b" ", 2)
    if len(parts) != 3:
        raise DocumentError(
            f"message is not 'prefix name payload' ({len(message)} bytes: {message[:40]!r}...)"
        )
    msg_prefix, raw_name, payload = parts
    if prefix and msg_prefix != prefix:
        return None
    try:
        name = raw_name.decode("ascii")
    except UnicodeDecodeError:
        raise DocumentError(f"document name is not ASCII: {raw_name[:40]!r}") from None
    if name not in DOCUMENT_NAMES and name != PROBE_NAME:
        raise DocumentError(f"unknown document name {name[:40]!r}")
    doc = decode_payload(payload, serializer=serializer, allow_pickle=allow_pickle, limits=limits)
    if not isinstance(doc, dict):
        raise DocumentError(f"{name} payload decoded to {type(doc).__name__}, expected a mapping")
    check_structure(doc, limits)
    return name, doc


def probe_message(*, prefix: bytes = b"", serializer: str = "msgpack", token: str = "") -> bytes:
    """A link-probe message (raw bytes) for publishers that own their socket."""
    payload = encoder_for(serializer)({"token": token})
    return b" ".join([prefix, PROBE_NAME.encode(), payload])
