"""``apt-stream demo --offline``: simulate the demo scan, its Approximant, volumes and a PNG.

No services (Tiled, Prefect, 0MQ); the live demo is :mod:`apt_stream.demo`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from apt_stream.offline_approximant import approximant_of_scan
from apt_stream.progress import progress_context


def offline_demo(
    workdir: str | Path,
    *,
    preset: str = "demo",
    seed: int = 1000,
    progress_factory: Callable | None = None,
    device: str = "cpu",
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
    engine, indices, seconds = approximant_of_scan(scan, progress_factory=progress_factory,
                                                   device=device)
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
        "device": str(device),
        "simulation_seconds": scan.provenance.get("simulation_seconds"),
        "approximant_seconds": round(seconds, 2),
        "frames_per_second": round(scan.n_frames / seconds, 1),
        "approximant_pcc_vs_truth": round(float(pcc(volume, scan.truth.delta)), 4),
    }
