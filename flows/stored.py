"""``reconstruct-stored-run``: reconstruct a run already in Tiled, as if it were live.

The end-of-run pattern of NSLS-II: the RunEngine's run goes to Tiled (bluesky-tiled-plugins'
``TiledWriter``), and when it stops a Prefect deployment is run for it. This flow opens the run
by its address (``tiled://HOST[:PORT]/PATH/<uid>``), replays its documents through the live
path (:func:`apt_stream.stream.tiled_source.reconstruct_stored`: pipeline, assembler,
LiveReconstructor with the same engine and trigger policy) and hands the run's work to a
``reconstruct_scan`` flow run through a :class:`~apt_stream.flows.relay.LiveBridge`, so the
tasks, artifacts and Tiled results are those of a live scan. The result container's metadata
has ``raw_run = {"uid", "tiled_path", "tiled_uri"}``.

:func:`reconstruct_tiled_run` is the same without Prefect (``apt-stream reconstruct tiled://…``).
The API key is never a parameter: it comes from the environment variable
``tiled_api_key_env`` names (or the caller).
"""

from __future__ import annotations

import contextvars
import os
import threading
import time
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from apt_stream.errors import ConfigError, DocumentError, InputError
from apt_stream.publish.server import API_KEY_ENV, TiledEndpoint

from . import tasks
from .reconstruct import reconstruct_scan
from .relay import LiveBridge, plain


class StoredRunConfig(BaseModel):
    """Everything :func:`reconstruct_stored_run` needs besides the run's address, as JSON."""

    model_config = ConfigDict(extra="forbid")

    data_roots: list[str] = Field(
        min_length=1, description="folders the run's probe and frames files may be read from")
    results_uri: str | None = Field(
        None, description="Tiled API address for the reconstruction (None: the raw run's server)")
    tiled_api_key_env: str = Field(API_KEY_ENV, description="environment variable with the key")
    backup_dir: str = Field("apt-stream-backup", description="JSON-lines backup when Tiled is down")
    preview_dir: str | None = Field(None, description="slice-preview PNGs (None: private cache)")
    checkpoint: str | None = Field(None, description="APT network checkpoint (.safetensors)")
    device: str = Field("cpu", description="torch device for the engine and the network")
    n_star: int = Field(29, ge=1, description="N*: finished angles that trigger inference")
    theta_star_deg: float = Field(17.0, ge=0, le=90, description="θ*: half-range they must cover")
    preview_every: int | None = Field(None, ge=1, description="interim APT every N angles")
    live_every: int | None = Field(None, ge=1, description="Prefect UI updates every N angles")
    angles_per_task: int | None = Field(None, ge=1, description="finished angles per task")
    approximant_every_s: float = Field(0.0, ge=0, description="least time between uploads")
    timeout_s: float = Field(3600.0, gt=0, description="give up on the run after this long")


def _api_key(config: StoredRunConfig, api_key: str | None) -> str | None:
    return api_key if api_key is not None else (os.environ.get(config.tiled_api_key_env) or None)


def _prepare(uri: str, config: StoredRunConfig, *, api_key: str | None, prefect: bool,
             publisher: Any = None, reconstruct_fn: Any = None) -> dict[str, Any]:
    """Open the run (fails fast on a bad address, uid or run), the model and the publisher."""
    from apt_stream.stream import DataRoots
    from apt_stream.stream.tiled_source import open_tiled_run

    key = _api_key(config, api_key)
    roots = DataRoots(config.data_roots)
    source = open_tiled_run(uri, api_key=key)
    try:  # before the model loads: a probe outside the data roots fails the run anyway
        roots.resolve(source.info.probe_uri)
    except DocumentError as exc:
        raise InputError(f"run {source.run_uid}: {exc}") from None
    load_model = tasks.load_model if prefect else plain(tasks.load_model)
    open_publisher = tasks.open_publisher if prefect else plain(tasks.open_publisher)
    if reconstruct_fn is None:
        reconstruct_fn, model_info = load_model(config.checkpoint, config.device)
    else:
        model_info = {}
    run_metadata = {"n_star": config.n_star, "theta_star_deg": config.theta_star_deg,
                    **model_info}
    results_api = None
    if publisher is None:
        results_api = config.results_uri or source.address.api_uri
        endpoint = TiledEndpoint(results_api, api_key=key)
        publisher = open_publisher(endpoint, backup_dir=config.backup_dir,
                                   run_metadata=run_metadata,
                                   approximant_every_s=config.approximant_every_s)
    else:
        publisher.run_metadata.update(run_metadata)
    from .wiring import engine_factory

    factory = engine_factory(device=config.device,
                             data_consistency=model_info.get("data_consistency_sweeps", 0) > 0)
    return {"source": source, "roots": roots, "publisher": publisher, "engine_factory": factory,
            "reconstruct_fn": reconstruct_fn, "results_api": results_api}


