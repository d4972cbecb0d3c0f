"""Property-based fuzzing of the listener's input: nothing a socket delivers may escape.

The property everywhere: ``ZmqDocumentSource._handle(message)`` (strict=False) returns None or a
``(name, dict)`` pair and never raises, and what it returns passes ``check_structure`` and the
event-model schema. Inputs: random bytes, truncated and byte-mutated encodings of real documents
(an apt-stream run composed with event_model), nesting up to 100,000 levels, wrong types in every
field, headers claiming huge lengths, and the committed corpus (tests/corpus/) of every message
class that ever broke the listener. One level up, a :class:`DocumentPipeline` feeding a
:class:`RunAssembler` is given two interleaved runs with documents dropped, duplicated, reordered
and mutated, and must neither raise nor hang.

Runs are deterministic (``derandomize=True``, no example database), so CI sees the same examples
every time. ``APT_FUZZ_SCALE=10`` multiplies every example count for a longer local hunt and
``APT_FUZZ_PROFILE=apt-stream-fuzz-random`` draws fresh random examples instead.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Iterator

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apt_stream.stream import DocumentPipeline, RunAssembler
from apt_stream.stream.decode import DOCUMENT_NAMES, PROBE_NAME, encode_json, encode_msgpack
from apt_stream.stream.limits import MessageLimits, check_structure
from apt_stream.stream.paths import file_uri
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
from apt_stream.stream.source import ZmqDocumentSource
from apt_stream.stream.validate import validate_document

# -- settings -----------------------------------------------------------------------------------

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
settings.register_profile("apt-stream-fuzz", derandomize=True, **_COMMON)
settings.register_profile("apt-stream-fuzz-random", derandomize=False, **_COMMON)
PROFILE = settings.get_profile(os.environ.get("APT_FUZZ_PROFILE", "apt-stream-fuzz"))
SCALE = float(os.environ.get("APT_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> settings:
    """This module's profile with ``examples`` examples (times APT_FUZZ_SCALE)."""
    return settings(PROFILE, max_examples=max(1, int(examples * SCALE)))


# -- real documents -----------------------------------------------------------------------------

def compose_apt_run(root: pathlib.Path, tag: str, *, n_angles: int = 2,
                    frames_per_angle: int = 2) -> list[tuple[str, dict]]:
    """A whole apt-stream run as the plan publishes it (ScanFileSource's shape), with fixed uids
    and times so the fuzz examples are the same on every machine. The probe and frames files it
    names do not exist (the assembler refuses the start; that is fine here)."""
    from event_model import compose_run

    keys = DataKeyMap()
    h = w = 8
    section = build_start_metadata(
        energy_kev=8.8, detector_distance_m=1.5, detector_pixel_m=75e-6, object_pixel_m=1e-8,
        field_shape=(32, 32), frame_shape=(h, w), n_slices=1,
        slice_spacing_m=[1e-6] * n_angles, angles_deg=[17.0 * n for n in range(n_angles)],
        frames_per_angle=[frames_per_angle] * n_angles, volume_shape_zyx=(4, 32, 32),
        probe_uri=file_uri(root / f"{tag}-probe.h5"), probe_shape=(1, h, w),
        run_dir=str(root), preset="tiny", sample=f"sample-{tag}", data_keys=keys,
    )
    bundle = compose_run(uid=f"run-{tag}", time=1000.0,
                         metadata={"plan_name": "fuzz", "scan_id": 1, APT_KEY: section})
    docs: list[tuple[str, dict]] = [("start", bundle.start_doc)]
    frames = bundle.compose_descriptor(
        name=FRAMES_STREAM, uid=f"desc-frames-{tag}", time=1000.1,
        data_keys=frames_data_keys(keys, (h, w)),
    )
    angles = bundle.compose_descriptor(
        name=ANGLES_STREAM, uid=f"desc-angles-{tag}", time=1000.2,
        data_keys=angles_data_keys(keys),
    )
    docs += [("descriptor", frames.descriptor_doc), ("descriptor", angles.descriptor_doc)]
    resource = bundle.compose_stream_resource(
        mimetype=HDF5_MIMETYPE, uri=file_uri(root / f"{tag}-frames.h5"), data_key=keys.frames,
        parameters={"dataset": "/entry/data/frames", "chunk_shape": [1, h, w], "swmr": True},
        uid=f"res-{tag}",
    )
    docs.append(("stream_resource", resource.stream_resource_doc))
    seq = 0
    for n in range(n_angles):
        for _ in range(frames_per_angle):
            seq += 1
            docs.append(("stream_datum", resource.compose_stream_datum(
                indices={"start": seq - 1, "stop": seq}, seq_nums={"start": seq, "stop": seq + 1},
                descriptor=frames.descriptor_doc)))
            t = 1001.0 + seq
            docs.append(("event", frames.compose_event(
                data={keys.angle_index: n, keys.angle_deg: 17.0 * n,
                      keys.position_y_px: 1.0 * seq, keys.position_x_px: 2.0},
                timestamps={k: t for k in (keys.angle_index, keys.angle_deg,
                                           keys.position_y_px, keys.position_x_px)},
                seq_num=seq, uid=f"ev-{tag}-{seq}", time=t)))
        docs.append(("event", angles.compose_event(
            data={keys.done_angle_index: n, keys.done_angle_deg: 17.0 * n,
                  keys.done_n_frames: frames_per_angle},
            timestamps=dict.fromkeys((keys.done_angle_index, keys.done_angle_deg,
                                      keys.done_n_frames), 1100.0 + n),
            seq_num=n + 1, uid=f"angle-{tag}-{n}", time=1100.0 + n)))
    docs.append(("stop", bundle.compose_stop(exit_status="success", reason="fuzz",
                                             uid=f"stop-{tag}", time=1200.0)))
    return docs


