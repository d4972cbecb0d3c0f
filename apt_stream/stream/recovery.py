"""Find the documents of a run a listener joined late (or lost by restarting).

Where a run's documents are written down (docs/streaming.md, "Slow joiners"):

* the beamline's **run journal** ``<data_root>/<run_dir>/documents.jsonl`` (written by the plan,
  every document of the run, next to ``frames.h5``);
* the listener's own **spool** ``<spool_dir>/<run_uid>.jsonl`` (what it received before it
  stopped).

:class:`RunRecovery` looks a uid up in those files: journals one folder below each data root
first (they are complete), then spool files. A match returns every document of that run in the
order written; the caller drops the duplicates of what it has already seen. Only regular files
whose real path (symlinks resolved) lies under a data root, or under the spool folder, are read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from apt_stream.stream.paths import DataRoots
from apt_stream.stream.schema import JOURNAL_FILE
from apt_stream.stream.spool import replay_spool

log = logging.getLogger(__name__)

_HEADER_NAMES = ("start", "descriptor", "stream_resource", "resource")


class RunRecovery:
    """Looks up the document log holding a start/descriptor/resource uid.

    Parameters
    ----------
    data_roots
        Roots whose immediate sub-folders hold run journals (``*/documents.jsonl``).
    spool_dir
        The listener's spool folder (``*.jsonl``).
    max_files
        Only the most recently modified ``max_files`` logs are searched, so a long-lived data root
        does not make each lookup slower.
    """

    def __init__(
        self,
        *,
        data_roots: DataRoots | Iterable[str | os.PathLike] | None = None,
        spool_dir: str | os.PathLike | None = None,
        max_files: int = 200,
    ) -> None:
        if data_roots is not None and not isinstance(data_roots, DataRoots):
            data_roots = DataRoots(data_roots)
        self.data_roots = data_roots
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        self.max_files = int(max_files)
        # path -> (size, mtime_ns, header uids): a file is re-read only when it has grown.
        self._headers: dict[Path, tuple[int, int, frozenset[str]]] = {}
        self.lookups = 0
        self.recovered_runs = 0
        #: Logs skipped because they lead outside the roots (a symlink planted in a data root).
        self.refused: list[str] = []

    def _inside(self, path: Path, roots: tuple[Path, ...]) -> bool:
        """A regular file whose real path (symlinks resolved) lies under one of ``roots``."""
        try:
            real = path.resolve()
            if not real.is_file():
                return False
        except OSError:
            return False
        if any(real.is_relative_to(r) for r in roots):
            return True
        self.refused.append(str(path))
        log.warning("recovery: %s resolves to %s, outside %s; not read", path, real,
                    [str(r) for r in roots])
        return False

    def _candidates(self) -> list[Path]:
        journals: list[Path] = []
        if self.data_roots is not None:
            roots = self.data_roots.roots
            for root in roots:
                journals.extend(p for p in root.glob(f"*/{JOURNAL_FILE}") if self._inside(p, roots))
        spools: list[Path] = []
        if self.spool_dir is not None and self.spool_dir.is_dir():
            spool_root = (self.spool_dir.resolve(),)
            spools.extend(p for p in self.spool_dir.glob("*.jsonl") if self._inside(p, spool_root))

        def newest_first(paths: list[Path]) -> list[Path]:
            return sorted(paths, key=lambda p: p.stat().st_mtime_ns, reverse=True)

        candidates = (newest_first(journals) + newest_first(spools))[: self.max_files]
        if len(self._headers) > 2 * self.max_files:  # forget files deleted or out of reach
            keep = set(candidates)
            self._headers = {p: v for p, v in self._headers.items() if p in keep}
        return candidates

    def _header_uids(self, path: Path) -> frozenset[str]:
        stat = path.stat()
        cached = self._headers.get(path)
        if cached and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
            return cached[2]
        uids = frozenset(
            doc["uid"]
            for name, doc in replay_spool(path)
            if name in _HEADER_NAMES and isinstance(doc.get("uid"), str)
        )
        self._headers[path] = (stat.st_size, stat.st_mtime_ns, uids)
        return uids

    def find(self, uid: str) -> list[tuple[str, dict]] | None:
        """All documents of the run that holds ``uid``, or None if no log knows it yet."""
        self.lookups += 1
        if not isinstance(uid, str) or not uid:
            return None
        for path in self._candidates():
            try:
                if uid not in self._header_uids(path):
                    continue
                docs = list(replay_spool(path))
            except OSError as exc:
                log.warning("recovery: cannot read %s: %s", path, exc)
                continue
            if not docs or docs[0][0] != "start":
                log.warning("recovery: %s does not begin with a start document; skipped", path)
                continue
            self.recovered_runs += 1
            log.info("recovery: rebuilt run %s from %s (%d documents)", docs[0][1].get("uid"),
                     path, len(docs))
            return docs
        return None
