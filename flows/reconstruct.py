"""``reconstruct_scan``: one flow run per scan, one task per unit of the scan's work.

The flow takes the run's calls from its :class:`~apt_stream.flows.relay.RunChannel` (the live
listener's worker hands them over) and runs each as a task: ``publish-run-started``, then per
finished angle ``finish-angle`` (the engine's second pass + rotate back + accumulate) and
``publish-angle`` (Approximant and the angle's row to Tiled), ``reconstruct`` and
``publish-volumes`` when the trigger fires and at the end, ``publish-run-stopped`` last.

Artifacts (keys ``scan-<run uid>-…``): a progress bar (finished angles / N*) updated after every
angle, slice previews (image) at each reconstruction, and at the end a per-angle table and a
markdown summary with timings, Prefect's overhead and, with ground truth, the paper's metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.states import Completed, Failed

from apt_stream.private_dir import private_dir

from . import tasks
from .artifacts import ScanBook, artifact_key, group_by_shape, png_data_url
from .relay import Call, RunChannel


def _timed_task(book: ScanBook, kind: str, task: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run a task from the flow and book its wall time against its body's."""
    tasks.take_body_seconds()
    t0 = time.perf_counter()
    error = None
    try:
        return task(*args, **kwargs)
    except Exception as exc:
        error = exc
        raise
    finally:
        body_s, publish_s = tasks.take_body_seconds()
        book.record(kind, call_s=time.perf_counter() - t0, body_s=body_s, publish_s=publish_s,
                    error=error)


def _artifact(book: ScanBook, create: Callable, *args: Any, **kwargs: Any) -> Any:
    """Create or update an artifact; its time counts as Prefect overhead."""
    t0 = time.perf_counter()
    try:
        return create(*args, **kwargs)
    finally:
        book.artifact_s += time.perf_counter() - t0


def _flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:  # no flow run context (called as a plain function)
        return None


def _run_call(book: ScanBook, call: Call) -> None:
    tasks.take_body_seconds()
    t0 = time.perf_counter()
    call.execute()
    body_s, publish_s = tasks.take_body_seconds()
    book.record(call.kind, call_s=time.perf_counter() - t0, body_s=body_s, publish_s=publish_s,
                error=call.error)


def _on_volumes(book: ScanBook, channel: RunChannel, call: Call, *, preview_dir: Path,
                truth_fn: Callable | None, log: logging.Logger | logging.LoggerAdapter) -> None:
    """Previews (and metrics for the final volumes) while the worker waits on this call."""
    final = bool(call.info["final"])
    shown = dict(call.info["volumes"])
    if channel.engine is not None:
        shown = {"approximant": channel.engine.volume(), **shown}
    key = artifact_key(book.run_uid)
    stage = "final" if final else "live"
    try:
        for i, group in enumerate(group_by_shape(shown)):
            title = f"{book.run_uid[:8]}: {', '.join(group)} ({len(book.rows)} angles, {stage})"
            png = _timed_task(book, "preview", tasks.preview, group,
                              preview_dir / f"{key}-{stage}-{i}.png", title)
            _artifact(book, create_image_artifact, png_data_url(png), key=f"{key}-preview-{i}",
                      description=title)
            book.previews.append(str(png))
    except Exception as exc:
        log.warning("preview failed: %s", exc)
    if not final or truth_fn is None:
        return
    try:
        truth = truth_fn(channel.header)
        if truth is None:
            return
        scored = {n: v for n, v in shown.items() if np.shape(v) == np.shape(truth)}
        if scored:
            book.metrics = _timed_task(book, "score", tasks.score, scored, truth)
            _timed_task(book, "publish_metrics", tasks.publish_metrics, channel.publisher,
                        book.run_uid, book.metrics)
    except Exception as exc:
        log.warning("scoring against ground truth failed: %s", exc)


@flow(name="reconstruct-scan", flow_run_name="scan-{run_uid}", validate_parameters=False,
      persist_result=False, log_prints=False)
