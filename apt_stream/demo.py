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


def client_snippet(uri: str, run_uid: str) -> str:
    return (
        "from tiled.client import from_uri\n"
        "from tiled.queries import Key\n"
        f"client = from_uri({uri!r}, api_key=os.environ['APT_STREAM_TILED_API_KEY'])\n"
        f"scan = client.search(Key('run_uid') == {run_uid!r}).values().first()\n"
        "print(scan.metadata['status'], scan.metadata['angles_used'])\n"
        "apt = scan['apt'][:, 32, :]   # an xz slice, read lazily\n"
    )


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
) -> dict:
    """Run the live demo end to end; returns the summary printed by the CLI."""
    from apt_stream.flows.settings import apply_offline_env

    apply_offline_env()  # before Prefect is imported: it reads its settings once
    from apt_stream.config import get_preset
    from apt_stream.figures import cross_sections_png
    from apt_stream.flows.listen import ListenConfig, LiveResources, listen
    from apt_stream.io import write_scan
    from apt_stream.plugins.bluesky.zmq_link import start_proxy
    from apt_stream.publish import TiledPublisher
    from apt_stream.publish.server import local_tiled_server
    from apt_stream.reconstruct import (
        DEFAULT_CHECKPOINT,
        baseline_volumes,
        score,
        tomography_projections,
    )
    from apt_stream.sim.acquire import simulate_scan

    t_start = time.perf_counter()
    work = Path(workdir).resolve()
    for sub in ("runs", "spool", "previews", "backup"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    p = get_preset(preset)
    say(f"1/5 simulating a {p.name} scan (seed {seed}): {p.scan.n_angles} angles over ±{p.scan.angle_range_deg}°")
    scan = simulate_scan(p, seed=seed)
    scan_path = write_scan(work / "scan.h5", scan)
    timings = {"simulate_s": time.perf_counter() - t_start}
    checkpoint = Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT

    with ExitStack() as stack:
        say("2/5 starting Tiled (embedded), the 0MQ proxy and the Prefect listen flow")
        endpoint = stack.enter_context(local_tiled_server(work / "tiled"))
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
        )
        resources = LiveResources(
            publisher=publisher, stop=stop,
            on_ready=lambda listener: (listeners.append(listener), ready.set()),
            truth_fn=lambda header: scan.truth,
        )

        def run_flow() -> None:
            try:
                outcome["result"] = listen(config, resources)
            except BaseException as exc:  # reported by the main thread
                outcome["error"] = exc
                ready.set()

        flow_thread = threading.Thread(target=run_flow, name="apt-listen", daemon=True)
        flow_thread.start()
        if not ready.wait(180) or "error" in outcome:
            raise ServiceError(f"the listen flow did not come up: {outcome.get('error')!r}")
        timings["services_up_s"] = time.perf_counter() - t_start

        rate_text = f"{rate_hz:g} frames/s" if rate_hz else "full speed"
        say(f"3/5 acquiring: simulated beamline at {rate_text} in its own process")
        t_acq = time.perf_counter()
        rate_args = ["--rate", str(rate_hz)] if rate_hz else []
        # The beamline's output goes to a file: a pipe nobody reads while we poll could fill up.
        beam_log = stack.enter_context(open(work / "beamline.log", "w"))
        beamline = subprocess.Popen(
            [sys.executable, "-m", "apt_stream.cli", "replay", str(scan_path), "--zmq",
             proxy.in_address, *rate_args, "--data-root", str(work / "runs")],
            stdout=beam_log, stderr=subprocess.STDOUT, text=True,
        )
        stack.callback(lambda: beamline.poll() is None and beamline.kill())
        from apt_stream.pipeline import progress_context

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
        if baselines:
            t0 = time.perf_counter()
            angles, proj = tomography_projections(scan, list(range(scan.n_angles)))
            base = baseline_volumes(angles, proj, scan.volume_shape_zyx)
            volumes.update(base)
            publisher.reconstruction_ready(
                run_uid, {f"baselines/{k}": v for k, v in base.items()}, final=True
            )
            timings["baselines_s"] = time.perf_counter() - t0
        metrics = score(volumes, scan.truth)
        publisher.metrics_ready(run_uid, metrics)
        cross_sections_png(
            {**volumes, "ground truth δ": scan.truth.delta}, work / "previews" / "demo.png",
            title=f"{p.name}: {scan.n_angles} angles over ±{p.scan.angle_range_deg}°",
        )
        pub = publisher.stats()
        run_stats = (result.get("runs") or {}).get(run_uid, {})
        latency = None
        if run_uid in pub["apt_readable_at"] and "trigger_frame_received_at" in run_stats:
            latency = pub["apt_readable_at"][run_uid] - run_stats["trigger_frame_received_at"]
        live_s = timings["live_total_s"]
        live = result.get("live") or {}
        summary = {
            "run_uid": run_uid,
            "status": node.metadata.get("status"),
            "angles": int(scan.n_angles),
            "frames": int(scan.n_frames),
            "frame_rate_hz": rate_hz,
            "timings_s": {k: round(v, 2) for k, v in timings.items()},
            "latency_s": None if latency is None else round(latency, 2),
            "prefect_overhead_pct": scans[0].get("prefect_overhead_pct"),
            "prefect_overhead_s": scans[0].get("prefect_overhead_s"),
            "tiled_share_pct": round(100 * pub["tiled_s"] / live_s, 2) if live_s else None,
            "max_backlog_frames": live.get("max_backlog_frames"),
            "acquired_fps": round(scan.n_frames / timings["acquisition_s"], 1),
            "pipeline_capacity_fps": (
                round(live["frames_processed"] / live["worker_busy_s"], 1)
                if live.get("worker_busy_s") else None
            ),
            "metrics_vs_truth": metrics,
            "tiled_uri": endpoint.uri,
            "tiled_data": str(endpoint.data_dir),
            "client_snippet": client_snippet(endpoint.uri, run_uid),
            "previews": sorted(str(x) for x in (work / "previews").glob("*.png")),
            "scan_file": str(scan_path),
        }
        summary["timings_s"]["total_s"] = round(time.perf_counter() - t_start, 2)
        return summary
