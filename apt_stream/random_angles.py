"""Training samples with a fresh random angle set each: (Approximant patch, truth patch) from banks.

Every sample draws a bank (one simulated phantom + acquisition), an angular range ±θ and a number
of angles N within it, forms that subset's Approximant from the bank (exactly what the live
engine would have accumulated from those angles), scales it by its own RMS (``rms_scale``: the
network sees a dimensionless volume, and its output is multiplied back, so δ comes out in the
input's physical units and a vacuum input, whose RMS is only noise, gives a near-zero output),
and cuts a random full-depth lateral patch. Flips along x, y and z are applied to input and truth
together: a chip mounted upside down is as plausible as one the right way up, and the symmetric
angle sets make a z-flipped Approximant the Approximant of the z-flipped chip.

Physics-in-the-loop models (``inputs=("approximant", "sart")``, apt_stream.model.inputs) also
read a SART volume of the same angles. SART costs ~0.5 s per volume, too slow to run per sample on
2 cores, so each bank gets ``sets_per_bank`` angle settings drawn once (seeded), their SART volumes
computed up front (in ``jobs`` processes, cached under ``cache_dir``), and every sample draws one
of those settings; crops and flips still make every sample new.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from apt_stream.angle_bank import AngleBank
from apt_stream.errors import InputError
from apt_stream.sim.materials import is_metal

#: The paper's trigger setting, drawn with extra weight so the default use is well covered.
DEFAULT_SETTING = (29, 17.0)


def rms_scale(volume: np.ndarray) -> float:
    """The scale the network input is divided by: the volume's root-mean-square (never 0)."""
    rms = float(np.sqrt(np.mean(np.square(volume, dtype=np.float64))))
    return rms if rms > 0 else 1.0


@dataclass(frozen=True)
class AngleSampling:
    """How angle sets are drawn: N and ±θ ranges, and how often the default setting is used."""

    n_angles: tuple[int, int] = (5, 61)
    range_deg: tuple[float, float] = (8.0, 45.0)
    default_probability: float = 0.25


