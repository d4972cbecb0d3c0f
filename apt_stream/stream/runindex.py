"""Which run a document belongs to, from the uids seen so far.

Only start, stop, descriptor and (stream_)resource documents name their run; events and datums
name a descriptor or a resource. The index learns those links as documents pass, so every later
document can be attributed, and it reports the uid a document *refers to* so that a consumer that
missed the referenced document (a late joiner) knows what to look for.
"""

from __future__ import annotations


def _uid(value: object) -> str | None:
    """A uid field, or None when it is not a non-empty string (unvalidated input can hold
    anything, and a list or dict cannot even be a dictionary key)."""
    return value if isinstance(value, str) and value else None


class RunIndex:
    """uid -> run uid links for descriptors and resources, plus the set of known runs."""

    def __init__(self) -> None:
        self.runs: set[str] = set()
        self._parent: dict[str, str] = {}  # descriptor / resource / stream_resource uid -> run uid

    @staticmethod
    def referenced_uid(name: str, doc: dict) -> str | None:
        """The uid this document needs to have been seen already (None for a start)."""
        if name == "start":
            return None
        if name in ("stop", "descriptor", "stream_resource", "resource"):
            return _uid(doc.get("run_start"))
        if name in ("event", "event_page"):
            return _uid(doc.get("descriptor"))
        if name == "stream_datum":
            return _uid(doc.get("descriptor")) or _uid(doc.get("stream_resource"))
        if name in ("datum", "datum_page"):
            return _uid(doc.get("resource"))
        return None

    def run_of(self, name: str, doc: dict) -> str | None:
        """The run uid of a document, or None when it refers to something not seen yet."""
        if name == "start":
            return _uid(doc.get("uid"))
        ref = self.referenced_uid(name, doc)
        if ref is None:
            return None
        if name in ("stop", "descriptor", "stream_resource", "resource"):
            return ref if ref in self.runs else None
        if name == "stream_datum" and ref not in self._parent:
            ref = _uid(doc.get("stream_resource"))
        return self._parent.get(ref) if ref is not None else None

    def learn(self, name: str, doc: dict, run_uid: str) -> None:
        """Record the links a document introduces (call after :meth:`run_of` succeeded)."""
        if name == "start":
            self.runs.add(run_uid)
        elif name in ("descriptor", "stream_resource", "resource"):
            uid = doc.get("uid")
            if isinstance(uid, str):
                self._parent[uid] = run_uid

    def knows(self, uid: str) -> bool:
        return uid in self.runs or uid in self._parent

    def forget(self, run_uid: str) -> None:
        """Drop a finished run's links (keeps memory flat over many runs)."""
        self.runs.discard(run_uid)
        for uid in [u for u, r in self._parent.items() if r == run_uid]:
            del self._parent[uid]
