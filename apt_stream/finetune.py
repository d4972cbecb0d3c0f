"""Fine-tuning on the user's own chip, labels from its gold-standard region (the paper's workflow).

The paper trained on one region of a chip, labelled by that region's many-angle gold-standard
reconstruction, and reconstructed other regions from few angles. ``finetune_on_gold`` does the
same from a shipped (or any) checkpoint: the gold scan's SART volume over all its angles is the
label; the inputs are Approximants of random few-angle subsets of the gold scan itself (and, when
given, of separate few-angle scans of the same region), built from angle banks exactly as in
training. No ground truth is used anywhere.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from apt_stream.errors import InputError

#: Fine-tuning learning rate: a tenth of the paper's, so the general prior is adjusted, not erased.
FINETUNE_LR = 2e-5
#: Angle settings (SART input volumes) per bank for physics-in-the-loop models: few banks here.
FINETUNE_SETS_PER_BANK = 16


def gold_label(scan, *, iterations: int = 10, sart_iterations: int = 10) -> tuple[np.ndarray, Any]:
    """The gold-standard volume (SART over every angle of ``scan``) and the engine that made it."""
    from apt_stream.physics import tomo
    from apt_stream.physics.engine import approximant_from_scan

    engine = approximant_from_scan(scan, keep_slices=True, projection_iterations=iterations)
    angles, proj = engine.projections()
    volume = tomo.sart(proj, angles, scan.volume_shape_zyx, n_iter=sart_iterations, nonneg=True)
    return np.asarray(volume, dtype=np.float32), engine


def labelled_bank(scan, label: np.ndarray, *, seed: int):
    """An angle bank of ``scan`` whose 'truth' is the gold label instead of ground truth."""
    import dataclasses

    from apt_stream.angle_bank import bank_from_scan
    from apt_stream.io import GroundTruth

    if tuple(label.shape) != tuple(scan.volume_shape_zyx):
        raise InputError(f"scan volume {scan.volume_shape_zyx} differs from the gold volume {label.shape}")
    truth = GroundTruth(delta=label, beta=np.zeros_like(label), labels=np.zeros(label.shape, np.uint8),
                        voxel_size_m=scan.object_pixel_m)
    return bank_from_scan(dataclasses.replace(scan, truth=truth), seed=seed, split="train")


def finetune_on_gold(
    checkpoint: str | Path,
    gold_path: str | Path,
    scan_paths: list[str | Path] | tuple = (),
    *,
    out_dir: str | Path,
    epochs: int = 15,
    samples_per_epoch: int = 128,
    n_angles: tuple[int, int] = (15, 41),
    range_deg: tuple[float, float] = (12.0, 25.0),
    seed: int = 0,
    progress: Any = True,
    device: str = "cpu",
) -> dict:
    """Fine-tune ``checkpoint`` on the gold scan's region; returns paths and the gain on held data.

    Validation uses a fixed set of angle subsets of the gold region (the label is all there is);
    ``scan_paths`` add their Approximants (over all their angles) as extra training inputs.
    """
    from apt_stream.io import read_scan
    from apt_stream.model.checkpoint import load_checkpoint
    from apt_stream.model.inputs import model_inputs
    from apt_stream.model.train import evaluate, train
    from apt_stream.random_angles import AngleSampling, RandomAngleDataset

    t0 = time.perf_counter()
    gold = read_scan(gold_path)
    label, _ = gold_label(gold)
    banks = [labelled_bank(gold, label, seed=0)]
    for k, path in enumerate(scan_paths, start=1):
        banks.append(labelled_bank(read_scan(path), label, seed=k))
    model, meta = load_checkpoint(checkpoint)
    patch = int(model.config.input_zyx[1])
    top = float(np.abs(gold.angles_deg).max())
    sampling = AngleSampling(n_angles=n_angles, range_deg=(min(range_deg[0], top), min(range_deg[1], top)),
                             default_probability=0.5)
    inputs = {"inputs": model_inputs(model), "sets_per_bank": FINETUNE_SETS_PER_BANK}
    train_ds = RandomAngleDataset(banks, patch_xy=patch, samples_per_epoch=samples_per_epoch, sampling=sampling,
                                  **inputs)
    val_ds = RandomAngleDataset(banks[:1], patch_xy=patch, samples_per_epoch=48, sampling=sampling,
                                fixed_seed=777, **inputs)
    model.to(device)
    before = evaluate(model, val_ds, device=device)["pcc"]
    result = train(
        model, train_ds, val_ds, epochs=epochs, out_dir=out_dir, seed=seed, progress=progress,
        lr=FINETUNE_LR, lr_decay_epochs=max(epochs, 1) * 5 // 4, device=device,
        provenance={"finetuned_from": str(checkpoint), "finetuned_from_sha256": meta.get("sha256"),
                    "gold_scan": str(gold_path), "scans": [str(p) for p in scan_paths],
                    "labels": "SART over every angle of the gold scan"},
    )
    return {
        "best": str(result.best_path), "best_epoch": result.best_epoch,
        "gold_region_pcc_before": round(float(before), 4),
        "gold_region_pcc_after": round(-float(result.best_val_loss), 4),
        "seconds": round(time.perf_counter() - t0, 1),
        "device": str(device),
    }
