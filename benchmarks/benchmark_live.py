"""The live pipeline at demo scale: keep-up factor, trigger-to-Tiled latency, Prefect and Tiled shares.

Runs the full live demo (embedded Tiled, Prefect's ephemeral server, 0MQ proxy, the simulated
beamline in its own process) with the beamline at full speed, then reports:

* ``keep_up_factor``: the pipeline's capacity (frames processed per second of worker time — the
  engine, Prefect's tasks and Tiled writes included) over the demo's acquisition rate;
* whether the backlog stayed bounded at the offered (full-speed) rate: max backlog in frames;
* ``latency_s``: from the arrival of the last frame the trigger needed to the APT volume being
  readable in Tiled;
* Prefect's overhead as a share of the compute it orchestrates, and Tiled's share of wall time.
"""

from __future__ import annotations

import json
import tempfile

from apt_stream.demo import DEFAULT_RATE_HZ, live_demo


def run_all(*, preset: str = "demo", seed: int = 1000, quick: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="apt-bench-live-") as tmp:
        summary = live_demo(
            tmp, preset="tiny" if quick else preset, seed=seed, rate_hz=None, baselines=False,
            say=lambda msg: None,
        )
    capacity = summary.get("pipeline_capacity_fps")
    return {
        "benchmark": "live",
        "preset": "tiny" if quick else preset,
        "demo_rate_hz": DEFAULT_RATE_HZ,
        "offered_fps": summary["acquired_fps"],
        "pipeline_capacity_fps": capacity,
        "keep_up_factor": round(capacity / DEFAULT_RATE_HZ, 2) if capacity else None,
        "max_backlog_frames": summary["max_backlog_frames"],
        "frames": summary["frames"],
        "latency_s": summary["latency_s"],
        "prefect_overhead_pct": summary["prefect_overhead_pct"],
        "tiled_share_pct": summary["tiled_share_pct"],
        "timings_s": summary["timings_s"],
    }


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_all(), indent=2))
