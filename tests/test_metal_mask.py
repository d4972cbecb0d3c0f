"""The apt-metal mask: a per-model calibrated cut of the δ volume, scored and published as a mask."""

from __future__ import annotations

import numpy as np
import pytest
from test_publish_writer import make_header

from apt_stream.errors import ConfigError, InputError
from apt_stream.metal_mask import (
    Z_GRID,
    MetalRule,
    calibrate,
    mask_scores,
    metal_mask,
    standard_scores,
)


def _chip(seed: int, *, metal_fraction: float = 0.2, noise: float = 0.6, shape=(8, 16, 16)):
    rng = np.random.default_rng(seed)
    metal = rng.random(shape) < metal_fraction
    return np.where(metal, 1.0, 0.0) + rng.normal(0, noise, shape), metal


def test_calibration_picks_the_threshold_with_the_fewest_wrong_voxels():
    pairs = [_chip(s) for s in range(3)]
    cal = calibrate(pairs)
    # brute force over the same grid, error rates averaged over volumes
    brute = [np.mean([((standard_scores(v) > z) != m).mean() for v, m in pairs]) for z in Z_GRID]
    assert cal.rule.z_threshold == pytest.approx(Z_GRID[int(np.argmin(brute))])
    np.testing.assert_allclose(cal.mean_errors, brute, atol=1e-12)
    # metal is rare and noisy, so the best cut is above the midpoint of the two classes
    assert cal.rule.z_threshold > 0.5
    assert cal.rule.min_spread == pytest.approx(0.1 * min(v.std() for v, _ in pairs))


def test_the_mask_follows_the_input_vacuum_gives_no_metal_and_a_flip_flips_it():
    volume, metal = _chip(0)
    rule = calibrate([(volume, metal)]).rule
    mask = rule.mask(volume)
    assert mask.dtype == np.uint8 and mask.shape == volume.shape
    assert mask_scores(mask, metal)["dsc"] > 0.5
    np.testing.assert_array_equal(rule.mask(volume[::-1]), mask[::-1])
    # a near-empty output (what the network gives on vacuum: 0.1 % of a chip's spread) has no
    # metal: its spread is below the rule's floor, not blown up to unit variance
    vacuum = 1e-3 * np.random.default_rng(1).normal(size=volume.shape)
    assert rule.mask(vacuum).sum() == 0
    assert metal_mask(vacuum, rule.z_threshold).sum() > 0  # without the floor it would call noise


def test_mask_scores_are_the_masks_own_dsc_and_ber():
    volume, metal = _chip(2)
    mask = metal_mask(volume, 1.0)
    s = mask_scores(mask, metal)
    tp = np.sum((mask == 1) & metal)
    assert s["ber"] == pytest.approx(np.mean(mask.astype(bool) != metal))
    assert s["dsc"] == pytest.approx(2 * tp / (mask.sum() + metal.sum()))
    assert mask_scores(mask, metal, exclude_z=[0])["ber"] == pytest.approx(
        np.mean(mask[1:].astype(bool) != metal[1:]))


def test_bad_calibration_input_and_rules_name_the_problem():
    volume, metal = _chip(0)
    with pytest.raises(InputError, match="differ in shape"):
        calibrate([(volume, metal[:-1])])
    with pytest.raises(InputError, match="both metal and non-metal"):
        calibrate([(volume, np.zeros_like(metal))])
    with pytest.raises(InputError, match="NaN"):
        metal_mask(np.full(volume.shape, np.nan), 1.0)

    class Model:
        io_config = {"metal_mask": {"z_threshold": "high"}}

    with pytest.raises(ConfigError, match="calibrate-metal"):
        MetalRule.of_model(Model())
    Model.io_config = {}
    assert MetalRule.of_model(Model()) is None


def test_the_mask_is_published_to_tiled_as_uint8(tiled_root, tmp_path):
    import uuid

    from apt_stream.publish import TiledPublisher

    publisher = TiledPublisher(tiled_root, backup_dir=tmp_path / "backup")
    run_uid = str(uuid.uuid4())
    publisher.run_started(make_header(run_uid, scan_id=4242))
    apt = np.random.default_rng(0).normal(size=(4, 8, 8)).astype(np.float32)
    mask = metal_mask(apt, 1.0)
    publisher.reconstruction_ready(run_uid, {"apt": apt, "apt-metal": mask}, final=True)
    node = tiled_root[run_uid]["apt-metal"]
    assert node.dtype == np.uint8
    np.testing.assert_array_equal(node.read(), mask)
    assert sorted(tiled_root[run_uid].metadata["volumes"]) == ["apt", "apt-metal"]
