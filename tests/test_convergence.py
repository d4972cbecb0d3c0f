"""The data-only convergence estimate (apt_stream.physics.convergence) on a simulated scan and on noise."""

from __future__ import annotations

import numpy as np
import pytest

from apt_stream.errors import ConfigError, InputError
from apt_stream.physics.convergence import (
    ConvergenceMonitor,
    ConvergenceOptions,
    fourier_ring_correlation,
    resolution_from_frc,
    sample_rows,
)
from apt_stream.physics.next_angle import bisection_order


@pytest.fixture(scope="module")
def tiny_projections():
    from apt_stream.config import get_preset
    from apt_stream.physics.engine import approximant_from_scan
    from apt_stream.sim.acquire import simulate_scan

    scan = simulate_scan(get_preset("tiny"), seed=5, n_angles=29, range_deg=17.0)
    angles, proj = approximant_from_scan(scan, projection_iterations=6).projections()
    return scan.volume_shape_zyx, angles, proj


def _stream(shape, angles, proj, order):
    mon = ConvergenceMonitor(shape, ConvergenceOptions(budget_share=None))
    rows = []
    for k in range(1, len(order) + 1):
        idx = order[:k]
        row = mon.update(angles[idx], proj[idx], newest_deg=float(angles[order[k - 1]]))
        if row is not None:
            rows.append(row)
    return rows


def test_agreement_rises_and_residual_is_low_on_a_simulated_scan(tiny_projections):
    shape, angles, proj = tiny_projections
    rows = _stream(shape, angles, proj, bisection_order(len(angles)))
    assert rows[0].n_angles == 6 and rows[-1].n_angles == 29  # from min_angles on, every angle
    first, last = rows[0], rows[-1]
    assert last.frc_half > first.frc_half + 0.1  # the halves agree more as angles are added
    assert np.mean([r.frc_half for r in rows[-5:]]) > 0.85
    assert np.isnan(first.change) and np.isnan(first.heldout_residual)
    # The earlier reconstruction predicts unseen angles well, and moves little per angle.
    assert np.nanmax([r.heldout_residual for r in rows]) < 0.4
    assert np.nanmedian([r.change for r in rows]) < 0.06
    assert last.resolution == 1.0
    assert rows[3].angle_deg == pytest.approx(angles[bisection_order(29)[8]])


def test_pure_noise_has_no_agreement_and_is_not_predicted(tiny_projections):
    shape, angles, proj = tiny_projections
    noise = np.random.default_rng(0).normal(size=proj.shape).astype(np.float32)
    rows = _stream(shape, angles, noise, list(range(len(angles))))
    frc = np.array([r.frc_half for r in rows])
    assert abs(frc.mean()) < 0.1 and np.abs(frc).max() < 0.3
    assert np.nanmin([r.heldout_residual for r in rows]) > 0.9
    assert np.nanmedian([r.change for r in rows]) > 0.2
    assert max(r.resolution for r in rows) < 0.5


def test_frc_of_a_volume_with_itself_is_one_and_of_independent_noise_near_zero():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(16, 4, 24))
    freq, frc = fourier_ring_correlation(a, a)
    assert np.allclose(frc, 1.0) and freq[-1] == 1.0 and freq[0] > 0
    _, frc = fourier_ring_correlation(a, rng.normal(size=a.shape))
    assert np.abs(frc).mean() < 0.15
    assert resolution_from_frc(freq, np.linspace(1, -0.4, freq.size)) == pytest.approx(0.75)
    with pytest.raises(InputError):
        fourier_ring_correlation(a, a[:, :2])


def test_throttling_and_options(tiny_projections):
    shape, angles, proj = tiny_projections
    mon = ConvergenceMonitor(shape, ConvergenceOptions(every=3, budget_share=None))
    done = [k for k in range(1, 16) if mon.update(angles[:k], proj[:k]) is not None]
    assert done == [6, 9, 12, 15]
    assert list(sample_rows(24, 8)) == sorted(set(sample_rows(24, 8))) and len(sample_rows(24, 8)) == 8
    assert list(sample_rows(5, None)) == [0, 1, 2, 3, 4]
    # A tiny budget share skips estimates after the first (the estimate is never free).
    tight = ConvergenceMonitor(shape, ConvergenceOptions(budget_share=1e-6))
    got = [tight.update(angles[:k], proj[:k]) for k in range(6, 12)]
    assert got[0] is not None and all(g is None for g in got[1:]) and tight.skipped == 5
    for bad in ({"min_angles": 2}, {"rows": 0}, {"sweeps": 0}, {"every": 0}, {"budget_share": 2}):
        with pytest.raises(ConfigError):
            ConvergenceOptions(**bad)
    with pytest.raises(InputError):
        mon.update(angles[:7], proj[:6])


def test_bisection_order_and_suggestions(tiny_projections):
    from apt_stream.physics.next_angle import angular_gaps, suggest_angles

    assert bisection_order(5) == [0, 4, 2, 1, 3]
    assert sorted(bisection_order(29)) == list(range(29)) and bisection_order(1) == [0]
    grid = np.linspace(-17, 17, 9)
    # Coverage only: the middle of the widest gap comes first, measured angles never.
    best = suggest_angles([-17.0, 17.0], grid, k=None)
    assert best[0].angle_deg == 0.0 and all(abs(s.angle_deg) != 17.0 for s in best)
    assert np.allclose(angular_gaps([0.0], [-2.0, 3.0]), [2.0, 3.0])
    s = suggest_angles([-17.0, -12.75, 17.0], grid, k=2)
    assert s[0].angle_deg in (4.25, 0.0) and s[0].score >= s[1].score
    assert suggest_angles(grid, grid) == []
    # With data: the disagreement term is computed and ranks within the same gaps.
    shape, angles, proj = tiny_projections
    picked = [0, 7, 14, 21, 28]
    ranked = suggest_angles(angles[picked], angles, projections=(angles[picked], proj[picked]),
                            volume_shape_zyx=shape, k=None)
    assert len(ranked) == 24 and all(np.isfinite(r.disagreement) for r in ranked)
    assert ranked[0].gap_deg >= 0.6 * max(r.gap_deg for r in ranked)