def _policy(config: StoredRunConfig) -> Any:
    from apt_stream.stream import TriggerPolicy

    return TriggerPolicy(n_star=config.n_star, theta_star_deg=config.theta_star_deg,
                         preview_every=config.preview_every)


def _summary(result: dict[str, Any], results_api: str | None, seconds: float) -> dict[str, Any]:
    source_link = result.pop("raw_run", None)
    where = {"tiled_uri": results_api, "tiled_path": result["run_uid"]} if results_api else None
    return {"run_uid": result["run_uid"], "status": result["status"], "raw_run": source_link,
            "result": where, **{k: v for k, v in result.items() if k not in ("run_uid", "status")},
            "seconds": round(seconds, 3)}


def reconstruct_tiled_run(uri: str, config: StoredRunConfig, *, api_key: str | None = None,
                          publisher: Any = None, reconstruct_fn: Any = None) -> dict[str, Any]:
    """Reconstruct the stored run at ``uri`` without Prefect; results to Tiled.

    Returns the run's status, counters and ``raw_run`` link. Raises :class:`InputError` for a
    bad address, an unknown uid or a run that is not a finished ptycho-tomo scan, and
    :class:`ServiceError` when Tiled cannot be reached.
    """
    from apt_stream.stream.tiled_source import reconstruct_stored

    t0 = time.perf_counter()
    p = _prepare(uri, config, api_key=api_key, prefect=False, publisher=publisher,
                 reconstruct_fn=reconstruct_fn)
    result = reconstruct_stored(p["source"], p["publisher"], engine_factory=p["engine_factory"],
                                reconstruct_fn=p["reconstruct_fn"], policy=_policy(config),
                                data_roots=p["roots"], timeout_s=config.timeout_s)
    result["raw_run"] = p["source"].raw_run
    return _summary(result, p["results_api"], time.perf_counter() - t0)


@flow(name="reconstruct-stored-run", log_prints=False, persist_result=False)
def reconstruct_stored_run(uri: str, config: StoredRunConfig, resources: Any = None) -> dict:
    """Reconstruct the stored run at ``uri`` (``tiled://HOST[:PORT]/PATH/<uid>``) with the
    live engine, trigger and publisher; its work runs as a ``reconstruct_scan`` flow run.

    ``resources`` (in-process callers only): a :class:`~apt_stream.flows.listen.LiveResources`
    whose ``publisher`` / ``reconstruct_fn`` / ``truth_fn`` are used when set.
    """
    from apt_stream.stream.tiled_source import reconstruct_stored

    log = get_run_logger()
    t0 = time.perf_counter()
    publisher = getattr(resources, "publisher", None)
    own_fn = getattr(resources, "reconstruct_fn", None)
    truth_fn = getattr(resources, "truth_fn", None)
    p = _prepare(uri, config, api_key=None, prefect=True, publisher=publisher,
                 reconstruct_fn=own_fn)
    source = p["source"]
    log.info("reconstructing stored run %s (%s), N* = %d, θ* = ±%g°", source.run_uid,
             source.address.uri, config.n_star, config.theta_star_deg)
    bridge = LiveBridge(p["publisher"], engine_factory=p["engine_factory"],
                        reconstruct_fn=p["reconstruct_fn"], tasks=tasks.LIVE_TASKS)
    outcome: dict[str, Any] = {}

    def feed() -> None:
        try:
            outcome["result"] = reconstruct_stored(
                source, bridge, engine_factory=bridge.engine_factory,
                reconstruct_fn=bridge.reconstruct_fn, policy=_policy(config),
                data_roots=p["roots"], timeout_s=config.timeout_s)
        except BaseException as exc:  # re-raised on the flow's thread
            outcome["error"] = exc

    worker = threading.Thread(target=contextvars.copy_context().run, args=(feed,),
                              name=f"stored-{source.run_uid[:8]}", daemon=True)
    worker.start()
    summary: Any = None
    try:
        channel = None
        while channel is None and worker.is_alive():
            channel = bridge.next_run(timeout_s=0.25)
        if channel is not None:
            state = reconstruct_scan(
                channel, channel.run_uid, n_star=config.n_star,
                theta_star_deg=config.theta_star_deg, preview_dir=config.preview_dir,
                truth_fn=truth_fn, live_every=config.live_every,
                angles_per_task=config.angles_per_task, return_state=True)
            summary = state.result(raise_on_failure=False) if state.is_final() else None
        worker.join(config.timeout_s)
    finally:
        bridge.close()
    if "error" in outcome:
        raise outcome["error"]
    if "result" not in outcome:
        raise ConfigError(f"run {source.run_uid} did not finish within {config.timeout_s:g} s")
    result = outcome["result"]
    result["raw_run"] = source.raw_run
    out = _summary(result, p["results_api"], time.perf_counter() - t0)
    out["scan"] = summary if isinstance(summary, dict) else None
    return out
