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

import json
import logging
import math
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger
from prefect.states import Completed, Failed

from apt_stream.private_dir import private_dir

from . import tasks
from .artifacts import ScanBook, artifact_key, convergence_markdown, group_by_shape, png_data_url
from .relay import LAST_KIND, Call, RunChannel

#: Prefect's overhead may cost at most this share of the compute per unit of work: a task's
#: overhead against the angles it runs (angles are grouped into one task until it holds), and a
#: live update's artifacts against the angles between two updates.
TASK_BUDGET = 0.015
LIVE_BUDGET = 0.015
#: A live update's artifact cost assumed before one is measured (table + progress + image).
LIVE_COST_PRIOR_S = 0.05


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


class ArtifactWriter:
    """The flow's artifacts through one Prefect client: one API request each.

    Prefect's ``create_*_artifact`` helpers open a new client per call (≈ 2× the time of the
    request itself here). Each call's time is booked as Prefect overhead; a failure (Prefect
    unreachable) is logged and counted, never raised: artifacts must not fail a scan.
    """

    def __init__(self, book: ScanBook, log: logging.Logger | logging.LoggerAdapter,
                 flow_run_id: str | None) -> None:
        self.book = book
        self.log = log
        self.flow_run_id = flow_run_id
        self.failures = 0
        self._client: Any = None

    def _call(self, kind: str, fn: Callable[[Any], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            if self._client is None:
                from prefect.client.orchestration import get_client

                client = get_client(sync_client=True)
                client.__enter__()
                self._client = client
            return fn(self._client)
        except Exception as exc:
            self.failures += 1
            self.log.warning("%s artifact not written: %s: %s", kind, type(exc).__name__, exc)
            return None
        finally:
            self.book.record_artifact(kind, time.perf_counter() - t0)

    def create(self, kind: str, key: str, data: Any, description: str) -> Any:
        """A new artifact, or a new version of the one with this ``key``; returns its id."""
        from prefect.client.schemas.actions import ArtifactCreate

        request = ArtifactCreate(type=kind, key=key, data=data, description=description,
                                 flow_run_id=self.flow_run_id)
        made = self._call(kind, lambda c: c.create_artifact(artifact=request))
        return None if made is None else made.id

    def progress(self, artifact_id: Any, pct: float, description: str) -> None:
        from prefect.client.schemas.actions import ArtifactUpdate

        if artifact_id is None:
            return
        update = ArtifactUpdate(data=float(pct), description=description)
        self._call("progress", lambda c: c.update_artifact(artifact_id, update))

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.__exit__(None, None, None)
            except Exception:
                pass


def _flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:  # no flow run context (called as a plain function)
        return None


def _run_call(book: ScanBook, call: Call) -> float:
    """Run a call as its own task; returns its body's compute seconds (publishing left out)."""
    tasks.take_body_seconds()
    t0 = time.perf_counter()
    call.execute()
    body_s, publish_s = tasks.take_body_seconds()
    book.record(call.kind, call_s=time.perf_counter() - t0, body_s=body_s, publish_s=publish_s,
                error=call.error)
    return body_s - publish_s


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def choose_angles_per_task(book: ScanBook, *, budget: float = TASK_BUDGET, most: int = 16) -> int:
    """How many finished angles one task should hold so that its overhead stays within
    ``budget`` of their compute, from what this scan measured so far (1 until it has)."""
    over = _median(book.task_overheads)
    compute = _median(book.angle_compute[-8:])
    if over is None or compute is None:
        return 1
    if compute <= 0:
        return most
    return max(1, min(most, math.ceil(over / (budget * compute))))


def live_every_auto(book: ScanBook, *, budget: float = LIVE_BUDGET, most: int = 10) -> int:
    """Angles between two live updates so that their artifacts stay within ``budget`` of the
    compute in between (at least every ``most`` angles)."""
    compute = _median(book.angle_compute[-8:])
    if compute is None:
        return most
    cost = book.live_cost_s() or LIVE_COST_PRIOR_S
    if compute <= 0:
        return most
    return max(1, min(most, math.ceil(cost / (budget * compute))))


def _on_volumes(book: ScanBook, channel: RunChannel, call: Call, *, preview_dir: Path,
                truth_fn: Callable | None, log: logging.Logger | logging.LoggerAdapter,
                writer: ArtifactWriter) -> None:
    """Previews (and metrics for the final volumes) while the worker waits on this call."""
    final = bool(call.info["final"])
    shown = dict(call.info["volumes"])
    if channel.engine is not None:
        shown = {"approximant": channel.engine.volume(), **shown}
    key = artifact_key(book.run_uid)
    n = len(book.rows)
    # A live preview is the state at that moment (Approximant and APT from n angles): its own
    # file per angle count, so a later one (or the final) does not overwrite it.
    name = "final" if final else f"live-{n:03d}angles"
    when = f"final, {n} angles" if final else f"live, {n} of N* = {book.n_star} angles"
    voxel_size_m = getattr(channel.header, "voxel_size_m", None)
    if final and _same_volumes(book.last_preview, shown):
        # The trigger fired on the last angle: the final volumes are the ones just shown. Keep a
        # "final" file for the user, but no second render, task or image artifact (measured:
        # they were a fifth of Prefect's overhead at demo scale).
        try:
            # (the same file when a final reconstruction fired early on stop advice is
            # announced final again at the run's stop)
            copies = [png if Path(png) == preview_dir / f"{key}-{name}-{i}.png" else
                      shutil.copyfile(png, preview_dir / f"{key}-{name}-{i}.png")
                      for i, png in enumerate(book.last_preview[1])]
            book.previews.extend(str(c) for c in copies)
            shown_pngs = None
        except OSError as exc:
            log.warning("could not reuse the last preview, rendering again: %s", exc)
            shown_pngs = []
    else:
        shown_pngs = []
    try:
        truth = truth_fn(channel.header) if truth_fn is not None else None
    except Exception as exc:
        log.warning("no ground truth for the preview: %s", exc)
        truth = None
    try:
        for i, group in enumerate(group_by_shape(shown) if shown_pngs is not None else []):
            title = f"{book.run_uid[:8]}: {when}"
            fits = truth is not None and np.shape(getattr(truth, "delta", truth)) == np.shape(
                next(iter(group.values())))
            options = {"voxel_size_m": voxel_size_m, "truth": truth if fits else None}
            png = _timed_task(book, "preview", tasks.preview, group,
                              preview_dir / f"{key}-{name}-{i}.png", title, **options)
            # The flow's one client (Prefect's create_image_artifact opens a new one per call).
            writer.create("image", f"{key}-preview-{i}", png_data_url(png), title)
            book.previews.append(str(png))
            shown_pngs.append(str(png))
        if shown_pngs:
            book.last_preview = (shown, shown_pngs)
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


def _same_volumes(last: tuple[dict, list[str]] | None, shown: dict) -> bool:
    """Whether ``shown`` holds exactly the volumes of the last preview (same names, same data)."""
    if last is None or set(last[0]) != set(shown):
        return False
    return all(last[0][k] is shown[k] or np.array_equal(last[0][k], shown[k]) for k in shown)


class _LiveView:
    """The per-angle view of a running scan: progress, the angles table and an Approximant
    preview, as new versions of the same artifacts every ``every`` angles (None: chosen from
    the measured cost, see :func:`live_every_auto`) and at the end."""

    def __init__(self, book: ScanBook, channel: RunChannel, writer: ArtifactWriter, *,
                 every: int | None, preview_dir: Path, truth_fn: Callable | None,
                 log: logging.Logger | logging.LoggerAdapter) -> None:
        self.book, self.channel, self.writer, self.log = book, channel, writer, log
        self.every = every
        self.preview_dir = preview_dir
        self.truth_fn = truth_fn
        self.key = artifact_key(book.run_uid)
        self.progress_id = writer.create(
            "progress", f"{self.key}-progress", 0.0,
            f"finished angles of N* = {book.n_star}")
        self.shown_angles = 0
        self.shown_convergence = 0
        self.snapshot: Any = None

    def due(self) -> bool:
        every = self.every or live_every_auto(self.book)
        return len(self.book.rows) - self.shown_angles >= every

    def take_snapshot(self) -> None:
        """While the worker waits (the engine is not being changed): copy the Approximant."""
        engine = self.channel.engine
        if engine is None:
            return
        try:
            self.snapshot = np.array(engine.volume(), copy=True)
        except Exception as exc:
            self.log.warning("no Approximant for the live preview: %s", exc)

    def _preview(self) -> None:
        volume, self.snapshot = self.snapshot, None
        if volume is None:
            return
        n = len(self.book.rows)
        title = f"{self.book.run_uid[:8]}: Approximant, live, {n} of N* = {self.book.n_star} angles"
        options: dict[str, Any] = {"voxel_size_m": getattr(self.channel.header, "voxel_size_m", None)}
        try:
            truth = self.truth_fn(self.channel.header) if self.truth_fn is not None else None
            if truth is not None and np.shape(getattr(truth, "delta", truth)) == np.shape(volume):
                options["truth"] = truth
        except Exception as exc:
            self.log.warning("no ground truth for the live preview: %s", exc)
        path = self.preview_dir / f"{self.key}-live-approximant-{n:03d}angles.png"
        tasks.take_body_seconds()
        t0 = time.perf_counter()
        try:
            # Not a task: a picture for the UI, rendered while the worker goes on.
            png = plain_preview(tasks.preview)({"approximant": volume}, path, title, **options)
        except Exception as exc:
            self.log.warning("live preview failed: %s", exc)
            return
        finally:
            tasks.take_body_seconds()
            self.book.plain_s["live_preview"] += time.perf_counter() - t0
        self.writer.create("image", f"{self.key}-preview-0", png_data_url(png), title)
        self.book.live_previews.append(str(png))

    def _convergence_plot(self, rows: list[dict]) -> None:
        """The same estimates as a plot (image artifact), rendered outside any task."""
        from apt_stream.figures import convergence_png

        t0 = time.perf_counter()
        try:
            png = convergence_png(rows, self.preview_dir / f"{self.key}-convergence.png",
                                  n_star=self.book.n_star, title=f"scan {self.book.run_uid}")
        except Exception as exc:
            self.log.warning("convergence plot failed: %s", exc)
            return
        finally:
            self.book.plain_s["live_preview"] += time.perf_counter() - t0
        self.writer.create("image", f"{self.key}-convergence-plot", png_data_url(png),
                           f"live convergence of {self.book.run_uid} ({len(rows)} estimates)")

    def update(self, *, final: bool = False, preview: bool = True) -> None:
        """Write the newest table, progress and (``preview``) the Approximant preview."""
        book = self.book
        n = len(book.rows)
        if n == self.shown_angles and not final:
            return
        a0 = book.artifact_s
        if n:
            what = "final" if final else "live"
            self.writer.create("table", f"{self.key}-angles", json.dumps(book.table()),
                               f"per-angle results of {book.run_uid} ({n} angles, {what})")
        self.writer.progress(self.progress_id, book.progress_pct,
                             f"{n} of N* = {book.n_star} angles finished")
        rows = list(self.channel.convergence)  # closed loop: the bridge appends them
        if len(rows) > self.shown_convergence:
            self.writer.create("markdown", f"{self.key}-convergence",
                               convergence_markdown(rows, n_star=book.n_star),
                               f"live convergence of {book.run_uid} ({len(rows)} estimates)")
            self._convergence_plot(rows)
            self.shown_convergence = len(rows)
            book.convergence = rows
        if preview and not final:
            self._preview()
        self.shown_angles = n
        if not final:
            book.live_updates += 1
            book.live_costs.append(book.artifact_s - a0)


def plain_preview(task: Callable) -> Callable:
    """The preview task's function, run without a task run."""
    return getattr(task, "fn", task)


def _finished_angle(book: ScanBook, view: _LiveView, call: Call, compute_s: float,
                    log: logging.Logger | logging.LoggerAdapter) -> bool:
    """Book a finished angle (inside its ``with call``); whether a live update is due."""
    if call.error is not None:
        log.error("%s failed: %s", call.kind, call.error)
        return False
    book.add_angle(call.result, compute_s=compute_s)
    if view.due():
        view.take_snapshot()
        return True
    return False


def _run_angle_group(book: ScanBook, channel: RunChannel, view: _LiveView, first: Call, *,
                     size: int, stop: Any, wait_s: float,
                     log: logging.Logger | logging.LoggerAdapter) -> Call | None:
    """Up to ``size`` finish-angle calls in one ``finish-angles`` task, taken as they come.

    The worker is released after each angle, as with one task per angle. The task ends after
    ``size`` angles, when another kind of call comes (returned: the flow runs it next), or when
    no call came for ``wait_s``. Time spent waiting for the next angle is not booked as
    overhead; artifact time is booked as artifacts.
    """
    state: dict[str, Any] = {"n": 0, "wait": 0.0, "body": 0.0, "publish": 0.0,
                             "leftover": None, "started": False, "aside": 0.0}

    def work() -> int:
        state["started"] = True
        call = first
        while True:
            with call:
                tasks.take_body_seconds()
                call.execute(as_task=False)
                body_s, publish_s = tasks.take_body_seconds()
                state["body"] += body_s
                state["publish"] += publish_s
                live = _finished_angle(book, view, call, body_s - publish_s, log)
                if call.error is not None:
                    book.errors.append(f"{call.kind}: {type(call.error).__name__}: {call.error}")
            state["n"] += 1
            if live:
                t0 = time.perf_counter()
                view.update()
                state["aside"] += time.perf_counter() - t0
            if state["n"] >= size:
                return state["n"]
            t0 = time.perf_counter()
            nxt = channel.next_call(stop=stop, timeout_s=wait_s)
            state["wait"] += time.perf_counter() - t0
            if nxt is None:
                return state["n"]
            if nxt.kind != "finish_angle":
                state["leftover"] = nxt
                return state["n"]
            call = nxt

    tasks.take_body_seconds()
    t0 = time.perf_counter()
    try:
        tasks.finish_angles(int(first.info.get("angle_id", -1)), work)
    except Exception as exc:
        if not state["started"]:
            # Prefect failed before the task's body ran: the worker runs this angle itself
            # (and the rest of the run without Prefect).
            with first:
                first.error = exc
            log.warning("finish-angles could not run as a task: %s", exc)
            return None
        log.warning("finish-angles: Prefect failed around the task: %s", exc)
    call_s = time.perf_counter() - t0 - state["wait"] - state["aside"]
    book.record("finish_angle", call_s=call_s, body_s=state["body"], publish_s=state["publish"])
    book.groups.append(state["n"])
    return state["leftover"]


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
    live_every: int | None = None,
    angles_per_task: int | None = None,
    group_wait_s: float = 30.0,
    on_start: Callable[[str, str | None], None] | None = None,
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
    live_every
        Update the progress bar, the angles table and the Approximant preview every this many
        finished angles while the scan runs (None: as often as Prefect's overhead budget
        allows, measured: at least every 10 angles).
    angles_per_task
        Finished angles per ``finish-angles`` task (1: one ``finish-angle`` task per angle;
        None: chosen from the measured task overhead and angle compute, so that a task costs at
        most :data:`TASK_BUDGET` of the compute it runs).
    group_wait_s
        A task holding several angles ends when no angle came for this long.
    on_start
        Called with ``(run_uid, flow_run_id)`` when the flow run starts (the demo prints the
        run's UI link).

    Returns
    -------
    dict
        The summary (status, angles, timings, Prefect overhead); the flow run is Failed when
        the scan failed or a task raised.
    """
    log = get_run_logger()
    channel.flow_run_id = _flow_run_id()
    if on_start is not None:
        try:
            on_start(run_uid, channel.flow_run_id)
        except Exception as exc:
            log.warning("on_start failed: %s", exc)
    book = ScanBook(run_uid=run_uid, n_star=n_star, theta_star_deg=theta_star_deg)
    key = artifact_key(run_uid)
    # Never a fixed name in the shared temp dir (another user could plant a symlink there).
    pdir = Path(preview_dir) if preview_dir else private_dir("previews", fallback_to_temp=True)
    writer = ArtifactWriter(book, log, channel.flow_run_id)
    view = _LiveView(book, channel, writer, every=live_every, preview_dir=pdir,
                     truth_fn=truth_fn, log=log)
    tiled_uri = None
    call: Call | None = None
    try:
        while True:
            if call is None:
                call = channel.next_call(stop=stop)
            if call is None:
                break
            size = angles_per_task or choose_angles_per_task(book)
            if call.kind == "finish_angle" and size > 1:
                call = _run_angle_group(book, channel, view, call, size=size, stop=stop,
                                        wait_s=group_wait_s, log=log)
                continue
            live = False
            with call:
                compute_s = _run_call(book, call)
                if call.error is not None:
                    log.error("%s failed: %s", call.kind, call.error)
                elif call.kind == "run_started" and channel.publisher is not None:
                    tiled_uri = getattr(channel.publisher, "scan_uri", lambda _: None)(run_uid)
                elif call.kind == "finish_angle":
                    book.groups.append(1)
                    live = _finished_angle(book, view, call, compute_s, log)
                elif call.kind == "reconstruct":
                    book.reconstructions += 1
                elif call.kind == "reconstruction_ready":
                    _on_volumes(book, channel, call, preview_dir=pdir, truth_fn=truth_fn, log=log,
                                writer=writer)
                elif call.kind == "run_stopped":
                    book.status = call.info["status"]
                    book.gaps = {k: call.info[k] for k in ("frames_missing", "angles_with_gaps")
                                 if k in call.info}
            if live:
                view.update()
            last, call = call.kind == LAST_KIND, None
            if last:
                break
    finally:
        channel.close()
    if book.status is None:
        book.status = "detached"
        log.warning("left run %s before its end; it finishes without Prefect", run_uid)
    view.update(final=True)
    from .prefect_server import configured_api_url, flow_run_ui_url

    try:
        run_url = flow_run_ui_url(configured_api_url(), channel.flow_run_id)
    except Exception:
        run_url = None
    # The summary is written last, so its overhead figure leaves out its own write.
    writer.create("markdown", f"{key}-summary",
                  book.markdown(tiled_uri=tiled_uri, flow_run_url=run_url), f"scan {run_uid}")
    writer.close()
    summary = book.summary()
    channel.summary = summary
    log.info("scan %s %s: %d angles, Prefect overhead %.3f s over %d tasks (%s %% of compute)",
             run_uid, book.status, len(book.rows), book.overhead_s, book.n_tasks,
             summary["prefect_overhead_pct"])
    if book.status == "failed" or book.errors:
        return Failed(message=f"scan {run_uid} {book.status}; errors: {book.errors}", data=summary)
    return Completed(message=f"scan {run_uid} {book.status}", data=summary)
