"""Puts a live document stream in run order for its consumers, recovering what was missed.

Consumers (the spool, the run assembler) may assume: a run's start comes before its other
documents, a descriptor/resource before the documents that refer to it, no document twice. A
listener that joined late or restarted breaks these on the wire; :class:`DocumentPipeline`
restores them by looking the missing run up in the run journal or spool
(:class:`~apt_stream.stream.recovery.RunRecovery`) and replaying it first.

A stop that arrives before the run's events (its ``num_events`` says how many each stream has)
is held until they are in, or for ``stop_grace_s``: a stop overtaking its run on the wire no longer
ends the run early.

A consumer that raises is logged once per cause and counted (``strict=False``, a running
beamline) or re-raises (``strict=True``, tests); either way the other consumers still see the
document. Documents held for an unknown run are bounded in number and in bytes.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence

from apt_stream.errors import DocumentError
from apt_stream.stream.problems import ProblemLog, cause_of
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
    max_orphan_bytes
        Bytes (as JSON) of documents held for unknown runs; beyond this the oldest are dropped.
    stop_grace_s
        How long a stop that came before the events it counts waits for them.
    quiet_fill_s
        An open run with no document for this long is looked up in its journal (documents lost
        on the wire, the stop included, are taken from there).
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
        max_orphan_bytes: int = 64 * 2**20,
        stop_grace_s: float = 30.0,
        quiet_fill_s: float = 10.0,
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
        self._orphans: dict[str, list[tuple[str, dict, int]]] = defaultdict(list)
        self._n_orphans = 0
        self._orphan_bytes = 0
        self.max_orphan_bytes = int(max_orphan_bytes)
        self.stop_grace_s = float(stop_grace_s)
        self._stream_of: dict[str, tuple[str, str]] = {}  # descriptor uid -> (run uid, stream)
        self._events: dict[str, dict[str, int]] = {}  # run uid -> stream -> events delivered
        self._held_stops: dict[str, tuple[float, dict]] = {}  # run uid -> (deadline, stop doc)
        self._last_doc_at: dict[str, float] = {}  # open run -> monotonic time of its last document
        self.quiet_fill_s = float(quiet_fill_s)
        self._log = ProblemLog(log)
        self._last_try: dict[str, float] = {}
        self._replaying = False
        self.stats = {
            "delivered": 0, "duplicates": 0, "orphans_dropped": 0, "late_for_finished_run": 0,
            "recovered_runs": 0, "consumer_errors": 0, "stops_held": 0, "stops_forced": 0,
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
        now = time.monotonic()
        for run_uid, last in list(self._last_doc_at.items()):
            # A run gone quiet may have lost its last documents (the stop too) on the wire: its
            # journal, when there is one, has them.
            if now - last > self.quiet_fill_s and run_uid not in self._finished:
                self._last_doc_at[run_uid] = now
                self._fill_from_log(run_uid, include_stop=True)
        for run_uid, (deadline, doc) in list(self._held_stops.items()):
            if now >= deadline:
                self._fill_from_log(run_uid)
                if run_uid not in self._held_stops:
                    continue
                self.stats["stops_forced"] += 1
                log.warning("run %s: its stop counted events that never came (%s); stopping it "
                            "with what arrived", run_uid, self._shortfall(run_uid, doc))
                del self._held_stops[run_uid]
                self._deliver("stop", doc, run_uid, force=True)

    @property
    def held_stops(self) -> list[str]:
        """Runs whose stop waits for events it counts."""
        return list(self._held_stops)

    @property
    def n_orphans(self) -> int:
        return self._n_orphans

    # -- internals ---------------------------------------------------------------------------
    def _shortfall(self, run_uid: str, stop: dict) -> dict[str, str]:
        counted = stop.get("num_events")
        have = self._events.get(run_uid, {})
        if not isinstance(counted, dict):
            return {}
        return {str(k): f"{have.get(k, 0)}/{v}" for k, v in counted.items()
                if isinstance(v, int) and have.get(k, 0) < v}

    def _deliver(self, name: str, doc: dict, run_uid: str, *, force: bool = False) -> None:
        if run_uid in self._finished:
            self.stats["late_for_finished_run"] += 1
            return
        if name == "stop" and not force:
            if run_uid in self._held_stops:
                self.stats["duplicates"] += 1
                return
            if self._shortfall(run_uid, doc):
                # Events were lost on the wire (a proxy restart, a full buffer): the run's
                # journal has them.
                self._fill_from_log(run_uid)
            if self._shortfall(run_uid, doc):
                # The stop overtook events it counts: hold it until they arrive.
                self.stats["stops_held"] += 1
                self._held_stops[run_uid] = (time.monotonic() + self.stop_grace_s, doc)
                return
        seen = self._seen.setdefault(run_uid, set())
        uid = doc.get("uid")
        if isinstance(uid, str):
            if uid in seen:
                self.stats["duplicates"] += 1
                return
            seen.add(uid)
        self._index.learn(name, doc, run_uid)
        self._count(name, doc, run_uid)
        self._last_doc_at[run_uid] = time.monotonic()
        for consumer in self.consumers:
            try:
                consumer(name, doc)
            except DocumentError as exc:  # a refused document: expected, no traceback
                self.stats["consumer_errors"] += 1
                if self.strict:
                    raise
                self._log.report(f"run {run_uid}", cause_of(str(exc)),
                                 f"{name} document of run {run_uid} refused: {exc}")
            except Exception as exc:
                self.stats["consumer_errors"] += 1
                if self.strict:
                    raise
                message = f"{type(exc).__name__}: {exc}"
                if self._log.report(f"run {run_uid}", cause_of(message),
                                    f"consumer {consumer!r} failed on a {name} document of run "
                                    f"{run_uid}: {message}"):
                    log.debug("traceback of the first such failure", exc_info=True)
        self.stats["delivered"] += 1
        if isinstance(uid, str) and uid in self._orphans and not self._replaying:
            self._release(uid)
        if name == "stop":
            self._finish(run_uid)
        elif run_uid in self._held_stops:
            deadline, stop = self._held_stops[run_uid]
            if not self._shortfall(run_uid, stop):
                del self._held_stops[run_uid]
                self._deliver("stop", stop, run_uid, force=True)

    def _count(self, name: str, doc: dict, run_uid: str) -> None:
        if name == "descriptor" and isinstance(doc.get("uid"), str):
            self._stream_of[doc["uid"]] = (run_uid, str(doc.get("name", "primary")))
        elif name in ("event", "event_page"):
            _, stream = self._stream_of.get(doc.get("descriptor"), (None, None))
            if stream is not None:
                n = len(doc.get("seq_num", ())) if name == "event_page" else 1
                counts = self._events.setdefault(run_uid, {})
                counts[stream] = counts.get(stream, 0) + (n if isinstance(n, int) else 0)

    def _finish(self, run_uid: str) -> None:
        self._seen.pop(run_uid, None)
        self._events.pop(run_uid, None)
        self._held_stops.pop(run_uid, None)
        self._last_doc_at.pop(run_uid, None)
        for uid in [u for u, (r, _) in self._stream_of.items() if r == run_uid]:
            del self._stream_of[uid]
        self._log.summarise(f"run {run_uid}")
        self._finished[run_uid] = None
        while len(self._finished) > self.keep_finished:
            old, _ = self._finished.popitem(last=False)
            self._index.forget(old)

    def _fill_from_log(self, run_uid: str, *, include_stop: bool = False) -> None:
        """Deliver what the run's journal or spool holds and this pipeline has not seen."""
        if self.recovery is None or self._replaying:
            return
        docs = self.recovery.find(run_uid) or []
        before = self.stats["delivered"]
        stop = None
        self._replaying = True
        try:
            for name, doc in docs:
                if name == "stop":
                    stop = doc
                elif self._index.run_of(name, doc) == run_uid:
                    self._deliver(name, doc, run_uid)
        finally:
            self._replaying = False
        if include_stop and stop is not None and run_uid not in self._finished:
            self._deliver("stop", stop, run_uid)
        filled = self.stats["delivered"] - before
        if filled:
            self.stats["filled_from_log"] = self.stats.get("filled_from_log", 0) + filled
            log.warning("run %s: %d documents lost on the wire were taken from its log", run_uid,
                        filled)
        held = self._held_stops.get(run_uid)
        if held is not None and not self._shortfall(run_uid, held[1]):
            del self._held_stops[run_uid]
            self._deliver("stop", held[1], run_uid, force=True)

    def _try_recover(self, ref: str) -> bool:
        if self.recovery is None:
            return False
        now = time.monotonic()
        if now - self._last_try.get(ref, -1e9) < self.retry_interval_s:
            return False
        self._last_try[ref] = now
        if len(self._last_try) > 4 * self.max_orphans:  # refs nobody asks for any more
            self._last_try = {r: t for r, t in self._last_try.items() if r in self._orphans}
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
        if ref is None or not isinstance(ref, str):
            self.stats["orphans_dropped"] += 1
            self._log.report("listener", f"{name} names no run",
                             f"dropping {name} document that names no run")
            return
        try:
            size = len(json.dumps(doc, default=str))
        except (TypeError, ValueError, RecursionError):
            size = self.max_orphan_bytes + 1
        if size > self.max_orphan_bytes:
            self.stats["orphans_dropped"] += 1
            self._log.report("listener", "orphan too big",
                             f"dropping a {size}-byte {name} document for unknown run/uid {ref}: "
                             f"larger than max_orphan_bytes={self.max_orphan_bytes}")
            return
        self._orphans[ref].append((name, doc, size))
        self._n_orphans += 1
        self._orphan_bytes += size
        while self._n_orphans > self.max_orphans or self._orphan_bytes > self.max_orphan_bytes:
            oldest = next(iter(self._orphans))
            _, _, dropped = self._orphans[oldest].pop(0)
            self._n_orphans -= 1
            self._orphan_bytes -= dropped
            self.stats["orphans_dropped"] += 1
            self._log.report("listener", "orphans over limit",
                             f"documents held for unknown runs exceed {self.max_orphans} / "
                             f"{self.max_orphan_bytes} bytes; dropping the oldest")
            if not self._orphans[oldest]:
                del self._orphans[oldest]

    def _release(self, ref: str) -> None:
        waiting = self._orphans.pop(ref, [])
        self._n_orphans -= len(waiting)
        self._orphan_bytes -= sum(size for _, _, size in waiting)
        self._last_try.pop(ref, None)
        for name, doc, _ in waiting:
            self(name, doc)
