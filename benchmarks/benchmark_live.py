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


def _run(preset: str, seed: int, rate_hz: float | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="apt-bench-live-") as tmp:
        return live_demo(tmp, preset=preset, seed=seed, rate_hz=rate_hz, baselines=False,
                         say=lambda msg: None)


def run_all(*, preset: str = "demo", seed: int = 1000, quick: bool = False) -> dict:
    """Two runs: the beamline at full speed (keep-up, backlog), then at the demo's rate
    (latency and each service's share of the wall time a user actually waits)."""
    preset = "tiny" if quick else preset
    fast = _run(preset, seed, None)
    paced = _run(preset, seed, DEFAULT_RATE_HZ)
    capacity = fast.get("pipeline_capacity_fps")
    prefect_s = paced.get("prefect_overhead_s")
    return {
        "benchmark": "live",
        "preset": preset,
        "demo_rate_hz": DEFAULT_RATE_HZ,
        "full_speed": {
            "offered_fps": fast["acquired_fps"],
            "pipeline_capacity_fps": capacity,
            "max_backlog_frames": fast["max_backlog_frames"],
            "latency_s": fast["latency_s"],
            "timings_s": fast["timings_s"],
        },
        "keep_up_factor": round(capacity / DEFAULT_RATE_HZ, 2) if capacity else None,
        "at_demo_rate": {
            "acquired_fps": paced["acquired_fps"],
            "latency_s": paced["latency_s"],
            "max_backlog_frames": paced["max_backlog_frames"],
            "prefect_overhead_pct_of_compute": paced["prefect_overhead_pct"],
            "prefect_overhead_pct_of_scan_compute": paced.get(
                "prefect_overhead_pct_of_scan_compute"),
            "prefect_overhead_s": prefect_s,
            "prefect_overhead_breakdown_s": paced.get("prefect_overhead_breakdown_s"),
            "angles_per_task": paced.get("angles_per_task"),
            "prefect_share_of_wall_pct": (
                round(100 * prefect_s / paced["timings_s"]["live_total_s"], 2) if prefect_s else None
            ),
            "tiled_share_of_wall_pct": paced["tiled_share_pct"],
            "timings_s": paced["timings_s"],
        },
        "frames": fast["frames"],
    }


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_all(), indent=2))
