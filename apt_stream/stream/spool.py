"""Append-only JSON-lines logs of documents: the listener's per-run spool and the run journal.

One line per document: ``{"name": "event", "doc": {...}}``. The beamline writes the same format as
the run journal next to the frames file (``documents.jsonl``); the listener writes a spool per run
(``<spool_dir>/<run_uid>.jsonl``). Either one replays a run through :func:`replay_spool`, which is
how a restarted or late listener rebuilds it (docs/streaming.md, "Slow joiners").
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from apt_stream.errors import DocumentError
from apt_stream.stream.decode import to_builtin
from apt_stream.stream.runindex import RunIndex

log = logging.getLogger(__name__)

_SAFE_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def encode_line(name: str, doc: dict) -> str:
    """One spool line (with its newline)."""
    return json.dumps({"name": name, "doc": doc}, default=to_builtin, separators=(",", ":")) + "\n"


class JsonlDocumentWriter:
    """Appends documents to one JSON-lines file and flushes after each, so readers see them."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, name: str, doc: dict) -> None:
        if self._fh is None:
            raise DocumentError(f"document log {self.path} is closed")
        self._fh.write(encode_line(name, doc))
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __call__(self, name: str, doc: dict) -> None:
        self.write(name, doc)


def replay_spool(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """Yield the ``(name, doc)`` pairs of a spool or journal file in the order written.

    A torn last line (the writer was mid-line) is skipped silently; a bad line elsewhere is skipped
    with a warning, so one damaged record cannot hide the rest of a run.
    """
    path = Path(path)
    if not path.is_file():
        raise DocumentError(f"document log {str(path)!r} does not exist")
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            name, doc = record["name"], record["doc"]
            if not isinstance(name, str) or not isinstance(doc, dict):
                raise TypeError("name must be a string and doc a mapping")
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            if number == len(lines) and not line.endswith("\n"):
                continue
            log.warning("skipping bad line %d of %s: %s", number, path, exc)
            continue
        yield name, doc


def spool_path(spool_dir: str | os.PathLike, run_uid: str) -> Path:
    """``<spool_dir>/<run_uid>.jsonl``; refuses uids that could name another path."""
    if not isinstance(run_uid, str) or not _SAFE_UID.match(run_uid):
        raise DocumentError(f"run uid {run_uid!r} is not safe to use as a file name")
    return Path(spool_dir) / f"{run_uid}.jsonl"


class RunSpool:
    """A document callback that appends each run's documents to its own spool file.

    It expects documents in run order (start first), which :class:`DocumentPipeline` guarantees.
    A spool that already exists (a restarted listener) is appended to, skipping documents whose
    uid it already holds, so replaying recovered documents does not duplicate them.
    """

    def __init__(self, spool_dir: str | os.PathLike) -> None:
        self.spool_dir = Path(spool_dir)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._index = RunIndex()
        self._writers: dict[str, JsonlDocumentWriter] = {}
        self._seen: dict[str, set[str]] = {}

    def path_for(self, run_uid: str) -> Path:
        return spool_path(self.spool_dir, run_uid)

    def __call__(self, name: str, doc: dict) -> None:
        run_uid = self._index.run_of(name, doc)
        if run_uid is None:
            log.warning("spool: %s document for an unknown run, not spooled", name)
            return
        self._index.learn(name, doc, run_uid)
        writer = self._writers.get(run_uid)
        if writer is None:
            path = self.path_for(run_uid)
            seen: set[str] = set()
            if path.exists():
                seen = {d.get("uid") for _, d in replay_spool(path)}
            writer = self._writers[run_uid] = JsonlDocumentWriter(path)
            self._seen[run_uid] = seen
        uid = doc.get("uid")
        if uid is not None and uid in self._seen[run_uid]:
            return
        writer.write(name, doc)
        if uid is not None:
            self._seen[run_uid].add(uid)
        if name == "stop":
            writer.close()
            del self._writers[run_uid]
            del self._seen[run_uid]
            self._index.forget(run_uid)

    def done_path(self, run_uid: str) -> Path:
        return self.spool_dir / f"{spool_path(self.spool_dir, run_uid).stem}.done"

    def mark_done(self, run_uid: str, status: str = "") -> None:
        """Record that a run was fully processed, so a restarted listener does not replay it."""
        try:
            self.done_path(run_uid).write_text(status + "\n", encoding="utf-8")
        except (OSError, DocumentError) as exc:
            log.warning("spool: cannot mark run %s done: %s", run_uid, exc)

    def unfinished(self, *, max_age_s: float = 7 * 86400) -> list[str]:
        """Run uids spooled here but never marked done (newest first, at most ``max_age_s`` old):
        what a listener killed mid-run left behind."""
        import time

        now = time.time()
        runs = []
        for path in self.spool_dir.glob("*.jsonl"):
            try:
                st = path.lstat()
            except OSError:
                continue
            if not path.is_file() or path.is_symlink() or now - st.st_mtime > max_age_s:
                continue
            if not (self.spool_dir / f"{path.stem}.done").exists():
                runs.append((st.st_mtime, path.stem))
        return [uid for _, uid in sorted(runs, reverse=True)]

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
        self._seen.clear()
