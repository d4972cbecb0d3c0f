"""A run stored in Tiled (by bluesky-tiled-plugins' ``TiledWriter``) as a document source.

``TiledWriter`` stores a Bluesky run as one container (key: the run uid, spec ``BlueskyRun``
3.x): the start and stop documents in its metadata, one child per stream whose metadata holds
the stream's descriptor, an ``internal`` table with one row per event (``seq_num``, ``time``,
the data keys and ``ts_<key>`` timestamps) and, for each external data key, an array node whose
data source points at the detector's file (``assets[0].data_uri``, ``parameters["dataset"]``).

:class:`TiledRunSource` turns that back into the document stream the live listener sees --
start, descriptors, one StreamResource for the frames file, StreamDatum + event per frame in
acquisition order, the ``angles`` events, stop -- so a stored run goes through the same
:class:`~apt_stream.stream.pipeline.DocumentPipeline`, :class:`~apt_stream.stream.assembler.
RunAssembler` (frames read from the referenced HDF5 file, under the data roots),
:class:`~apt_stream.stream.live.LiveReconstructor` and sink as a live one
(:func:`reconstruct_stored`). Nothing is unpickled: documents come from Tiled's JSON metadata
and its table, frames from the HDF5 file.

Addresses: ``tiled://HOST[:PORT]/PATH/<uid>`` (HTTP), ``tiled+https://HOST/PATH/<uid>``; the
API key comes from the caller (``$APT_STREAM_TILED_API_KEY`` on the command line), never from
the address. Tiled is imported only when a run is opened.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import numpy as np

from apt_stream.errors import DocumentError, InputError, ServiceError
from apt_stream.stream.messages import Message, RunHeader, RunStopped
from apt_stream.stream.schema import APT_KEY, HDF5_MIMETYPE, parse_start_metadata
from apt_stream.stream.validate import validate_document

log = logging.getLogger(__name__)

#: URI schemes of a stored run and the HTTP scheme each means.
SCHEMES = {"tiled": "http", "tiled+http": "http", "tiled+https": "https"}
#: Where ``listen`` and the demo store raw runs: a container beside the reconstructions.
RAW_CONTAINER = "raw"


@dataclass(frozen=True)
class TiledRunAddress:
    """A stored run's place: the server's API address and the node's path on it."""

    api_uri: str  # http(s)://host:port/api/v1
    path: tuple[str, ...]  # ("raw", "<uid>")

    @property
    def uid(self) -> str:
        return self.path[-1]

    @property
    def tiled_path(self) -> str:
        return "/".join(self.path)

    @property
    def uri(self) -> str:
        """The ``tiled://`` form (``tiled+https://`` for HTTPS)."""
        parts = urlsplit(self.api_uri)
        scheme = "tiled" if parts.scheme == "http" else "tiled+https"
        return f"{scheme}://{parts.netloc}/{quote(self.tiled_path)}"


def parse_tiled_uri(uri: str) -> TiledRunAddress:
    """``tiled://HOST[:PORT]/PATH/<uid>`` -> :class:`TiledRunAddress`.

    Raises
    ------
    InputError
        Another scheme, no host, no path, or a key in the address.
    """
    if not isinstance(uri, str) or "://" not in uri:
        raise InputError(f"not a Tiled run address: {uri!r} (expected tiled://HOST[:PORT]/PATH/<uid>)")
    parts = urlsplit(uri)
    http = SCHEMES.get(parts.scheme.lower())
    if http is None:
        raise InputError(f"{uri!r}: scheme {parts.scheme!r} is not one of "
                         f"{sorted(SCHEMES)} (expected tiled://HOST[:PORT]/PATH/<uid>)")
    if "api_key" in parts.query or parts.password or parts.username:
        raise InputError("put the Tiled API key in APT_STREAM_TILED_API_KEY (or --api-key), "
                         "not in the address")
    if not parts.hostname:
        raise InputError(f"{uri!r} names no host (expected tiled://HOST[:PORT]/PATH/<uid>)")
    path = tuple(unquote(p) for p in parts.path.split("/") if p)
    if path[:2] == ("api", "v1"):  # tiled://host/api/v1/raw/<uid>: the API prefix given too
        path = path[2:]
        if path[:1] == ("metadata",):
            path = path[1:]
    if not path:
        raise InputError(f"{uri!r} names no run (expected tiled://HOST[:PORT]/PATH/<uid>)")
    if any(p in (".", "..") for p in path):
        raise InputError(f"{uri!r}: '.' and '..' are not allowed in the path")
    return TiledRunAddress(api_uri=f"{http}://{parts.netloc}/api/v1", path=path)


