"""Prefect tasks: each one library call.

Tasks that write to Tiled retry on :class:`~apt_stream.errors.ServiceError` (a sink that says its
service refused). The :class:`~apt_stream.publish.TiledPublisher` itself rides out Tiled blips
(client retries with backoff) and outages (JSON-lines backup), so it rarely raises; the task
retries are for sinks and checks that do. Compute tasks never retry: finishing an angle twice
would count it twice in the Approximant.

Every task has ``cache_policy=NO_CACHE`` and ``persist_result=False``: the arguments are engines,
volumes and clients, which Prefect must not hash or pickle. :func:`take_body_seconds` reports how
long task bodies ran on this thread since it was last called, so a flow can tell Prefect's own
overhead from the work.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from apt_stream.errors import ServiceError

from .relay import RunTasks, body_entered, body_returned

_clock = threading.local()
log = logging.getLogger(__name__)


def take_body_seconds() -> tuple[float, float]:
    """Seconds task bodies ran on this thread since the previous call, and the part of it
    spent publishing inside ``finish-angle`` tasks (both reset to 0)."""
    seconds = getattr(_clock, "body_s", 0.0), getattr(_clock, "publish_s", 0.0)
    _clock.body_s = _clock.publish_s = 0.0
    return seconds


def _timed(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def body(*args: Any, **kwargs: Any) -> Any:
        body_entered()
        t0 = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
            body_returned(result)
            return result
        finally:
            _clock.body_s = getattr(_clock, "body_s", 0.0) + time.perf_counter() - t0

    body.marks_body = True  # the relay can tell the orchestrator's failures from the body's
    return body


def _service_error(task_: Any, task_run: Any, state: Any) -> bool:
    """Retry only when a service refused (not on bad input, which would fail again)."""
    return isinstance(state.result(raise_on_failure=False), ServiceError)


_COMMON = {"cache_policy": NO_CACHE, "persist_result": False, "log_prints": False}
_TILED = {**_COMMON, "retries": 3, "retry_delay_seconds": [1, 4, 16],
          "retry_condition_fn": _service_error}


# -- per-angle work ------------------------------------------------------------------------------
@task(name="finish-angle", task_run_name="finish-angle-{angle_id}", **_COMMON)
@_timed
def finish_angle(engine: Any, angle_id: int, publisher: Any = None, run_uid: str | None = None
                 ) -> Any:
    """Finish a completed angle (second pass, rotate back, accumulate) and publish it.

    One task per angle: the engine's ``finish_angle`` then the publisher's ``angle_finished``
    (row + Approximant). No retries: finishing twice would count the angle twice. A publishing
    error is logged, not raised, as the live reconstructor treats any sink: the
    :class:`~apt_stream.publish.TiledPublisher` already turns Tiled failures into its backup.
    """
    summary = engine.finish_angle(angle_id)
    if publisher is not None:
        t0 = time.perf_counter()
        try:
            publisher.angle_finished(run_uid, summary, engine)
        except Exception:
            log.exception("publishing angle %s of run %s failed", angle_id, run_uid)
        finally:
            _clock.publish_s = getattr(_clock, "publish_s", 0.0) + time.perf_counter() - t0
    return summary


@task(name="finish-angles", task_run_name="finish-angles-from-{first_angle_id}", **_COMMON)
def finish_angles(first_angle_id: int, work: Callable[[], Any]) -> Any:
    """Several finished angles in one task run, when one angle is too cheap to be worth a task.

    ``work`` (the flow's) runs each angle's :func:`finish_angle` body in turn as the angles
    complete, and keeps the per-angle view current through artifacts; it returns the number of
    angles done. No retries, like ``finish-angle``.
    """
    return work()


@task(name="publish-angle", **_TILED)
@_timed
def publish_angle(publisher: Any, run_uid: str, summary: Any, approximant: Any) -> None:
    """Approximant + the angle's row to Tiled."""
    publisher.angle_finished(run_uid, summary, approximant)


@task(name="reconstruct", **_COMMON)
@_timed
def reconstruct(reconstruct_fn: Callable, volume: Any, header: Any, projections: Any = None,
                input_projections: Any = None) -> dict:
    """The APT network (+ data consistency when given projections) on the Approximant."""
    from apt_stream.stream.live import accepts_projections

    if projections is None or not accepts_projections(reconstruct_fn):
        return reconstruct_fn(volume, header)
    if input_projections is not None and accepts_projections(reconstruct_fn, "input_projections"):
        return reconstruct_fn(volume, header, projections=projections, input_projections=input_projections)
    return reconstruct_fn(volume, header, projections=projections)


@task(name="publish-volumes", **_TILED)
@_timed
def publish_volumes(publisher: Any, run_uid: str, volumes: Mapping, *, final: bool) -> None:
    publisher.reconstruction_ready(run_uid, volumes, final=final)


@task(name="publish-run-started", **_TILED)
@_timed
def publish_run_started(publisher: Any, header: Any) -> None:
    publisher.run_started(header)


@task(name="publish-run-stopped", **_TILED)
@_timed
def publish_run_stopped(publisher: Any, run_uid: str, status: str,
                        metadata: dict | None = None) -> None:
    if metadata:
        publisher.run_stopped(run_uid, status, metadata=metadata)
    else:
        publisher.run_stopped(run_uid, status)


#: What :class:`~apt_stream.flows.relay.LiveBridge` hands to a run's flow.
LIVE_TASKS = RunTasks(
    publish_run_started=publish_run_started,
    finish_angle=finish_angle,
    publish_angle=publish_angle,
    reconstruct=reconstruct,
    publish_volumes=publish_volumes,
    publish_run_stopped=publish_run_stopped,
)


# -- end of scan ---------------------------------------------------------------------------------
@task(name="score", **_COMMON)
@_timed
def score(volumes: Mapping[str, Any], truth: Any) -> dict[str, dict[str, float]]:
    """Paper metrics (PCC, MS-SSIM, DSC, BER) of each volume against the ground truth."""
    from apt_stream.metrics import evaluate

    return {name: evaluate(volume, truth) for name, volume in volumes.items()}


@task(name="publish-metrics", **_TILED)
@_timed
def publish_metrics(publisher: Any, run_uid: str, metrics: Mapping) -> None:
    publisher.metrics_ready(run_uid, metrics)


@task(name="preview", **_COMMON)
@_timed
def preview(volumes: Mapping[str, Any], path: str | Path, title: str, **options: Any) -> Path:
    """xy / xz / yz sections of same-shaped volumes, as a PNG (options: ``truth``,
    ``voxel_size_m``, … of :func:`apt_stream.figures.cross_sections_figure`)."""
    from apt_stream.figures import cross_sections_png

    return cross_sections_png(volumes, path, title=title, **options)


# -- set-up and checks ---------------------------------------------------------------------------
@task(name="connect-tiled", **_TILED)
@_timed
def open_publisher(endpoint: Any, *, backup_dir: str, run_metadata: Mapping[str, Any],
                   approximant_every_s: float = 0.0) -> Any:
    """A TiledPublisher on ``endpoint`` (offline, backup only, when it is None)."""
    from apt_stream.publish import TiledPublisher

    options = {"backup_dir": backup_dir, "run_metadata": run_metadata,
               "approximant_every_s": approximant_every_s}
    if endpoint is None:
        return TiledPublisher(None, **options)
    return TiledPublisher.from_endpoint(endpoint, **options)


@task(name="load-model", **_COMMON)
@_timed
def load_model(checkpoint: str | None, device: str) -> tuple[Callable, dict]:
    """The network from its checkpoint, as a reconstruct function (+ name and checksum)."""
    from .wiring import model_reconstructor

    return model_reconstructor(checkpoint, device=device)


@task(name="check-tiled", **_TILED)
@_timed
def check_tiled(endpoint: Any) -> dict:
    from apt_stream.publish import check_writable

    return check_writable(endpoint)


@task(name="check-proxy", **_COMMON)
@_timed
def check_proxy(in_address: str, out_address: str, *, timeout_s: float) -> dict:
    """Send link probes into the proxy and see one come out (the beamline's own link check)."""
    import tempfile

    from apt_stream.plugins.bluesky import make_publisher, wait_for_link
    from apt_stream.stream import Listener

    with tempfile.TemporaryDirectory() as empty:
        listener = Listener(out_address, emit=lambda message: None, data_roots=[empty],
                            recover=False).start(ready_timeout_s=timeout_s)
        publisher = make_publisher(in_address)
        try:
            sent = wait_for_link(publisher, listener.source.probe_seen, timeout_s=timeout_s)
        finally:
            publisher.close()
            listener.stop()
    return {"in": in_address, "out": out_address, "probes_sent": sent}


@task(name="check-model", **_COMMON)
@_timed
def check_model(checkpoint: str, device: str) -> dict:
    from apt_stream.model import count_parameters, load_checkpoint

    model, meta = load_checkpoint(checkpoint, map_location=device)
    return {"checkpoint": str(checkpoint), "preset": meta.get("preset"),
            "sha256": meta.get("sha256"), "parameters": count_parameters(model)}