ROOT = pathlib.Path("/nonexistent-apt-stream-fuzz-root")
RUN_A = compose_apt_run(ROOT, "a")
RUN_B = compose_apt_run(ROOT, "b", n_angles=3, frames_per_angle=1)
REAL = RUN_A + RUN_B + [
    ("start", {"uid": "plain", "time": 1.0, "scan_id": 1, "nested": {"list": [1, 2.5, "x"]}}),
    ("event_page", {"uid": ["p1", "p2"], "time": [1.0, 2.0], "descriptor": "desc-frames-a",
                    "seq_num": [1, 2], "data": {"rot": [0.0, 1.0]},
                    "timestamps": {"rot": [1.0, 2.0]}, "filled": {}}),
    (PROBE_NAME, {"token": "t"}),
]
ENCODERS = {"msgpack": encode_msgpack, "json": encode_json}


def message_of(name: str, doc: dict, encoding: str, prefix: bytes = b"") -> bytes:
    return b" ".join([prefix, name.encode(), ENCODERS[encoding](doc)])


# -- the property ---------------------------------------------------------------------------------

SOURCES = {s: ZmqDocumentSource("tcp://127.0.0.1:1", serializer=s, strict=False)
           for s in ("msgpack", "json", "auto")}
LIMITS = MessageLimits()


def assert_handled(message: bytes) -> list[tuple[str, dict] | None]:
    """The property: every source returns None or a checked (name, doc); nothing escapes."""
    results = []
    for source in SOURCES.values():
        before = source.stats.received
        result = source._handle(message)  # an exception here fails the test: the property
        assert source.stats.received == before + 1
        if result is not None:
            name, doc = result
            assert isinstance(name, str) and name in DOCUMENT_NAMES
            assert isinstance(doc, dict)
            check_structure(doc, LIMITS)
            validate_document(name, doc)
        results.append(result)
    return results


def test_real_documents_pass_unharmed():
    """The fuzz seeds themselves are valid: mutations start from documents that get through."""
    for name, doc in REAL:
        for encoding in ENCODERS:
            message = message_of(name, doc, encoding)
            handled = SOURCES[encoding]._handle(message)
            if name == PROBE_NAME:
                assert handled is None
            else:
                assert handled == (name, json.loads(json.dumps(doc))), (name, encoding)


