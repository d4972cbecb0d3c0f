"""Safe decoding of 0MQ messages and per-document validation."""

from __future__ import annotations

import json
import logging
import pickle
import threading
import time

import msgpack
import numpy as np
import pytest

from apt_stream.errors import ConfigError, DocumentError
from apt_stream.stream.decode import (
    PROBE_NAME,
    decode_message,
    decode_payload,
    encode_json,
    encode_msgpack,
    encoder_for,
    probe_message,
)
from apt_stream.stream.limits import MessageLimits, check_structure
from apt_stream.stream.source import FileDocumentSource, ZmqDocumentSource
from apt_stream.stream.validate import validate_document

START = {"uid": "abc", "time": 1.0, "scan_id": 1, "nested": {"list": [1, 2.5, "x"]}}


@pytest.mark.parametrize("serializer", ["msgpack", "json", "auto"])
@pytest.mark.parametrize("prefix", [b"", b"beamline"])
def test_round_trip(serializer, prefix):
    encode = encode_json if serializer == "json" else encode_msgpack
    message = b" ".join([prefix, b"start", encode(START)])
    assert decode_message(message, serializer=serializer, prefix=prefix) == ("start", START)


def test_numpy_values_serialise():
    doc = {"a": np.float32(1.5), "b": np.int64(7), "c": np.arange(3), "d": np.bool_(True)}
    for encode, serializer in ((encode_msgpack, "msgpack"), (encode_json, "json")):
        assert decode_payload(encode(doc), serializer=serializer) == {
            "a": 1.5, "b": 7, "c": [0, 1, 2], "d": True
        }
    with pytest.raises(TypeError, match="object"):
        encode_msgpack({"x": object()})


def test_other_prefix_is_skipped_not_an_error():
    message = b"other start " + encode_msgpack(START)
    assert decode_message(message, prefix=b"mine") is None


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (b"\x00\x01garbage", "prefix name payload"),
        (b" start \xc1\xc1\xc1", "msgpack"),
        (b" start " + msgpack.packb([1, 2]), "expected a mapping"),
        (b" nonsense " + encode_msgpack(START), "unknown document name"),
        (b" \xff\xfe " + encode_msgpack(START), "not ASCII"),
    ],
)
def test_bad_messages_raise_document_error(message, match):
    with pytest.raises(DocumentError, match=match):
        decode_message(message)


@pytest.mark.parametrize("serializer", ["msgpack", "json", "auto", "pickle"])
def test_pickle_refused_unless_allowed(serializer):
    payload = pickle.dumps(START)
    message = b" start " + payload
    with pytest.raises(DocumentError, match="allow_pickle"):
        decode_message(message, serializer=serializer)
    if serializer in ("auto", "pickle"):
        assert decode_message(message, serializer=serializer, allow_pickle=True) == ("start", START)
    else:
        # Even when allowed, a msgpack/json listener does not unpickle.
        with pytest.raises(DocumentError):
            decode_message(message, serializer=serializer, allow_pickle=True)


def test_probe_and_encoder_lookup():
    assert decode_message(probe_message(token="t")) == (PROBE_NAME, {"token": "t"})
    assert encoder_for("json") is encode_json
    with pytest.raises(DocumentError, match="pickle"):
        encoder_for("pickle")


def test_validation_names_the_problem():
    validate_document("start", {"uid": "a", "time": 1.0})
    with pytest.raises(DocumentError, match=r"invalid start document \(uid 'a'\).*'time'"):
        validate_document("start", {"uid": "a"})
    with pytest.raises(DocumentError, match=r"at 'seq_num'"):
        validate_document(
            "event",
            {"uid": "e", "time": 1.0, "descriptor": "d", "seq_num": "one", "data": {},
             "timestamps": {}},
        )
    with pytest.raises(DocumentError, match="unknown document name"):
        validate_document("begin", {})
    with pytest.raises(DocumentError, match="deprecated"):
        validate_document("bulk_events", {})


# -- bounds on what one message may cost (apt_stream.stream.limits) -------------------------------

def nested(depth: int) -> dict:
    """A start document whose ``x`` chain makes it ``depth`` levels deep (the document is 1)."""
    doc = {"uid": "deep", "time": 1.0}
    cur = doc
    for _ in range(depth - 1):
        cur["x"] = {}
        cur = cur["x"]
    return doc


