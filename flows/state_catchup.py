"""Flow-run states Prefect could not record while its API was down, set once it answers again.

When the Prefect server goes away mid-scan the work goes on without it (:mod:`.relay`), and the
scan's flow run cannot record its end: in the UI it would stay ``Running`` for ever. The listen
flow hands such runs to a :class:`StateCatchUp`, which probes the API cheaply (``/health``, a
2 s timeout: Prefect's own client retries for about a minute per call) and, once it answers,
sets each run's final state (Completed, or Failed for a failed scan) with the summary as its
message. With a ``path`` the pending states are kept in a JSON file too, so a listener that exits
before Prefect is back (``--max-runs``, a restart) sets them the next time it starts.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def api_answers(timeout_s: float = 2.0) -> bool:
    """Whether the configured Prefect API answers its health check now."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return False
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout_s) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class StateCatchUp:
    """Pending final states by flow-run id; :meth:`try_now` sets those it can."""

    def __init__(self, *, retry_every_s: float = 10.0,
                 path: str | os.PathLike | None = None) -> None:
        self.retry_every_s = float(retry_every_s)
        self.path = Path(path) if path is not None else None
        self._pending: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        if self.path is not None and self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text())
                self._pending = {str(k): dict(v) for k, v in loaded.items() if isinstance(v, dict)}
            except (OSError, ValueError, AttributeError) as exc:
                log.warning("cannot read pending Prefect states from %s: %s", self.path, exc)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.caught_up: list[str] = []

    @property
    def pending(self) -> list[str]:
        with self._lock:
            return list(self._pending)

    def add(self, flow_run_id: str | None, summary: dict | None) -> None:
        if not flow_run_id:
            return
        with self._lock:
            self._pending[flow_run_id] = {k: v for k, v in dict(summary or {}).items()
                                          if k in ("run_uid", "status", "errors", "angles")}
            self._save()
        log.warning("flow run %s: Prefect did not record its end; it will be set when the API "
                    "answers again", flow_run_id)

    def try_now(self) -> int:
        """Set the pending states if the API answers; returns how many were set."""
        if not self.pending or not api_answers():
            return 0
        from prefect.client.orchestration import get_client
        from prefect.states import Completed, Failed

        done = 0
        with get_client(sync_client=True) as client:
            for flow_run_id, summary in list(self._pending.items()):
                status = summary.get("status") or "unknown"
                message = (f"scan {summary.get('run_uid', '?')} {status} (recorded after a "
                           "Prefect outage)")
                state = (Failed if status == "failed" or summary.get("errors") else Completed)(
                    message=message)
                try:
                    client.set_flow_run_state(flow_run_id, state, force=True)
                except Exception as exc:  # still unreachable, or refused: keep it for later
                    log.info("flow run %s: state not set yet (%s)", flow_run_id, exc)
                    continue
                with self._lock:
                    self._pending.pop(flow_run_id, None)
                    self._save()
                self.caught_up.append(flow_run_id)
                done += 1
        return done

    def _save(self) -> None:  # with the lock held
        if self.path is None:
            return
        try:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self._pending, default=str))
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot save pending Prefect states to %s: %s", self.path, exc)

    def start(self) -> StateCatchUp:
        def loop() -> None:
            while not self._stop.wait(self.retry_every_s):
                try:
                    self.try_now()
                except Exception:
                    log.exception("state catch-up failed; retrying later")

        self._thread = threading.Thread(target=loop, name="prefect-state-catchup", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1)