# -- raw bytes ------------------------------------------------------------------------------------

@fuzz(500)
@given(st.binary(max_size=2048), st.sampled_from(sorted(DOCUMENT_NAMES) + ["", "x", PROBE_NAME]))
def test_random_bytes(payload, name):
    assert_handled(payload)
    assert_handled(b" " + name.encode() + b" " + payload)


@fuzz(500)
@given(st.data())
def test_truncated_and_mutated_real_documents(data):
    name, doc = data.draw(st.sampled_from(REAL), label="document")
    encoding = data.draw(st.sampled_from(sorted(ENCODERS)), label="encoding")
    message = bytearray(message_of(name, doc, encoding))
    n = len(message)
    mutation = data.draw(st.sampled_from(["truncate", "flip", "insert", "delete", "splice"]))
    if mutation == "truncate":
        message = message[: data.draw(st.integers(0, n - 1))]
    elif mutation == "flip":
        for pos, byte in data.draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)),
                                            min_size=1, max_size=8)):
            message[pos] = byte
    elif mutation == "insert":
        pos = data.draw(st.integers(0, n))
        message[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    elif mutation == "delete":
        lo = data.draw(st.integers(0, n - 1))
        del message[lo: data.draw(st.integers(lo + 1, n))]
    else:  # two documents' bytes glued at random points
        other_name, other = data.draw(st.sampled_from(REAL))
        tail = message_of(other_name, other, encoding)
        message = message[: data.draw(st.integers(0, n))] + tail[data.draw(
            st.integers(0, len(tail))):]
    assert_handled(bytes(message))


# -- nesting --------------------------------------------------------------------------------------

DEPTHS = st.one_of(st.integers(1, 64), st.integers(1, 100_000),
                   st.sampled_from([31, 32, 33, 999, 1000, 1001, 1023, 1024, 1025, 100_000]))


def nested_payload(kind: str, depth: int, closed: bool) -> bytes:
    if kind == "json-list":
        return b"[" * depth + (b"]" * depth if closed else b"")
    if kind == "json-map":
        return b'{"a":' * depth + (b"1" + b"}" * depth if closed else b"")
    if kind == "json-in-doc":
        return (b'{"uid":"u","time":1,"x":' + b"[" * depth
                + (b"]" * depth + b"}" if closed else b""))
    if kind == "msgpack-list":
        return b"\x91" * depth + (b"\xc0" if closed else b"")
    if kind == "msgpack-map":
        return b"\x81\xa1a" * depth + (b"\xc0" if closed else b"")
    # msgpack-in-doc: a start document whose 'x' nests depth levels
    return b"\x83\xa3uid\xa1u\xa4time\x01\xa1x" + b"\x91" * depth + (b"\xc0" if closed else b"")


@fuzz(200)
@given(st.sampled_from(["json-list", "json-map", "json-in-doc", "msgpack-list", "msgpack-map",
                        "msgpack-in-doc"]), DEPTHS, st.booleans(),
       st.sampled_from(["start", "event", "stop"]))
def test_deep_nesting(kind, depth, closed, name):
    results = assert_handled(b" " + name.encode() + b" " + nested_payload(kind, depth, closed))
    if depth > LIMITS.max_depth:
        assert results == [None, None, None]


# -- wrong types ----------------------------------------------------------------------------------

JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)


def paths_of(doc) -> Iterator[tuple]:
    """Every path to a value in a document (keys and list indices)."""
    stack = [((), doc)]
    while stack:
        path, obj = stack.pop()
        items = obj.items() if isinstance(obj, dict) else enumerate(obj) \
            if isinstance(obj, list) else ()
        for key, value in items:
            yield (*path, key)
            stack.append(((*path, key), value))


PATHS = [(i, path) for i, (_, doc) in enumerate(REAL) for path in paths_of(doc)]


def set_at(doc, path, value, *, delete=False):
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


