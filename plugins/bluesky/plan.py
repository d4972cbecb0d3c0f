"""The ptycho-tomography plan and the run journal it keeps next to its frames."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp

from apt_stream.errors import InputError
from apt_stream.stream.paths import file_uri
from apt_stream.stream.schema import (
    ANGLES_STREAM,
    APT_KEY,
    JOURNAL_FILE,
    PROBE_FILE,
    DataKeyMap,
    build_start_metadata,
)
from apt_stream.stream.spool import JsonlDocumentWriter

from .devices import (
    AngleMarker,
    SimPtychoDetector,
    readback_key,
    write_probe,
)
from .frames import FrameSource

log = logging.getLogger(__name__)


class RunJournal:
    """A RunEngine callback writing every document of an apt-stream run to
    ``<run_dir>/documents.jsonl`` (the run journal a late listener recovers from).

    Runs without an ``apt_stream.run_dir`` in their start document are ignored. A journal that
    cannot be written is logged, never raised: it must not stop the acquisition.
    """

    def __init__(self) -> None:
        self._writer: JsonlDocumentWriter | None = None

    def __call__(self, name: str, doc: dict) -> None:
        try:
            if name == "start":
                run_dir = (doc.get(APT_KEY) or {}).get("run_dir")
                if self._writer is not None:
                    self._writer.close()
                self._writer = JsonlDocumentWriter(Path(run_dir) / JOURNAL_FILE) if run_dir else None
            if self._writer is None:
                return
            self._writer.write(name, doc)
            if name == "stop":
                self._writer.close()
                self._writer = None
        except Exception:
            log.exception("run journal could not record a %s document", name)


def ptycho_tomo_plan(
    detector: SimPtychoDetector,
    rot,
    stage_x,
    stage_y,
    *,
    scan_source: Any,
    md: dict | None = None,
    rate_limit_hz: float | None = None,
    angle_order: Sequence[int] | None = None,
    max_angles: int | None = None,
    marker: AngleMarker | None = None,
    journal: bool = True,
    sample: str | None = None,
    advisor: Callable[[list[int], list[int]], dict] | None = None,
):
    """Acquire a ptycho-tomography scan: for each angle, move the rotation stage, then for each
    lateral position move x/y and trigger + read the detector; mark each finished angle.

    Parameters
    ----------
    detector
        A :class:`SimPtychoDetector` (it owns the frames file under its root).
    rot, stage_x, stage_y
        Positioners: rotation (deg), sample x and y (object-field pixels).
    scan_source
        Frames to acquire: a ScanData, a scan file path or a :class:`FrameSource`.
    md
        Extra start-document metadata (the ``apt_stream`` key is reserved).
    rate_limit_hz
        At most this many frames per second (emulates acquisition time; None: as fast as possible).
    angle_order
        Angle indices in acquisition order (default: as planned); any order is allowed.
    max_angles
        Stop after this many angles (the start document still lists the planned scan).
    marker
        The ``angles``-stream readable (default: a new :class:`AngleMarker`).
    journal
        Write the run journal ``documents.jsonl`` next to the frames (needed for late joiners).
    sample
        Sample name (default: from the scan's provenance).
    advisor
        Closed loop: ``advisor(done, pending)`` (angle indices acquired so far, and still to
        acquire) is asked before each angle after the first; its answer
        ``{"stop": bool, "next": index or None}`` ends the scan early (``stop``: the run ends
        with exit status success and reason ``"stopped on advice"`` in its stop document) or
        picks the next angle (``next``, one of ``pending``; None keeps the planned order).
        E.g. ``apt_stream.stream.advice.AdviceClient(address).advisor(angles_deg)``.

    Yields
    ------
    Msg
        Bluesky messages; the run's documents are described in docs/streaming.md.
    """
    if md is not None and APT_KEY in md:
        raise InputError(f"md may not set {APT_KEY!r}: the plan writes that section")
    if rate_limit_hz is not None and not rate_limit_hz > 0:
        raise InputError(f"rate_limit_hz must be > 0 or None, got {rate_limit_hz!r}")
    source = FrameSource.coerce(scan_source, sample=sample)
    order = source.acquisition_order(angle_order=angle_order, max_angles=max_angles)
    marker = marker or AngleMarker()
    run_dir = detector.new_run_dir()
    probe_path = write_probe(run_dir / PROBE_FILE, source.probe)
    done_index, done_deg, done_n = marker.keys
    keys = DataKeyMap(
        frames=detector.frames_key,
        angle_deg=readback_key(rot),
        angle_index=detector.angle_index_key,
        position_y_px=readback_key(stage_y),
        position_x_px=readback_key(stage_x),
        done_angle_index=done_index,
        done_angle_deg=done_deg,
        done_n_frames=done_n,
    )
    geometry = source.geometry()
    section = build_start_metadata(
        **geometry,
        probe_uri=file_uri(probe_path),
        probe_shape=source.probe.shape,
        run_dir=str(run_dir),
        data_keys=keys,
        extra={"rate_limit_hz": rate_limit_hz},
    )
    n_planned = sum(len(rows) for _, rows in order)
    start_md = {
        "plan_name": "ptycho_tomo_plan",
        "sample": geometry["sample"],
        "num_points": n_planned,
        "num_intervals": max(0, n_planned - 1),
        "motors": [rot.name, stage_y.name, stage_x.name],
        "detectors": [detector.name],
        "plan_args": {
            "rate_limit_hz": rate_limit_hz,
            "angle_order": None if angle_order is None else [int(n) for n in angle_order],
            "max_angles": max_angles,
        },
        "hints": {"dimensions": [([readback_key(rot)], "primary")]},
        **(md or {}),
        APT_KEY: section,
    }
    detector.arm(source, [int(k) for _, rows in order for k in rows], run_dir)
    period = None if rate_limit_hz is None else 1.0 / rate_limit_hz

    def acquire():
        next_t = time.monotonic()
        pending = dict(order)
        done: list[int] = []
        while pending:
            n = next(iter(pending))
            if advisor is not None and done:
                advice = advisor(list(done), list(pending)) or {}
                if advice.get("stop"):
                    log.info("stopping after %d angles on advice: %s", len(done),
                             advice.get("reason"))
                    yield from bps.null()
                    return
                if advice.get("next") in pending:
                    n = advice["next"]
            rows = pending.pop(n)
            if advisor is not None:
                detector.queue_next(rows)
            done.append(n)
            angle = float(source.angles_deg[n])
            yield from bps.mv(rot, angle)
            for k in rows:
                y, x = (float(v) for v in source.positions_px[k])
                yield from bps.mv(stage_y, y, stage_x, x)
                if period is not None:
                    wait = next_t - time.monotonic()
                    if wait > 0:
                        yield from bps.sleep(wait)
                    next_t = max(next_t, time.monotonic()) + period
                yield from bps.trigger_and_read([detector, rot, stage_y, stage_x])
            marker.mark(n, angle, len(rows))
            yield from bps.trigger_and_read([marker], name=ANGLES_STREAM)

    plan = bpp.run_wrapper(bpp.stage_wrapper(acquire(), [detector]), md=start_md)
    if journal:
        plan = bpp.subs_wrapper(plan, RunJournal())
    return (yield from plan)
