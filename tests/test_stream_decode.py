"""Safe decoding of 0MQ messages and per-document validation."""

from __future__ import annotations

import pickle

import msgpack
import numpy as np
import pytest

from apt_stream.errors import DocumentError
from apt_stream.stream.decode import (
    PROBE_NAME,
    decode_message,
    decode_payload,
    encode_json,
    encode_msgpack,
    encoder_for,
    probe_message,
)
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