@fuzz(500)
@given(st.sampled_from(PATHS), JSON_VALUES, st.booleans(), st.sampled_from(sorted(ENCODERS)))
def test_wrong_types_in_every_field(where, value, delete, encoding):
    index, path = where
    name, doc = REAL[index]
    mutated = set_at(doc, path, value, delete=delete and isinstance(path[-1], str))
    assert_handled(message_of(name, mutated, encoding))


@fuzz(100)
@given(st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=12),
       st.sampled_from(sorted(DOCUMENT_NAMES)), st.sampled_from(sorted(ENCODERS)))
def test_arbitrary_json_documents(doc, name, encoding):
    assert_handled(message_of(name, doc, encoding))


@fuzz(100)
@given(st.dictionaries(st.one_of(st.integers(-5, 5), st.binary(max_size=4), st.text(max_size=4)),
                       st.one_of(JSON_SCALARS, st.binary(max_size=8)), max_size=6),
       st.sampled_from(["start", "event"]))
def test_msgpack_only_types(doc, name):
    """msgpack can carry what JSON cannot: int and bytes keys, binary values."""
    assert_handled(b" " + name.encode() + b" " + msgpack.packb(doc, use_bin_type=True,
                                                                  strict_types=False))


# -- huge claimed lengths ---------------------------------------------------------------------------

HEADERS = {  # msgpack type byte -> width of its length field
    b"\xd9": 1, b"\xda": 2, b"\xdb": 4,  # str8/16/32
    b"\xc4": 1, b"\xc5": 2, b"\xc6": 4,  # bin8/16/32
    b"\xdc": 2, b"\xdd": 4,  # array16/32
    b"\xde": 2, b"\xdf": 4,  # map16/32
    b"\xc7": 1, b"\xc8": 2, b"\xc9": 4,  # ext8/16/32 (a type byte follows the length)
}


@fuzz(200)
@given(st.sampled_from(sorted(HEADERS)), st.integers(0, 2**32 - 1), st.binary(max_size=64),
       st.sampled_from(REAL), st.integers(0, 10_000), st.booleans())
def test_huge_claimed_lengths(type_byte, length, tail, real, at, alone):
    width = HEADERS[type_byte]
    header = type_byte + (length % (1 << (8 * width))).to_bytes(width, "big")
    if type_byte in (b"\xc7", b"\xc8", b"\xc9"):
        header += b"\x01"
    if alone:
        payload = header + tail
    else:  # the header spliced into a real document's encoding
        encoded = encode_msgpack(real[1])
        at %= len(encoded)
        payload = encoded[:at] + header + tail + encoded[at + 1:]
    assert_handled(b" start " + payload)


# -- the corpus ------------------------------------------------------------------------------------

