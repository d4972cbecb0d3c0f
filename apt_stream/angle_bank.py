"""Angle banks: every angle's Approximant contribution of a simulated scan, kept separately.

The Approximant is an average over angles of back-rotated per-angle estimates (paper Eq. 8;
``ApproximantAccumulator``). Keeping each angle's back-rotated volume and its coverage lets the
Approximant of *any* subset of the scan's angles be formed by a sum and a division, without
re-simulating or re-running the engine. Training draws a new random angle set (N and ±θ) for
every sample from one bank, so one model serves any trigger setting (issue: "one model for any
trigger setting"), and the per-angle projections in the bank feed data consistency and the
classical baselines at the same angles.

File layout (HDF5, appended phantom by phantom, resumable)::

    banks/<seed>/contrib      float16 (A, nz, ny, nx)  back-rotated δ estimate of each angle / scale
    banks/<seed>/cover        uint8   (A, nz, nx)      1 where that angle reached the voxel
    banks/<seed>/projections  float32 (A, ny, Nx)      per-angle projections (δ line integrals, voxels)
    banks/<seed>/angles_deg   float64 (A,)
    banks/<seed>/truth        float32 (nz, ny, nx)     true δ
    banks/<seed>/labels       uint8   (nz, ny, nx)
    banks/<seed>.attrs        scale, split, acquisition (JSON), design (JSON), timings
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apt_stream.config import select_angles
from apt_stream.errors import InputError

#: Seeds by split, disjoint from each other and from the old pair cache's.
BANK_SEED_BASE = {"train": 40_000, "val": 50_000}


@dataclass
class AngleBank:
    """One phantom's bank in memory (see the module docstring for the arrays)."""

    seed: int
    contrib: np.ndarray
    cover: np.ndarray
    projections: np.ndarray
    angles_deg: np.ndarray
    truth: np.ndarray
    labels: np.ndarray
    scale: float
    split: str = "train"
    acquisition: dict | None = None

    def approximant(self, indices: Sequence[int]) -> np.ndarray:
        """The Approximant (δ units) of the angles ``indices``: the engine's running average."""
        idx = np.asarray(indices, dtype=int)
        if idx.size == 0:
            raise InputError("need at least one angle")
        total = self.contrib[idx].astype(np.float32).sum(axis=0) * np.float32(self.scale)
        count = self.cover[idx].astype(np.float32).sum(axis=0)[:, None, :]
        return total / np.maximum(count, 1.0)

    def choose(self, n_angles: int, range_deg: float) -> np.ndarray:
        """Indices of ``n_angles`` bank angles spread over ±``range_deg`` (as a trigger would)."""
        return select_angles(self.angles_deg, n_angles, range_deg)

    def available(self, range_deg: float) -> int:
        return int((np.abs(self.angles_deg) <= range_deg + 1e-6).sum())


def bank_from_scan(scan, *, seed: int, split: str = "train", progress: Callable | None = None) -> AngleBank:
    """Run the streaming engine over ``scan`` and keep every angle's contribution separately."""
    import torch

    from apt_stream.physics.engine import approximant_from_scan, slices_to_sample_frame

    if scan.truth is None:
        raise InputError("an angle bank needs a scan with ground truth")
    engine = approximant_from_scan(scan, keep_slices=True, progress=progress)
    order = sorted(engine.summaries.values(), key=lambda s: s.angle_deg)
    shape = tuple(scan.volume_shape_zyx)
    frame = int(np.asarray(scan.probe).shape[-1])
    vols, covers = [], []
    for summary in order:
        vol, cover = slices_to_sample_frame(
            summary.delta, shape_zyx=shape, frame_px=frame, angle_deg=summary.angle_deg
        )
        vols.append(vol.numpy())
        covers.append(cover[:, 0, :].to(torch.uint8).numpy())
    vols_a = np.stack(vols)
    scale = float(np.abs(vols_a).max()) / 30_000.0 or 1.0  # float16 holds up to 65504
    return AngleBank(
        seed=int(seed), contrib=(vols_a / scale).astype(np.float16), cover=np.stack(covers),
        projections=np.stack([s.projection for s in order]).astype(np.float32),
        angles_deg=np.array([s.angle_deg for s in order]), truth=scan.truth.delta.astype(np.float32),
        labels=np.asarray(scan.truth.labels, dtype=np.uint8), scale=scale, split=split,
        acquisition=dict(scan.provenance.get("acquisition", {})) if scan.provenance else None,
    )


