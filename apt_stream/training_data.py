"""Paired training data: simulated ICs → (Approximant, ground truth) volumes, cached in HDF5.

Each pair comes from its own seeded phantom, so the train / val / test splits never share a
phantom, and therefore never overlap in space either (the paper split one specimen into
non-overlapping regions; we have as many specimens as we like). Seeds are disjoint by split:
train from 10 000, val from 20 000, test from 30 000 (+ the base seed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from apt_stream.config import Preset, get_preset

SPLIT_SEED_BASE = {"train": 10_000, "val": 20_000, "test": 30_000}


def split_seeds(split: str, count: int, *, base_seed: int = 0) -> list[int]:
    """The phantom seeds of a split: disjoint ranges, so no phantom is in two splits."""
    if split not in SPLIT_SEED_BASE:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEED_BASE)}, got {split!r}")
    start = SPLIT_SEED_BASE[split] + base_seed
    return list(range(start, start + count))


def make_pair(
    preset: Preset,
    seed: int,
    *,
    n_angles: int | None = None,
    range_deg: float | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Simulate one scan of phantom ``seed`` and return (approximant, truth δ, info)."""
    from apt_stream.physics.engine import approximant_from_scan
    from apt_stream.sim.acquire import simulate_scan

    t0 = time.perf_counter()
    scan = simulate_scan(preset, seed=seed, n_angles=n_angles, range_deg=range_deg)
    t1 = time.perf_counter()
    engine = approximant_from_scan(scan)
    info = {
        "seed": int(seed),
        "angles": int(scan.n_angles),
        "range_deg": float(np.abs(scan.angles_deg).max()),
        "simulate_s": round(t1 - t0, 2),
        "approximant_s": round(time.perf_counter() - t1, 2),
    }
    return engine.volume(), scan.truth.delta.astype(np.float32), info


def build_pair_cache(
    path: str | Path,
    *,
    preset: str = "demo",
    counts: dict[str, int] | None = None,
    base_seed: int = 0,
    n_angles: int | None = None,
    range_deg: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Simulate and cache pairs for each split (default 24 train / 4 val / 4 test phantoms).

    The cache is appended to pair by pair, so an interrupted build keeps what it finished and a
    second call resumes where it stopped (pairs are keyed by seed).
    """
    import h5py

    p = get_preset(preset)
    counts = counts or {"train": 24, "val": 4, "test": 4}
    jobs = [(split, s) for split, n in counts.items() for s in split_seeds(split, n, base_seed=base_seed)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "a") as fh:
        root = fh.require_group("pairs")
        root.attrs["preset"] = p.name
        root.attrs["n_angles"] = n_angles or p.scan.n_angles
        root.attrs["range_deg"] = range_deg or p.scan.angle_range_deg
        for stale in [k for k in root if k.endswith(".tmp")]:  # left by an interrupted build
            del root[stale]
        for done, (split, seed) in enumerate(jobs):
            name = str(seed)
            if name not in root:
                apx, truth, info = make_pair(p, seed, n_angles=n_angles, range_deg=range_deg)
                g = root.create_group(name + ".tmp")
                g.create_dataset("approximant", data=apx)
                g.create_dataset("truth", data=truth)
                g.attrs.update({**info, "split": split})
                root.move(name + ".tmp", name)
                fh.flush()
            if progress is not None:
                progress(done + 1, len(jobs))
    return path
