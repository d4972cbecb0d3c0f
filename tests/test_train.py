"""Training: NPCC loss, LR schedule, paired sub-volumes, HDF5 pair cache, train/resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from apt_stream.errors import ConfigError, InputError, ModelError
from apt_stream.model import (
    PairDataset,
    create_model,
    load_checkpoint,
    load_pairs,
    npcc_loss,
    poly_lr,
    predict_volume,
    save_pairs,
    train,
)
from apt_stream.model.checkpoint import load_optimizer_state, save_optimizer_state

torch.set_num_threads(1)

TINY = dict(
    stem_width=4, stage_widths=(8, 16, 32), attn_width=16, attn_out=32, attn_heads=4,
    decoder_widths=(16, 8, 4), input_zyx=(16, 16, 16),
)


def tiny_model(**kw):
    torch.manual_seed(0)
    return create_model("cpu", **{**TINY, **kw})


def synthetic_pairs(n, *, shape=(16, 24, 24), up=1, seed=0):
    """Binary 'wires' (truth) and a blurred, noisy version of them (approximant)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        z, y, x = shape
        truth = np.zeros((z, y * up, x * up), np.float32)
        for _ in range(6):
            zz = rng.integers(0, z - 2)
            if rng.random() < 0.5:
                yy = rng.integers(0, y * up - 2)
                truth[zz : zz + 2, yy : yy + 2, :] = 1
            else:
                xx = rng.integers(0, x * up - 2)
                truth[zz : zz + 2, :, xx : xx + 2] = 1
        low = truth[:, ::up, ::up] if up > 1 else truth
        blurred = (low + np.roll(low, 2, 0) + np.roll(low, -2, 0)) / 3
        pairs.append((blurred + 0.2 * rng.standard_normal(low.shape).astype(np.float32), truth))
    return pairs


# --- loss and schedule ---------------------------------------------------------------------------


def test_npcc_of_identical_volumes_is_minus_one():
    x = torch.randn(3, 1, 4, 5, 6)
    assert float(npcc_loss(x, x)) == pytest.approx(-1.0, abs=1e-6)
    assert float(npcc_loss(x, -x)) == pytest.approx(1.0, abs=1e-6)


def test_npcc_is_scale_and_offset_invariant_per_sample():
    x, y = torch.randn(2, 1, 8, 8, 8), torch.randn(2, 1, 8, 8, 8)
    scale = torch.tensor([3.0, 0.01]).view(2, 1, 1, 1, 1)
    assert float(npcc_loss(scale * x + 7, y)) == pytest.approx(float(npcc_loss(x, y)), abs=1e-5)


def test_npcc_averages_per_sample_not_over_the_batch():
    x = torch.randn(2, 1, 4, 4, 4)
    y = torch.stack([x[0], torch.randn(1, 4, 4, 4)])
    per = [float(npcc_loss(x[i : i + 1], y[i : i + 1])) for i in range(2)]
    assert float(npcc_loss(x, y)) == pytest.approx(sum(per) / 2, abs=1e-6)


def test_npcc_shape_mismatch_raises():
    with pytest.raises(InputError, match="differ in shape"):
        npcc_loss(torch.zeros(1, 4), torch.zeros(1, 5))


def test_marginal_w1_ignores_affine_maps_and_positions_but_sees_the_histogram_shape():
    from apt_stream.model.losses import marginal_w1

    torch.manual_seed(0)
    truth = (torch.rand(2, 1, 8, 8, 8) < 0.2).float()  # two classes, like metal in a chip
    shuffled = truth.flatten(1)[:, torch.randperm(512)].view_as(truth)
    # Same histogram at other positions, and any positive gain and offset: distance 0.
    assert torch.allclose(marginal_w1(3 * shuffled + 1, truth), torch.zeros(2), atol=1e-5)
    # A one-humped output (a smooth ramp of the same ranks) is far from the two-class histogram;
    # the sharper it is, the closer.
    blur = truth + 0.8 * torch.randn_like(truth)
    sharp = truth + 0.1 * torch.randn_like(truth)
    assert (marginal_w1(blur, truth) > 2 * marginal_w1(sharp, truth)).all()
    with pytest.raises(InputError, match="differ in shape"):
        marginal_w1(torch.zeros(1, 4), torch.zeros(1, 5))