def test_check_structure_names_what_is_wrong():
    limits = MessageLimits(max_depth=4, max_items=20, max_string_len=5, max_list_len=3,
                           max_map_len=4)
    check_structure({"a": [1, {"b": "xyz"}], "c": None}, limits)
    check_structure(nested(4), limits)
    with pytest.raises(DocumentError, match=r"nests deeper than 4 levels \(at 'x/x/x/x'\)"):
        check_structure(nested(5), limits)
    with pytest.raises(DocumentError, match="more than 20 items"):
        check_structure({"a": [[0, 0, 0]] * 3, "b": [[0, 0, 0]] * 3}, limits)
    with pytest.raises(DocumentError, match=r"string of 6 characters at 'a/0'"):
        check_structure({"a": ["abcdef"]}, limits)
    with pytest.raises(DocumentError, match=r"map key of 6 characters"):
        check_structure({"abcdef": 1}, limits)
    with pytest.raises(DocumentError, match=r"list of 4 items at 'a'"):
        check_structure({"a": [1, 2, 3, 4]}, limits)
    with pytest.raises(DocumentError, match=r"mapping of 5 entries"):
        check_structure(dict.fromkeys("abcde", 1), limits)
    with pytest.raises(DocumentError, match=r"map key 3 at '<document>' is not a string"):
        check_structure({3: 1}, limits)
    with pytest.raises(DocumentError, match=r"bytes value at 'a': documents hold JSON types"):
        check_structure({"a": b"raw"}, limits)
    with pytest.raises(DocumentError, match="expected a mapping"):
        check_structure(7, limits)
    # Iterative: 100,000 levels cost a list, not the interpreter's stack.
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(DocumentError, match="nests deeper than 32 levels"):
        check_structure({"a": deep})
    with pytest.raises(ConfigError, match="max_depth"):
        MessageLimits(max_depth=0)


def test_the_300_deep_start_document_is_dropped_not_fatal():
    """The attacker probe: ~1 kB of nesting made jsonschema raise RecursionError, which killed
    the listener thread."""
    message = b" start " + encode_msgpack(nested(300))
    assert len(message) < 1000
    with pytest.raises(DocumentError, match="nests deeper than 32 levels"):
        decode_message(message)
    # validate_document on its own converts the RecursionError too.
    with pytest.raises(DocumentError, match="nests too deeply to validate"):
        validate_document("start", nested(3000))
    source = ZmqDocumentSource("tcp://127.0.0.1:1")
    assert source._handle(message) is None
    assert source.stats.dropped == 1 and "nests deeper" in source.stats.last_error


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\xdd\xff\xff\xff\xff", r"4294967295 exceeds max_array_len"),  # array32 of 2**32-1
        (b"\xdf\xff\xff\xff\xff", r"exceeds max_map_len"),
        (b"\xdb\xff\xff\xff\xff", r"exceeds max_str_len|incomplete input"),  # nothing allocated
        (b"\x81\xa1s\xdb\x00\x50\x00\x00" + b"x" * (5 << 20), r"exceeds max_str_len"),
        (b"\xc6\xff\xff\xff\xff", r"exceeds max_bin_len|incomplete input"),
        (b"\x81\xa1b\xc4\x01x", r"exceeds max_bin_len\(0\)"),  # bin is never a JSON type
        (b"\x81\xa1e\xd4\x01\x00", r"exceeds max_ext_len\(0\)"),  # nor is ext
        (b"\x91" * 100_000 + b"\xc0", "decoder's stack"),
        (b"\x81\xa1x" * 40 + b"\xc0", "nests deeper than 32 levels"),
        # 300 lists of 1000 empty maps: each list is allowed, the total is not.
        (b"\xde\x01\x2c" + b"".join(b"\xa3k%02x" % (i % 256) + b"\xdc\x03\xe8" + b"\x80" * 1000
                                    for i in range(300)), "more than 200000 items|exceeds"),
    ],
)
def test_msgpack_headers_cannot_claim_big_allocations(payload, match):
    with pytest.raises(DocumentError, match=match):
        decode_message(b" start " + payload)