def raw_run_link(uid: str, tiled_path: str, api_uri: str | None = None) -> dict[str, Any]:
    """What a reconstruction container records about its raw run (``metadata["raw_run"]``)."""
    link: dict[str, Any] = {"uid": uid, "tiled_path": tiled_path}
    if api_uri:
        link["tiled_uri"] = api_uri
    return link


def with_raw_run(emit: Callable[[Message], object],
                 link: Callable[[str], Mapping[str, Any] | None]) -> Callable[[Message], object]:
    """``emit`` with ``header.raw_run = link(run_uid)`` set on each RunHeader it passes on."""

    def emit_linked(message: Message) -> object:
        if isinstance(message, RunHeader):
            found = link(message.run_uid)
            if found:
                message = dataclasses.replace(message, raw_run=dict(found))
        return emit(message)

    return emit_linked


# -- reading a stored run ------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """A table cell as plain JSON types (numpy scalars and arrays to Python; NaN stays NaN)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class TiledRunSource:
    """The documents of one run stored by ``TiledWriter``, in acquisition order.

    Parameters
    ----------
    node
        The run's Tiled client node (e.g. ``from_uri(...)["raw"][uid]``).
    address
        Where it is (for messages and for the reconstruction's ``raw_run`` link).
    validate
        Check each document against event-model's schema (a bad one raises).

    Raises (when iterated, or by :meth:`check`)
    ------
    InputError
        The node is not a finished Bluesky ptycho-tomo run: no start document, no
        ``apt_stream`` section, no stop document, a frames key without a file, or frames and
        events that do not match.
    """

    def __init__(self, node: Any, address: TiledRunAddress, *, validate: bool = True) -> None:
        self.node = node
        self.address = address
        self.validate = validate
        self.stats = {"documents": 0, "events": 0, "frames": 0}
        md = dict(node.metadata or {})
        where = f"{address.tiled_path} on {address.api_uri}"
        start = md.get("start")
        if not isinstance(start, Mapping) or "uid" not in start:
            raise InputError(f"{where} is not a Bluesky run (its metadata has no start document)")
        self.start = _plain(dict(start))
        self.run_uid = str(self.start["uid"])
        if APT_KEY not in self.start:
            raise InputError(
                f"run {self.run_uid} ({where}) is not a ptycho-tomo scan: its start document has "
                f"no {APT_KEY!r} section (plan_name {self.start.get('plan_name')!r})")
        try:
            self.info = parse_start_metadata(self.start)
        except DocumentError as exc:
            raise InputError(f"run {self.run_uid} ({where}): {exc}") from None
        stop = md.get("stop")
        if not isinstance(stop, Mapping) or not stop:
            raise InputError(
                f"run {self.run_uid} ({where}) has no stop document yet (still acquiring, or its "
                "writer failed): reconstruct it once it has one")
        self.stop = _plain(dict(stop))
        self.where = where

    @property
    def raw_run(self) -> dict[str, Any]:
        return raw_run_link(self.run_uid, self.address.tiled_path, self.address.api_uri)

    def _stream_nodes(self) -> dict[str, Any]:
        streams = {}
        for name in self.info.streams.values():
            try:
                streams[name] = self.node[name]
            except KeyError:
                raise InputError(f"run {self.run_uid} ({self.where}) has no {name!r} stream") from None
        return streams

    @staticmethod
    def _descriptors(stream: Any) -> list[dict]:
        descs = getattr(stream, "descriptors", None)
        if descs:
            return [_plain(dict(d)) for d in descs]
        md = dict(stream.metadata or {})
        return [_plain({k: v for k, v in md.items() if k not in ("_config_updates",)})]

    @staticmethod
    def _base(stream: Any) -> Any:
        return getattr(stream, "base", stream)

    def _frames_resource(self, stream: Any, desc: dict) -> tuple[dict, int]:
        key = self.info.data_keys.frames
        try:
            node = self._base(stream)[key]
        except KeyError:
            raise InputError(f"run {self.run_uid} ({self.where}): stream "
                             f"{self.info.streams['frames']!r} has no {key!r} array") from None
        sources = node.data_sources() if callable(getattr(node, "data_sources", None)) else None
        if not sources:
            raise InputError(f"run {self.run_uid} ({self.where}): {key!r} has no data source "
                             "(read the node with include_data_sources())")
        source = sources[0]
        assets = list(getattr(source, "assets", []) or [])
        if getattr(source, "mimetype", None) != HDF5_MIMETYPE or len(assets) != 1:
            raise InputError(
                f"run {self.run_uid} ({self.where}): {key!r} is stored as "
                f"{getattr(source, 'mimetype', None)!r} in {len(assets)} files; one "
                f"{HDF5_MIMETYPE} file is read")
        params = dict(getattr(source, "parameters", {}) or {})
        shape = tuple(node.shape)
        resource = {
            "uid": f"{self.run_uid}/tiled/{key}",
            "run_start": self.run_uid,
            "data_key": key,
            "mimetype": HDF5_MIMETYPE,
            "uri": assets[0].data_uri,
            "parameters": {"dataset": params.get("dataset"), "chunk_shape": [1, *shape[1:]],
                           "swmr": bool(params.get("swmr", False))},
        }
        return resource, int(shape[0]) if shape else 0

    def _events(self, stream: Any, descriptor_uid: str, skip: set[str]) -> list[dict]:
        try:
            table = self._base(stream)["internal"].read()
        except KeyError:
            return []
        columns = [c for c in table.columns if c not in ("seq_num", "time")]
        data_cols = [c for c in columns if not c.startswith("ts_") and c not in skip]
        ts_cols = {c: "ts_" + c for c in data_cols if "ts_" + c in table.columns}
        events = []
        records = table.to_dict("list")
        for i in range(len(table)):
            seq = int(records["seq_num"][i])
            t = float(records["time"][i])
            events.append({
                "uid": f"{self.run_uid}/tiled/{descriptor_uid}/{seq}",
                "descriptor": descriptor_uid,
                "seq_num": seq,
                "time": t,
                "data": {c: _plain(records[c][i]) for c in data_cols},
                "timestamps": {c: float(_plain(records[ts_cols[c]][i])) if c in ts_cols else t
                               for c in data_cols},
                "filled": {},
            })
        events.sort(key=lambda e: e["seq_num"])
        return events

    def documents(self) -> Iterator[tuple[str, dict]]:
        """``(name, doc)`` in the order a live listener would see them."""
        streams = self._stream_nodes()
        frames_name, angles_name = self.info.streams["frames"], self.info.streams["angles"]
        yield "start", self.start
        descs = {name: self._descriptors(node) for name, node in streams.items()}
        for name in (frames_name, angles_name):
            for desc in descs[name]:
                desc.setdefault("name", name)
                desc.setdefault("run_start", self.run_uid)
                yield "descriptor", desc
        frames_desc = descs[frames_name][0]
        resource, n_rows = self._frames_resource(streams[frames_name], frames_desc)
        if not isinstance(resource["parameters"]["dataset"], str):
            raise InputError(f"run {self.run_uid} ({self.where}): the frames' data source has "
                             "no 'dataset' parameter")
        yield "stream_resource", resource
        frame_events = self._events(streams[frames_name], frames_desc["uid"],
                                    skip={self.info.data_keys.frames})
        angle_events = self._events(streams[angles_name], descs[angles_name][0]["uid"], skip=set())
        if n_rows != len(frame_events):
            raise InputError(
                f"run {self.run_uid} ({self.where}): {n_rows} stored frames but "
                f"{len(frame_events)} {frames_name!r} events; they must match one to one")
        self.stats["frames"] = n_rows
        # Frame i of the file belongs to the i-th event (TiledWriter stacks the stream datums'
        # rows in order); events of both streams in the order they were taken.
        row_of = {e["seq_num"]: i for i, e in enumerate(frame_events)}
        merged = sorted([(e["time"], 0, e) for e in frame_events]
                        + [(e["time"], 1, e) for e in angle_events],
                        key=lambda item: (item[0], item[1], item[2]["seq_num"]))
        for _, kind, event in merged:
            if kind == 0:
                seq, row = event["seq_num"], row_of[event["seq_num"]]
                yield "stream_datum", {
                    "uid": f"{resource['uid']}/{seq}", "stream_resource": resource["uid"],
                    "descriptor": frames_desc["uid"],
                    "indices": {"start": row, "stop": row + 1},
                    "seq_nums": {"start": seq, "stop": seq + 1},
                }
            yield "event", event
        yield "stop", self.stop

    def __iter__(self) -> Iterator[tuple[str, dict]]:
        for name, doc in self.documents():
            if self.validate:
                try:
                    validate_document(name, doc)
                except DocumentError as exc:
                    raise InputError(f"run {self.run_uid} ({self.where}): {exc}") from None
            self.stats["documents"] += 1
            if name == "event":
                self.stats["events"] += 1
            yield name, doc

    def run(self, callback: Callable[[str, dict], object], *, on_idle=None) -> None:
        for name, doc in self:
            callback(name, doc)
        if on_idle is not None:
            on_idle()


