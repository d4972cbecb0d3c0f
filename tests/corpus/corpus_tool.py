"""The corpus of messages that broke, or tried to break, the document listener.

Each entry is one raw 0MQ message in ``tests/corpus/messages/<file>.bin`` (exactly the bytes a SUB
socket receives: ``prefix name payload``) and a record in ``messages/index.json``: why it is
there, the serializer the listener had, and a regular expression its drop reason must match.
``tests/test_fuzz_documents.py`` replays every entry through ``ZmqDocumentSource._handle`` and
checks that it is dropped with that reason and that nothing escapes; the fuzz tests also mutate
the entries.

Add a message that broke a listener (captured bytes, e.g. from ``socket.recv()``)::

    python tests/corpus/corpus_tool.py add NAME --why "what it did" --reason "regex" --file msg.bin
    python tests/corpus/corpus_tool.py add NAME --why ... --reason ... --hex 2073746172742091c0
    python tests/corpus/corpus_tool.py add NAME --why ... --reason ... < msg.bin

or from Python (e.g. a test helper): ``add_message("name", message, why=..., reason=...)``.
Rebuild the seed entries (deterministic; run after changing :func:`seed_entries`)::

    python tests/corpus/corpus_tool.py seed

List them: ``python tests/corpus/corpus_tool.py list``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import pickle
import re
import sys
from dataclasses import asdict, dataclass

import msgpack

HERE = pathlib.Path(__file__).resolve().parent
MESSAGES = HERE / "messages"
INDEX = MESSAGES / "index.json"
#: File the armed pickle entry would create (relative: in the unpickler's working directory).
PICKLE_MARKER = "APT_STREAM_PICKLE_RAN"
_SAFE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,80}$")


@dataclass(frozen=True)
class Entry:
    file: str
    why: str
    reason: str  # regex the drop reason (stats.last_error) must match
    serializer: str = "msgpack"  # the listener's serializer when it was received

    @property
    def path(self) -> pathlib.Path:
        return MESSAGES / self.file

    def message(self) -> bytes:
        return self.path.read_bytes()


def load_index() -> list[Entry]:
    if not INDEX.is_file():
        return []
    return [Entry(**record) for record in json.loads(INDEX.read_text())]


def _write_index(entries: list[Entry]) -> None:
    records = [asdict(e) for e in sorted(entries, key=lambda e: e.file)]
    INDEX.write_text(json.dumps(records, indent=1, ensure_ascii=True) + "\n")


def add_message(name: str, message: bytes, *, why: str, reason: str,
                serializer: str = "msgpack", replace: bool = False) -> Entry:
    """Store ``message`` as ``messages/<name>.bin`` and record it in the index."""
    if not _SAFE_NAME.match(name):
        raise ValueError(f"corpus name {name!r}: use lowercase letters, digits, '.', '_', '-'")
    if serializer not in ("msgpack", "json", "auto"):
        raise ValueError(f"serializer must be msgpack, json or auto, got {serializer!r}")
    re.compile(reason)
    MESSAGES.mkdir(parents=True, exist_ok=True)
    entry = Entry(file=f"{name}.bin", why=why, reason=reason, serializer=serializer)
    entries = {e.file: e for e in load_index()}
    if entry.file in entries and not replace:
        raise FileExistsError(f"{entry.file} is already in the corpus (replace=True to overwrite)")
    entry.path.write_bytes(bytes(message))
    entries[entry.file] = entry
    _write_index(list(entries.values()))
    return entry


# -- the seed entries: every message class that ever broke the listener -------------------------

class _TouchOnUnpickle:
    """Unpickling this runs ``pathlib.Path(PICKLE_MARKER).touch()``: proof that code ran."""

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(PICKLE_MARKER),))


def _nested_start(depth: int) -> dict:
    doc: dict = {"uid": "6f1c2a8e-3b4d-4e5f-9a0b-1c2d3e4f5a6b", "time": 1700000000.25,
                 "scan_id": 7, "plan_name": "ptycho_tomo"}
    cur = doc
    for _ in range(depth - 1):
        cur["a"] = {}
        cur = cur["a"]
    return doc


def _pack(doc) -> bytes:
    return msgpack.packb(doc, use_bin_type=True)


def _json(doc) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


GOOD_START = {"uid": "0b9c4a1e-7d2f-4c3b-8e5a-6f7d8c9b0a1e", "time": 1700000000.5, "scan_id": 3,
              "plan_name": "ptycho_tomo", "sample": "chip"}
GOOD_EVENT = {"uid": "e1", "time": 1.0, "descriptor": "d1", "seq_num": 1,
              "data": {"rot": 0.0}, "timestamps": {"rot": 1.0}}


def seed_entries() -> list[tuple[str, bytes, str, str, str]]:
    """(name, message, why, reason, serializer) of the seed corpus."""
    start = b" start "
    out = [
        ("nested-start-300", start + _pack(_nested_start(300)),
         "the attacker probe: a ~1 kB start document nested 300 deep; jsonschema raised "
         "RecursionError inside validate_document and the listener thread died",
         r"nests deeper than 32 levels", "msgpack"),
        ("nested-start-300-json", start + _json(_nested_start(300)),
         "the same 300-deep start document as JSON", r"nests deeper than 32 levels", "json"),
        ("json-deep-array-100k", start + b"[" * 100_000 + b"]" * 100_000,
         "100,000 nested JSON arrays: json.loads raises RecursionError",
         r"nests deeper than 32 levels", "json"),
        ("json-deep-map-20k", start + b'{"":' * 20_000 + b"0" + b"}" * 20_000,
         "20,000 nested JSON objects", r"nests deeper than 32 levels", "json"),
        ("json-deep-unclosed-100k", start + b"[" * 100_000,
         "100,000 opening brackets and nothing else", r"nests deeper than 32 levels", "json"),
        ("msgpack-deep-array-100k", start + b"\x91" * 100_000 + b"\xc0",
         "100,000 nested msgpack arrays", r"decoder's stack", "msgpack"),
        ("msgpack-deep-map-40", start + b"\x81\xa1a" * 40 + b"\xc0",
         "msgpack maps nested 40 deep: decodes, then too deep to validate safely",
         r"nests deeper than 32 levels", "msgpack"),
        ("msgpack-array32-claim", start + b"\xdd\xff\xff\xff\xff",
         "five bytes claiming a 2**32-1 element array", r"exceeds max_array_len", "msgpack"),
        ("msgpack-map32-claim", start + b"\xdf\xff\xff\xff\xff" + b"\xa1k\xc0",
         "a map header claiming 2**32-1 entries", r"exceeds max_map_len", "msgpack"),
        ("msgpack-str32-claim", start + b"\x81\xa1s\xdb\xff\xff\xff\xff" + b"x" * 16,
         "a string header claiming 4 GiB", r"incomplete input|exceeds max_str_len", "msgpack"),
        ("msgpack-bin32-claim", start + b"\x81\xa1b\xc6\xff\xff\xff\xff" + b"x" * 16,
         "a bin header claiming 4 GiB", r"incomplete input|exceeds max_bin_len", "msgpack"),
        ("msgpack-ext32-claim", start + b"\x81\xa1e\xc9\xff\xff\xff\xff\x01" + b"x" * 16,
         "an ext header claiming 4 GiB", r"incomplete input|exceeds max_ext_len", "msgpack"),
        ("msgpack-item-flood", start + b"\x81\xa1a\xdc\x00\xc9"
         + (b"\xdc\x03\xe8" + b"\x80" * 1000) * 201,
         "201 lists of 1000 empty maps (201,000 items in 200 kB; each list is within limits)",
         r"more than 200000 items", "msgpack"),
        ("msgpack-truncated-start", start + _pack(GOOD_START)[:40],
         "a real start document cut short", r"msgpack payload could not be decoded", "msgpack"),
        ("json-truncated-start", start + _json(GOOD_START)[:40],
         "a real start document as JSON, cut short", r"JSON payload could not be decoded",
         "json"),
        ("msgpack-extra-data", start + _pack(GOOD_START) + b"\xc0",
         "a start document with trailing bytes", r"extra data", "msgpack"),
        ("pickle-dict", start + pickle.dumps(GOOD_START, protocol=4),
         "a pickled (harmless) dict: pickle is refused unless allow_pickle=True",
         r"pickle is refused", "msgpack"),
        ("pickle-touch-marker", start + pickle.dumps({"uid": "p", "time": 1.0,
                                                      "x": _TouchOnUnpickle()}, protocol=4),
         f"a pickle whose unpickling creates the file {PICKLE_MARKER} (code execution): it must "
         "be refused, never loaded", r"pickle is refused", "auto"),
        ("payload-is-a-list", start + _pack([1, 2, 3]), "a payload that is not a mapping",
         r"decoded to list, expected a mapping", "msgpack"),
        ("payload-is-an-int", start + _pack(7), "a payload that is a number",
         r"decoded to int, expected a mapping", "msgpack"),
        ("start-time-is-a-string", start + _pack({**GOOD_START, "time": "yesterday"}),
         "a start document whose time is a string", r"invalid start document.*'time'",
         "msgpack"),
        ("start-uid-is-a-number", start + _pack({**GOOD_START, "uid": 5}),
         "a start document whose uid is a number", r"invalid start document.*'uid'", "msgpack"),
        ("event-seq-num-is-a-string", b" event " + _pack({**GOOD_EVENT, "seq_num": "one"}),
         "an event whose seq_num is a string", r"invalid event document.*'seq_num'", "msgpack"),
        ("descriptor-data-keys-is-a-list", b" descriptor " + _pack(
            {"uid": "d", "time": 1.0, "run_start": "s", "data_keys": []}),
         "a descriptor whose data_keys is a list", r"invalid descriptor document", "msgpack"),
        ("int-map-keys", start + _pack({**GOOD_START, 1: 2}),
         "a map with an integer key", r"int is not allowed for map key", "msgpack"),
        ("bin-value", start + _pack({**GOOD_START, "b": b"\x00\x01"}),
         "a binary value (not a JSON type)", r"exceeds max_bin_len", "msgpack"),
        ("ext-timestamp", start + msgpack.packb({**GOOD_START, "t": msgpack.Timestamp(1)}),
         "an ext (Timestamp) value (not a JSON type)", r"exceeds max_ext_len", "msgpack"),
        ("json-huge-integer", start + b'{"uid":"u","time":' + b"9" * 10_000 + b"}",
         "a JSON number of 10,000 digits", r"JSON payload could not be decoded", "json"),
        ("json-invalid-utf8", start + b'{"uid":"\xff\xfe","time":1}',
         "JSON that is not UTF-8", r"JSON payload could not be decoded", "json"),
        ("msgpack-invalid-utf8", start + b"\x82\xa3uid\xa2\xff\xfe\xa4time\x01",
         "a msgpack string that is not UTF-8", r"msgpack payload could not be decoded",
         "msgpack"),
        ("name-non-ascii-utf8", " stärt ".encode() + _pack(GOOD_START),
         "a document name in non-ASCII UTF-8", r"document name is not ASCII", "msgpack"),
        ("name-non-ascii-bytes", b" \xff\xfe " + _pack(GOOD_START),
         "a document name that is not text at all", r"document name is not ASCII", "msgpack"),
        ("name-unknown", b" begin " + _pack(GOOD_START), "an unknown document name",
         r"unknown document name", "msgpack"),
        ("name-deprecated-bulk-events", b" bulk_events " + _pack({}),
         "a deprecated bulk_events document", r"unknown document name", "msgpack"),
        ("no-separators", b"\x00\x01garbage-without-spaces",
         "a message that is not 'prefix name payload'", r"prefix name payload", "msgpack"),
        ("empty", b"", "an empty message", r"prefix name payload", "msgpack"),
    ]
    return out


def seed() -> list[Entry]:
    entries = {e.file: e for e in load_index()}
    made = []
    for name, message, why, reason, serializer in seed_entries():
        entries.pop(f"{name}.bin", None)
        MESSAGES.mkdir(parents=True, exist_ok=True)
        entry = Entry(file=f"{name}.bin", why=why, reason=reason, serializer=serializer)
        entry.path.write_bytes(message)
        made.append(entry)
    _write_index(list(entries.values()) + made)
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="add one message")
    add.add_argument("name")
    add.add_argument("--why", required=True)
    add.add_argument("--reason", required=True, help="regex the drop reason must match")
    add.add_argument("--serializer", default="msgpack", choices=["msgpack", "json", "auto"])
    add.add_argument("--replace", action="store_true")
    source = add.add_mutually_exclusive_group()
    source.add_argument("--file", type=pathlib.Path)
    source.add_argument("--hex")
    sub.add_parser("seed", help="(re)write the seed entries")
    sub.add_parser("list", help="list the entries")
    args = parser.parse_args(argv)
    if args.command == "add":
        if args.file is not None:
            message = args.file.read_bytes()
        elif args.hex is not None:
            message = bytes.fromhex(args.hex)
        else:
            message = sys.stdin.buffer.read()
        entry = add_message(args.name, message, why=args.why, reason=args.reason,
                            serializer=args.serializer, replace=args.replace)
        print(f"added {entry.path} ({len(message)} bytes)")
    elif args.command == "seed":
        made = seed()
        print(f"wrote {len(made)} seed entries to {MESSAGES}")
    else:
        for entry in load_index():
            print(f"{entry.file:40s} {entry.path.stat().st_size:>8d}  {entry.why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