def test_total_item_budget_while_decoding_msgpack():
    limits = MessageLimits(max_items=1000)
    payload = msgpack.packb({"a": [{} for _ in range(600)], "b": [[] for _ in range(600)]})
    with pytest.raises(DocumentError, match="more than 1000 items"):
        decode_payload(payload, limits=limits)
    assert decode_payload(msgpack.packb({"a": [{}] * 400}), limits=limits) == {"a": [{}] * 400}


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"[" * 100_000, "nests deeper than 32 levels"),
        (b'{"a":' * 100_000, "nests deeper than 32 levels"),
        (b"[" + b"0," * 300_000 + b"0]", "more than 200000 items"),
        (b'["' + b'","' * 900_000 + b'"]', "more than 200000 items"),
        (b"]" * 1_000_000, "more than 200000 items|could not be decoded"),
    ],
)
def test_json_is_scanned_before_it_is_parsed(payload, match):
    with pytest.raises(DocumentError, match=match):
        decode_payload(payload, serializer="json")


def test_json_brackets_inside_strings_do_not_count():
    doc = {"uid": "s", "time": 1.0, "text": "[[[{{{" * 1000 + '\\"[', "n": ",,,," * 100_000}
    assert decode_message(b" start " + encode_json(doc), serializer="json") == ("start", doc)
    limits = MessageLimits(max_depth=3)
    ok = b'{"a":[{"b":"[[[["}]}'
    assert decode_payload(ok, serializer="json", limits=limits) == {"a": [{"b": "[[[["}]}
    with pytest.raises(DocumentError, match="deeper than 3"):
        decode_payload(b'{"a":[{"b":[]}]}', serializer="json", limits=limits)


def test_message_size_is_checked_first():
    limits = MessageLimits(max_message_bytes=100)
    with pytest.raises(DocumentError, match="exceeds the 100-byte limit"):
        decode_message(b" start " + encode_msgpack({"s": "x" * 200}), limits=limits)


def test_huge_json_numbers_and_non_json_types_are_refused():
    with pytest.raises(DocumentError, match="JSON payload could not be decoded"):
        decode_payload(b'{"a":' + b"9" * 10_000 + b"}", serializer="json")
    with pytest.raises(DocumentError, match="Timestamp|ext"):
        decode_message(b" start " + msgpack.packb({"t": msgpack.Timestamp(1)}))
    with pytest.raises(DocumentError, match="bin"):
        decode_message(b" start " + msgpack.packb({"t": b"raw"}, use_bin_type=True))


# -- the source never lets a message or a callback end the loop -----------------------------------

class Boom(Exception):
    pass


def test_handle_swallows_any_exception_unless_strict(monkeypatch, caplog):
    import apt_stream.stream.source as source_module

    def explode(name, doc):
        raise Boom("validator blew up")

    monkeypatch.setattr(source_module, "validate_document", explode)
    source = ZmqDocumentSource("tcp://127.0.0.1:1")
    message = b" start " + encode_msgpack(START)
    with caplog.at_level(logging.WARNING, logger="apt_stream.stream.source"):
        for _ in range(1000):
            assert source._handle(message) is None
    assert source.stats.dropped == 1000 and source.stats.delivered == 0
    assert "Boom while decoding: validator blew up" in source.stats.last_error
    assert source.stats.drop_causes == {"Boom: validator blew up": 1000}
    # Logged once, then at 10, 100 and 1000: not a line per message.
    assert len([r for r in caplog.records if "validator blew up" in r.getMessage()]) == 4
    strict = ZmqDocumentSource("tcp://127.0.0.1:1", strict=True)
    with pytest.raises(Boom):
        strict._handle(message)


def test_causes_group_by_kind_not_by_value():
    source = ZmqDocumentSource("tcp://127.0.0.1:1")
    for uid in ("a", "b", "c"):
        source._handle(b" start " + encode_msgpack({"uid": uid}))
    (cause,) = source.stats.drop_causes
    assert cause.startswith("DocumentError: invalid start document (uid #)")
    assert source.stats.drop_causes[cause] == 3 and len(source.stats.errors) == 3


@pytest.fixture
def pub_socket():
    zmq = pytest.importorskip("zmq")
    context = zmq.Context()
    socket = context.socket(zmq.PUB)
    socket.setsockopt(zmq.LINGER, 0)
    yield zmq, socket
    socket.close(linger=0)
    context.term()


def run_in_thread(source, callback, **kwargs):
    thread = threading.Thread(target=source.run, args=(callback,), kwargs=kwargs, daemon=True)
    thread.start()
    assert source.ready.wait(5)
    return thread


