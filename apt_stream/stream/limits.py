"""Bounds on what one 0MQ message may cost a subscriber, checked before any real work.

A subscriber reads whatever reaches its socket, so every message is treated as hostile until it
has passed these checks, in this order:

1. the message size (``max_message_bytes``): before it is split or decoded; the 0MQ socket also
   refuses bigger messages itself (``ZMQ_MAXMSGSIZE``), so they are never even allocated;
2. JSON only, before :func:`json.loads`: a cheap scan of the raw text for the nesting depth and
   the number of items (C-speed ``bytes`` operations, no Python-level loop over the payload);
3. msgpack only, while decoding: every length a header claims (string, binary, array, map, ext) is
   capped (:func:`msgpack_caps`), so a five-byte header claiming a 2**32-element array is refused
   instead of allocated, and the total number of items is counted as containers complete, so a
   16 MiB message of empty maps cannot become a gigabyte of dicts;
4. the decoded object, by :func:`check_structure`: depth, item count, string and list lengths,
   JSON-only types. It walks iteratively (an explicit stack), so a document nested 100,000 deep
   costs a list, not the interpreter's stack.

After this a document is small and shallow enough for jsonschema validation (which recurses) and
for every consumer. Real documents are far inside the defaults: a start document nests about six
levels deep, an event page of a long scan holds a few thousand items.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from apt_stream.errors import ConfigError, DocumentError

MiB = 1 << 20


@dataclass(frozen=True)
class MessageLimits:
    """What one message may hold; every field is a hard cap (exceeding it drops the message).

    Attributes
    ----------
    max_message_bytes
        Whole message (``prefix name payload``), in bytes. 16 MiB: documents carry metadata only;
        frames and probes live in HDF5 files that documents reference.
    max_depth
        Nesting depth of containers; the document mapping itself is level 1. 32 (real documents:
        about 6). Well below Python's recursion limit, so jsonschema cannot overflow the stack.
    max_items
        Total number of items in all containers (map entries plus list elements, counted over the
        whole document). 200,000.
    max_string_len
        Longest string, as a key or a value: characters after decoding (UTF-8 bytes when msgpack
        decodes it). 1 MiB.
    max_list_len
        Longest single list. 100,000.
    max_map_len
        Most entries in a single mapping. 10,000.
    """

    max_message_bytes: int = 16 * MiB
    max_depth: int = 32
    max_items: int = 200_000
    max_string_len: int = 1 * MiB
    max_list_len: int = 100_000
    max_map_len: int = 10_000

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_depth", "max_items", "max_string_len",
                     "max_list_len", "max_map_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"MessageLimits.{name} must be a positive integer, got {value!r}")


DEFAULT_LIMITS = MessageLimits()

#: Scalar types a decoded document may contain (JSON's, as Python decodes them).
_SCALARS = (str, int, float, bool, type(None))


def _where(path: tuple) -> str:
    text = "/".join(str(p)[:80] for p in path[:12]) or "<document>"
    return text if len(path) <= 12 else text + "/..."


def check_structure(doc: Any, limits: MessageLimits | None = None) -> None:
    """Check a decoded document against ``limits`` without recursion.

    Raises :class:`DocumentError` naming the first problem found, e.g. ``document nests deeper
    than 32 levels (at 'a/b/0/c')``, ``document holds more than 200000 items``, ``string of
    2000000 characters at 'plan_args/x' (limit 1048576)``, ``map key 3 at 'data' is not a
    string`` or ``bytes value at 'data/x': documents hold JSON types only``.
    """
    limits = limits or DEFAULT_LIMITS
    max_depth, max_items = limits.max_depth, limits.max_items
    max_str, max_list, max_map = limits.max_string_len, limits.max_list_len, limits.max_map_len
    items = 0
    # (container, its depth, its path); paths are tuples built once per container.
    stack: list[tuple[Any, int, tuple]] = [(doc, 1, ())]
    while stack:
        obj, depth, path = stack.pop()
        if depth > max_depth:
            raise DocumentError(
                f"document nests deeper than {max_depth} levels (at {_where(path)!r})"
            )
        if isinstance(obj, dict):
            if len(obj) > max_map:
                raise DocumentError(
                    f"mapping of {len(obj)} entries at {_where(path)!r} (limit {max_map})"
                )
            items += len(obj)
            if items > max_items:
                raise DocumentError(f"document holds more than {max_items} items")
            for key, value in obj.items():
                if type(key) is not str:
                    raise DocumentError(
                        f"map key {key!r:.40} at {_where(path)!r} is not a string "
                        f"({type(key).__name__})"
                    )
                if len(key) > max_str:
                    raise DocumentError(
                        f"map key of {len(key)} characters at {_where(path)!r} (limit {max_str})"
                    )
                _check_value(value, depth, path, key, stack, max_str)
        elif isinstance(obj, list):
            if len(obj) > max_list:
                raise DocumentError(
                    f"list of {len(obj)} items at {_where(path)!r} (limit {max_list})"
                )
            items += len(obj)
            if items > max_items:
                raise DocumentError(f"document holds more than {max_items} items")
            for index, value in enumerate(obj):
                _check_value(value, depth, path, index, stack, max_str)
        else:  # only the root can get here (children are checked before they are pushed)
            raise DocumentError(f"document is a {type(obj).__name__}, expected a mapping")


def _check_value(value: Any, depth: int, path: tuple, key: Any, stack: list, max_str: int) -> None:
    if isinstance(value, dict | list):
        stack.append((value, depth + 1, (*path, key)))
    elif isinstance(value, str):
        if len(value) > max_str:
            raise DocumentError(
                f"string of {len(value)} characters at {_where((*path, key))!r} (limit {max_str})"
            )
    elif not isinstance(value, _SCALARS):
        raise DocumentError(
            f"{type(value).__name__} value at {_where((*path, key))!r}: documents hold JSON types "
            "only (mappings, lists, strings, numbers, booleans, null)"
        )


# -- msgpack -----------------------------------------------------------------------------------


def msgpack_caps(limits: MessageLimits | None = None) -> dict[str, int]:
    """Keyword arguments for :func:`msgpack.unpackb` that cap every length a header can claim.

    Binary and ext values are refused outright (documents are JSON types; ``max_ext_len=0`` and
    ``max_bin_len=0``), so a header claiming a huge one fails before any allocation.
    """
    limits = limits or DEFAULT_LIMITS
    return {
        "max_str_len": limits.max_string_len * 4,  # UTF-8: up to 4 bytes per character
        "max_bin_len": 0,
        "max_array_len": limits.max_list_len,
        "max_map_len": limits.max_map_len,
        "max_ext_len": 0,
    }


class ItemBudgetExceeded(DocumentError):
    """Raised inside msgpack's hooks to abort a decode that exceeds ``max_items``."""


