"""The evaluation's data residual: how well a volume agrees with the measured projections."""

from __future__ import annotations

import numpy as np

from apt_stream.evaluation import _table, data_residual
from apt_stream.physics import tomo


def _layered(rng):
    v = np.zeros((16, 8, 24), np.float32)
    v[4:6, :, 4:20] = 1.0
    v[10:12, :, 8:16] = 2.0
    return v + 0.01 * rng.standard_normal(v.shape).astype(np.float32)


def test_the_measured_volume_fits_its_data_and_others_do_not():
    rng = np.random.default_rng(0)
    truth = _layered(rng)
    angles = np.linspace(-17, 17, 9)
    p = tomo.project(truth, angles, det_width_px=tomo.detector_width_px(truth.shape, angles))
    # The engine's projections carry an unknown gain and offset: the residual must not care.
    measured = 0.37 * p + 0.05
    assert data_residual(truth, angles, measured) < 0.01
    flipped = np.ascontiguousarray(truth[::-1, :, ::-1])
    shifted = np.roll(truth, 5, axis=2)
    assert data_residual(shifted, angles, measured) > 0.2
    assert data_residual(truth, angles, measured) < data_residual(flipped, angles, measured)
    noise = rng.standard_normal(truth.shape).astype(np.float32)
    assert data_residual(noise, angles, measured) > 0.5


def test_results_table_shows_the_residual_column_only_when_measured():
    row = {"pcc": 0.5, "ms_ssim": 0.6, "dsc": 0.4, "ber": 0.2}
    plain = "\n".join(_table({"sart": row}, "t"))
    assert "data residual" not in plain
    both = "\n".join(_table({"sart": {**row, "data_residual": 0.123}, "gold": row}, "t"))
    assert "| sart | 0.500 | 0.600 | 0.400 | 0.200 | 0.123 |" in both
    assert "| gold | 0.500 | 0.600 | 0.400 | 0.200 | |" in both
