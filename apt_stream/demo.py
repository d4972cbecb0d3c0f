"""``apt-stream demo``: the whole live pipeline on one machine, on loopback.

1. Simulate a seeded IC scan (demo preset: 29 angles over ±17°) — the "beamline" data.
2. Start an embedded Tiled server (SQLite + files under the demo folder), a 0MQ proxy, and the
   Prefect ``listen`` flow (Prefect's ephemeral server unless ``PREFECT_API_URL`` is set).
3. Start the simulated beamline in its own process (``apt-stream replay``: a bluesky RunEngine
   running the ptycho-tomo plan over simulated devices, publishing through bluesky's zmq
   Publisher) at a realistic frame rate.
4. The listener reconstructs live: Approximant per angle, APT once 29 angles cover ±17°, every
   result published to Tiled.
5. Afterwards: classical baselines (FBP/SIRT/SART) on the same angles for comparison, metrics
   against the ground truth, PNG previews, a Tiled query that finds the scan, and a summary.
Everything is shut down on the way out, also on errors and Ctrl-C.
"""

from __future__ import annotations

import contextvars
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from apt_stream.errors import ServiceError

#: Frames per second of the simulated beamline: the demo's "realistic" acquisition rate. Bluesky
#: itself tops out near 100 events/s on these 2 cores (docs/benchmarks.md).
DEFAULT_RATE_HZ = 40.0
#: The demo's Prefect UI shows progress, the angles table and an Approximant preview every this
#: many finished angles while the scan runs (and the final state at the end).
DEMO_LIVE_EVERY = 10


def next_run_dir(work: Path) -> Path:
    """A new ``run-NNN`` folder under the demo folder: one per demo run, so a second run's scan,
    previews and logs never mix with the first's (Tiled and Prefect keep one store for all)."""
    taken = [int(d.name[4:]) for d in work.glob("run-[0-9][0-9][0-9]*") if d.name[4:].isdigit()]
    n = max(taken, default=0) + 1
    while True:
        run_dir = work / f"run-{n:03d}"
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:  # a demo started at the same moment took it
            n += 1


def client_snippet(run_uid: str, tiled_dir: str | Path) -> str:
    """Python that finds this run's scan and slices it; runs as printed while ``apt-stream serve``
    serves the demo's folder (its default address; its key: ``$APT_STREAM_TILED_API_KEY`` or
    the folder's ``api_key`` file)."""
    from apt_stream.publish.serve import client_snippet as snippet
    from apt_stream.publish.serve import key_expression

    folder = Path(tiled_dir).resolve()
    return (f"# needs `apt-stream serve {folder.parent if folder.name == 'tiled' else folder}` "
            "running (another terminal)\n" + snippet(run_uid, key=key_expression(folder)))