def open_tiled_run(uri: str | TiledRunAddress, *, api_key: str | None = None,
                   timeout_s: float = 30.0, validate: bool = True) -> TiledRunSource:
    """Connect to the run's server and open the run ``uri`` names.

    Raises
    ------
    InputError
        A malformed address, no node at the path (the message names the container and the uid),
        or a node that is not a finished ptycho-tomo run.
    ServiceError
        The server cannot be reached or refuses the key (the key is never in the message).
    """
    address = uri if isinstance(uri, TiledRunAddress) else parse_tiled_uri(uri)
    node = _connect(address, api_key, timeout_s)
    walked: list[str] = []
    for key in address.path:
        try:
            node = node[key]
        except KeyError:
            here = "/".join(walked) or "the root"
            what = "run" if len(walked) == len(address.path) - 1 else "container"
            raise InputError(f"no {what} {key!r} in {here} on {address.api_uri}") from None
        except Exception as exc:
            raise ServiceError(f"Tiled at {address.api_uri} failed on {address.tiled_path}: "
                               f"{type(exc).__name__}") from None
        walked.append(key)
    return TiledRunSource(node, address, validate=validate)


def _connect(address: TiledRunAddress, api_key: str | None, timeout_s: float) -> Any:
    """A Tiled client on the server's root that lists data sources (the frames file)."""
    import httpx
    from tiled.client import from_uri

    loopback = urlsplit(address.api_uri).hostname in ("127.0.0.1", "localhost", "::1")
    try:
        root = from_uri(address.api_uri, api_key=api_key, structure_clients="numpy",
                        timeout=httpx.Timeout(timeout_s), trust_env=not loopback)
    except Exception as exc:
        text = str(exc).replace(api_key, "***") if api_key else str(exc)
        raise ServiceError(f"cannot use Tiled at {address.api_uri}: {type(exc).__name__}: "
                           f"{text}") from None
    return root.include_data_sources()