def test_apt_loss_is_npcc_at_weight_zero_and_adds_the_weighted_distance():
    from apt_stream.model.losses import apt_loss, marginal_w1

    x, y = torch.randn(3, 1, 6, 6, 6), (torch.rand(3, 1, 6, 6, 6) < 0.3).float()
    assert float(apt_loss(x, y)) == pytest.approx(float(npcc_loss(x, y)), abs=1e-7)
    expected = float(npcc_loss(x, y)) + 0.5 * float(marginal_w1(x, y).mean())
    assert float(apt_loss(x, y, marginal_weight=0.5)) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(InputError, match="marginal_weight"):
        apt_loss(x, y, marginal_weight=-1)


def test_training_with_the_distribution_term_sharpens_the_output_histogram(tmp_path):
    """The term does what it is for: trained with it, the output's histogram is closer to the
    truth's two classes than trained on NPCC alone, from the same start and batches."""

    pairs = synthetic_pairs(3, seed=4)
    runs = {}
    for weight in (0.0, 4.0):
        model = tiny_model()
        res = train(model, pairs[:2], pairs[2:], epochs=6, out_dir=tmp_path / str(weight), progress=False,
                    lr=2e-3, marginal_weight=weight)
        runs[weight] = res.history[-1]["val_marginal_w1"]
        meta = json.loads((tmp_path / str(weight) / "last.json").read_text())
        assert meta["config"]["marginal_weight"] == weight
        assert meta["config"]["loss"] == ("npcc" if weight == 0 else "npcc+marginal_w1")
    assert runs[4.0] < 0.8 * runs[0.0], runs  # measured: 0.72 (NPCC alone) vs 0.49
    with pytest.raises(ConfigError, match="marginal_weight"):
        train(tiny_model(), pairs[:1], epochs=1, out_dir=tmp_path / "bad", progress=False, marginal_weight=-0.1)


def test_threshold_bce_scores_each_voxels_side_of_the_truths_metal_threshold():
    from apt_stream.metrics import prior_from_labels
    from apt_stream.model.losses import threshold_bce

    torch.manual_seed(0)
    metal = (torch.rand(2, 1, 8, 16, 16) < 0.2).float()
    truth = 1.0 + 2.0 * metal + 0.1 * torch.rand_like(metal)  # metal has the larger δ
    noise = torch.randn_like(metal)
    clear, muddled = metal * 3 + 0.3 * noise, metal * 3 + 1.5 * noise
    # affine-free in the output and in the truth, like NPCC
    ref = threshold_bce(clear, truth, metal)
    assert torch.allclose(threshold_bce(5 * clear - 2, 1e-5 * truth, metal), ref, atol=1e-5)
    # more voxels on the wrong side of the truth's threshold: a higher loss
    assert (threshold_bce(muddled, truth, metal) > 3 * ref).all()
    assert (threshold_bce(-clear, truth, metal) > 10 * ref).all()
    # the gradient pushes a metal voxel below the threshold up, and a dielectric above it down
    pred = muddled.clone().requires_grad_()
    threshold_bce(pred, truth, metal).sum().backward()
    zt = (truth[0] - truth[0].mean()) / truth[0].std(unbiased=False)
    m = metal[0].bool()
    t = prior_from_labels(zt.double().numpy(), m.numpy()).threshold
    z = ((muddled[0] - muddled[0].mean()) / muddled[0].std(unbiased=False))
    g = pred.grad[0]
    assert (g[m & (z < t - 0.5)] < 0).all() and (g[~m & (z > t + 0.5)] > 0).all()
    # the threshold is the truth's: it does not follow the output (a uniformly brighter metal
    # class in the output only lowers the loss)
    assert (threshold_bce(clear + 2 * metal, truth, metal) < ref).all()
    # a patch without metal has no threshold: it scores 0 and still backpropagates
    none = torch.zeros(1, 1, 4, 4, 4)
    out = torch.randn(1, 1, 4, 4, 4, requires_grad=True)
    loss = threshold_bce(out, torch.rand(1, 1, 4, 4, 4), none)
    assert float(loss.detach()) == 0.0
    loss.sum().backward()
    with pytest.raises(InputError, match="temperature"):
        threshold_bce(clear, truth, metal, temperature=0)


def test_apt_loss_adds_the_weighted_threshold_term_and_needs_the_masks(tmp_path):
    from apt_stream.model.losses import apt_loss, threshold_bce

    x, y = torch.randn(3, 1, 6, 6, 6), (torch.rand(3, 1, 6, 6, 6) < 0.3).float()
    expected = float(npcc_loss(x, y)) + 0.7 * float(threshold_bce(x, y, y).mean())
    assert float(apt_loss(x, y, metal=y, metal_weight=0.7)) == pytest.approx(expected, abs=1e-6)
    assert float(apt_loss(x, y, metal=y)) == pytest.approx(float(npcc_loss(x, y)), abs=1e-7)
    with pytest.raises(InputError, match="metal masks"):
        apt_loss(x, y, metal_weight=0.5)
    with pytest.raises(InputError, match="metal_weight"):
        apt_loss(x, y, metal=y, metal_weight=-1)
    with pytest.raises(ConfigError, match="metal masks"):
        train(tiny_model(), synthetic_pairs(1), epochs=1, out_dir=tmp_path, progress=False,
              metal_weight=0.5)


