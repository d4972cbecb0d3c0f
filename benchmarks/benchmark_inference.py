"""Stitched APT inference: eager fp32 against the optimised path (inference_mode, bf16 autocast,
channels-last), measured in the same run. ``apt-stream bench inference``.

Two cases: the ``cpu`` preset over a demo-sized volume (32 × 64 × 64, several overlapping
patches) and the ``paper`` preset over exactly one 280 × 64 × 64 patch (→ 280 × 128 × 128). The
PCC difference between the two paths' outputs must stay below 1e-3.
"""

from __future__ import annotations

import json

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


def run_all(*, quick: bool = False) -> dict:
    cases = {"cpu preset, demo volume": dict(preset="cpu", volume_shape=(32, 32, 32), repeats=1)} if quick else CASES
    rows = {}
    for name, kwargs in cases.items():
        res = benchmark_inference(**kwargs)
        res["pcc_difference"] = 1.0 - float(res["pcc"])
        res["pcc_difference_ok"] = res["pcc_difference"] < 1e-3
        rows[name] = res
    return {"benchmark": "inference", "torch": torch.__version__, "threads": torch.get_num_threads(), "cases": rows}


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_all(), indent=2, default=float))