class RandomAngleDataset:
    """Random (Approximant, truth) patches from angle banks; see the module docstring.

    Parameters
    ----------
    banks : sequence of AngleBank
    patch_xy : int
        Lateral patch edge (full depth is always used).
    samples_per_epoch : int
        How many samples one pass of :meth:`batches` yields.
    sampling : AngleSampling
    fixed_seed : int, optional
        Draw the same samples on every pass (validation).
    metal_masks : bool
        Also give each patch's metal mask (from the bank's labels, cropped and flipped with it):
        :meth:`batches` then yields ``(input, truth, metal)``, for the threshold term of the loss.
    """

    def __init__(
        self,
        banks: Sequence[AngleBank],
        *,
        patch_xy: int,
        samples_per_epoch: int,
        sampling: AngleSampling | None = None,
        fixed_seed: int | None = None,
        inputs: Sequence[str] = ("approximant",),
        sets_per_bank: int = 8,
        jobs: int = 1,
        cache_dir: str | Path | None = None,
        progress: Callable[[int, int], None] | None = None,
        metal_masks: bool = False,
    ) -> None:
        if not banks:
            raise InputError("no angle banks")
        for b in banks:
            if min(b.truth.shape[1:]) < patch_xy:
                raise InputError(f"bank {b.seed}: volume {b.truth.shape} is smaller than patch {patch_xy}")
        self.banks = list(banks)
        self.patch = int(patch_xy)
        self.samples = int(samples_per_epoch)
        self.sampling = sampling or AngleSampling()
        self.fixed_seed = fixed_seed
        self.metal_masks = bool(metal_masks)
        self.inputs = tuple(inputs)
        if self.inputs not in (("approximant",), ("approximant", "sart")):
            raise InputError(f"inputs must be ('approximant',) or ('approximant', 'sart'), got {self.inputs}")
        #: bank index -> [((N, θ, angle indices), SART volume float16)], physics-in-the-loop inputs
        self.sets: dict[int, list[tuple[tuple, np.ndarray]]] | None = None
        if "sart" in self.inputs:
            self.sets = self._sart_sets(int(sets_per_bank), jobs=jobs, cache_dir=cache_dir, progress=progress)

    #: what train() records and inference repeats: divide by the RMS, multiply back
    input_norm = "rms"
    augmentations = ("flip_x", "flip_y", "flip_z")

    @property
    def provenance(self) -> dict:
        s = self.sampling
        return {
            "bank_seeds": [b.seed for b in self.banks],
            "angle_sampling": {"n_angles": list(s.n_angles), "range_deg": list(s.range_deg),
                               "default_setting": list(DEFAULT_SETTING),
                               "default_probability": s.default_probability},
            "inputs": list(self.inputs),
            **({"sets_per_bank": len(next(iter(self.sets.values())))} if self.sets else {}),
        }

    def __len__(self) -> int:
        return self.samples

    def draw_setting(self, bank: AngleBank, rng: np.random.Generator) -> tuple[int, float]:
        """(N, θ) for one sample, feasible for the bank's angles."""
        s = self.sampling
        n0, t0 = DEFAULT_SETTING
        if rng.random() < s.default_probability and bank.available(t0) >= n0:
            return n0, t0
        top = min(s.range_deg[1], float(np.abs(bank.angles_deg).max()))
        theta = float(rng.uniform(min(s.range_deg[0], top), top))
        n_max = min(s.n_angles[1], bank.available(theta))
        n = int(rng.integers(min(s.n_angles[0], n_max), n_max + 1))
        return n, theta

    def _sart_sets(self, k: int, *, jobs: int, cache_dir, progress) -> dict:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        from apt_stream.model.inputs import SART_RELAXATION, SART_SWEEPS

        if k < 1:
            raise InputError(f"sets_per_bank must be >= 1, got {k}")
        settings = []
        for bank in self.banks:
            rng = np.random.default_rng([bank.seed, 0 if self.fixed_seed is None else self.fixed_seed, k])
            draws = [self.draw_setting(bank, rng) for _ in range(k)]
            settings.append([(n, theta, np.asarray(bank.choose(n, theta))) for n, theta in draws])
        cache = Path(cache_dir) if cache_dir is not None else None
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
        jobs_todo, out = [], {}
        for b, bank in enumerate(self.banks):
            path = (cache / f"sart-{bank.seed}-{self.fixed_seed}-{k}-{SART_SWEEPS}.npz") if cache else None
            if path is not None and path.exists():
                with np.load(path) as f:
                    out[b] = [(settings[b][i], f[f"v{i}"]) for i in range(k)]
                continue
            jobs_todo.append((b, path, [(bank.angles_deg[idx], bank.projections[idx], bank.truth.shape)
                                        for _, _, idx in settings[b]]))
        done, total = len(out), len(self.banks)
        if progress is not None:
            progress(done, total)

        def store(b, path, vols):
            nonlocal done
            out[b] = list(zip(settings[b], vols, strict=True))
            if path is not None:
                np.savez(path, **{f"v{i}": v for i, v in enumerate(vols)})
            done += 1
            if progress is not None:
                progress(done, total)

        if jobs <= 1 or len(jobs_todo) <= 1:
            for b, path, work in jobs_todo:
                store(b, path, _sart_volumes(work, SART_SWEEPS, SART_RELAXATION))
        else:
            with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_one_thread) as pool:
                futures = [(b, path, pool.submit(_sart_volumes, work, SART_SWEEPS, SART_RELAXATION))
                           for b, path, work in jobs_todo]
                for b, path, fut in futures:
                    store(b, path, fut.result())
        return out

    def sample(self, rng: np.random.Generator, *, augment: bool) -> tuple[np.ndarray, np.ndarray, dict]:
        """One (input, truth, info) sample; ``info["metal"]`` is its metal mask with ``metal_masks``."""
        b = int(rng.integers(len(self.banks)))
        bank = self.banks[b]
        if self.sets is None:
            n, theta = self.draw_setting(bank, rng)
            idx, extra = bank.choose(n, theta), []
        else:
            (n, theta, idx), sart = self.sets[b][int(rng.integers(len(self.sets[b])))]
            extra = [sart.astype(np.float32)]
        apx = bank.approximant(idx)
        scale = rms_scale(apx)
        channels = np.stack([apx / scale] + [c / rms_scale(c) for c in extra])
        nz, ny, nx = apx.shape
        y0 = int(rng.integers(0, ny - self.patch + 1))
        x0 = int(rng.integers(0, nx - self.patch + 1))
        win = (slice(None), slice(y0, y0 + self.patch), slice(x0, x0 + self.patch))
        x, t = channels[(slice(None), *win)], bank.truth[win] / scale
        m = is_metal(bank.labels[win]) if self.metal_masks else None
        if augment:
            for axis in (0, 1, 2):
                if rng.random() < 0.5:
                    x, t = np.flip(x, axis + 1), np.flip(t, axis)
                    m = None if m is None else np.flip(m, axis)
        info = {"seed": bank.seed, "n_angles": n, "range_deg": theta, "scale": scale}
        if m is not None:
            info["metal"] = np.ascontiguousarray(m, np.float32)
        return np.ascontiguousarray(x, np.float32), np.ascontiguousarray(t, np.float32), info

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        rng: np.random.Generator | None = None,
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """Mini-batches ``(B, C, Z, P, P)`` of input and ``(B, 1, Z, P, P)`` truth (divided by the
        Approximant's RMS), and with ``metal_masks`` a third ``(B, 1, Z, P, P)`` metal mask."""
        if self.fixed_seed is not None:
            rng = np.random.default_rng(self.fixed_seed)
        elif rng is None:
            rng = np.random.default_rng()
        for b0 in range(0, self.samples, batch_size):
            pairs = [self.sample(rng, augment=augment) for _ in range(min(batch_size, self.samples - b0))]
            xs = torch.from_numpy(np.stack([p[0] for p in pairs]))
            ys = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None]
            if self.metal_masks:
                yield xs, ys, torch.from_numpy(np.stack([p[2]["metal"] for p in pairs]))[:, None]
            else:
                yield xs, ys


def _one_thread() -> None:
    # Pool workers share 2 cores with the parent: one thread each, or torch oversubscribes.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def _sart_volumes(work, n_iter: int, relaxation: float) -> list[np.ndarray]:
    from apt_stream.model.inputs import sart_channel

    return [sart_channel(ang, proj, shape, n_iter=n_iter, relaxation=relaxation).astype(np.float16)
            for ang, proj, shape in work]