def test_poly_lr_follows_paper_rule():
    assert poly_lr(0) == pytest.approx(2e-4)
    assert poly_lr(100) == pytest.approx(2e-4 * 0.5**0.9)
    assert poly_lr(150) == pytest.approx(2e-4 * 0.25**0.9)
    assert poly_lr(200) == 0.0 and poly_lr(250) == 0.0


# --- data --------------------------------------------------------------------------------------


def test_pair_dataset_cuts_full_depth_patches_with_half_overlap():
    pairs = synthetic_pairs(2, shape=(16, 24, 40))
    ds = PairDataset(pairs, patch_xy=16, overlap=0.5)
    # y: starts 0, 8 (+ flush 8); x: 0, 8, 16, 24 -> 2 * 4 patches per volume.
    assert len(ds) == 2 * 2 * 4
    x, y = ds[3]
    assert x.shape == y.shape == (1, 16, 16, 16)
    k, y0, x0 = ds.index[3]
    a = pairs[k][0]
    np.testing.assert_allclose(x[0].numpy(), ((a - a.mean()) / a.std())[:, y0 : y0 + 16, x0 : x0 + 16], atol=1e-5)
    np.testing.assert_array_equal(y[0].numpy(), pairs[k][1][:, y0 : y0 + 16, x0 : x0 + 16])


def test_pair_dataset_upsampled_truth_aligns():
    pairs = synthetic_pairs(1, shape=(8, 16, 16), up=2)
    ds = PairDataset(pairs, patch_xy=8, upsample_xy=2, normalize=False)
    x, y = ds[len(ds) - 1]
    assert x.shape == (1, 8, 8, 8) and y.shape == (1, 8, 16, 16)
    np.testing.assert_array_equal(y[0].numpy(), pairs[0][1][:, 16:32, 16:32])


def test_flips_are_x_and_y_only_and_shared_by_input_and_truth():
    pairs = [(np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8),) * 2]
    ds = PairDataset(pairs, patch_xy=8, normalize=False)
    seen = set()
    for seed in range(12):
        (x, y), = ds.batches(1, augment=True, rng=np.random.default_rng(seed))
        torch.testing.assert_close(x, y)
        base = torch.from_numpy(pairs[0][0])[None, None]
        for dims in ((), (-1,), (-2,), (-2, -1)):
            if torch.equal(x, base.flip(dims) if dims else base):
                seen.add(dims)
        # Depth is never flipped and never mixed with a lateral axis.
        assert x[0, 0, 0].sum() < x[0, 0, 1].sum()
    assert seen == {(), (-1,), (-2,), (-2, -1)}


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([(np.zeros((4, 8, 8)), np.zeros((4, 8, 9)))], "truth shape"),
        ([(np.zeros((8, 8)), np.zeros((8, 8)))], "approximant must be"),
        ([(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)))], "larger than"),
        ([(np.full((4, 8, 8), np.nan), np.zeros((4, 8, 8)))], "NaN"),
    ],
)
def test_pair_dataset_rejects_bad_pairs(pairs, message):
    with pytest.raises(InputError, match=message):
        PairDataset(pairs, patch_xy=8)


def test_hdf5_pair_cache_round_trip_with_splits(tmp_path):
    pairs = synthetic_pairs(3, shape=(4, 8, 8))
    path = save_pairs(tmp_path / "pairs.h5", pairs, seeds=[10, 11, 12], splits=["train", "val", "train"])
    got, attrs = load_pairs(path, split="train", with_attrs=True)
    assert [a["seed"] for a in attrs] == [10, 12]
    np.testing.assert_array_equal(got[1][1], pairs[2][1])
    assert len(load_pairs(path)) == 3
    with pytest.raises(InputError, match="split 'test'"):
        load_pairs(path, split="test")


# --- optimisation ------------------------------------------------------------------------------


def test_one_training_step_reduces_the_loss():
    model = tiny_model()
    model.train()
    ds = PairDataset(synthetic_pairs(2), patch_xy=16)
    x, y = next(ds.batches(4))
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.9, 0.999))
    before = npcc_loss(model(x), y)
    opt.zero_grad()
    before.backward()
    opt.step()
    after = npcc_loss(model(x), y)
    assert float(after.detach()) < float(before.detach())


