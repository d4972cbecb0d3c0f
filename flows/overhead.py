"""Measure what one Prefect task costs on this machine (for docs/prefect.md's granularity rule).

``measure_task_overhead`` runs ``n_tasks`` empty tasks (same options as the pipeline's tasks)
and one progress-artifact update per task, and reports the wall time per task. Compare it with
the compute per angle: the per-angle tasks are worth it while overhead / compute stays < 5 %.
"""

from __future__ import annotations

import statistics
import time

from prefect import flow, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from apt_stream.errors import InputError


@task(name="empty", cache_policy=NO_CACHE, persist_result=False)
def _empty(i: int) -> int:
    return i


@flow(name="prefect-overhead", persist_result=False, log_prints=False)
def measure_task_overhead(n_tasks: int = 50) -> dict[str, float]:
    """Seconds per empty task call and per progress-artifact update (median and mean)."""
    if n_tasks < 1:
        raise InputError(f"n_tasks must be >= 1, got {n_tasks}")
    task_s, artifact_s = [], []
    progress = create_progress_artifact(0.0, key="prefect-overhead")
    for i in range(n_tasks):
        t0 = time.perf_counter()
        _empty(i)
        t1 = time.perf_counter()
        update_progress_artifact(progress, 100.0 * (i + 1) / n_tasks)
        task_s.append(t1 - t0)
        artifact_s.append(time.perf_counter() - t1)
    return {
        "n_tasks": n_tasks,
        "task_median_s": statistics.median(task_s),
        "task_mean_s": statistics.mean(task_s),
        "artifact_update_median_s": statistics.median(artifact_s),
        "per_angle_s": statistics.median(task_s) * 2 + statistics.median(artifact_s),
    }
