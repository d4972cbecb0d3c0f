"""Angle banks, random-angle samples, scale-free inference and data consistency (tiny scale)."""

from __future__ import annotations

import numpy as np
import pytest

from apt_stream.angle_bank import bank_from_scan, load_banks, write_bank
from apt_stream.config import PRESETS
from apt_stream.errors import InputError
from apt_stream.physics import tomo
from apt_stream.physics.consistency import enforce_projections
from apt_stream.physics.engine import approximant_from_scan
from apt_stream.random_angles import AngleSampling, RandomAngleDataset, rms_scale
from apt_stream.sim.acquire import simulate_scan


@pytest.fixture(scope="module")
def tiny_scan():
    return simulate_scan(PRESETS["tiny"], seed=3, n_angles=9, range_deg=30.0)


@pytest.fixture(scope="module")
def tiny_bank(tiny_scan):
    return bank_from_scan(tiny_scan, seed=3)


def test_bank_subset_equals_engine_on_that_subset(tiny_scan, tiny_bank):
    for idx in ([0, 4, 8], list(range(9)), [2]):
        engine = approximant_from_scan(tiny_scan, angle_indices=idx)
        ref = engine.volume()
        got = tiny_bank.approximant(idx)
        # float16 storage: ~1e-3 of the largest value
        assert np.abs(got - ref).max() <= 2e-3 * np.abs(ref).max()


def test_bank_round_trip_and_splits(tmp_path, tiny_bank):
    import h5py

    path = tmp_path / "banks-1.h5"
    with h5py.File(path, "w") as fh:
        write_bank(fh.create_group("banks/3"), tiny_bank)
    [back] = load_banks(path, split="train")
    np.testing.assert_array_equal(back.contrib, tiny_bank.contrib)
    with pytest.raises(InputError, match="split 'val'"):
        load_banks(path, split="val")
    with pytest.raises(InputError, match="does not exist"):
        load_banks(tmp_path / "missing.h5")


def test_random_angle_samples_are_feasible_scaled_and_varied(tiny_bank):
    ds = RandomAngleDataset([tiny_bank], patch_xy=16, samples_per_epoch=24,
                            sampling=AngleSampling(n_angles=(3, 9), range_deg=(10.0, 30.0)))
    rng = np.random.default_rng(0)
    infos = [ds.sample(rng, augment=True)[2] for _ in range(24)]
    assert len({i["n_angles"] for i in infos}) > 2
    for i in infos:
        assert tiny_bank.available(i["range_deg"]) >= i["n_angles"]
    x, t, info = ds.sample(rng, augment=False)
    assert x.shape == (1, 12, 16, 16) and t.shape == x.shape[1:]
    # the input is dimensionless: divided by its whole volume's RMS
    full = tiny_bank.approximant(tiny_bank.choose(info["n_angles"], info["range_deg"]))
    assert info["scale"] == pytest.approx(rms_scale(full))
    xb, tb = next(ds.batches(4, augment=True, rng=rng))
    assert tuple(xb.shape) == (4, 1, 12, 16, 16)
    fixed = RandomAngleDataset([tiny_bank], patch_xy=16, samples_per_epoch=8, fixed_seed=1)
    a = next(fixed.batches(8))[0]
    b = next(fixed.batches(8))[0]
    assert (a == b).all()  # validation draws the same samples every epoch