def publish_until(socket, message, done, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        socket.send(message)
        time.sleep(0.02)
    return done()


def test_callback_and_on_idle_errors_do_not_end_the_loop(pub_socket):
    _, pub = pub_socket
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    source = ZmqDocumentSource(f"tcp://127.0.0.1:{port}", poll_timeout_s=0.01)
    calls = {"docs": 0, "idle": 0}

    def callback(name, doc):
        calls["docs"] += 1
        raise Boom("consumer failed")

    def on_idle():
        calls["idle"] += 1
        raise RuntimeError("flush failed")

    thread = run_in_thread(source, callback, on_idle=on_idle)
    try:
        assert publish_until(pub, b" start " + encode_msgpack(START),
                             lambda: calls["docs"] >= 3 and calls["idle"] >= 3)
        assert thread.is_alive()
        assert abs(time.time() - source.stats.last_poll) < 2.0  # the heartbeat is fresh
    finally:
        source.stop()
        thread.join(5)
    assert not thread.is_alive()
    assert source.stats.callback_errors == calls["docs"] + calls["idle"]
    assert source.stats.last_callback_error

    strict = ZmqDocumentSource(f"tcp://127.0.0.1:{port}", poll_timeout_s=0.01, strict=True)
    with pytest.raises(RuntimeError, match="flush failed"):
        strict.run(lambda name, doc: None, on_idle=on_idle)


def test_curve_subscriber_hears_only_the_right_server(pub_socket):
    zmq, pub = pub_socket
    if not zmq.has("curve"):
        pytest.skip("libzmq without CURVE")
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    pub.curve_secretkey = server_secret
    pub.curve_server = True
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    address = f"tcp://127.0.0.1:{port}"
    right = ZmqDocumentSource(address, curve_server_key=server_public.decode(),
                              curve_public_key=client_public.decode(),
                              curve_secret_key=client_secret.decode())
    ephemeral = ZmqDocumentSource(address, curve_server_key=server_public)  # own key pair
    wrong = ZmqDocumentSource(address, curve_server_key=zmq.curve_keypair()[0],
                              curve_public_key=client_public, curve_secret_key=client_secret)
    plain = ZmqDocumentSource(address)
    assert right.curve and ephemeral.curve and not plain.curve
    got: dict[str, list] = {"right": [], "ephemeral": [], "wrong": [], "plain": []}
    sources = {"right": right, "ephemeral": ephemeral, "wrong": wrong, "plain": plain}
    threads = [run_in_thread(src, lambda n, d, k=key: got[k].append((n, d)))
               for key, src in sources.items()]
    try:
        assert publish_until(pub, b" start " + encode_msgpack(START),
                             lambda: got["right"] and got["ephemeral"])
        publish_until(pub, b" start " + encode_msgpack(START), lambda: False, timeout_s=0.5)
    finally:
        for src in sources.values():
            src.stop()
        for thread in threads:
            thread.join(5)
    assert got["right"][0] == ("start", START) and got["ephemeral"][0] == ("start", START)
    assert got["wrong"] == [] and got["plain"] == []
    assert wrong.stats.received == 0 and plain.stats.received == 0


def test_curve_keys_are_checked():
    with pytest.raises(ConfigError, match="40-character Z85"):
        ZmqDocumentSource("tcp://127.0.0.1:1", curve_server_key="short")
    with pytest.raises(ConfigError, match="without curve_server_key"):
        ZmqDocumentSource("tcp://127.0.0.1:1", curve_public_key="x" * 40)
    with pytest.raises(ConfigError, match="both"):
        ZmqDocumentSource("tcp://127.0.0.1:1", curve_server_key="x" * 40, curve_public_key="y")
    with pytest.raises(ConfigError, match="not valid Z85"):
        ZmqDocumentSource("tcp://127.0.0.1:1", curve_server_key="\"" * 40)


def test_file_source_drops_deep_documents(tmp_path):
    path = tmp_path / "documents.jsonl"
    lines = [json.dumps({"name": "start", "doc": {"uid": "u", "time": 1.0}}),
             json.dumps({"name": "start", "doc": nested(200)}),
             json.dumps({"name": "stop", "doc": {"nested": nested(40)}})]
    path.write_text("\n".join(lines) + "\n")
    source = FileDocumentSource(path)
    assert list(source) == [("start", {"uid": "u", "time": 1.0})]
    assert source.stats.dropped == 2 and "nests deeper" in source.stats.errors[0]