# -- reconstructing it ----------------------------------------------------------------------------
def feed_run(source: Iterable[tuple[str, dict]], emit: Callable[[Message], object], *,
             data_roots: Any, consumers: Iterable[Callable[[str, dict], object]] = (),
             max_batch_frames: int = 64, data_wait_s: float = 5.0,
             drain_timeout_s: float = 60.0) -> dict[str, Any]:
    """Push a stored run's documents through the live pipeline and assembler into ``emit``.

    The same :class:`~apt_stream.stream.pipeline.DocumentPipeline` (order, de-duplication) and
    :class:`~apt_stream.stream.assembler.RunAssembler` (probe and frames read from their files
    under ``data_roots``, in a child process) as a live listener; ``consumers`` see the documents
    too. A document the assembler refuses (a file outside the data roots, say) raises: a stored
    run is either reconstructed whole or not at all.

    Returns the assembler's counters and its problem reports.
    """
    from apt_stream.stream.assembler import RunAssembler
    from apt_stream.stream.pipeline import DocumentPipeline

    stopped: list[RunStopped] = []

    def emit_and_watch(message: Message) -> object:
        if isinstance(message, RunStopped):
            stopped.append(message)
        return emit(message)

    assembler = RunAssembler(emit_and_watch, data_roots=data_roots,
                             max_batch_frames=max_batch_frames, data_wait_s=data_wait_s,
                             run_idle_timeout_s=None)
    pipeline = DocumentPipeline([*consumers, assembler], recovery=None, strict=True)
    t0 = time.perf_counter()
    try:
        for name, doc in source:
            try:
                pipeline(name, doc)
            except DocumentError as exc:
                raise InputError(str(exc)) from None
        if not assembler.drain(timeout_s=drain_timeout_s):
            raise ServiceError(f"frames still unread after {drain_timeout_s:g} s: "
                               f"{list(assembler.problems)[-3:]}")
    finally:
        assembler.close()
    if not stopped:
        raise InputError("the run's documents ended without the assembler finishing it: "
                         f"{list(assembler.problems)[-3:]}")
    return {**assembler.stats, "problems": list(assembler.problems),
            "feed_s": round(time.perf_counter() - t0, 3)}


