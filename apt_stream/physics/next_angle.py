"""Which angle to measure next: rank candidate angles by expected information gain.

Parallel-beam tomography about y: the projection at θ fills the central plane of the volume's
Fourier space at θ (Fourier slice theorem). A candidate θ adds the Fourier area between its
plane and the nearest measured ones, which at every radius grows with the angular **gap** from θ
to the nearest measured angle; so the gap (in degrees, 0 for an angle measured already) is the
coverage term. Where the data allow (≥ 4 measured angles with projections), a **disagreement**
term weights it: the current estimate split into two reconstructions (even and odd measured
angles, as in :mod:`apt_stream.physics.convergence`) predicts each candidate's projection twice;
where the two predictions differ the current data pin that projection down least.

``score = gap / max(gap) · (1 + disagreement / max(disagreement))`` (the second factor is 1
without data). :func:`suggest_angles` returns the candidates best first. Pure numerics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from apt_stream.errors import InputError


def bisection_order(n: int) -> list[int]:
    """Indices 0..n-1 in coarse-to-fine order: both ends, then midpoints breadth-first.

    A scan acquired in this order covers its whole range after two angles and halves its
    largest gap at every level (the order a stop rule can cut short without losing the range).
    """
    if n < 1:
        return []
    if n == 1:
        return [0]
    order, queue = [0, n - 1], [(0, n - 1)]
    while queue:
        lo, hi = queue.pop(0)
        if hi - lo < 2:
            continue
        mid = (lo + hi) // 2
        order.append(mid)
        queue += [(lo, mid), (mid, hi)]
    return order


@dataclass(frozen=True)
class Suggestion:
    angle_deg: float
    score: float
    gap_deg: float
    disagreement: float  # nan without data

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def angular_gaps(measured_deg: Any, candidates_deg: Any) -> np.ndarray:
    """Distance (deg) from each candidate to its nearest measured angle (inf when none is)."""
    cand = np.asarray(candidates_deg, dtype=np.float64).ravel()
    meas = np.asarray(measured_deg, dtype=np.float64).ravel()
    if meas.size == 0:
        return np.full(cand.shape, np.inf)
    return np.min(np.abs(cand[:, None] - meas[None, :]), axis=1)


def _disagreement(angles: np.ndarray, proj: np.ndarray, cand: np.ndarray,
                  shape: tuple[int, int, int], rows: int | None, sweeps: int) -> np.ndarray:
    from apt_stream.physics import tomo
    from apt_stream.physics.convergence import sample_rows

    order = np.argsort(angles, kind="stable")
    angles, proj = angles[order], proj[order]
    idx = sample_rows(shape[1], rows)
    p = np.asarray(proj[:, idx, :], np.float32)
    sub = (shape[0], int(idx.size), shape[2])
    even = tomo.sart(p[0::2], angles[0::2], sub, n_iter=sweeps)
    odd = tomo.sart(p[1::2], angles[1::2], sub, n_iter=sweeps)
    diff = tomo.project(np.asarray(even - odd, np.float32), cand, det_width_px=p.shape[2])
    scale = float(np.sqrt(np.mean(p.astype(np.float64) ** 2))) or 1.0
    return np.sqrt(np.mean(np.asarray(diff, np.float64) ** 2, axis=(1, 2))) / scale


def suggest_angles(
    measured_deg: Sequence[float],
    candidates_deg: Sequence[float],
    *,
    projections: tuple[Any, Any] | None = None,
    volume_shape_zyx: Sequence[int] | None = None,
    k: int | None = 3,
    rows: int | None = 8,
    sweeps: int = 2,
) -> list[Suggestion]:
    """The unmeasured candidates ranked by expected information gain, best first (at most ``k``).

    ``projections`` is the engine's ``(angles_deg, (N, ny, W))`` of the measured angles and
    ``volume_shape_zyx`` the volume's shape: with both (and ≥ 4 angles) the disagreement term is
    used. Candidates within 1e-6° of a measured angle are left out.
    """
    cand = np.asarray(candidates_deg, dtype=np.float64).ravel()
    meas = np.asarray(measured_deg, dtype=np.float64).ravel()
    if cand.size == 0:
        return []
    gaps = angular_gaps(meas, cand)
    keep = gaps > 1e-6
    cand, gaps = cand[keep], gaps[keep]
    if cand.size == 0:
        return []
    if meas.size == 0:  # nothing measured: the ends and the middle are equally good; ends first
        gaps = np.abs(cand - cand.mean()) + 1.0
    finite = np.where(np.isfinite(gaps), gaps, 0.0)
    gap_term = finite / (finite.max() or 1.0)
    dis = np.full(cand.shape, np.nan)
    factor = np.ones_like(gap_term)
    if projections is not None and volume_shape_zyx is not None:
        angles, proj = np.asarray(projections[0], np.float64), np.asarray(projections[1])
        if proj.ndim != 3 or proj.shape[0] != angles.size:
            raise InputError(f"projections must be (N, ny, W) for {angles.size} angles, got "
                             f"{proj.shape}")
        if angles.size >= 4:
            shape = tuple(int(v) for v in volume_shape_zyx)
            dis = _disagreement(angles, proj, cand, shape, rows, sweeps)
            factor = 1.0 + dis / (dis.max() or 1.0)
    score = gap_term * factor
    # Best score first; ties go to the candidate nearer the range's centre, then the lower angle.
    order = np.lexsort((cand, np.abs(cand - np.median(cand)), -np.round(score, 12)))
    out = [Suggestion(float(cand[i]), float(score[i]), float(finite[i] if meas.size else np.inf),
                      float(dis[i])) for i in order]
    return out if k is None else out[: int(k)]
