"""Fine-tuning gain: tune on region A's gold scan, score region B of the same design from 29 angles.

Usage: ``python -m apt_stream.benchmarks.finetune_gain CHECKPOINT OUT_DIR [DESIGN_SEED]`` (about
5 min on 2 cores). Region B shares the design (stack, materials, rules) with A but not its
patterns; tuning never sees ground truth (labels: SART over every angle of A's gold scan). Prints
the metrics of region B against its truth before and after tuning, and SART's.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path


def run(checkpoint: str, out_dir: str, design_seed: int = 70_003) -> dict:
    from apt_stream.config import PRESETS
    from apt_stream.evaluation import bank_of
    from apt_stream.finetune import finetune_on_gold
    from apt_stream.io import write_scan
    from apt_stream.reconstruct import load_model, score
    from apt_stream.sim.acquire import simulate_scan
    from apt_stream.sim.design import DesignOptions, render_design, sample_design

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = PRESETS["demo"]
    design = sample_design(design_seed, (32, 64, 64), DesignOptions(metals=("Cu", "W", "Al")))
    region_a = render_design(design, voxel_size_m=p.phantom.voxel_size_m)
    region_b = render_design(dataclasses.replace(design, seed=design.seed + 1),
                             voxel_size_m=p.phantom.voxel_size_m)
    write_scan(out / "gold-A.h5", simulate_scan(p, seed=1, phantom=region_a, scan=p.gold_scan))
    write_scan(out / "reduced-A.h5", simulate_scan(p, seed=2, phantom=region_a))
    tuned = finetune_on_gold(checkpoint, out / "gold-A.h5", [out / "reduced-A.h5"],
                             out_dir=out / "ft", epochs=12, progress=False)
    bank = bank_of(simulate_scan(p, seed=3, phantom=region_b))
    idx = list(range(bank.scan.n_angles))
    rows: dict = {"design_seed": design_seed, "finetune": tuned}
    for name, path in (("before", checkpoint), ("after", tuned["best"])):
        model, _ = load_model(path)
        vols = bank.apt(model, idx)
        rows[name] = score(vols, bank.scan.truth)["apt"]
    rows["sart"] = score(bank.baselines(idx, which=("sart",)), bank.scan.truth)["sart"]
    return rows


if __name__ == "__main__":  # pragma: no cover
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 70_003
    print(json.dumps(run(sys.argv[1], sys.argv[2], seed), indent=1))
