"""The Approximant of a scan without services: ``apt-stream approximant`` and the offline paths.

``approximant_of_scan``: a ScanData → (angle subset) → streaming engine, as the live listener
runs it. ``approximant_of_file``: scan file → the same → volume file (+ PNG).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from apt_stream.config import select_angles
from apt_stream.progress import progress_context


def approximant_of_scan(
    scan,
    *,
    n_angles: int | None = None,
    range_deg: float | None = None,
    batch_size: int | None = None,
    projection_iterations: int | None = None,
    progress_factory: Callable | None = None,
    device: str = "cpu",
):
    """Approximant of a ScanData; returns (engine, chosen angle indices, seconds).

    ``projection_iterations`` keeps iterating each angle after its Approximant contribution, for
    the projections data consistency and the classical baselines use (``engine.projections()``).
    """
    from apt_stream.physics.engine import approximant_from_scan

    if n_angles is None and range_deg is None:
        indices = np.arange(scan.n_angles)
    else:
        rng = float(np.abs(scan.angles_deg).max()) if range_deg is None else range_deg
        n = scan.n_angles if n_angles is None else n_angles
        indices = select_angles(scan.angles_deg, n, rng)
    t0 = time.perf_counter()
    with progress_context(progress_factory, f"Approximant ({len(indices)} angles)") as update:
        engine = approximant_from_scan(
            scan, angle_indices=indices, batch_size=batch_size, progress=update,
            projection_iterations=projection_iterations, device=device,
        )
    return engine, indices, time.perf_counter() - t0


def approximant_of_file(
    scan_path: str | Path,
    output: str | Path,
    *,
    n_angles: int | None = None,
    range_deg: float | None = None,
    batch_size: int | None = None,
    png: str | Path | None = None,
    progress_factory: Callable | None = None,
    device: str = "cpu",
) -> dict:
    """Read a scan, compute its Approximant over the chosen angles and write a volume file."""
    from apt_stream.io import read_scan, write_volumes
    from apt_stream.metrics import pcc

    scan = read_scan(scan_path)
    engine, indices, seconds = approximant_of_scan(
        scan, n_angles=n_angles, range_deg=range_deg, batch_size=batch_size,
        progress_factory=progress_factory, device=device,
    )
    volume = engine.volume()
    chosen = scan.angles_deg[indices]
    attrs = {
        "source": str(scan_path),
        "angles_deg": [float(a) for a in chosen],
        "n_angles": int(len(indices)),
        "seconds": round(seconds, 3),
        "batch_size": batch_size or 0,
        "device": str(device),
    }
    volumes = {"approximant": volume, "count": engine.accumulator.count_volume()}
    result = {
        "output": str(output),
        "angles": int(len(indices)),
        "range_deg": [float(chosen.min()), float(chosen.max())],
        "frames": int(sum(s.n_frames for s in engine.summaries.values())),
        "seconds": round(seconds, 3),
    }
    if scan.truth is not None:
        from apt_stream.reconstruct import metrics_skipped

        note = metrics_skipped(scan.truth)
        if note is None:
            result["pcc_vs_truth"] = round(float(pcc(volume, scan.truth.delta)), 4)
            attrs["pcc_vs_truth"] = result["pcc_vs_truth"]
        else:
            result["note"] = attrs["note"] = note
    write_volumes(output, volumes, voxel_size_m=scan.object_pixel_m, attrs=attrs)
    if png is not None:
        from apt_stream.figures import cross_sections_png

        shown = {"Approximant": volume}
        if scan.truth is not None:
            shown["ground truth δ"] = scan.truth.delta
        cross_sections_png(shown, png, title=f"{len(indices)} angles",
                           voxel_size_m=scan.object_pixel_m)
        result["png"] = str(png)
    return result