def test_metal_masks_follow_the_truth_patch_through_crops_and_flips(tiny_bank):
    from apt_stream.sim.materials import is_metal

    kw = dict(patch_xy=16, samples_per_epoch=8, sampling=AngleSampling(n_angles=(3, 9), range_deg=(10.0, 30.0)))
    plain = RandomAngleDataset([tiny_bank], **kw)
    masked = RandomAngleDataset([tiny_bank], metal_masks=True, **kw)
    # In this phantom δ is a function of the material, and metal and non-metal δ never coincide,
    # so a truth patch says by itself which of its voxels are metal.
    metal = is_metal(tiny_bank.labels)
    metal_values = np.unique(tiny_bank.truth[metal])
    def holds_metal_delta(values):
        return np.isclose(values[..., None], metal_values, rtol=1e-5, atol=0).any(axis=-1)

    assert not holds_metal_delta(np.unique(tiny_bank.truth[~metal])).any()
    for seed in range(6):
        x0, t0, _ = plain.sample(np.random.default_rng(seed), augment=True)
        x1, t1, info = masked.sample(np.random.default_rng(seed), augment=True)
        # the masks draw nothing: the same seed gives the same sample with or without them
        np.testing.assert_array_equal(x0, x1)
        np.testing.assert_array_equal(t0, t1)
        m = info["metal"].astype(bool)
        assert m.shape == t1.shape and m.any() and not m.all()
        # cropped and flipped with the truth: exactly the voxels holding a metal's δ
        np.testing.assert_array_equal(m, holds_metal_delta(t1 * info["scale"]))
    xb, tb, mb = next(masked.batches(4, augment=True, rng=np.random.default_rng(0)))
    assert tuple(mb.shape) == tuple(tb.shape) and set(np.unique(mb.numpy())) <= {0.0, 1.0}


def test_sart_input_channel_matches_sart_of_the_same_angles(tiny_bank, tmp_path):
    from apt_stream.model.inputs import SART_SWEEPS, sart_channel

    made = []
    ds = RandomAngleDataset([tiny_bank], patch_xy=16, samples_per_epoch=4, inputs=("approximant", "sart"),
                            sets_per_bank=3, cache_dir=tmp_path, progress=lambda d, n: made.append(d),
                            sampling=AngleSampling(n_angles=(3, 9), range_deg=(10.0, 30.0)))
    assert made[-1] == 1 and len(ds.sets[0]) == 3
    (n, theta, idx), sart = ds.sets[0][0]
    ref = sart_channel(tiny_bank.angles_deg[idx], tiny_bank.projections[idx], tiny_bank.truth.shape)
    assert np.abs(sart.astype(np.float32) - ref).max() <= 2e-3 * np.abs(ref).max()
    x, t, info = ds.sample(np.random.default_rng(0), augment=False)
    assert x.shape == (2, 12, 16, 16) and t.shape == (12, 16, 16)
    # each channel is dimensionless (its own RMS over the whole volume is 1 before cropping)
    assert 0.2 < float(np.sqrt(np.mean(x[1] ** 2))) < 5
    # cached: a second dataset reads the same volumes without recomputing
    assert len(list(tmp_path.glob(f"sart-3-None-3-{SART_SWEEPS}.npz"))) == 1
    again = RandomAngleDataset([tiny_bank], patch_xy=16, samples_per_epoch=4, inputs=("approximant", "sart"),
                               sets_per_bank=3, cache_dir=tmp_path,
                               sampling=AngleSampling(n_angles=(3, 9), range_deg=(10.0, 30.0)))
    np.testing.assert_array_equal(again.sets[0][2][1], ds.sets[0][2][1])
    with pytest.raises(InputError, match="inputs must be"):
        RandomAngleDataset([tiny_bank], patch_xy=16, samples_per_epoch=4, inputs=("sart",))


def test_rms_normalised_inference_is_scale_equivariant():
    import torch

    from apt_stream.model import create_model, predict_volume

    torch.manual_seed(0)
    model = create_model("cpu")
    model.io_config.update(input_norm="rms", output_affine=[0.7, 0.2])
    v = np.random.default_rng(0).normal(1.0, 0.3, size=(32, 40, 40)).astype(np.float32) * 1e-6
    out1 = predict_volume(model, v)
    out2 = predict_volume(model, 1000 * v)
    # float32 rounding differs between the two scales; a broken equivariance would be O(1)
    np.testing.assert_allclose(out2, 1000 * out1, rtol=1e-3, atol=1e-4 * np.abs(out2).max())
    # a near-empty input gives a near-empty output (no learned constant creeps in)
    assert np.abs(predict_volume(model, v * 1e-4)).max() < 1e-3 * np.abs(out1).max()


def _plate_problem():
    vol = np.zeros((12, 8, 20), np.float32)
    vol[3:6, :, 4:9] = 1.0
    vol[7:10, :, 11:16] = 2.0
    angles = np.linspace(-17, 17, 9)
    proj = tomo.project(vol, angles)
    return vol, angles, proj