def write_bank(group, bank: AngleBank, *, extra_attrs: dict | None = None) -> None:
    for name in ("contrib", "cover", "projections", "angles_deg", "truth", "labels"):
        group.create_dataset(name, data=getattr(bank, name))
    group.attrs.update({
        "seed": bank.seed, "scale": bank.scale, "split": bank.split,
        "acquisition": json.dumps(bank.acquisition or {}), **(extra_attrs or {}),
    })


def read_bank(group) -> AngleBank:
    split = group.attrs.get("split", "train")
    return AngleBank(
        seed=int(group.attrs["seed"]), contrib=group["contrib"][()], cover=group["cover"][()],
        projections=group["projections"][()], angles_deg=group["angles_deg"][()],
        truth=group["truth"][()], labels=group["labels"][()], scale=float(group.attrs["scale"]),
        split=split.decode() if isinstance(split, bytes) else str(split),
        acquisition=json.loads(group.attrs.get("acquisition", "{}")),
    )


def load_banks(paths: str | Path | Sequence[str | Path], *, split: str | None = None) -> list[AngleBank]:
    """All banks of one or more files (optionally one split), sorted by seed."""
    import h5py

    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    banks: list[AngleBank] = []
    for path in map(Path, paths):
        if not path.exists():
            raise InputError(f"angle-bank file {path} does not exist (build it with `apt-stream train`)")
        with h5py.File(path, "r") as fh:
            root = fh.get("banks")
            if root is None:
                raise InputError(f"{path} has no 'banks' group")
            banks += [read_bank(root[k]) for k in root if not k.endswith(".tmp")]
    banks = sorted((b for b in banks if split is None or b.split == split), key=lambda b: b.seed)
    if not banks:
        raise InputError(f"{paths} hold no banks" + (f" of split {split!r}" if split else ""))
    return banks


#: Angle counts of a training bank: many, so that subsets of 5-61 angles can be drawn from it.
BANK_ANGLES = (25, 61)


def simulate_bank(
    seed: int, *, split: str = "train", shape_zyx=(32, 64, 64), ranges=None
) -> tuple[AngleBank, dict]:
    """A random design scanned with a random acquisition (many angles), as a bank + timings."""
    from apt_stream.sim.acquire import simulate_scan
    from apt_stream.sim.acquisition import (
        AcquisitionRanges,
        describe_acquisition,
        sample_acquisition,
    )
    from apt_stream.sim.design import describe_design, render_design, sample_design

    t0 = time.perf_counter()
    ranges = ranges or AcquisitionRanges(n_angles=BANK_ANGLES)
    preset = sample_acquisition(seed, shape_zyx=shape_zyx, ranges=ranges)
    design = sample_design(seed, tuple(shape_zyx))
    phantom = render_design(design, voxel_size_m=preset.phantom.voxel_size_m)
    scan = simulate_scan(preset, seed=seed, phantom=phantom)
    t1 = time.perf_counter()
    bank = bank_from_scan(scan, seed=seed, split=split)
    bank.acquisition = describe_acquisition(preset)
    info = {"design": json.dumps(describe_design(design)), "simulate_s": round(t1 - t0, 2),
            "engine_s": round(time.perf_counter() - t1, 2)}
    return bank, info


def build_banks(
    path: str | Path,
    seeds: Iterable[tuple[str, int]],
    *,
    shape_zyx=(32, 64, 64),
    ranges=None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Simulate and append banks for ``(split, seed)`` pairs; finished seeds are skipped (resume)."""
    import h5py

    jobs = list(seeds)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for done, (split, seed) in enumerate(jobs):
        with h5py.File(path, "a") as fh:
            root = fh.require_group("banks")
            for stale in [k for k in root if k.endswith(".tmp")]:
                del root[stale]
            present = str(seed) in root
        if not present:
            bank, info = simulate_bank(seed, split=split, shape_zyx=shape_zyx, ranges=ranges)
            with h5py.File(path, "a") as fh:
                root = fh["banks"]
                g = root.create_group(f"{seed}.tmp")
                write_bank(g, bank, extra_attrs=info)
                root.move(f"{seed}.tmp", str(seed))
        if progress is not None:
            progress(done + 1, len(jobs))
    return path


def bank_seeds(split: str, count: int, *, start: int = 0) -> list[tuple[str, int]]:
    if split not in BANK_SEED_BASE:
        raise InputError(f"split must be one of {sorted(BANK_SEED_BASE)}, got {split!r}")
    base = BANK_SEED_BASE[split] + start
    return [(split, s) for s in range(base, base + count)]