def test_train_checkpoints_each_epoch_and_resume_continues(tmp_path):
    pairs = synthetic_pairs(3)
    events = []
    model = tiny_model()
    res = train(
        model, pairs[:2], pairs[2:], epochs=1, out_dir=tmp_path, seed=3,
        progress=events.append, provenance={"data_seeds": [0, 1, 2]},
    )
    assert [h["epoch"] for h in res.history] == [1]
    assert res.best_epoch == 1
    for name in ("last.safetensors", "last.json", "last.optim.safetensors", "best.safetensors", "history.json"):
        assert (tmp_path / name).exists(), name
    assert {e["event"] for e in events} == {"batch", "epoch"}
    meta = json.loads((tmp_path / "last.json").read_text())
    assert meta["config"]["lr0"] == 2e-4 and meta["config"]["batch_size"] == 4
    assert meta["provenance"]["data_seeds"] == [0, 1, 2]
    assert meta["io"]["output_affine"] is not None

    res2 = train(tiny_model(), pairs[:2], pairs[2:], epochs=3, out_dir=tmp_path, resume=True, seed=3, progress=False)
    assert [h["epoch"] for h in res2.history] == [1, 2, 3]
    assert res2.history[2]["lr"] == pytest.approx(poly_lr(2))
    assert json.loads((tmp_path / "last.json").read_text())["provenance"]["epoch"] == 3
    best, _ = load_checkpoint(res2.best_path)
    assert best.io_config["output_affine"] is not None
    vol = predict_volume(best, pairs[2][0])
    assert vol.shape == pairs[2][1].shape


def test_resume_matches_an_uninterrupted_run(tmp_path):
    pairs = synthetic_pairs(2)
    straight = train(tiny_model(), pairs[:1], pairs[1:], epochs=2, out_dir=tmp_path / "a", progress=False)
    train(tiny_model(), pairs[:1], pairs[1:], epochs=1, out_dir=tmp_path / "b", progress=False)
    resumed = train(tiny_model(), pairs[:1], pairs[1:], epochs=2, out_dir=tmp_path / "b", resume=True, progress=False)
    assert resumed.history[-1]["train_loss"] == pytest.approx(straight.history[-1]["train_loss"], rel=1e-4)


def test_train_from_hdf5_cache(tmp_path):
    pairs = synthetic_pairs(3)
    cache = save_pairs(tmp_path / "pairs.h5", pairs, seeds=[5, 6, 7], splits=["train", "train", "val"])
    res = train(tiny_model(), cache, cache, epochs=1, out_dir=tmp_path / "run", progress=False, max_batches_per_epoch=1)
    meta = json.loads((res.out_dir / "best.json").read_text())
    assert meta["provenance"]["train_data_seeds"] == [5, 6]
    assert meta["provenance"]["val_data_seeds"] == [7]


def test_optimizer_state_round_trip(tmp_path):
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(1, 1, 16, 16, 16)).mean().backward()
    opt.step()
    save_optimizer_state(tmp_path / "o.safetensors", opt, extra={"epoch": 4})
    fresh = torch.optim.Adam(model.parameters(), lr=5.0)
    assert load_optimizer_state(tmp_path / "o.safetensors", fresh) == {"epoch": 4}
    a, b = opt.state_dict(), fresh.state_dict()
    assert b["param_groups"][0]["lr"] == 1e-3
    for k in a["state"]:
        torch.testing.assert_close(a["state"][k]["exp_avg_sq"], b["state"][k]["exp_avg_sq"])


def test_train_rejects_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="epochs"):
        train(tiny_model(), synthetic_pairs(1), epochs=0, out_dir=tmp_path, progress=False)
    with pytest.raises(InputError, match="no training pairs"):
        train(tiny_model(), [], epochs=1, out_dir=tmp_path, progress=False)
    with pytest.raises(ModelError, match="APTNet"):
        train(torch.nn.Conv3d(1, 1, 1), synthetic_pairs(1), epochs=1, out_dir=tmp_path, progress=False)


def test_resume_with_a_different_network_is_refused(tmp_path):
    pairs = synthetic_pairs(1)
    train(tiny_model(), pairs, epochs=1, out_dir=tmp_path, progress=False)
    with pytest.raises(ModelError, match="differs"):
        train(tiny_model(attn_heads=2), pairs, epochs=2, out_dir=tmp_path, resume=True, progress=False)
