"""``listen``: the long-running flow that follows a beamline's 0MQ proxy and reconstructs scans.

It starts the library's live path — :class:`~apt_stream.stream.Listener` (0MQ source, recovery,
spool, run assembler) feeding a :class:`~apt_stream.stream.LiveReconstructor` — with a
:class:`~apt_stream.flows.relay.LiveBridge` as the reconstructor's sink, then runs one
``reconstruct_scan`` flow run per scan as the runs arrive, until told to stop.

Configuration is JSON (:class:`ListenConfig`), so a deployment can carry it. The Tiled API key is
never a parameter (Prefect stores parameters): the flow reads it from the environment variable
named by ``tiled_api_key_env``. In-process callers pass live objects — a publisher, their own
engine factory and reconstruct function, a ground-truth function, a stop event — as
:class:`LiveResources`, which Prefect does not try to store.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from apt_stream.errors import ConfigError, ServiceError
from apt_stream.publish.server import API_KEY_ENV, URI_ENV, TiledEndpoint

from . import tasks
from .reconstruct import reconstruct_scan
from .relay import LiveBridge
from .state_catchup import StateCatchUp


class ListenConfig(BaseModel):
    """Everything the ``listen`` flow needs, as JSON."""

    model_config = ConfigDict(extra="forbid")

    proxy_address: str = Field("tcp://127.0.0.1:5578", description="the 0MQ proxy's output")
    data_roots: list[str] = Field(min_length=1, description="folders frames may be read from")
    spool_dir: str | None = Field(None, description="per-run document spool (None: none)")
    tiled_uri: str | None = Field(
        None, description=f"Tiled API address; None: ${URI_ENV}; neither: backup only"
    )
    tiled_api_key_env: str = Field(API_KEY_ENV, description="environment variable with the key")
    backup_dir: str = Field("apt-stream-backup", description="JSON-lines backup when Tiled is down")
    approximant_every_s: float = Field(
        2.0, ge=0, description="least time between Approximant uploads (rows go up every angle)"
    )
    preview_dir: str | None = Field(
        None, description="slice-preview PNGs (None: a private per-user cache folder)"
    )
    checkpoint: str | None = Field(None, description="APT network checkpoint (.safetensors)")
    device: str = Field("cpu", description="torch device for the engine and the network")
    n_star: int = Field(29, ge=1, description="N*: finished angles that trigger inference")
    theta_star_deg: float = Field(17.0, ge=0, le=90, description="θ*: half-range they must cover")
    preview_every: int | None = Field(
        None, ge=1, description="interim APT previews every this many finished angles"
    )
    live_every: int | None = Field(
        None, ge=1, description="Prefect UI: progress, angles table and Approximant preview every "
        "this many finished angles (None: as often as the overhead budget allows)"
    )
    angles_per_task: int | None = Field(
        None, ge=1, description="finished angles per Prefect task (None: from measured compute)"
    )
    workers: int | None = Field(
        None, ge=1, description="per-angle work on a local Dask cluster of this many workers"
    )
    dask_address: str | None = Field(
        None, description="per-angle work on the Dask scheduler at this address (tcp://HOST:PORT)"
    )
    max_duration_s: float | None = Field(None, gt=0, description="stop after this long")
    max_runs: int | None = Field(None, ge=1, description="stop after this many scans")
    stop_file: str | None = Field(None, description="stop when this file appears")
    attach_timeout_s: float = Field(30.0, gt=0, description="wait for a flow to take a new run")
    run_idle_timeout_s: float | None = Field(
        600.0, gt=0, description="close a run with no document for this long as abandoned"
    )
    max_runs_in_flight: int = Field(16, ge=1, description="open runs at most")
    health_file: str | None = Field(None, description="liveness JSON, rewritten every 5 s")
    store_raw: bool = Field(
        True, description="store each raw run in Tiled (raw/<uid>, bluesky-tiled-plugins' "
        "TiledWriter); the Tiled server must be allowed to read the data roots")
    convergence: bool = Field(
        False, description="closed loop: a live convergence estimate after each finished angle "
        "(Tiled `convergence` table, Prefect convergence artifact)")
    stop_advice: bool = Field(
        False, description="closed loop: stop advice (StopPolicy defaults); implies convergence")
    stop_act: bool = Field(
        False, description="closed loop: on stop advice fire the final reconstruction at once")
    stop_change_tol: float | None = Field(
        None, gt=0, description="closed loop: the stop rule's change tolerance (relative; "
        "None: StopPolicy's default, 0.03); docs/closed-loop.md has a tuning table")
    stop_patience: int | None = Field(
        None, ge=1, description="closed loop: estimates in a row below the tolerance before "
        "the stop advice (None: StopPolicy's default, 2; 3 for small volumes like `tiny`)")
    suggest: int = Field(
        0, ge=0, description="closed loop: suggest this many next angles with each estimate")
    advice_address: str | None = Field(
        None, description="closed loop: serve the newest advice on this 0MQ REP address "
        "(tcp://127.0.0.1:PORT; port 0: a free one) for ptycho_tomo_plan(advisor=...)")
    queue_address: str | None = Field(
        None, description="closed loop: queue each suggested angle (measure_angle) on the "
        "bluesky-queueserver RE Manager at this 0MQ control address (implies suggest >= 1)")
    queue_start: bool = Field(
        False, description="closed loop: start the queue server's queue when it is idle")
    curve_server_key: str | None = Field(
        None, description="the proxy's CURVE public key (Z85); set to require CURVE"
    )
    curve_public_key: str | None = Field(None, description="this listener's CURVE public key")
    curve_secret_key_env: str = Field(
        "APT_STREAM_CURVE_SECRET_KEY", description="environment variable with its secret key"
    )

    def curve_options(self, environ: dict[str, str] | None = None) -> dict[str, str]:
        """ZmqDocumentSource CURVE keywords (the secret key from the environment, never stored)."""
        if not self.curve_server_key:
            return {}
        env = os.environ if environ is None else environ
        secret = env.get(self.curve_secret_key_env)
        if not (self.curve_public_key and secret):
            raise ConfigError(
                f"CURVE needs curve_public_key and the secret key in ${self.curve_secret_key_env}"
            )
        return {"curve_server_key": self.curve_server_key,
                "curve_public_key": self.curve_public_key, "curve_secret_key": secret}

    def tiled_endpoint(self, environ: dict[str, str] | None = None) -> TiledEndpoint | None:
        env = os.environ if environ is None else environ
        uri = self.tiled_uri or env.get(URI_ENV)
        if not uri:
            return None
        return TiledEndpoint(uri=uri, api_key=env.get(self.tiled_api_key_env) or None)


class LiveResources:
    """Live objects for an in-process ``listen`` (any may be None: the config's default is used).

    ``__slots__`` and no iteration: Prefect cannot turn it into JSON, so it records only the
    type name and never a client, a key or a volume.
    """

    __slots__ = ("publisher", "engine_factory", "reconstruct_fn", "truth_fn", "stop", "on_ready",
                 "on_done", "on_scan_start", "on_advice_server")

    def __init__(
        self,
        *,
        publisher: Any = None,
        engine_factory: Callable[[Any], Any] | None = None,
        reconstruct_fn: Callable[[Any, Any], dict] | None = None,
        truth_fn: Callable[[Any], Any] | None = None,
        stop: threading.Event | None = None,
        on_ready: Callable[[Any], None] | None = None,
        on_done: Callable[[dict], None] | None = None,
        on_scan_start: Callable[[str, str | None], None] | None = None,
        on_advice_server: Callable[[str], None] | None = None,
    ) -> None:
        self.publisher = publisher
        self.engine_factory = engine_factory
        self.reconstruct_fn = reconstruct_fn
        self.truth_fn = truth_fn
        self.stop = stop
        #: Called with the Listener once it is subscribed (so a caller can start publishing).
        self.on_ready = on_ready
        #: Called with the flow's result when its work is done, before Prefect records the end
        #: (a caller can exit even if the Prefect API has gone away).
        self.on_done = on_done
        #: Called with ``(run_uid, flow_run_id)`` when a scan's flow run starts.
        self.on_scan_start = on_scan_start
        #: Called with the advice server's address (``advice_address``) once it is bound.
        self.on_advice_server = on_advice_server


def _closed_loop(config: ListenConfig, stack: contextlib.ExitStack) -> tuple[dict, Any]:
    """The LiveReconstructor's closed-loop keywords from the config (all off by default), and
    the advice server when ``advice_address`` is set (closed with ``stack``)."""
    wanted = (config.convergence or config.stop_advice or config.stop_act or config.suggest > 0
              or config.advice_address is not None or config.queue_address is not None)
    if not wanted:
        return {}, None
    from apt_stream.physics.convergence import ConvergenceOptions
    from apt_stream.stream.trigger import StopPolicy

    suggest = max(config.suggest, 1) if config.queue_address else config.suggest
    keywords: dict[str, Any] = {"convergence": ConvergenceOptions(), "suggest": suggest}
    if config.stop_advice or config.stop_act:
        tuned = {k: v for k, v in (("change_tol", config.stop_change_tol),
                                   ("patience", config.stop_patience)) if v is not None}
        keywords["stop_policy"] = StopPolicy(act=config.stop_act, **tuned)
    server = None
    routes: list[Callable[[str, dict], Any]] = []
    if config.advice_address is not None:
        from apt_stream.stream.advice import AdviceBoard, AdviceServer

        board = AdviceBoard()
        server = stack.enter_context(AdviceServer(board, config.advice_address))
        routes.append(board.post)
    if config.queue_address is not None:
        from apt_stream.plugins.bluesky.queue import QueueRoute

        routes.append(QueueRoute(config.queue_address, start=config.queue_start))
    if routes:
        def on_advice(run_uid: str, advice: dict) -> None:
            for route in routes:  # each route logs its own failures
                route(run_uid, dict(advice))

        keywords["on_advice"] = on_advice
    return keywords, server


def _stopper(config: ListenConfig, event: threading.Event | None) -> Callable[[], bool]:
    deadline = None if config.max_duration_s is None else time.monotonic() + config.max_duration_s
    stop_file = Path(config.stop_file) if config.stop_file else None

    def should_stop() -> bool:
        return bool(
            (event is not None and event.is_set())
            or (deadline is not None and time.monotonic() > deadline)
            or (stop_file is not None and stop_file.exists())
        )

    return should_stop


@flow(name="listen", log_prints=False, persist_result=False)
def listen(config: ListenConfig, resources: Any = None) -> dict:
    """Follow the proxy and reconstruct every scan until stopped.

    Parameters
    ----------
    config
        Addresses, folders, trigger rule, model and stop conditions.
    resources
        :class:`LiveResources` for in-process use (optional).

    Returns
    -------
    dict
        Per-scan summaries and the listener's, reconstructor's and publisher's counters.
    """
    with contextlib.ExitStack() as resources_stack:
        return _listen(config, resources, resources_stack)


def _listen(config: ListenConfig, resources: Any, resources_stack: contextlib.ExitStack) -> dict:
    log = get_run_logger()
    res = resources if resources is not None else LiveResources()
    if not isinstance(res, LiveResources):
        raise ConfigError(f"resources must be LiveResources, got {type(res).__name__}")
    from apt_stream.stream import DataRoots, Listener, LiveReconstructor, TriggerPolicy

    # Fail on a wrong folder before spending time loading the network.
    DataRoots(config.data_roots)
    if res.reconstruct_fn is not None:
        reconstruct_fn, model_info = res.reconstruct_fn, {}
    else:
        reconstruct_fn, model_info = tasks.load_model(config.checkpoint, config.device)
    run_metadata = {"n_star": config.n_star, "theta_star_deg": config.theta_star_deg, **model_info}
    publisher = res.publisher
    if publisher is None:
        endpoint = config.tiled_endpoint()
        if endpoint is None:
            log.warning("no Tiled configured (%s): results go to the backup only", URI_ENV)
        publisher = tasks.open_publisher(endpoint, backup_dir=config.backup_dir,
                                         run_metadata=run_metadata,
                                         approximant_every_s=config.approximant_every_s)
    else:
        publisher.run_metadata.update(run_metadata)
    from .wiring import engine_factory as default_engine_factory

    cluster = None
    if res.engine_factory is None and (config.workers or config.dask_address):
        from apt_stream.cluster import open_cluster

        cluster = resources_stack.enter_context(
            open_cluster(workers=config.workers, address=config.dask_address))
        log.info("per-angle work on the Dask cluster at %s (%d workers; dashboard %s)",
                 cluster.address, len(cluster.workers), cluster.dashboard)
        if res.reconstruct_fn is None:  # the network runs on a worker too, loaded once there
            from apt_stream.reconstruct import DEFAULT_CHECKPOINT

            reconstruct_fn = cluster.reconstruct_fn(config.checkpoint or str(DEFAULT_CHECKPOINT),
                                                    device=config.device)
    bridge = LiveBridge(
        publisher,
        engine_factory=res.engine_factory or default_engine_factory(
            device=config.device, data_consistency=model_info.get("data_consistency_sweeps", 0) > 0,
            cluster=cluster),
        reconstruct_fn=reconstruct_fn,
        tasks=tasks.LIVE_TASKS,
        attach_timeout_s=config.attach_timeout_s,
    )
    listener: Listener | None = None

    finished_runs: list[str] = []

    def run_finished(run_uid: str, status: str) -> None:
        finished_runs.append(run_uid)
        if listener is not None:
            listener.mark_done(run_uid, status)

    closed_loop, advice_server = _closed_loop(config, resources_stack)
    if advice_server is not None:
        log.info("serving closed-loop advice on %s", advice_server.address)
        if res.on_advice_server is not None:
            res.on_advice_server(advice_server.address)
    live = LiveReconstructor(
        bridge, engine_factory=bridge.engine_factory, reconstruct_fn=bridge.reconstruct_fn,
        policy=TriggerPolicy(n_star=config.n_star, theta_star_deg=config.theta_star_deg,
                             preview_every=config.preview_every),
        on_run_finished=run_finished, **closed_loop,
    )
    raw_store = None
    emit = live.submit
    if config.store_raw:
        from apt_stream.publish.raw import open_raw_store
        from apt_stream.stream.tiled_source import with_raw_run

        raw_store = open_raw_store(getattr(publisher, "root", None),
                                   backup_dir=Path(config.backup_dir) / "raw")
        if raw_store is not None:
            emit = with_raw_run(live.submit, raw_store.link)
    listener = Listener(config.proxy_address, emit=emit, data_roots=config.data_roots,
                        spool_dir=config.spool_dir, run_idle_timeout_s=config.run_idle_timeout_s,
                        max_runs_in_flight=config.max_runs_in_flight,
                        health_file=config.health_file,
                        consumers=[raw_store] if raw_store is not None else (),
                        **config.curve_options())
    should_stop = _stopper(config, res.stop)
    scans: list[dict] = []
    lock = threading.Lock()
    flows: list[threading.Thread] = []
    catchup = StateCatchUp(path=Path(config.spool_dir) / "prefect-states-pending.json"
                           if config.spool_dir else None)
    catchup.try_now()  # what an earlier listener could not record
    catchup.start()

    def follow(channel) -> None:
        # One flow run per scan, each on its own thread: a scan whose stop never comes cannot
        # hold up the next one.
        try:
            state = reconstruct_scan(
                channel, channel.run_uid, n_star=config.n_star,
                theta_star_deg=config.theta_star_deg, preview_dir=config.preview_dir,
                truth_fn=res.truth_fn, stop=should_stop, live_every=config.live_every,
                angles_per_task=config.angles_per_task, on_start=res.on_scan_start,
                return_state=True,
            )
            final = state.is_final()
            summary = state.result(raise_on_failure=False) if final else channel.summary
        except Exception as exc:  # the orchestrator failed; the run goes on without it
            final, summary = False, channel.summary if channel.summary is not None else exc
        if not final:  # Prefect could not record the end: set it when the API is back
            catchup.add(channel.flow_run_id, summary if isinstance(summary, dict) else None)
        with lock:
            scans.append(summary if isinstance(summary, dict) else
                         {"run_uid": channel.run_uid, "error": repr(summary)})

    def enough() -> bool:
        # Counted where the work is done, not by the flows: a scan's flow may be stuck on an
        # unreachable Prefect API while its run finished without it.
        if config.max_runs is None or len(finished_runs) < config.max_runs:
            return False
        for thread in flows:  # give the flows a moment to write their summaries
            thread.join(5)
        return True

    try:
        listener.start()
        log.info("listening on %s (N* = %d, θ* = ±%g°)", config.proxy_address, config.n_star,
                 config.theta_star_deg)
        if res.on_ready is not None:
            res.on_ready(listener)
        while not should_stop() and not enough():
            if not listener.alive:
                # Never a live process that serves nothing: the caller exits non-zero.
                raise ServiceError(f"the listener stopped: {listener.error!r}")
            channel = bridge.next_run(timeout_s=0.25)
            if channel is None:
                continue
            thread = threading.Thread(target=contextvars.copy_context().run, args=(follow, channel),
                                      name=f"scan-{channel.run_uid[:8]}", daemon=True)
            thread.start()
            flows.append(thread)
            flows[:] = [t for t in flows if t.is_alive()]
    finally:
        listener.stop()
        # Runs still open finish on the worker, without Prefect; then the worker stops.
        bridge.close()
        live.close()
        for thread in flows:
            thread.join(5)
        catchup.stop()
        catchup.try_now()
        if raw_store is not None:
            raw_store.close()
    result = {
        "scans": scans,
        "listener": listener.stats(),
        "live": live.metrics(),
        "runs": dict(live.run_stats),
        "publisher": publisher.stats() if hasattr(publisher, "stats") else None,
        "states_caught_up": list(catchup.caught_up),
        "states_pending": catchup.pending,
        "raw_runs": None if raw_store is None else raw_store.stats(),
        "advice_address": None if advice_server is None else advice_server.address,
        "cluster": None if cluster is None else {"address": cluster.address,
                                                 "workers": len(cluster.workers),
                                                 "dashboard": cluster.dashboard},
    }
    if res.on_done is not None:
        res.on_done(result)
    return result