def live_demo(
    workdir: str | Path,
    *,
    preset: str = "demo",
    seed: int = 1000,
    rate_hz: float | None = DEFAULT_RATE_HZ,
    checkpoint: str | Path | None = None,
    baselines: bool = True,
    say: Callable[[str], None] = print,
    progress_factory: Callable | None = None,
    ephemeral: bool = False,
    live_every: int | None = DEMO_LIVE_EVERY,
    keep_serving: Callable[[dict], None] | None = None,
    workers: int | None = None,
    adaptive: bool = False,
    n_angles: int | None = None,
    stop_rule: dict | None = None,
    device: str | None = None,
) -> dict:
    """Run the live demo end to end; returns the summary printed by the CLI.

    ``adaptive``: the closed loop (docs/closed-loop.md). The listener runs the live convergence
    estimate, stop advice (acting on it: the final reconstruction fires at once) and next-angle
    suggestions, served on a 0MQ advice server; the beamline acquires coarse to fine and asks
    it between angles for the next angle, ending the scan on stop advice. The summary's
    ``closed_loop`` compares the angles it needed and its APT PCC with the fixed-N* scan (the
    same scan's N* angles, reconstructed offline with the same network). ``n_angles``: plan this
    many angles (and N*) instead of the preset's (e.g. 29 on the tiny preset, whose 7 angles
    are fewer than the stop rule's minimum). ``stop_rule``: ``stop_change_tol`` /
    ``stop_patience`` for the adaptive run's stop rule (:class:`ListenConfig` fields).

    ``workers``: the per-angle work on a local Dask cluster of that many worker processes
    (None: the listener's own worker thread).

    Prefect: with ``PREFECT_API_URL`` set, that server; else (the default) a ``prefect server
    start`` with its web UI on a free 127.0.0.1 port, its SQLite database in ``<workdir>/prefect``;
    ``ephemeral=True``: Prefect's own temporary server, no UI. ``keep_serving(summary)`` is
    called once the demo is done while the Prefect server is still up (the CLI serves the Tiled
    folder there until Ctrl-C). Each run writes its files to a new ``<workdir>/run-NNN``.

    Raises
    ------
    ConfigError
        ``preset="paper"`` on a machine without a GPU.
    """
    from apt_stream.flows.settings import apply_offline_env

    apply_offline_env()  # before Prefect is imported: it reads its settings once
    from apt_stream.config import get_preset
    from apt_stream.errors import ConfigError
    from apt_stream.flows.prefect_server import configured_api_url, prefect_ui_server, ui_url_for
    from apt_stream.io import write_scan
    from apt_stream.reconstruct import DEFAULT_CHECKPOINT
    from apt_stream.sim.acquire import simulate_scan

    t_start = time.perf_counter()
    p = get_preset(preset)
    if n_angles is not None:
        p = p.model_copy(update={"scan": p.scan.model_copy(update={"n_angles": int(n_angles)})})
    from apt_stream.devices import resolve_device

    if p.name == "paper" and resolve_device("auto").type != "cuda":
        raise ConfigError(
            "the paper preset needs a GPU (349 angles of 128² frames, 12 probe modes: hours "
            "on a CPU); this machine has none. Use --preset demo (minutes) or tiny (seconds)"
        )
    device = str(resolve_device(device))
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    run_dir = next_run_dir(work)
    for sub in ("runs", "spool", "previews", "backup"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    checkpoint = Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT
    box: dict = {}

    def simulate() -> None:
        say(f"1/5 simulating a {p.name} scan (seed {seed}): {p.scan.n_angles} angles over "
            f"±{p.scan.angle_range_deg}°" + (" (minutes: the paper's geometry)"
                                            if p.name == "paper" else ""))
        box["scan"] = simulate_scan(p, seed=seed)
        box["scan_path"] = write_scan(run_dir / "scan.h5", box["scan"])
        box["simulate_s"] = time.perf_counter() - t_start

    outer = ExitStack()
    prefect_ui: str | None = None
    try:
        if ephemeral or configured_api_url() is not None:
            simulate()
            prefect_ui = None if ephemeral else ui_url_for(configured_api_url())
        else:
            # The server boots (≈ 10-20 s) while the scan is simulated.
            api = outer.enter_context(prefect_ui_server(work / "prefect", while_starting=simulate))
            prefect_ui = api.server.ui_url if api.server is not None else None
        return _live(
            p=p, rate_hz=rate_hz, checkpoint=checkpoint, baselines=baselines, say=say,
            progress_factory=progress_factory, live_every=live_every, keep_serving=keep_serving,
            t_start=t_start, device=device, work_root=work, work=run_dir, box=box,
            prefect_ui=prefect_ui, workers=workers, adaptive=adaptive, stop_rule=stop_rule)
    finally:
        outer.close()


def _live(*, p, rate_hz, checkpoint, baselines, say, progress_factory, live_every, keep_serving,
          t_start, device, work_root: Path, work: Path, box: dict, prefect_ui: str | None,
          workers: int | None = None, adaptive: bool = False,
          stop_rule: dict | None = None) -> dict:
    """The demo once the scan is simulated and Prefect is up: steps 2-5 (``work``: this run's
    folder, ``work_root``: the demo folder with the Tiled store)."""
    from apt_stream.figures import preview_png
    from apt_stream.flows.listen import ListenConfig, LiveResources, listen
    from apt_stream.flows.prefect_server import configured_api_url, flow_run_ui_url
    from apt_stream.plugins.bluesky.zmq_link import start_proxy
    from apt_stream.publish import TiledPublisher
    from apt_stream.publish.server import local_tiled_server
    from apt_stream.reconstruct import baseline_volumes, score, tomography_projections

    scan, scan_path = box["scan"], box["scan_path"]
    timings = {"simulate_s": box["simulate_s"]}
    run_links: dict = {}

    def scan_started(run_uid: str, flow_run_id: str | None) -> None:
        url = flow_run_ui_url(configured_api_url(), flow_run_id) if prefect_ui else None
        run_links.update(flow_run_id=flow_run_id, url=url)
        if url:
            say(f"   Prefect UI, this scan live: {url}")

    with ExitStack() as stack:
        say("2/5 starting Tiled (embedded), the 0MQ proxy and the Prefect listen flow"
            + (f"; Prefect UI at {prefect_ui}" if prefect_ui else ""))
        # Raw runs (raw/<uid>, TiledWriter) reference the detector files under run-NNN/runs.
        endpoint = stack.enter_context(local_tiled_server(work_root / "tiled",
                                                          readable_storage=[work_root]))
        proxy = start_proxy()
        stack.callback(proxy.stop)
        # Approximant uploads at most every 5 s (angle rows go up at once): keeps Tiled's share of
        # the wall time small while a user watching the scan still sees it grow.
        publisher = TiledPublisher.from_endpoint(
            endpoint, backup_dir=work / "backup", approximant_every_s=5.0
        )
        ready, stop = threading.Event(), threading.Event()
        listeners: list = []
        stack.callback(stop.set)
        outcome: dict = {}
        config = ListenConfig(
            proxy_address=proxy.out_address, data_roots=[str(work / "runs")],
            spool_dir=str(work / "spool"), preview_dir=str(work / "previews"),
            checkpoint=str(checkpoint), max_runs=1, n_star=p.scan.n_angles,
            theta_star_deg=p.scan.angle_range_deg, backup_dir=str(work / "backup"),
            live_every=live_every, device=device, workers=workers,
            **({"convergence": True, "stop_advice": True, "stop_act": True, "suggest": 3,
                "advice_address": "tcp://127.0.0.1:0", **(stop_rule or {})} if adaptive else {}),
        )
        advice_at: list[str] = []
        resources = LiveResources(
            publisher=publisher, stop=stop, on_advice_server=advice_at.append,
            on_ready=lambda listener: (listeners.append(listener), ready.set()),
            truth_fn=lambda header: scan.truth, on_scan_start=scan_started,
        )

        def run_flow() -> None:
            try:
                outcome["result"] = listen(config, resources)
            except BaseException as exc:  # reported by the main thread
                outcome["error"] = exc
                ready.set()

        # In a copy of this context: Prefect's settings (the API URL of the server started
        # above) live in a context variable, which a new thread would not see.
        flow_thread = threading.Thread(target=contextvars.copy_context().run, args=(run_flow,),
                                       name="apt-listen", daemon=True)
        flow_thread.start()
        if not ready.wait(180) or "error" in outcome:
            raise ServiceError(f"the listen flow did not come up: {outcome.get('error')!r}")
        timings["services_up_s"] = time.perf_counter() - t_start

        rate_text = f"{rate_hz:g} frames/s" if rate_hz else "full speed"
        say(f"3/5 acquiring: simulated beamline at {rate_text} in its own process")
        t_acq = time.perf_counter()
        rate_args = ["--rate", str(rate_hz)] if rate_hz else []
        if adaptive:  # coarse to fine, asking apt-stream between angles
            say(f"   closed loop: the beamline asks {advice_at[0]} for its next angle and "
                "stops on advice")
            rate_args += ["--advice", advice_at[0], "--order", "bisection"]
        # The beamline's output goes to a file: a pipe nobody reads while we poll could fill up.
        beam_log = stack.enter_context(open(work / "beamline.log", "w"))
        beamline = subprocess.Popen(
            [sys.executable, "-m", "apt_stream.cli", "replay", str(scan_path), "--zmq",
             proxy.in_address, *rate_args, "--data-root", str(work / "runs")],
            stdout=beam_log, stderr=subprocess.STDOUT, text=True,
        )
        stack.callback(lambda: beamline.poll() is None and beamline.kill())
        from apt_stream.progress import progress_context

        # A bar of frames received by the listener while the beamline acquires.
        with progress_context(progress_factory, "frames received") as update:
            while beamline.poll() is None:
                if update is not None and listeners:
                    got = listeners[0].stats()["assembler"]["frames_emitted"]
                    update(min(got, scan.n_frames), scan.n_frames)
                time.sleep(0.5)
            if update is not None:
                update(scan.n_frames, scan.n_frames)
        if beamline.wait(timeout=60) != 0:
            beam_log.flush()
            tail = (work / "beamline.log").read_text(errors="replace").strip()[-500:]
            raise ServiceError(f"the simulated beamline failed: {tail}")
        timings["acquisition_s"] = time.perf_counter() - t_acq
        say("4/5 acquisition done; waiting for the final reconstruction")
        flow_thread.join(timeout=600)
        if "error" in outcome:
            raise ServiceError(f"the listen flow failed: {outcome['error']!r}")
        result = outcome.get("result") or {}
        timings["live_total_s"] = time.perf_counter() - t_acq

        say("5/5 baselines, metrics, previews and a Tiled query")
        from tiled.client import from_uri
        from tiled.queries import Key

        scans = result.get("scans") or []
        if not scans or "run_uid" not in scans[0]:
            raise ServiceError(f"the listen flow reconstructed no scan: {result!r}")
        run_uid = scans[0]["run_uid"]
        client = from_uri(endpoint.uri, api_key=endpoint.api_key)
        hits = list(client.search(Key("run_uid") == run_uid).values())
        if not hits:
            raise ServiceError(f"scan {run_uid} is not in Tiled")
        node = hits[0]
        approximant = np.asarray(node["approximant"].read())
        volumes = {"approximant": approximant}
        if "apt" in node:
            volumes["apt"] = np.asarray(node["apt"].read())
        run_stats = (result.get("runs") or {}).get(run_uid, {})
        acquired = list(range(scan.n_angles))
        if adaptive and "angles" in node:  # the angles the closed loop measured
            acquired = sorted({int(a) for a in node["angles"].read()["angle_id"]})
        if baselines:
            t0 = time.perf_counter()
            angles, proj = tomography_projections(scan, acquired)
            base = baseline_volumes(angles, proj, scan.volume_shape_zyx)
            volumes.update(base)
            publisher.reconstruction_ready(
                run_uid, {f"baselines/{k}": v for k, v in base.items()}, final=True
            )
            timings["baselines_s"] = time.perf_counter() - t0
        metrics = score(volumes, scan.truth)
        publisher.metrics_ready(run_uid, metrics)
        shown = preview_png(
            volumes, work / "previews" / "demo.png", truth=scan.truth, metrics=metrics,
            voxel_size_m=scan.object_pixel_m,
            title=f"{p.name}: {scan.n_angles} angles over ±{p.scan.angle_range_deg}°",
        )
        pub = publisher.stats()
        # frames acquired (a closed-loop scan ends before the planned ones)
        n_frames = int(np.isin(np.asarray(scan.angle_index), acquired).sum())
        closed_loop = None
        if adaptive:
            closed_loop = _compare_fixed(scan, p, checkpoint, device, run_stats, acquired,
                                         metrics, say)
        latency = None
        if run_uid in pub["apt_readable_at"] and "trigger_frame_received_at" in run_stats:
            latency = pub["apt_readable_at"][run_uid] - run_stats["trigger_frame_received_at"]
        live_s = timings["live_total_s"]
        live = result.get("live") or {}
        summary = {
            "run_uid": run_uid,
            "status": node.metadata.get("status"),
            "angles": len(acquired),
            "frames": n_frames,
            "frame_rate_hz": rate_hz,
            "timings_s": {k: round(v, 2) for k, v in timings.items()},
            "latency_s": None if latency is None else round(latency, 2),
            "prefect_overhead_pct": scans[0].get("prefect_overhead_pct"),
            "prefect_overhead_s": scans[0].get("prefect_overhead_s"),
            "prefect_compute_s": scans[0].get("compute_s"),
            # The same overhead against all of the scan's compute (both passes of every angle,
            # the first on the listener's worker, + inference).
            "prefect_overhead_pct_of_scan_compute": scans[0].get(
                "prefect_overhead_pct_of_scan_compute"),
            "prefect_tasks": scans[0].get("tasks"),
            "angles_per_task": scans[0].get("angles_per_task"),
            "prefect_overhead_breakdown_s": scans[0].get("prefect_overhead_breakdown_s"),
            "prefect_ui": prefect_ui,
            "prefect_flow_run_url": run_links.get("url"),
            "tiled_share_pct": round(100 * pub["tiled_s"] / live_s, 2) if live_s else None,
            "max_backlog_frames": live.get("max_backlog_frames"),
            "dask_workers": (result.get("cluster") or {}).get("workers"),
            "acquired_fps": round(n_frames / timings["acquisition_s"], 1),
            "pipeline_capacity_fps": (
                round(live["frames_processed"] / live["worker_busy_s"], 1)
                if live.get("worker_busy_s") else None
            ),
            "metrics_vs_truth": metrics,
            # "Note: SART (…) beats APT (…) on PCC …" when a baseline wins, else None.
            "preview_note": shown.note,
            "tiled_uri": endpoint.uri,
            "tiled_data": str(endpoint.data_dir),
            "client_snippet": client_snippet(run_uid, endpoint.data_dir),
            # The raw run TiledWriter stored, and how to reconstruct it again from Tiled.
            "raw_run": node.metadata.get("raw_run"),
            "reconstruct_from_tiled": (
                f"apt-stream reconstruct tiled://127.0.0.1:8000/raw/{run_uid} --data-root "
                f"{work_root} --angles {len(acquired)} --range {p.scan.angle_range_deg:g}"
                "   # with `apt-stream serve` running"),
            "previews": sorted(str(x) for x in (work / "previews").glob("*.png")),
            "scan_file": str(scan_path),
            "run_dir": str(work),
        }
        if closed_loop is not None:
            summary["closed_loop"] = closed_loop
        summary["timings_s"]["total_s"] = round(time.perf_counter() - t_start, 2)
        pct = summary["prefect_overhead_pct"]
        if pct is not None:
            say(f"   Prefect overhead: {pct:.2f} % of the compute it orchestrated "
                f"({summary['prefect_overhead_s']:.3f} s over {summary['prefect_tasks']} tasks, "
                f"{summary['prefect_compute_s']:.2f} s of compute; target < 5 %)")
    if keep_serving is not None:
        keep_serving(summary)  # the embedded Tiled server is closed; Prefect's is still up
    return summary



def _compare_fixed(scan, p, checkpoint, device: str, run_stats: dict, acquired: list[int],
                   metrics: dict, say: Callable[[str], None]) -> dict:
    """The closed loop's part of the summary: angles needed and APT PCC against the fixed-N*
    scan (the same scan's N* angles over ±θ*, reconstructed offline with the same network)."""
    from apt_stream.reconstruct import reconstruct_scan

    n_star, theta = int(p.scan.n_angles), float(p.scan.angle_range_deg)
    t0 = time.perf_counter()
    fixed = reconstruct_scan(scan, n_angles=n_star, range_deg=theta, checkpoint=checkpoint,
                             device=device)
    pcc_fixed = float(fixed.metrics["apt"]["pcc"]) if fixed.metrics else None
    pcc_adaptive = float(metrics["apt"]["pcc"]) if "apt" in metrics else None
    out = {
        "angles_needed": len(acquired),
        "n_star": n_star,
        "angles_saved": n_star - len(acquired),
        "stop_advised_at_n": run_stats.get("stop_advised_at_n"),
        "fired_early": bool(run_stats.get("fired_early")),
        "pcc_adaptive": None if pcc_adaptive is None else round(pcc_adaptive, 4),
        "pcc_fixed_n_star": None if pcc_fixed is None else round(pcc_fixed, 4),
        "dsc_adaptive": round(float(metrics["apt"]["dsc"]), 4) if "apt" in metrics else None,
        "dsc_fixed_n_star": round(float(fixed.metrics["apt"]["dsc"]), 4) if fixed.metrics
        else None,
        "fixed_offline_s": round(time.perf_counter() - t0, 2),
        "convergence": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                        for r in run_stats.get("convergence") or []],
    }
    say(f"   closed loop: {out['angles_needed']} angles needed against the fixed N* = {n_star} "
        f"(saved {out['angles_saved']}); APT PCC {out['pcc_adaptive']} adaptive vs "
        f"{out['pcc_fixed_n_star']} with all N* angles")
    return out
