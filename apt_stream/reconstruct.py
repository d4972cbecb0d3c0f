"""Scan → Approximant → APT network (→ classical baselines), offline.

The live pipeline calls the same pieces (``apt_volume``, ``baseline_volumes``) from its worker.
Classical baselines reconstruct from per-angle projections; like the paper's, those come from a
better-converged ptychographic reconstruction of each angle than the Approximant's two iterations
(``BASELINE_ITERATIONS``), after phase-offset removal.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from apt_stream.errors import ModelError

#: The trained `cpu` network shipped inside the package (docs/model-card.md).
DEFAULT_CHECKPOINT = Path(__file__).parent / "model" / "weights" / "apt-cpu.safetensors"
BASELINE_ITERATIONS = 10
BASELINES = ("fbp", "sirt", "sart")


def load_model(checkpoint: str | Path | None = None, *, device: str = "cpu"):
    """Load a checkpoint (default: the shipped model). Returns (model, metadata)."""
    from apt_stream.model.checkpoint import load_checkpoint

    path = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
    if not path.exists():
        hint = "" if checkpoint else " (the package ships none: run `apt-stream train --preset cpu`)"
        raise ModelError(f"model checkpoint {path} does not exist{hint}")
    return load_checkpoint(path, map_location=device)


def apt_volume(
    model, approximant: np.ndarray, *, device: str = "cpu", dtype: str = "float32",
    progress: Callable | None = None,
) -> np.ndarray:
    """Run the APT network over a whole input by stitched patches (δ units if calibrated).

    ``approximant`` is (Z, Y, X), or (C, Z, Y, X) as :func:`apt_stream.model.inputs.network_input`
    builds it for models that read more than the Approximant.
    """
    from apt_stream.model.inference import predict_volume

    return predict_volume(model, approximant, device=device, dtype=dtype, progress=progress)


def dc_sweeps(model) -> int:
    """Data-consistency sweeps the model asks for (``io_config["data_consistency"]``; 0 = off)."""
    from apt_stream.physics.consistency import DC_ITERATIONS

    dc = dict(getattr(model, "io_config", {}).get("data_consistency") or {})
    return int(dc.get("iterations", DC_ITERATIONS))


def apt_volumes(
    model, approximant: np.ndarray, *, projections: tuple[np.ndarray, np.ndarray] | None = None,
    input_projections: tuple[np.ndarray, np.ndarray] | None = None,
    device: str = "cpu", dtype: str = "float32", progress: Callable | None = None,
) -> dict[str, np.ndarray]:
    """``{"apt": data-consistent volume, "apt-raw": network output}`` (``apt`` only without data).

    A model with a calibrated metal rule (``io_config["metal_mask"]``, :mod:`apt_stream.metal_mask`)
    also gives ``"apt-metal"``: the uint8 metal mask of the ``apt`` volume.

    ``projections`` is ``(angles_deg, projections)`` of the angles the Approximant used (the
    engine's ``projections()``); the network's volume is then pulled towards them by a few SART
    sweeps (:func:`apt_stream.physics.consistency.enforce_projections`, with the sweeps the model's
    ``io_config["data_consistency"]`` names, else the module defaults).
    ``input_projections`` (default ``projections``) are what a physics-in-the-loop model reads
    (``engine.projections(refined=False)``: the Approximant's own iterations, as in training).
    """
    from apt_stream.model.inputs import network_input
    from apt_stream.physics.consistency import DC_RELAXATION, enforce_projections

    inputs = network_input(model, approximant, input_projections or projections, device=device)
    raw = apt_volume(model, inputs, device=device, dtype=dtype, progress=progress)
    n_iter = dc_sweeps(model)
    # The shipped model's setting was chosen by measurement (docs/results.md, data consistency).
    if projections is None or len(projections[0]) == 0 or n_iter == 0:
        return _with_metal_mask(model, {"apt": raw})
    dc = dict(model.io_config.get("data_consistency") or {})
    consistent, _ = enforce_projections(
        raw, projections[0], projections[1], n_iter=n_iter,
        relaxation=float(dc.get("relaxation", DC_RELAXATION)), method=str(dc.get("method", "sart")),
        report_residual=False,
    )
    return _with_metal_mask(model, {"apt": consistent, "apt-raw": raw})


def _with_metal_mask(model, volumes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from apt_stream.metal_mask import MetalRule

    rule = MetalRule.of_model(model)
    if rule is not None:
        volumes["apt-metal"] = rule.mask(volumes["apt"])
    return volumes


def is_mask(volume: np.ndarray) -> bool:
    """Masks (``apt-metal``) are uint8/bool; every reconstructed volume is a float."""
    return np.asarray(volume).dtype in (np.uint8, np.bool_)


def baseline_volumes(
    angles_deg: np.ndarray, projections: np.ndarray, shape_zyx, *, which=BASELINES,
    device: str | None = None,
) -> dict[str, np.ndarray]:
    """FBP, SIRT and SART (non-negative) from projections (N, ny, W) at ``angles_deg``."""
    from apt_stream.physics import tomo

    makers = {
        "fbp": lambda: tomo.fbp(projections, angles_deg, shape_zyx, device=device),
        "sirt": lambda: tomo.sirt(projections, angles_deg, shape_zyx, nonneg=True, device=device),
        "sart": lambda: tomo.sart(projections, angles_deg, shape_zyx, nonneg=True, device=device),
    }
    return {name: np.asarray(makers[name](), dtype=np.float32) for name in which}


def tomography_projections(
    scan, angle_indices, *, iterations: int = BASELINE_ITERATIONS, progress: Callable | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-angle projections from ``iterations`` multislice iterations (for FBP/SIRT/SART)."""
    from apt_stream.physics.engine import approximant_from_scan

    engine = approximant_from_scan(
        scan, angle_indices=angle_indices, projection_iterations=iterations, progress=progress
    )
    return engine.projections()


def match_to(volume: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Affinely map ``volume`` onto the reference's mean and spread (z-score, then rescale).

    Reconstructions come in different units and scales (two-iteration δ, calibrated network output,
    line-integral inversions); structure metrics such as MS-SSIM should not reward or punish a
    global gain. Every method gets the same treatment.
    """
    v = np.asarray(volume, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    std = v.std()
    return (((v - v.mean()) / (std if std > 0 else 1.0)) * r.std() + r.mean()).astype(np.float32)


def metrics_skipped(truth) -> str | None:
    """A one-line note when the truth cannot be scored (one class: all metal or none), else None.

    DSC and BER need both classes and PCC/MS-SSIM a truth that varies; an empty field (a vacuum
    scan) or a block of one material has neither, so metrics are skipped rather than failing.
    """
    from apt_stream.sim.materials import is_metal

    metal = is_metal(truth.labels)
    n_metal = int(np.count_nonzero(metal))
    if 0 < n_metal < metal.size:
        return None
    which = "no metal" if n_metal == 0 else "all metal"
    empty = " (an empty field)" if not np.any(np.asarray(truth.labels)) else ""
    return f"metrics skipped: the ground truth has a single class ({which}{empty})"


def score(volumes: Mapping[str, np.ndarray], truth, *, exclude_z=None) -> dict[str, dict]:
    """The paper's four metrics of each volume against the ground truth (metal = METAL_LABELS).

    Check :func:`metrics_skipped` first: a single-class truth cannot be scored.
    A mask (``apt-metal``) is scored as it is, on DSC and BER only: re-binarising it would
    change nothing, and PCC / MS-SSIM of a 0/1 volume against δ mean nothing.
    """
    from apt_stream.metal_mask import mask_scores
    from apt_stream.metrics import evaluate
    from apt_stream.sim.materials import is_metal

    metal = is_metal(truth.labels)

    def one(vol):
        if is_mask(vol):
            return mask_scores(vol, metal, exclude_z=exclude_z)
        return evaluate(match_to(vol, truth.delta), truth.delta, reference_binary=metal, exclude_z=exclude_z)

    return {name: {k: round(float(v), 4) for k, v in one(vol).items()} for name, vol in volumes.items()}


@dataclass
class Reconstruction:
    volumes: dict[str, np.ndarray]
    angles_deg: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, dict] | None = None
    model_meta: dict | None = None
    #: why ``metrics`` is None although the scan has a truth (:func:`metrics_skipped`)
    note: str | None = None


def reconstruct_scan(
    scan,
    *,
    n_angles: int | None = None,
    range_deg: float | None = None,
    checkpoint: str | Path | None = None,
    with_baselines: bool = False,
    device: str = "cpu",
    progress_factory: Callable | None = None,
) -> Reconstruction:
    """Approximant over the chosen angles, the APT volume, and optionally FBP/SIRT/SART."""
    from apt_stream.offline_approximant import approximant_of_scan
    from apt_stream.progress import progress_context

    model, meta = load_model(checkpoint, device=device)
    from apt_stream.physics.consistency import DC_PROJECTION_ITERATIONS

    # Better-converged projections only when something uses them (data consistency, baselines).
    wants = with_baselines or dc_sweeps(model) > 0
    engine, indices, t_apx = approximant_of_scan(
        scan, n_angles=n_angles, range_deg=range_deg, progress_factory=progress_factory,
        projection_iterations=DC_PROJECTION_ITERATIONS if wants else None, device=device,
    )
    approximant = engine.volume()
    t0 = time.perf_counter()
    with progress_context(progress_factory, "APT network + data consistency") as update:
        apt = apt_volumes(model, approximant, projections=engine.projections(),
                          input_projections=engine.projections(refined=False), device=device,
                          progress=update)
    timings = {"approximant_s": t_apx, "network_s": time.perf_counter() - t0}
    volumes = {"approximant": approximant, **apt}
    if with_baselines:
        t0 = time.perf_counter()
        angles, projections = engine.projections()  # the same six-iteration projections as DC
        volumes.update(baseline_volumes(angles, projections, scan.volume_shape_zyx,
                                        device=device))
        timings["baselines_s"] = time.perf_counter() - t0
    note = metrics_skipped(scan.truth) if scan.truth is not None else None
    metrics = score(volumes, scan.truth) if scan.truth is not None and note is None else None
    return Reconstruction(
        volumes=volumes, angles_deg=scan.angles_deg[indices], timings=timings, metrics=metrics,
        model_meta=meta, note=note,
    )


def reconstruct_file(
    scan_path: str | Path,
    output: str | Path,
    *,
    n_angles: int | None = None,
    range_deg: float | None = None,
    checkpoint: str | Path | None = None,
    with_baselines: bool = False,
    png: str | Path | None = None,
    progress_factory: Callable | None = None,
    device: str = "cpu",
) -> dict:
    from apt_stream.io import read_scan, write_volumes

    scan = read_scan(scan_path)
    rec = reconstruct_scan(
        scan, n_angles=n_angles, range_deg=range_deg, checkpoint=checkpoint,
        with_baselines=with_baselines, progress_factory=progress_factory, device=device,
    )
    meta = rec.model_meta or {}
    attrs = {
        "source": str(scan_path),
        "angles_deg": [float(a) for a in rec.angles_deg],
        "model": meta.get("preset", "?"),
        "model_sha256": meta.get("sha256", ""),
        "timings": {k: round(v, 3) for k, v in rec.timings.items()},
        "device": str(device),
    }
    if rec.metrics:
        attrs["metrics"] = rec.metrics
    if rec.note:
        attrs["note"] = rec.note
    write_volumes(output, rec.volumes, voxel_size_m=scan.object_pixel_m, attrs=attrs)
    summary = {"output": str(output), **attrs}
    if png is not None:
        from apt_stream.figures import cross_sections_png

        summary["png"] = str(cross_sections_png(
            rec.volumes, png, title=f"{len(rec.angles_deg)} angles", truth=scan.truth,
            metrics=rec.metrics, voxel_size_m=scan.object_pixel_m,
        ))
    return summary
