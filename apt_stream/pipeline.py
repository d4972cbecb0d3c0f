"""Offline pipelines that string the library together for the CLI (no services involved).

``approximant_of_file``: scan file → (angle subset) → streaming engine → volume file (+ PNG).
``offline_demo``: simulate the demo scans, compute the Approximant, write volumes and a PNG; the
live demo (Tiled, Prefect, ZMQ) builds on top of this in ``apt_stream.demo``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from apt_stream.config import select_angles


@contextmanager
def progress_context(progress_factory: Callable | None, description: str) -> Iterator:
    """Yield an ``update(done, total)`` callback (or None) from a CLI progress-bar factory."""
    if progress_factory is None:
        yield None
        return
    bar, update = progress_factory(description)
    with bar:
        yield update


def approximant_of_scan(
    scan,
    *,
    n_angles: int | None = None,
    range_deg: float | None = None,
    batch_size: int | None = None,
    projection_iterations: int | None = None,
    progress_factory: Callable | None = None,
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
            projection_iterations=projection_iterations,
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
) -> dict:
    """Read a scan, compute its Approximant over the chosen angles and write a volume file."""
    from apt_stream.io import read_scan, write_volumes
    from apt_stream.metrics import pcc

    scan = read_scan(scan_path)
    engine, indices, seconds = approximant_of_scan(
        scan, n_angles=n_angles, range_deg=range_deg, batch_size=batch_size,
        progress_factory=progress_factory,
    )
    volume = engine.volume()
    chosen = scan.angles_deg[indices]
    attrs = {
        "source": str(scan_path),
        "angles_deg": [float(a) for a in chosen],
        "n_angles": int(len(indices)),
        "seconds": round(seconds, 3),
        "batch_size": batch_size or 0,
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


def offline_demo(
    workdir: str | Path,
    *,
    preset: str = "demo",
    seed: int = 1000,
    progress_factory: Callable | None = None,
) -> dict:
    """Simulate the preset's N* scan, compute its Approximant and write volumes + a PNG."""
    from apt_stream.config import get_preset
    from apt_stream.io import write_scan, write_volumes
    from apt_stream.metrics import pcc
    from apt_stream.sim.acquire import simulate_scan

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    p = get_preset(preset)
    with progress_context(progress_factory, f"simulating {p.name} scan") as update:
        scan = simulate_scan(p, seed=seed, progress=update)
    scan_path = write_scan(workdir / "scan.h5", scan)
    engine, indices, seconds = approximant_of_scan(scan, progress_factory=progress_factory)
    volume = engine.volume()
    write_volumes(
        workdir / "approximant.h5", {"approximant": volume},
        voxel_size_m=scan.object_pixel_m, attrs={"seconds": seconds},
    )
    from apt_stream.figures import cross_sections_png

    png = cross_sections_png(
        {"Approximant": volume, "ground truth δ": scan.truth.delta},
        workdir / "approximant.png",
        title=f"{p.name}: {len(indices)} angles over ±{p.scan.angle_range_deg}°",
        voxel_size_m=scan.object_pixel_m,
    )
    return {
        "scan": str(scan_path),
        "png": str(png),
        "angles": int(len(indices)),
        "frames": int(scan.n_frames),
        "simulation_seconds": scan.provenance.get("simulation_seconds"),
        "approximant_seconds": round(seconds, 2),
        "frames_per_second": round(scan.n_frames / seconds, 1),
        "approximant_pcc_vs_truth": round(float(pcc(volume, scan.truth.delta)), 4),
    }