def _load_corpus_tool():
    path = pathlib.Path(__file__).parent / "corpus" / "corpus_tool.py"
    spec = importlib.util.spec_from_file_location("apt_stream_corpus_tool", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


corpus_tool = _load_corpus_tool()
CORPUS = corpus_tool.load_index()


def test_corpus_is_complete():
    files = {p.name for p in corpus_tool.MESSAGES.glob("*.bin")}
    assert files == {e.file for e in CORPUS}, "every .bin needs an index.json record and back"
    assert len(CORPUS) >= 30
    attacker = next(e for e in CORPUS if e.file == "nested-start-300.bin")
    assert 900 < len(attacker.message()) < 1100


@pytest.mark.parametrize("entry", CORPUS, ids=[e.file for e in CORPUS])
def test_corpus_message_is_dropped_with_its_reason(entry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the armed pickle would drop its marker
    message = entry.message()
    source = ZmqDocumentSource("tcp://127.0.0.1:1", serializer=entry.serializer)
    assert source._handle(message) is None
    assert source.stats.dropped == 1, f"{entry.file}: not dropped ({entry.why})"
    assert _search(entry.reason, source.stats.last_error), (entry.file, source.stats.last_error)
    # Whatever the listener's serializer, it is never delivered and nothing escapes.
    assert assert_handled(message) == [None, None, None]
    assert not (tmp_path / corpus_tool.PICKLE_MARKER).exists()


def _search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None


def test_the_corpus_pickle_is_armed_and_never_loaded(tmp_path, monkeypatch):
    """The marker pickle really runs code when unpickled (in a child process, in tmp_path), and
    no source loads it unless allow_pickle=True."""
    entry = next(e for e in CORPUS if e.file == "pickle-touch-marker.bin")
    payload = entry.message().split(b" ", 2)[2]
    (tmp_path / "payload.pickle").write_bytes(payload)
    armed = tmp_path / "armed"
    armed.mkdir()
    subprocess.run([sys.executable, "-c", "import pickle, sys; "
                    "pickle.loads(open(sys.argv[1], 'rb').read())",
                    str(tmp_path / "payload.pickle")], cwd=armed, check=True, timeout=60)
    assert (armed / corpus_tool.PICKLE_MARKER).exists()
    monkeypatch.chdir(tmp_path)
    for serializer in ("msgpack", "json", "auto"):
        source = ZmqDocumentSource("tcp://127.0.0.1:1", serializer=serializer)
        assert source._handle(entry.message()) is None
    assert not (tmp_path / corpus_tool.PICKLE_MARKER).exists()


def test_corpus_tool_adds_a_message(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_tool, "MESSAGES", tmp_path)
    monkeypatch.setattr(corpus_tool, "INDEX", tmp_path / "index.json")
    assert corpus_tool.main(["add", "new-one", "--why", "test", "--reason", "prefix name",
                             "--hex", "00ff"]) == 0
    (entry,) = corpus_tool.load_index()
    assert entry.message() == b"\x00\xff" and entry.reason == "prefix name"
    with pytest.raises(FileExistsError):
        corpus_tool.add_message("new-one", b"x", why="again", reason="x")
    with pytest.raises(ValueError, match="corpus name"):
        corpus_tool.add_message("../escape", b"x", why="no", reason="x")


@fuzz(300)
@given(st.sampled_from(CORPUS), st.data())
def test_mutated_corpus_messages(entry, data):
    message = bytearray(entry.message())
    if message:
        for pos, byte in data.draw(st.lists(st.tuples(st.integers(0, len(message) - 1),
                                                      st.integers(0, 255)), max_size=4)):
            message[pos] = byte
        message = message[: data.draw(st.integers(0, len(message)))]
    assert_handled(bytes(message))


# -- the pipeline ------------------------------------------------------------------------------------

OPS = st.lists(st.tuples(st.sampled_from(["drop", "duplicate", "swap", "move", "mutate"]),
                         st.integers(0, 10_000), st.integers(0, 10_000)), max_size=12)


INTERLEAVE = st.lists(st.booleans(), min_size=len(RUN_A) + len(RUN_B),
                      max_size=len(RUN_A) + len(RUN_B))


@fuzz(150)
@given(INTERLEAVE, OPS, st.data())
def test_pipeline_survives_broken_streams(tmp_path_factory, interleave, ops, data):
    """What a listener does: the stream passes the source (decode, limits, schema), then the
    pipeline and the assembler; neither may raise or hang whatever was dropped, repeated,
    reordered or mutated. The probe files do not exist, so the assembler refuses the starts."""
    root = tmp_path_factory.mktemp("fuzz-root")
    run_broken_stream((RUN_A, RUN_B), root, interleave, ops, data)


@pytest.fixture(scope="module")
def runs_with_files(tmp_path_factory):
    """The two runs with their probe and frames files on disk, and one frame reader for all
    examples (its child process starts once)."""
    import h5py
    import numpy as np

    from apt_stream.stream.detector_files import FrameReader

    root = tmp_path_factory.mktemp("fuzz-files")
    runs = (compose_apt_run(root, "a"), compose_apt_run(root, "b", n_angles=3,
                                                        frames_per_angle=1))
    rng = np.random.default_rng(0)
    for tag, n_frames in (("a", 4), ("b", 3)):
        with h5py.File(root / f"{tag}-probe.h5", "w") as fh:
            fh["/probe/modes"] = (rng.random((1, 8, 8)) + 1j).astype(np.complex64)
        with h5py.File(root / f"{tag}-frames.h5", "w") as fh:
            fh["/entry/data/frames"] = rng.random((n_frames, 8, 8)).astype(np.float32)
    reader = FrameReader(timeout_s=10.0)
    yield runs, root, reader
    reader.close()


def test_unbroken_runs_with_files_assemble(runs_with_files):
    """The seed of the next test is not vacuous: intact, the two runs assemble in full."""
    runs, root, reader = runs_with_files
    emitted = run_broken_stream(runs, root, [True] * (len(runs[0]) + len(runs[1])), [], None,
                                reader=reader)
    kinds = [type(m).__name__ for m in emitted]
    assert kinds.count("RunHeader") == 2 and kinds.count("RunStopped") == 2
    assert sum(m.frames.shape[0] for m in emitted if type(m).__name__ == "FrameBatch") == 7


@fuzz(60)
@given(INTERLEAVE, OPS, st.data())
def test_pipeline_survives_broken_streams_of_runs_it_assembles(runs_with_files, interleave,
                                                               ops, data):
    """The same with the probe and frames on disk: the assembler opens the runs and reads
    frames, so the broken streams reach all of its bookkeeping."""
    runs, root, reader = runs_with_files
    emitted = run_broken_stream(runs, root, interleave, ops, data, reader=reader)
    assert all(type(m).__name__ in ("RunHeader", "FrameBatch", "RunStopped") for m in emitted)


def test_pipeline_given_unvalidated_non_string_uids_drops_them():
    seen = []
    pipeline = DocumentPipeline([lambda name, doc: seen.append(name)], strict=False)
    pipeline("start", {"uid": [], "time": 1.0})
    pipeline("descriptor", {"uid": {}, "run_start": ["x"], "time": 1.0})
    pipeline("event", {"uid": "e", "descriptor": [1], "time": 1.0})
    assert seen == [] and pipeline.stats["orphans_dropped"] == 3


def run_broken_stream(runs, root, interleave, ops, data, *, reader=None) -> list:
    """Interleave two runs, break the stream with ``ops``, pass it through a source into a
    pipeline + assembler; returns what the assembler emitted."""
    a, b = list(runs[0]), list(runs[1])
    stream = []
    for pick_a in interleave:  # each run keeps its order; the two interleave
        if (pick_a and a) or not b:
            stream.append(a.pop(0))
        elif b:
            stream.append(b.pop(0))
    stream = [(name, copy.deepcopy(doc)) for name, doc in stream]
    for op, i, j in ops:
        if not stream:
            break
        i %= len(stream)
        j %= len(stream)
        if op == "drop":
            del stream[i]
        elif op == "duplicate":
            stream.insert(j, copy.deepcopy(stream[i]))
        elif op == "swap":
            stream[i], stream[j] = stream[j], stream[i]
        elif op == "move":
            stream.insert(j, stream.pop(i))
        else:
            name, doc = stream[i]
            paths = list(paths_of(doc))
            if paths:
                path = paths[j % len(paths)]
                stream[i] = (name, set_at(doc, path, data.draw(JSON_VALUES, label="value")))
    collected: list = []
    emitted: list = []
    assembler = RunAssembler(emitted.append, data_roots=[root], reader=reader, data_wait_s=0.05)
    pipeline = DocumentPipeline([lambda name, doc: collected.append(name), assembler],
                                strict=False)
    source = ZmqDocumentSource("tcp://127.0.0.1:1", serializer="msgpack")
    began = time.monotonic()
    try:
        for name, doc in stream:
            try:
                message = message_of(name, doc, "msgpack")
            except (TypeError, ValueError, OverflowError):
                continue  # not encodable: a publisher could not have sent it
            item = source._handle(message)  # only checked documents reach the pipeline
            if item is not None:
                pipeline(*item)
        pipeline.retry_orphans()
        assembler.flush()
    finally:
        assembler.close()
    assert time.monotonic() - began < 30.0
    assert len(collected) <= len(stream)
    return emitted