def msgpack_hooks(limits: MessageLimits | None = None) -> dict[str, Callable]:
    """``list_hook``/``object_hook`` for :func:`msgpack.unpackb` that count items as containers
    complete and abort (raising :class:`ItemBudgetExceeded`, a :class:`DocumentError`) past
    ``max_items``; a fresh pair per decode."""
    limits = limits or DEFAULT_LIMITS
    budget = [limits.max_items]

    def spend(container):
        budget[0] -= len(container)
        if budget[0] < 0:
            raise ItemBudgetExceeded(f"document holds more than {limits.max_items} items")
        return container

    return {"list_hook": spend, "object_hook": spend}


# -- JSON --------------------------------------------------------------------------------------

# A JSON string, or an unterminated one running to the end. The possessive loop never
# backtracks and the pattern always matches once started, so the scan is linear in the payload.
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\[\s\S]?)*+(?:"|\Z)')
_BRACKETS_ONLY = bytes(b for b in range(256) if b not in b"[]{}")
_OPEN = np.frombuffer(b"[{", dtype=np.uint8)


def precheck_json(payload: bytes, limits: MessageLimits | None = None) -> None:
    """Refuse JSON text that nests deeper than ``max_depth`` or holds more than ``max_items``
    items, before :func:`json.loads` builds anything.

    Brackets and commas inside strings are not counted. The item estimate never exceeds what
    :func:`check_structure` would count for the decoded document, so nothing it would accept is
    refused here; depth is exact for well-formed JSON.
    """
    limits = limits or DEFAULT_LIMITS
    opens = payload.count(b"[") + payload.count(b"{")
    commas = payload.count(b",")
    if opens <= limits.max_depth and commas <= limits.max_items:
        return  # cannot be too deep or too big, whatever the strings hold
    quotes = payload.count(b'"')
    if quotes:
        # At least quotes - escaped quotes of them open or close a string, and a document holds
        # at least half as many items as strings (a key and its value are one item): refuse a
        # flood of tiny strings before spending a regex match on each.
        if (quotes - payload.count(b'\\"')) // 4 > limits.max_items:
            raise DocumentError(f"document holds more than {limits.max_items} items")
        payload = _JSON_STRING.sub(b'""', payload)
        opens = payload.count(b"[") + payload.count(b"{")
        commas = payload.count(b",")
    # Every comma separates two items and every container but the root is an item.
    if commas > limits.max_items or opens - 1 > limits.max_items:
        raise DocumentError(f"document holds more than {limits.max_items} items")
    if opens <= limits.max_depth:
        return
    brackets = payload.translate(None, _BRACKETS_ONLY)
    if len(brackets) > 2 * (limits.max_items + 1):  # a flood of closing brackets: not JSON
        raise DocumentError(f"document holds more than {limits.max_items} items")
    seq = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where(np.isin(seq, _OPEN), 1, -1).astype(np.int32)
    deepest = int(np.cumsum(steps, dtype=np.int32).max(initial=0))
    if deepest > limits.max_depth:
        raise DocumentError(f"document nests deeper than {limits.max_depth} levels")