def reconstruct_stored(source: TiledRunSource | Iterable[tuple[str, dict]], sink: Any, *,
                       engine_factory: Callable, reconstruct_fn: Callable, policy: Any = None,
                       data_roots: Any, link_raw_run: bool = True,
                       timeout_s: float | None = 3600.0, **feed_options: Any) -> dict[str, Any]:
    """Reconstruct a stored run exactly as a live one: source -> pipeline -> assembler ->
    :class:`~apt_stream.stream.live.LiveReconstructor` (engine, trigger) -> ``sink``.

    With ``link_raw_run`` the run header (hence the reconstruction's metadata) carries the
    source's ``raw_run`` link. Returns ``{"run_uid", "status", "run", "assembler", "live"}``.
    """
    from apt_stream.stream.live import LiveReconstructor

    live = LiveReconstructor(sink, engine_factory=engine_factory, reconstruct_fn=reconstruct_fn,
                             policy=policy)
    emit: Callable[[Message], object] = live.submit
    raw = getattr(source, "raw_run", None) if link_raw_run else None
    if raw:
        emit = with_raw_run(emit, lambda uid: raw if uid == raw["uid"] else None)
    try:
        fed = feed_run(source, emit, data_roots=data_roots, **feed_options)
        if not live.wait_idle(timeout_s):
            raise ServiceError(f"the reconstruction did not finish within {timeout_s:g} s")
    finally:
        live.close()
    run_uid = getattr(source, "run_uid", None) or next(iter(live.run_stats), None)
    stats = dict(live.run_stats.get(run_uid, {}))
    return {"run_uid": run_uid, "status": stats.get("status"), "run": stats, "assembler": fed,
            "live": live.metrics()}