def test_data_consistency_moves_a_wrong_volume_towards_the_data():
    truth, angles, proj = _plate_problem()
    start = np.roll(truth, 2, axis=2)  # laterally wrong: the data can tell
    out, report = enforce_projections(start, angles, 0.6 * proj, n_iter=3, relaxation=0.5)
    assert report.residual_after < 0.5 * report.residual_before
    assert 0.5 < report.gain < 0.7  # the data's gain is found, the volume keeps its own units
    assert np.corrcoef(out.ravel(), truth.ravel())[0, 1] > np.corrcoef(start.ravel(), truth.ravel())[0, 1]
    same, rep0 = enforce_projections(start, angles, proj, n_iter=0)
    assert (same == start).all() and rep0.iterations == 0


def test_data_consistency_never_amplifies_noise_only_data():
    truth, angles, proj = _plate_problem()
    small = 1e-3 * truth
    noise = np.random.default_rng(0).normal(size=proj.shape).astype(np.float32)
    out, _ = enforce_projections(small, angles, noise, n_iter=3, relaxation=0.5)
    assert np.sqrt(np.mean(out**2)) < 20 * np.sqrt(np.mean(small**2))


def test_data_consistency_rejects_bad_shapes():
    truth, angles, proj = _plate_problem()
    with pytest.raises(InputError, match="projections for"):
        enforce_projections(truth, angles[:3], proj)
    with pytest.raises(InputError, match="need a"):
        enforce_projections(truth[0], angles, proj)


def test_shipped_models_data_consistency_is_the_recorded_solver(tiny_scan):
    """``apt`` = network + the sweeps the checkpoint records (method, iterations, relaxation);
    ``apt-raw`` = the network alone; changing the recorded solver changes ``apt`` only."""
    import copy

    from apt_stream.evaluation import data_residual
    from apt_stream.reconstruct import apt_volumes, load_model

    model, _ = load_model()
    dc = model.io_config["data_consistency"]
    assert dc["iterations"] > 0 and dc["method"] in ("sirt", "sart")
    engine = approximant_from_scan(tiny_scan, projection_iterations=6)
    volume, refined = engine.volume(), engine.projections()
    kwargs = {"projections": refined, "input_projections": engine.projections(refined=False)}
    shipped = apt_volumes(model, volume, **kwargs)
    assert set(shipped) == {"apt", "apt-raw", "apt-metal"}  # the shipped model has a metal rule
    assert data_residual(shipped["apt"], *refined) < data_residual(shipped["apt-raw"], *refined)
    other = copy.copy(model)
    other.io_config = {**model.io_config, "data_consistency": {**dc, "method": "sart", "relaxation": 0.3}}
    swapped = apt_volumes(other, volume, **kwargs)
    np.testing.assert_array_equal(swapped["apt-raw"], shipped["apt-raw"])
    assert not np.allclose(swapped["apt"], shipped["apt"])


def test_apt_volumes_add_the_mask_of_the_apt_volume_when_the_model_has_a_rule(tiny_scan):
    import copy

    from apt_stream.metal_mask import metal_mask
    from apt_stream.reconstruct import apt_volumes, load_model, score

    model, _ = load_model()
    engine = approximant_from_scan(tiny_scan, projection_iterations=6)
    volume = engine.volume()
    kwargs = {"projections": engine.projections(), "input_projections": engine.projections(refined=False)}
    bare = copy.copy(model)
    bare.io_config = {k: v for k, v in model.io_config.items() if k != "metal_mask"}
    assert set(apt_volumes(bare, volume, **kwargs)) == {"apt", "apt-raw"}
    ruled = copy.copy(model)
    ruled.io_config = {**bare.io_config, "metal_mask": {"z_threshold": 1.0, "min_spread": 0.0}}
    out = apt_volumes(ruled, volume, **kwargs)
    np.testing.assert_array_equal(out["apt-metal"], metal_mask(out["apt"], 1.0))
    scores = score(out, tiny_scan.truth)
    assert set(scores["apt-metal"]) == {"dsc", "ber"}  # scored as a mask, not re-binarised
    assert set(scores["apt"]) == {"pcc", "ms_ssim", "dsc", "ber"}