def reconstruct_scan(
    channel: RunChannel,
    run_uid: str,
    *,
    n_star: int = 29,
    theta_star_deg: float = 17.0,
    preview_dir: str | None = None,
    truth_fn: Callable[[Any], Any] | None = None,
    stop: threading.Event | Callable[[], bool] | None = None,
    progress_every_s: float = 5.0,
) -> Any:
    """Run one live scan's work as tasks and report it as artifacts.

    Parameters
    ----------
    channel
        The run's calls (from :class:`~apt_stream.flows.relay.LiveBridge`).
    run_uid
        The run (names the flow run and the artifacts).
    n_star, theta_star_deg
        The trigger rule, for the progress bar and the summary.
    preview_dir
        Where slice-preview PNGs go (default: the private per-user folder
        ``~/.cache/apt-stream/previews``, see :func:`apt_stream.private_dir.private_dir`).
    truth_fn
        ``truth_fn(header)`` -> ground-truth volume or None; with it, the final volumes of the
        truth's shape are scored and a ``metrics`` table is published.
    stop
        An event (or predicate) that ends the flow early; the rest of the run then completes
        on the library's worker without Prefect.
    progress_every_s
        Least time between two progress-artifact updates (each costs ~15–25 ms of API time; on
        fast angles updating every angle would cost more than the angle's tasks).

    Returns
    -------
    dict
        The summary (status, angles, timings, Prefect overhead); the flow run is Failed when
        the scan failed or a task raised.
    """
    log = get_run_logger()
    channel.flow_run_id = _flow_run_id()
    book = ScanBook(run_uid=run_uid, n_star=n_star, theta_star_deg=theta_star_deg)
    key = artifact_key(run_uid)
    # Never a fixed name in the shared temp dir (another user could plant a symlink there).
    pdir = Path(preview_dir) if preview_dir else private_dir("previews", fallback_to_temp=True)
    progress = _artifact(book, create_progress_artifact, 0.0, key=f"{key}-progress",
                         description=f"finished angles of N* = {n_star}")
    tiled_uri = None
    shown_pct, shown_at = 0.0, time.monotonic()

    def show_progress(*, force: bool = False) -> None:
        nonlocal shown_pct, shown_at
        pct = book.progress_pct
        due = time.monotonic() - shown_at >= progress_every_s or (pct >= 100.0 > shown_pct)
        if pct != shown_pct and (force or due):
            _artifact(book, update_progress_artifact, progress, pct,
                      description=f"{len(book.rows)} of N* = {n_star} angles finished")
            shown_pct, shown_at = pct, time.monotonic()

    for call in channel.calls(stop=stop):
        with call:
            _run_call(book, call)
            if call.error is not None:
                log.error("%s failed: %s", call.kind, call.error)
                continue
            if call.kind == "run_started" and channel.publisher is not None:
                tiled_uri = getattr(channel.publisher, "scan_uri", lambda _: None)(run_uid)
            elif call.kind == "finish_angle":
                book.add_angle(call.result)
                show_progress()
            elif call.kind == "reconstruct":
                book.reconstructions += 1
            elif call.kind == "reconstruction_ready":
                _on_volumes(book, channel, call, preview_dir=pdir, truth_fn=truth_fn, log=log)
            elif call.kind == "run_stopped":
                book.status = call.info["status"]
                book.gaps = {k: call.info[k] for k in ("frames_missing", "angles_with_gaps")
                             if k in call.info}
    show_progress(force=True)
    if book.status is None:
        book.status = "detached"
        log.warning("left run %s before its end; it finishes without Prefect", run_uid)
    if book.rows:
        _artifact(book, create_table_artifact, book.table(), key=f"{key}-angles",
                  description=f"per-angle results of {run_uid}")
    # The summary is written last, so its overhead figure leaves out its own write.
    _artifact(book, create_markdown_artifact, book.markdown(tiled_uri=tiled_uri),
              key=f"{key}-summary", description=f"scan {run_uid}")
    summary = book.summary()
    channel.summary = summary
    log.info("scan %s %s: %d angles, Prefect overhead %.3f s over %d tasks", run_uid,
             book.status, len(book.rows), book.overhead_s, book.n_tasks)
    if book.status == "failed" or book.errors:
        return Failed(message=f"scan {run_uid} {book.status}; errors: {book.errors}", data=summary)
    return Completed(message=f"scan {run_uid} {book.status}", data=summary)
