"""Puts a live document stream in run order for its consumers, recovering what was missed.

Consumers (the spool, the run assembler) may assume: a run's start comes before its other
documents, a descriptor/resource before the documents that refer to it, no document twice. A
listener that joined late or restarted breaks these on the wire; :class:`DocumentPipeline`
restores them by looking the missing run up in the run journal or spool
(:class:`~apt_stream.stream.recovery.RunRecovery`) and replaying it first.

A consumer that raises is logged and counted (``strict=False``, a running beamline) or re-raises
(``strict=True``, tests); either way the other consumers still see the document.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence

from apt_stream.errors import DocumentError
from apt_stream.stream.recovery import RunRecovery
from apt_stream.stream.runindex import RunIndex

log = logging.getLogger(__name__)

Consumer = Callable[[str, dict], object]


class DocumentPipeline:
    """Order, de-duplicate and deliver documents to consumers.

    Parameters
    ----------
    consumers
        Callables ``(name, doc)``, called in order for every delivered document.
    recovery
        Where to find a run whose start was missed; None disables recovery (such documents are
        held until their run appears, then dropped beyond ``max_orphans``).
    strict
        Re-raise consumer errors instead of logging them.
    max_orphans
        Documents held while their run is unknown; beyond this the oldest are dropped.
    retry_interval_s
        Minimum time between two recovery attempts for the same missing uid.
    keep_finished
        How many stopped runs to remember, so their stragglers are dropped, not recovered again.
    """

    def __init__(
        self,
        consumers: Sequence[Consumer],
        *,
        recovery: RunRecovery | None = None,
        strict: bool = False,
        max_orphans: int = 10_000,
        retry_interval_s: float = 0.25,
        keep_finished: int = 64,
    ) -> None:
        self.consumers = list(consumers)
        self.recovery = recovery
        self.strict = strict
        self.max_orphans = int(max_orphans)
        self.retry_interval_s = float(retry_interval_s)
        self.keep_finished = int(keep_finished)
        self._index = RunIndex()
        self._seen: dict[str, set[str]] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._orphans: dict[str, list[tuple[str, dict]]] = defaultdict(list)
        self._n_orphans = 0
        self._last_try: dict[str, float] = {}
        self._replaying = False
        self.stats = {
            "delivered": 0, "duplicates": 0, "orphans_dropped": 0, "late_for_finished_run": 0,
            "recovered_runs": 0, "consumer_errors": 0,
        }

    # -- public ------------------------------------------------------------------------------
    def __call__(self, name: str, doc: dict) -> None:
        run_uid = self._index.run_of(name, doc)
        if run_uid is None:
            ref = self._index.referenced_uid(name, doc)
            if ref is None or not self._try_recover(ref):
                self._hold(ref, name, doc)
                return
            run_uid = self._index.run_of(name, doc)
            if run_uid is None:
                self._hold(ref, name, doc)
                return
        self._deliver(name, doc, run_uid)

    def retry_orphans(self) -> None:
        """Try recovery again for every uid that documents are waiting on (call when idle)."""
        for ref in list(self._orphans):
            if self._index.knows(ref) or self._try_recover(ref):
                self._release(ref)

    @property
    def n_orphans(self) -> int:
        return self._n_orphans

    # -- internals ---------------------------------------------------------------------------
    def _deliver(self, name: str, doc: dict, run_uid: str) -> None:
        if run_uid in self._finished:
            self.stats["late_for_finished_run"] += 1
            return
        seen = self._seen.setdefault(run_uid, set())
        uid = doc.get("uid")
        if isinstance(uid, str):
            if uid in seen:
                self.stats["duplicates"] += 1
                return
            seen.add(uid)
        self._index.learn(name, doc, run_uid)
        for consumer in self.consumers:
            try:
                consumer(name, doc)
            except DocumentError as exc:  # a refused document: expected, no traceback
                self.stats["consumer_errors"] += 1
                if self.strict:
                    raise
                log.warning("%s document of run %s refused: %s", name, run_uid, exc)
            except Exception:
                self.stats["consumer_errors"] += 1
                if self.strict:
                    raise
                log.exception("consumer %r failed on a %s document of run %s", consumer, name,
                              run_uid)
        self.stats["delivered"] += 1
        if isinstance(uid, str) and uid in self._orphans and not self._replaying:
            self._release(uid)
        if name == "stop":
            self._finish(run_uid)

    def _finish(self, run_uid: str) -> None:
        self._seen.pop(run_uid, None)
        self._finished[run_uid] = None
        while len(self._finished) > self.keep_finished:
            old, _ = self._finished.popitem(last=False)
            self._index.forget(old)

    def _try_recover(self, ref: str) -> bool:
        if self.recovery is None:
            return False
        now = time.monotonic()
        if now - self._last_try.get(ref, -1e9) < self.retry_interval_s:
            return False
        self._last_try[ref] = now
        docs = self.recovery.find(ref)
        if not docs:
            log.info("no run journal or spool knows uid %s yet", ref)
            return False
        run_uid = docs[0][1].get("uid")
        if run_uid in self._finished:
            return False
        log.warning("joined run %s late: replaying %d documents from its log", run_uid, len(docs))
        self.stats["recovered_runs"] += 1
        # Held documents wait until the whole log is in: released mid-replay they would overtake
        # the stream datums and resources they depend on.
        self._replaying = True
        try:
            for name, doc in docs:
                rid = self._index.run_of(name, doc)
                if rid is not None:
                    self._deliver(name, doc, rid)
        finally:
            self._replaying = False
        self._last_try.pop(ref, None)
        for waiting in [r for r in self._orphans if self._index.knows(r)]:
            self._release(waiting)
        return self._index.knows(ref)

    def _hold(self, ref: str | None, name: str, doc: dict) -> None:
        if ref is None:
            self.stats["orphans_dropped"] += 1
            log.warning("dropping %s document that names no run", name)
            return
        self._orphans[ref].append((name, doc))
        self._n_orphans += 1
        while self._n_orphans > self.max_orphans:
            oldest = next(iter(self._orphans))
            self._orphans[oldest].pop(0)
            self._n_orphans -= 1
            self.stats["orphans_dropped"] += 1
            if not self._orphans[oldest]:
                del self._orphans[oldest]

    def _release(self, ref: str) -> None:
        waiting = self._orphans.pop(ref, [])
        self._n_orphans -= len(waiting)
        self._last_try.pop(ref, None)
        for name, doc in waiting:
            self(name, doc)
