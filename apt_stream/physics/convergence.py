"""How much is a live reconstruction still changing, and how good is it, from the data alone.

After each finished angle (once ``min_angles`` are in), :class:`ConvergenceMonitor` estimates,
from the finished angles' projections (``engine.projections()``: (angles, (N, ny, W))) and no
ground truth:

``frc_half``
    Agreement of two independent reconstructions, one from the even and one from the odd angles
    (sorted by angle, so both halves span the same range): the Fourier ring correlation between
    them in every (z, x) plane of the sampled rows (pooled), averaged over the rings up to
    Nyquist. ~1 where the data determine the volume, ~0 on pure noise (two halves of noise
    reconstruct two unrelated volumes).
``resolution``
    The first ring (as a fraction of Nyquist) where that correlation falls below 1/7 (the
    half-set FSC criterion); 1.0 if it never does.
``change``
    ``‖x_n − x_prev‖ / ‖x_n‖`` between the all-angle reconstruction now and at the previous
    estimate: how much the latest angles moved the result.
``heldout_residual``
    How well the previous estimate's reconstruction (which had not seen them) predicts the
    projections of the angles finished since: ``‖p_new − A x_prev‖ / ‖p_new‖``. Falls as the
    reconstruction firms up; ≈ 1 or more on noise.

Reconstructions are a few SART sweeps (:func:`apt_stream.physics.tomo.sart`, linear, from
zero) on ``rows`` evenly spaced detector rows only: parallel-beam tomography about y is
separable in y, so a row subset is an unbiased sample of the volume at a fraction of the cost.
Live cost is bounded by ``every`` (estimate every k-th finished angle) and ``budget_share``
(skip an estimate while the estimates have used more than this share of the run's wall time).

Pure numerics: no service imports (DESIGN.md layering).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from apt_stream.errors import ConfigError, InputError

#: The half-set FSC threshold (Rosenthal & Henderson 2003).
FRC_THRESHOLD = 1.0 / 7.0

#: Columns of one convergence row (the Tiled ``convergence`` table), in order.
CONVERGENCE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("n_angles", "int64"),
    ("angle_deg", "float64"),
    ("frc_half", "float64"),
    ("resolution", "float64"),
    ("change", "float64"),
    ("heldout_residual", "float64"),
    ("seconds", "float64"),
)


@dataclass(frozen=True)
class ConvergenceOptions:
    """How (and how often) the live convergence estimate runs.

    Parameters
    ----------
    min_angles
        First estimate once this many angles are finished (each half needs a few).
    rows
        Detector rows (y) used, evenly spaced; None: all.
    sweeps
        SART sweeps per reconstruction.
    every
        Estimate every this many finished angles.
    budget_share
        Live only: skip an estimate while estimates have taken more than this share of the
        wall time since the first finished angle (None: never skip).
    """

    min_angles: int = 6
    rows: int | None = 8
    sweeps: int = 2
    every: int = 1
    budget_share: float | None = 0.25

    def __post_init__(self) -> None:
        if not isinstance(self.min_angles, int) or self.min_angles < 4:
            raise ConfigError(f"min_angles must be an integer >= 4, got {self.min_angles!r}")
        if self.rows is not None and (not isinstance(self.rows, int) or self.rows < 1):
            raise ConfigError(f"rows must be None or an integer >= 1, got {self.rows!r}")
        if not isinstance(self.sweeps, int) or self.sweeps < 1:
            raise ConfigError(f"sweeps must be an integer >= 1, got {self.sweeps!r}")
        if not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(f"every must be an integer >= 1, got {self.every!r}")
        if self.budget_share is not None and not (0 < self.budget_share <= 1):
            raise ConfigError(f"budget_share must be in (0, 1] or None, got {self.budget_share!r}")


@dataclass
class ConvergenceRow:
    """One estimate (one row of the ``convergence`` table)."""

    n_angles: int
    angle_deg: float  # the newest finished angle
    frc_half: float
    resolution: float
    change: float  # nan at the first estimate
    heldout_residual: float  # nan at the first estimate
    seconds: float
    frc_curve: list[float] = field(default_factory=list, repr=False)

    def as_row(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("frc_curve")
        return {k: (int(v) if k == "n_angles" else float(v)) for k, v in d.items()}


def sample_rows(ny: int, rows: int | None) -> np.ndarray:
    """``rows`` evenly spaced row indices of ``ny`` (all of them for None or rows >= ny)."""
    if rows is None or rows >= ny:
        return np.arange(ny)
    return np.unique(np.round(np.linspace(0, ny - 1, rows + 2)[1:-1]).astype(int))


def fourier_ring_correlation(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    """Fourier ring correlation of two (nz, ny, nx) volumes in their (z, x) planes, pooled over y.

    Each volume's mean is removed first. Returns ``(freq, frc)``: ring centres as a fraction of
    Nyquist (0 < f ≤ 1, the DC ring left out) and the correlation per ring.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise InputError(f"need two (nz, ny, nx) volumes of one shape, got {a.shape}, {b.shape}")
    nz, _, nx = a.shape
    fa = np.fft.fft2(a - a.mean(), axes=(0, 2))
    fb = np.fft.fft2(b - b.mean(), axes=(0, 2))
    kz = np.fft.fftfreq(nz)[:, None]
    kx = np.fft.fftfreq(nx)[None, :]
    radius = np.sqrt(kz**2 + kx**2) / 0.5  # fraction of Nyquist
    n_rings = max(2, min(nz, nx) // 2)
    ring = np.minimum((radius * n_rings).round().astype(int), n_rings + 1)
    num = np.real(fa * np.conj(fb)).sum(axis=1)  # (nz, nx): pooled over rows
    pa = (np.abs(fa) ** 2).sum(axis=1)
    pb = (np.abs(fb) ** 2).sum(axis=1)
    idx = ring.ravel()
    s_num = np.bincount(idx, num.ravel(), minlength=n_rings + 2)
    s_pa = np.bincount(idx, pa.ravel(), minlength=n_rings + 2)
    s_pb = np.bincount(idx, pb.ravel(), minlength=n_rings + 2)
    keep = np.arange(1, n_rings + 1)  # rings 1..Nyquist
    den = np.sqrt(s_pa[keep] * s_pb[keep])
    frc = np.where(den > 0, s_num[keep] / np.where(den > 0, den, 1.0), 0.0)
    return keep / n_rings, frc


def resolution_from_frc(freq: np.ndarray, frc: np.ndarray, threshold: float = FRC_THRESHOLD) -> float:
    """The first ring frequency (fraction of Nyquist) where ``frc`` falls below ``threshold``."""
    below = np.flatnonzero(np.asarray(frc) < threshold)
    return float(freq[below[0]]) if below.size else 1.0


def _quick_recon(proj: np.ndarray, angles: np.ndarray, shape: tuple[int, int, int],
                 sweeps: int) -> np.ndarray:
    from apt_stream.physics import tomo

    return np.asarray(tomo.sart(proj, angles, shape, n_iter=sweeps, nonneg=False), np.float64)


def _rel(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


class ConvergenceMonitor:
    """Per-run convergence estimates as angles finish (any order, any engine).

    ``update(angles_deg, projections)`` with the engine's finished angles (sorted or not) and
    their projections returns a :class:`ConvergenceRow`, or None when it is too early or this
    angle is throttled.
    """

    def __init__(self, volume_shape_zyx: Sequence[int], options: ConvergenceOptions | None = None):
        nz, ny, nx = (int(v) for v in volume_shape_zyx)
        self.options = options or ConvergenceOptions()
        self.shape = (nz, ny, nx)
        self.rows_idx = sample_rows(ny, self.options.rows)
        self.rows: list[ConvergenceRow] = []
        self.skipped = 0
        self.spent_s = 0.0
        self._t0: float | None = None
        self._prev: np.ndarray | None = None  # last all-angle reconstruction (sampled rows)
        self._prev_angles: set[float] = set()
        self._last_n = 0

    @property
    def sub_shape(self) -> tuple[int, int, int]:
        return (self.shape[0], int(self.rows_idx.size), self.shape[2])

    def due(self, n_finished: int) -> bool:
        """Whether an estimate is due at ``n_finished`` angles (count and budget rules)."""
        o = self.options
        if self._t0 is None:
            self._t0 = time.perf_counter()
        if n_finished < o.min_angles or n_finished <= self._last_n:
            return False
        if self.rows and n_finished - self._last_n < o.every:
            return False
        if o.budget_share is not None and self.rows:
            wall = time.perf_counter() - self._t0
            if self.spent_s > o.budget_share * wall:
                self.skipped += 1
                return False
        return True

    def update(self, angles_deg: Any, projections: Any, *, newest_deg: float | None = None,
               force: bool = False) -> ConvergenceRow | None:
        angles = np.asarray(angles_deg, dtype=np.float64).ravel()
        proj = np.asarray(projections)
        if proj.ndim != 3 or proj.shape[0] != angles.size:
            raise InputError(f"projections must be (N, ny, W) for N={angles.size} angles, "
                             f"got {proj.shape}")
        if proj.shape[1] != self.shape[1]:
            raise InputError(f"projections have ny={proj.shape[1]}, the volume {self.shape[1]}")
        n = angles.size
        if not (force and n >= self.options.min_angles) and not self.due(n):
            return None
        t0 = time.perf_counter()
        order = np.argsort(angles, kind="stable")
        angles, proj = angles[order], np.asarray(proj[order][:, self.rows_idx, :], np.float32)
        shape, sweeps = self.sub_shape, self.options.sweeps
        even = _quick_recon(proj[0::2], angles[0::2], shape, sweeps)
        odd = _quick_recon(proj[1::2], angles[1::2], shape, sweeps)
        freq, frc = fourier_ring_correlation(even, odd)
        full = _quick_recon(proj, angles, shape, sweeps)
        change = heldout = float("nan")
        if self._prev is not None:
            change = _rel(np.linalg.norm(full - self._prev), np.linalg.norm(full))
            new = np.array([a not in self._prev_angles for a in np.round(angles, 6)])
            if new.any():
                from apt_stream.physics import tomo

                predicted = tomo.project(self._prev.astype(np.float32), angles[new],
                                         det_width_px=proj.shape[2])
                heldout = _rel(np.linalg.norm(proj[new] - predicted), np.linalg.norm(proj[new]))
        prev_angles = self._prev_angles
        self._prev = full
        self._prev_angles = set(np.round(angles, 6).tolist())
        self._last_n = n
        seconds = time.perf_counter() - t0
        self.spent_s += seconds
        if newest_deg is None:  # the largest of the angles new since the last estimate
            fresh = [a for a in angles if round(float(a), 6) not in prev_angles] or [angles[-1]]
            newest_deg = float(max(fresh))
        newest = float(newest_deg)
        row = ConvergenceRow(
            n_angles=n, angle_deg=newest, frc_half=float(np.mean(frc)),
            resolution=resolution_from_frc(freq, frc), change=change, heldout_residual=heldout,
            seconds=seconds, frc_curve=[float(v) for v in frc],
        )
        self.rows.append(row)
        return row

    def table(self) -> list[dict[str, Any]]:
        """All estimates so far as plain rows (CONVERGENCE_COLUMNS)."""
        return [r.as_row() for r in self.rows]


def is_finite(x: float) -> bool:
    return x is not None and math.isfinite(float(x))
