"""Queue apt-stream's suggested next angle on a bluesky-queueserver (RE Manager over 0MQ).

The closed loop's queue-server route (docs/closed-loop.md): where a beamline runs its plans
through a queue server instead of one long plan with an ``advisor``, :class:`QueueRoute` is the
LiveReconstructor's ``on_advice`` (or is called with advice from an
:class:`~apt_stream.stream.advice.AdviceClient`): for each new advice that does not say stop it
adds ``measure_angle(angle_deg=<top suggestion>)`` — the plan of
:mod:`apt_stream.plugins.bluesky.qserver_profile`, the queue server's startup module — to the
queue, once per angle, and (``start=True``) starts the queue if it is idle.

Uses ``bluesky-queueserver-api``'s ``REManagerAPI`` on the RE Manager's 0MQ control address
(loopback by default).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_CONTROL_ADDRESS = "tcp://127.0.0.1:60615"
PLAN_NAME = "measure_angle"

#: The RE Manager's user-group permissions (``start-re-manager --user-group-permissions``):
#: group ``primary`` (the one :func:`queue_suggested_angle` uses) may run every plan of the
#: profile on every device; names starting with ``_`` stay private.
PERMISSIONS_YAML = """\
user_groups:
  root:
    allowed_plans: [null]
    forbidden_plans: [":^_"]
    allowed_devices: [null]
    forbidden_devices: [":^_:?.*"]
    allowed_functions: [null]
    forbidden_functions: [":^_"]
  primary:
    allowed_plans: [":.*"]
    forbidden_plans: [null]
    allowed_devices: [":?.*:depth=5"]
    forbidden_devices: [null]
    allowed_functions: [null]
    forbidden_functions: [null]
"""


def write_permissions(path: str | Path) -> Path:
    """Write :data:`PERMISSIONS_YAML` to ``path`` (for ``--user-group-permissions``)."""
    path = Path(path)
    path.write_text(PERMISSIONS_YAML)
    return path


def queue_suggested_angle(
    advice: dict,
    *,
    control_address: str = DEFAULT_CONTROL_ADDRESS,
    scan_path: str | None = None,
    data_root: str | None = None,
    user: str = "apt-stream",
    user_group: str = "primary",
    start: bool = False,
    api: Any = None,
) -> dict | None:
    """Add ``measure_angle`` for the advice's top next angle; returns the queued item (with its
    ``item_uid``), or None when the advice says stop or suggests nothing."""
    if advice.get("stop") or not advice.get("next_angles"):
        return None
    from bluesky_queueserver_api import BPlan

    angle = float(advice["next_angles"][0]["angle_deg"])
    kwargs: dict[str, Any] = {"angle_deg": angle}
    if scan_path:
        kwargs["scan_path"] = str(scan_path)
    if data_root:
        kwargs["data_root"] = str(data_root)
    kwargs["md"] = {"apt_stream_advice_run_uid": advice.get("run_uid"),
                    "apt_stream_advice_n_angles": advice.get("n_angles")}
    own = api is None
    if own:
        from bluesky_queueserver_api.zmq import REManagerAPI

        api = REManagerAPI(zmq_control_addr=control_address)
    try:
        got = api.item_add(BPlan(PLAN_NAME, **kwargs), user=user, user_group=user_group)
        if start and api.status().get("manager_state") == "idle":
            api.queue_start()
        return got.get("item")
    finally:
        if own:
            api.close()


class QueueRoute:
    """``on_advice(run_uid, advice)`` that queues each newly suggested angle once (thread-safe;
    a failing queue server is logged, never raised: advice must not cost a run)."""

    def __init__(self, control_address: str = DEFAULT_CONTROL_ADDRESS, *,
                 scan_path: str | None = None, data_root: str | None = None,
                 start: bool = False, user: str = "apt-stream",
                 user_group: str = "primary") -> None:
        self.control_address = control_address
        self.options = {"scan_path": scan_path, "data_root": data_root, "start": start,
                        "user": user, "user_group": user_group}
        self.queued: list[dict] = []
        self.errors = 0
        self._angles: set[float] = set()
        self._lock = threading.Lock()

    def __call__(self, run_uid: str, advice: dict) -> dict | None:
        nxt = advice.get("next_angles") or []
        if advice.get("stop") or not nxt:
            return None
        angle = round(float(nxt[0]["angle_deg"]), 6)
        with self._lock:
            if angle in self._angles:
                return None
            self._angles.add(angle)
        try:
            item = queue_suggested_angle({**advice, "run_uid": run_uid},
                                         control_address=self.control_address, **self.options)
        except Exception as exc:
            self.errors += 1
            log.warning("could not queue angle %.3f° on %s: %s", angle, self.control_address, exc)
            with self._lock:
                self._angles.discard(angle)
            return None
        if item is not None:
            self.queued.append(item)
        return item
