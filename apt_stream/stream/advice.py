"""Tell the beamline: the newest stop advice and next-angle suggestions, over 0MQ on loopback.

apt-stream side: :class:`AdviceBoard` keeps each run's newest advice (pass ``board.post`` as the
LiveReconstructor's ``on_advice``); :class:`AdviceServer` answers JSON requests for it on a REP
socket (``tcp://127.0.0.1:<port>`` by default).

Beamline side: :class:`AdviceClient` asks (REQ, with a timeout: a silent apt-stream never
blocks acquisition for long); :meth:`AdviceClient.advisor` makes the callable that
``ptycho_tomo_plan(advisor=...)`` asks between angles: ``advisor(done, pending)`` ->
``{"stop": bool, "next": index or None}``.

Requests and answers (one JSON object each)::

    {"op": "advice", "run_uid": null | "<uid>"}   -> {"ok": true, "advice": {...} | null}
    {"op": "ping"}                                  -> {"ok": true}

``advice`` is what LiveReconstructor posts: ``run_uid``, ``n_angles``, ``stop``, ``reason``,
``next_angles`` ([{angle_deg, score, gap_deg, disagreement}], best first), ``convergence``.
Without ``run_uid`` the newest run's advice is answered.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)


class AdviceBoard:
    """Thread-safe newest advice per run (and which run posted last)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_run: dict[str, dict] = {}
        self._newest: str | None = None
        self.posted = 0

    def post(self, run_uid: str, advice: dict) -> None:
        with self._lock:
            self._by_run[run_uid] = dict(advice)
            self._newest = run_uid
            self.posted += 1

    def get(self, run_uid: str | None = None) -> dict | None:
        with self._lock:
            uid = run_uid or self._newest
            got = self._by_run.get(uid) if uid else None
            return None if got is None else dict(got)


class AdviceServer:
    """Answer advice requests from a board on a 0MQ REP socket (a daemon thread)."""

    def __init__(self, board: AdviceBoard, address: str = "tcp://127.0.0.1:0") -> None:
        import zmq

        self.board = board
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        if address.endswith(":0"):
            port = self._sock.bind_to_random_port(address.rsplit(":", 1)[0])
            self.address = f"{address.rsplit(':', 1)[0]}:{port}"
        else:
            self._sock.bind(address)
            self.address = address
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="apt-advice", daemon=True)
        self._thread.start()

    def _answer(self, raw: bytes) -> dict:
        try:
            req = json.loads(raw)
        except ValueError:
            return {"ok": False, "error": "not JSON"}
        if not isinstance(req, dict):
            return {"ok": False, "error": "expected a JSON object"}
        op = req.get("op")
        if op == "ping":
            return {"ok": True}
        if op == "advice":
            uid = req.get("run_uid")
            return {"ok": True, "advice": self.board.get(uid if isinstance(uid, str) else None)}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def _serve(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not dict(poller.poll(100)):
                continue
            raw = self._sock.recv()
            self._sock.send(json.dumps(self._answer(raw), default=float).encode())
        self._sock.close(0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def __enter__(self) -> AdviceServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AdviceClient:
    """Ask an :class:`AdviceServer`; every request times out after ``timeout_s`` (-> None)."""

    def __init__(self, address: str, *, timeout_s: float = 2.0) -> None:
        self.address = address
        self.timeout_s = float(timeout_s)

    def request(self, payload: dict) -> dict | None:
        import zmq

        sock = zmq.Context.instance().socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, int(self.timeout_s * 1000))
        try:
            sock.connect(self.address)
            sock.send(json.dumps(payload).encode())
            return json.loads(sock.recv())
        except zmq.Again:
            return None
        finally:
            sock.close(0)

    def advice(self, run_uid: str | None = None) -> dict | None:
        got = self.request({"op": "advice", "run_uid": run_uid})
        return None if not got or not got.get("ok") else got.get("advice")

    def advisor(
        self,
        angles_deg: Sequence[float],
        *,
        run_uid: str | None = None,
        min_angles: int = 6,
        max_lag: int = 0,
        wait_s: float = 30.0,
        poll_s: float = 0.05,
    ) -> Callable[[list[int], list[int]], dict]:
        """The plan's ``advisor(done, pending)``: wait (at most ``wait_s``) until apt-stream's
        advice covers all but ``max_lag`` of the angles acquired, then answer its stop advice and
        the best pending suggestion (by angle; None: the plan's own order). Before ``min_angles``
        (no estimate yet) it answers at once with no advice."""
        angles = np.asarray(angles_deg, dtype=float)

        def advise(done: list[int], pending: list[int]) -> dict:
            if len(done) < min_angles:
                return {"stop": False, "next": None}
            deadline = time.monotonic() + wait_s
            advice = None
            while True:
                advice = self.advice(run_uid)
                if advice is not None and advice.get("n_angles", 0) >= len(done) - max_lag:
                    break
                if time.monotonic() >= deadline:
                    log.warning("no advice for %d angles within %.0f s; going on", len(done),
                                wait_s)
                    break
                time.sleep(poll_s)
            if not advice:
                return {"stop": False, "next": None}
            nxt = None
            for s in advice.get("next_angles") or []:
                near = [n for n in pending if abs(angles[n] - float(s["angle_deg"])) < 1e-6]
                if near:
                    nxt = near[0]
                    break
            return {"stop": bool(advice.get("stop")), "next": nxt, "reason": advice.get("reason"),
                    "n_angles": advice.get("n_angles")}

        return advise
