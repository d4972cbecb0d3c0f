"""Stitched inference: seamless blending, padding, upsampling, units, optimised path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from apt_stream.errors import InputError
from apt_stream.model import benchmark_inference, create_model, predict_volume
from apt_stream.model.inference import hann_window, tile_starts

torch.set_num_threads(1)


def identity_conv() -> nn.Conv3d:
    conv = nn.Conv3d(1, 1, 1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.zero_()
    return conv


class Constant(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full_like(x, self.value)


class NearestUp2(nn.Module):
    """Lateral x2 nearest upsampling: the identity for an upsampling network."""

    def forward(self, x):
        return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


class NeedsMultiple(nn.Module):
    """Identity that, like APTNet, insists on depth multiples of 8."""

    input_multiple_zyx = (8, 4, 4)

    def forward(self, x):
        assert x.shape[2] % 8 == 0
        return x.clone()


def rand_volume(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize(
    ("shape", "patch", "overlap"),
    [((12, 37, 50), 16, 0.5), ((5, 9, 70), (8, 16), 0.25), ((7, 16, 16), 16, 0.5), ((3, 40, 23), 12, 0.0)],
)
def test_identity_network_is_reproduced_without_seams(shape, patch, overlap):
    vol = rand_volume(shape)
    out = predict_volume(identity_conv(), vol, patch_xy=patch, overlap=overlap, normalize=False)
    assert out.shape == vol.shape and out.dtype == np.float32
    assert np.abs(out - vol).max() < 1e-5


def test_constant_network_gives_constant_output():
    out = predict_volume(Constant(3.25), rand_volume((6, 33, 41)), patch_xy=16, normalize=False)
    # Exact up to float32 rounding of the weighted average.
    assert np.abs(out - 3.25).max() <= 4 * np.finfo(np.float32).eps * 3.25


def test_lateral_upsampling_doubles_output_and_aligns_patches():
    vol = rand_volume((4, 21, 30))
    out = predict_volume(NearestUp2(), vol, patch_xy=8, batch_size=3, normalize=False)
    assert out.shape == (4, 42, 60)
    expect = vol.repeat(2, axis=1).repeat(2, axis=2)
    assert np.abs(out - expect).max() < 1e-5


def test_depth_is_padded_to_the_model_multiple_and_cropped():
    vol = rand_volume((13, 20, 20))
    out = predict_volume(NeedsMultiple(), vol, patch_xy=8, normalize=False)
    assert np.abs(out - vol).max() < 1e-5


def test_standardisation_and_torch_input():
    vol = 5.0 + 2.0 * rand_volume((6, 20, 20))
    out = predict_volume(identity_conv(), torch.from_numpy(vol), patch_xy=8)
    expect = (vol - vol.mean()) / vol.std()
    assert np.abs(out - expect).max() < 1e-5


def test_output_affine_from_model_config_maps_back():
    model = identity_conv()
    model.io_config = {"input_norm": "none", "output_affine": [2.0, -1.0]}
    vol = rand_volume((4, 16, 16))
    out = predict_volume(model, vol, patch_xy=8)
    assert np.abs(out - (2 * vol - 1)).max() < 1e-5
    raw = predict_volume(model, vol, patch_xy=8, calibrate=False)
    assert np.abs(raw - vol).max() < 1e-5


def test_single_patch_equals_direct_forward_of_aptnet():
    torch.manual_seed(0)
    model = create_model("cpu").eval()
    vol = rand_volume((32, 32, 32))
    out = predict_volume(model, vol, overlap=0.0)  # one 32x32 patch: the window cancels
    std = (vol - vol.mean()) / vol.std()
    with torch.no_grad():
        direct = model(torch.from_numpy(std)[None, None])[0, 0].numpy()
    assert np.abs(out - direct).max() < 1e-4


def test_aptnet_large_volume_bf16_channels_last_close_to_fp32():
    torch.manual_seed(0)
    model = create_model("cpu")
    model.train()
    vol = rand_volume((32, 40, 44))
    ref = predict_volume(model, vol, batch_size=2)
    assert model.training  # mode restored after the call
    fast = predict_volume(model, vol, batch_size=2, dtype="bfloat16", channels_last=True)
    assert ref.shape == fast.shape == (32, 40, 44)
    assert np.isfinite(fast).all()
    assert np.corrcoef(ref.ravel(), fast.ravel())[0, 1] > 0.99
    # The model's weights keep their usual layout afterwards.
    assert model.head.weight.is_contiguous()


def test_progress_callback_counts_patches():
    calls = []
    predict_volume(
        identity_conv(), rand_volume((2, 24, 24)), patch_xy=8, batch_size=4, normalize=False,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls[-1][0] == calls[-1][1] and len(calls) >= 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"overlap": 1.0}, "overlap"),
        ({"patch_xy": 0}, "patch_xy"),
        ({"batch_size": 0}, "batch_size"),
        ({"dtype": "float16"}, "dtype"),
    ],
)
def test_bad_arguments_raise_input_error(kwargs, message):
    with pytest.raises(InputError, match=message):
        predict_volume(identity_conv(), rand_volume((2, 8, 8)), **{"patch_xy": 8, **kwargs})


def test_bad_volumes_raise_input_error():
    with pytest.raises(InputError, match="3-D"):
        predict_volume(identity_conv(), np.zeros((8, 8)), patch_xy=8)
    bad = rand_volume((2, 8, 8))
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        predict_volume(identity_conv(), bad, patch_xy=8)
    with pytest.raises(InputError, match="multiple"):
        predict_volume(create_model("cpu"), rand_volume((32, 32, 32)), patch_xy=30)
    with pytest.raises(InputError, match="patch_xy is required"):
        predict_volume(identity_conv(), rand_volume((2, 8, 8)))


def test_window_and_tiling_helpers():
    w = hann_window(16)
    assert w.min() > 0 and np.allclose(w, w[::-1]) and w.max() <= 1
    starts, before, after = tile_starts(37, 16, 8, 4)
    assert before == 4 and starts[-1] + 16 == 37 + before + after
    assert all(b - a == 8 for a, b in zip(starts, starts[1:], strict=False))


def test_benchmark_reports_both_paths():
    res = benchmark_inference(
        "cpu", (16, 16, 16), repeats=1, patch_xy=16, input_zyx=(16, 16, 16),
        stem_width=4, stage_widths=(8, 16, 32), attn_width=16, attn_out=32, decoder_widths=(16, 8, 4),
    )
    assert res["eager"]["voxels_per_s"] > 0 and res["optimized"]["voxels_per_s"] > 0
    assert res["speedup"] == pytest.approx(res["eager"]["seconds"] / res["optimized"]["seconds"])
    assert res["pcc"] > 0.98


def test_batchnorm_folding_is_exact_and_leaves_the_model_alone():
    import torch

    from apt_stream.model import create_model
    from apt_stream.model.inference import fold_batchnorm

    torch.manual_seed(0)
    model = create_model("cpu")
    # Non-trivial running statistics, as after training.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    model.eval()
    x = torch.randn(2, 1, 32, 32, 32)
    folded = fold_batchnorm(model)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert torch.allclose(ref, out, atol=1e-4, rtol=1e-4)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())
    n_bn_left = sum(isinstance(m, torch.nn.BatchNorm3d) for m in folded.modules())
    assert n_bn_left < n_bn  # folded ones are gone from the copy...
    assert sum(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules()) == n_bn  # ...not the original


def test_shipped_end_to_end_benchmark_reports_a_same_run_ratio():
    from apt_stream.benchmarks.benchmark_inference import end_to_end

    res = end_to_end(repeats=1, shape_zyx=(16, 32, 32), n_angles=9)
    assert res["apt_seconds"]["median"] > 0 and res["sart_seconds"]["median"] > 0
    ratio = res["apt_seconds"]["median"] / res["sart_seconds"]["median"]
    assert res["apt_over_sart"]["median"] == pytest.approx(ratio)
    assert res["inputs"][0] == "approximant" and len(res["model_sha256"]) == 64
