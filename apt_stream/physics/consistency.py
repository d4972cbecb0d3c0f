"""Data consistency: pull a network's volume towards agreement with the measured projections.

A network fills the missing wedge from what it learned; where the measurement does carry
information (the directions inside the measured angular range), the result should agree with
the data rather than with the training set. ``enforce_projections`` starts SART sweeps at the
network's volume on the per-angle projections of the *measured* angles, so the components the
measurement determines move towards the data while the unmeasured ones (SART's null space at
these angles) keep the network's values.

The projections from the two-iteration Approximant engine underestimate the true line integrals
by a gain that depends on dose, probe and thickness. The measured projections are therefore first
mapped into the volume's units by a gain and offset that match their mean and spread to those of
the volume's own projections over the sample's footprint, and the sweeps run on that: consistency
in structure, the calibrated scale kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from apt_stream.errors import InputError
from apt_stream.physics import tomo

#: Defaults chosen by measurement (docs/results.md, "data consistency").
DC_ITERATIONS = 1
DC_RELAXATION = 0.3
#: Ptychographic iterations behind the projections data consistency uses. The Approximant's own
#: two iterations give projections too poor to enforce (measured: PCC 0.34 -> 0.27 after two
#: sweeps on an out-of-family chip, against 0.34 -> 0.37 with six-iteration projections), so the
#: engine keeps iterating each finished angle to this many (one pass serves both).
DC_PROJECTION_ITERATIONS = 6


@dataclass
class ConsistencyReport:
    """What a data-consistency step did: the gain/offset fit and the relative residuals."""

    gain: float
    offset: float
    residual_before: float
    residual_after: float
    iterations: int

    def as_dict(self) -> dict:
        return {k: round(float(v), 5) for k, v in self.__dict__.items()}


def _relative_residual(model_proj: np.ndarray, data: np.ndarray, mask: np.ndarray) -> float:
    ref = float(np.linalg.norm(data[mask]))
    return float(np.linalg.norm((model_proj - data)[mask])) / (ref if ref > 0 else 1.0)


def enforce_projections(
    volume: np.ndarray,
    angles_deg: np.ndarray,
    projections: np.ndarray,
    *,
    n_iter: int = DC_ITERATIONS,
    relaxation: float = DC_RELAXATION,
    method: str = "sart",
    report_residual: bool = True,
) -> tuple[np.ndarray, ConsistencyReport]:
    """SART sweeps from ``volume`` on ``projections`` (N, ny, W) at ``angles_deg``.

    Parameters
    ----------
    volume : (nz, ny, nx)
        Start volume (the network's δ).
    angles_deg : (N,)
        The measured angles.
    projections : (N, ny, W)
        Per-angle projections from the engine (δ line integrals in voxel units).
    n_iter, relaxation
        Sweeps (SART) or iterations (SIRT) and relaxation λ; ``n_iter = 0`` returns the volume
        unchanged.
    method : {"sart", "sirt"}
        SART updates angle by angle (stronger per sweep, one projector pair per angle); SIRT
        updates all angles at once (one projector pair per iteration: several times cheaper).
    report_residual : bool
        Project the result once more to report the residual after (costs one projection).

    Returns
    -------
    (volume, ConsistencyReport)
        The volume in the input volume's units, and the fit/residuals.
    """
    vol = np.asarray(volume, dtype=np.float32)
    p = np.asarray(projections, dtype=np.float32)
    ang = np.asarray(angles_deg, dtype=np.float64)
    if vol.ndim != 3 or p.ndim != 3:
        raise InputError(f"need a (nz, ny, nx) volume and (N, ny, W) projections, got {vol.shape}, {p.shape}")
    if p.shape[0] != ang.size:
        raise InputError(f"{p.shape[0]} projections for {ang.size} angles")
    width = p.shape[2]
    model_proj = tomo.project(vol, ang, det_width_px=width)
    # The footprint does not depend on y: project one slice of ones and broadcast.
    ones = np.ones((vol.shape[0], 1, vol.shape[2]), np.float32)
    footprint = np.broadcast_to(tomo.project(ones, ang, det_width_px=width) > 0.5, p.shape)
    if not footprint.any():
        raise InputError("the volume's footprint misses every detector column")
    a = model_proj[footprint].astype(np.float64)
    b = p[footprint].astype(np.float64)
    cov = float(((a - a.mean()) * (b - b.mean())).mean())
    # Spread-matching (not least-squares) gain: the data mapped into the volume's units then has
    # exactly the spread of the volume's own projections, so noise-only data (vacuum) can never
    # be amplified into structure; anti-correlated data (cov <= 0) is not used at all.
    gain = float(b.std() / a.std()) if a.std() > 0 and cov > 0 else 0.0
    offset = float(b.mean() - gain * a.mean())
    before = _relative_residual(gain * model_proj + offset, p, footprint)
    if n_iter == 0 or gain <= 0:
        return vol, ConsistencyReport(gain, offset, before, before, 0)
    # The offset is a constant per ray; spread it as a per-voxel constant (rays cross the volume).
    target = (p - offset) / gain
    if method not in ("sart", "sirt"):
        raise InputError(f"method must be 'sart' or 'sirt', got {method!r}")
    solver = tomo.sart if method == "sart" else tomo.sirt
    out = solver(target, ang, vol.shape, n_iter=n_iter, relaxation=relaxation, initial=vol)
    out = np.asarray(out, dtype=np.float32)
    after = (_relative_residual(gain * tomo.project(out, ang, det_width_px=width) + offset, p, footprint)
             if report_residual else float("nan"))
    return out, ConsistencyReport(gain, offset, before, after, int(n_iter))
