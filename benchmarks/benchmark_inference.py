"""Stitched APT inference: eager fp32 against the optimised path (inference_mode, bf16 autocast,
channels-last), measured in the same run. ``apt-stream bench inference``.

Two cases: the ``cpu`` preset over a demo-sized volume (32 × 64 × 64, several overlapping
patches) and the ``paper`` preset over exactly one 280 × 64 × 64 patch (→ 280 × 128 × 128). The
PCC difference between the two paths' outputs must stay below 1e-3.

``end_to_end`` times what the live path runs once the trigger fires, with the shipped model on the
demo volume (32 × 64 × 64, 29 angles over ±17°): the SART input channel, the stitched network and
any data-consistency sweeps (``apt_volumes``), interleaved with a non-negative SART of the same
projections (the classical reconstruction at the same angles) as the same-run baseline. Target:
≤ 2 s on 2 cores.
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
import torch

from apt_stream.model.inference import benchmark_inference

CASES = {
    "cpu preset, demo volume": dict(preset="cpu", volume_shape=(32, 64, 64), repeats=5),
    # bf16 through 59 M parameters drifts past the 1e-3 PCC budget on CPU (measured 6.5e-3), so
    # the paper patch's accepted path is fp32 + channels-last; bf16 is reported beside it.
    "paper preset, one patch (fp32, channels-last)": dict(
        preset="paper", volume_shape=(280, 64, 64), repeats=1, overlap=0.0, dtype="float32"
    ),
    "paper preset, one patch (bf16, channels-last)": dict(
        preset="paper", volume_shape=(280, 64, 64), repeats=1, overlap=0.0, dtype="bfloat16"
    ),
}


def end_to_end(*, repeats: int = 5, shape_zyx=(32, 64, 64), n_angles: int = 29) -> dict:
    """Shipped model: seconds of ``apt_volumes`` vs a SART of the same angles, interleaved."""
    from apt_stream.physics import tomo
    from apt_stream.reconstruct import apt_volumes, baseline_volumes, load_model

    model, meta = load_model(None)
    rng = np.random.default_rng(0)
    truth = np.zeros(shape_zyx, np.float32)
    truth[4:8], truth[12:14, ::4], truth[20:24, :, ::6] = 1.0, 2.0, 1.5
    angles = np.linspace(-17.0, 17.0, n_angles)
    proj = np.asarray(tomo.project(truth, angles), np.float32)
    proj += rng.normal(0, 0.01 * float(proj.std()), proj.shape).astype(np.float32)
    approximant = (truth + rng.normal(0, 0.5, shape_zyx)).astype(np.float32)
    apt_s, sart_s = [], []
    apt_volumes(model, approximant, projections=(angles, proj))  # warm-up
    for _ in range(repeats):
        t0 = time.perf_counter()
        apt_volumes(model, approximant, projections=(angles, proj))
        apt_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        baseline_volumes(angles, proj, shape_zyx, which=("sart",))
        sart_s.append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(apt_s, sart_s, strict=True)]
    return {"model_sha256": meta.get("sha256"), "inputs": list(model.io_config.get("inputs") or ["approximant"]),
            "volume_zyx": list(shape_zyx), "angles": n_angles,
            "apt_seconds": {"median": statistics.median(apt_s), "min": min(apt_s), "max": max(apt_s)},
            "sart_seconds": {"median": statistics.median(sart_s), "min": min(sart_s), "max": max(sart_s)},
            "apt_over_sart": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            "within_2_s": statistics.median(apt_s) <= 2.0}


def run_all(*, quick: bool = False) -> dict:
    cases = {"cpu preset, demo volume": dict(preset="cpu", volume_shape=(32, 32, 32), repeats=1)} if quick else CASES
    rows = {}
    for name, kwargs in cases.items():
        res = benchmark_inference(**kwargs)
        res["pcc_difference"] = 1.0 - float(res["pcc"])
        res["pcc_difference_ok"] = res["pcc_difference"] < 1e-3
        rows[name] = res
    return {"benchmark": "inference", "torch": torch.__version__, "threads": torch.get_num_threads(), "cases": rows,
            "shipped_end_to_end": end_to_end(repeats=1 if quick else 5)}


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_all(), indent=2, default=float))
