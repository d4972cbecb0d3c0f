"""Replay a scan file (or a ScanData) as a live document stream over 0MQ.

The same plan and simulated devices as a live acquisition run under a RunEngine; only the frame
source differs. ``apt-stream replay SCAN.h5 --zmq ADDR --rate HZ`` calls :func:`replay_scan`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apt_stream.errors import InputError
from apt_stream.stream.decode import PROBE_NAME

from .devices import SimPtychoDetector, make_stages
from .frames import FrameSource
from .plan import ptycho_tomo_plan
from .zmq_link import make_publisher


def make_run_engine():
    """A RunEngine usable from any thread (no SIGINT handler), with an in-memory scan_id."""
    from bluesky import RunEngine

    return RunEngine({}, context_managers=[])


def replay_scan(
    scan_path_or_data: Any,
    *,
    zmq_address: str | None = None,
    data_root: str | os.PathLike | None = None,
    publisher=None,
    rate_hz: float | None = None,
    serializer: str = "msgpack",
    md: dict | None = None,
    angle_order: Sequence[int] | None = None,
    max_angles: int | None = None,
    run_engine=None,
    connect_grace_s: float = 0.3,
    subscribers: Sequence = (),
    advisor=None,
) -> str:
    """Publish a scan as the document stream of a ptycho-tomo run; returns the run uid.

    Parameters
    ----------
    scan_path_or_data
        A scan file path, a ScanData or a FrameSource.
    data_root
        Where the simulated detector writes the run folder (frames, probe, journal); a listener
        must have it among its data roots. Default for a scan file: ``<its folder>/runs``.
    zmq_address
        The proxy's input (``tcp://host:port``); ignored when ``publisher`` is given.
    publisher
        An existing bluesky Publisher (e.g. one already linked with ``wait_for_link``).
    rate_hz
        Frames per second (None: as fast as the plan runs).
    serializer
        ``"msgpack"`` or ``"json"``.
    md, angle_order, max_angles
        Passed to :func:`ptycho_tomo_plan`.
    run_engine
        Reuse a RunEngine (default: a new one).
    connect_grace_s
        With a new publisher, send link probes for this long first: 0MQ drops what is sent before
        the TCP connection is up. Listeners that join later still recover the run from its journal.
    subscribers
        Extra RunEngine callbacks for this run (e.g. a local document collector).
    advisor
        Closed loop: passed to :func:`ptycho_tomo_plan` (asked between angles for the next one
        and whether to stop), e.g. ``AdviceClient(address).advisor(angles_deg)``; or an advice
        server's address (``tcp://…``), for which that advisor is made here.
    """
    if publisher is None and zmq_address is None:
        raise InputError("replay_scan needs zmq_address or publisher")
    if data_root is None:
        if not isinstance(scan_path_or_data, str | os.PathLike):
            raise InputError("replay_scan needs data_root when given a scan in memory")
        data_root = Path(scan_path_or_data).resolve().parent / "runs"
    source = FrameSource.coerce(scan_path_or_data)
    if isinstance(advisor, str):
        from apt_stream.stream.advice import AdviceClient

        advisor = AdviceClient(advisor).advisor(source.angles_deg)
    own_publisher = publisher is None
    if own_publisher:
        publisher = make_publisher(zmq_address, serializer=serializer)
        deadline = time.monotonic() + connect_grace_s
        while time.monotonic() < deadline:
            publisher(PROBE_NAME, {"token": "replay"})
            time.sleep(0.02)
    RE = run_engine if run_engine is not None else make_run_engine()
    tokens = [RE.subscribe(publisher)] + [RE.subscribe(cb) for cb in subscribers]
    rot, stage_x, stage_y = make_stages()
    detector = SimPtychoDetector(root=data_root)
    try:
        uids = RE(
            ptycho_tomo_plan(
                detector, rot, stage_x, stage_y, scan_source=source, md=md, rate_limit_hz=rate_hz,
                angle_order=angle_order, max_angles=max_angles, advisor=advisor,
            )
        )
    finally:
        for token in tokens:
            RE.unsubscribe(token)
        if own_publisher:
            publisher.close()
    if not uids:
        raise InputError("the replay produced no run")
    return uids[0]
