"""Training samples with a fresh random angle set each: (Approximant patch, truth patch) from banks.

Every sample draws a bank (one simulated phantom + acquisition), an angular range ±θ and a number
of angles N within it, forms that subset's Approximant from the bank (exactly what the live
engine would have accumulated from those angles), scales it by its own RMS (``rms_scale``: the
network sees a dimensionless volume, and its output is multiplied back, so δ comes out in the
input's physical units and a vacuum input, whose RMS is only noise, gives a near-zero output),
and cuts a random full-depth lateral patch. Flips along x, y and z are applied to input and truth
together: a chip mounted upside down is as plausible as one the right way up, and the symmetric
angle sets make a z-flipped Approximant the Approximant of the z-flipped chip.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from apt_stream.angle_bank import AngleBank
from apt_stream.errors import InputError

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
    """

    def __init__(
        self,
        banks: Sequence[AngleBank],
        *,
        patch_xy: int,
        samples_per_epoch: int,
        sampling: AngleSampling | None = None,
        fixed_seed: int | None = None,
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

    def sample(self, rng: np.random.Generator, *, augment: bool) -> tuple[np.ndarray, np.ndarray, dict]:
        bank = self.banks[int(rng.integers(len(self.banks)))]
        n, theta = self.draw_setting(bank, rng)
        apx = bank.approximant(bank.choose(n, theta))
        scale = rms_scale(apx)
        nz, ny, nx = apx.shape
        y0 = int(rng.integers(0, ny - self.patch + 1))
        x0 = int(rng.integers(0, nx - self.patch + 1))
        win = (slice(None), slice(y0, y0 + self.patch), slice(x0, x0 + self.patch))
        x, t = apx[win] / scale, bank.truth[win] / scale
        if augment:
            for axis in (0, 1, 2):
                if rng.random() < 0.5:
                    x, t = np.flip(x, axis), np.flip(t, axis)
        info = {"seed": bank.seed, "n_angles": n, "range_deg": theta, "scale": scale}
        return np.ascontiguousarray(x, np.float32), np.ascontiguousarray(t, np.float32), info

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        rng: np.random.Generator | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches ``(B, 1, Z, P, P)`` of input and truth (both divided by the input's RMS)."""
        if self.fixed_seed is not None:
            rng = np.random.default_rng(self.fixed_seed)
        elif rng is None:
            rng = np.random.default_rng()
        for b0 in range(0, self.samples, batch_size):
            pairs = [self.sample(rng, augment=augment) for _ in range(min(batch_size, self.samples - b0))]
            xs = torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None]
            ys = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None]
            yield xs, ys
