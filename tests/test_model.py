"""APT network: presets, validation, shapes, gradients, attention, checkpoints."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import torch

from apt_stream.errors import ConfigError, InputError, ModelError
from apt_stream.model import (
    APTNet,
    AxialAttention,
    NetworkConfig,
    count_parameters,
    create_model,
    list_presets,
    load_checkpoint,
    model_info,
    model_info_table,
    read_metadata,
    register_preset,
    save_checkpoint,
    sha256_file,
)
from apt_stream.model.presets import get_network_preset

torch.set_num_threads(1)

# A paper-architecture network with every width divided by 16: same layout, fast on CPU.
NARROW_PAPER = dict(
    stem_width=4, stage_widths=(8, 16, 32), attn_width=16, attn_out=32, decoder_widths=(16, 8, 4)
)


def tiny_model(**kw) -> APTNet:
    torch.manual_seed(0)
    opts = dict(
        stem_width=4, stage_widths=(8, 16, 32), attn_width=16, attn_out=32, attn_heads=4,
        decoder_widths=(16, 8, 4), input_zyx=(16, 16, 16),
    )
    return create_model("cpu", **{**opts, **kw})


# --- presets -----------------------------------------------------------------------------------


def test_presets_registered_and_cpu_is_default():
    assert {"paper", "cpu"} <= set(list_presets())
    assert create_model().config == get_network_preset("cpu").config()


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="paper"):
        create_model("resnet9000")


def test_register_preset_validates_and_refuses_duplicates():
    with pytest.raises(ConfigError, match="already registered"):
        register_preset("cpu", stem_width=4)
    with pytest.raises(ConfigError, match="attn_width"):
        register_preset("broken-test-preset", attn_width=30, attn_heads=4)
    assert "broken-test-preset" not in list_presets()


def test_paper_preset_parameter_count_matches_reference():
    # The authors' Keras network has ~59.4 M weights (computed in docs/network.md); we match
    # its layout exactly, so only norm parameters and the head bias differ.
    with torch.device("meta"):
        model = create_model("paper")
    n = count_parameters(model)
    assert 59.0e6 < n < 60.0e6
    assert n == 59_494_257


def test_paper_preset_shapes_from_model_info():
    rows, total = model_info("paper")
    shapes = {name: shape for name, shape, _ in rows}
    assert shapes["stem"] == (1, 32, 140, 64, 64)  # stride 2 along depth only
    assert shapes["stage3"] == (1, 512, 35, 16, 16)
    assert shapes["attention1"] == (1, 2048, 35, 16, 16)
    assert shapes["head"] == (1, 1, 280, 128, 128)  # 64x64x280 -> 128x128x280
    assert sum(p for _, _, p in rows) == total


def test_cpu_preset_is_small_and_keeps_lateral_size():
    rows, total = model_info("cpu")
    assert 100_000 < total < 500_000
    assert dict((n, s) for n, s, _ in rows)["head"] == (1, 1, 32, 32, 32)


def test_model_info_table_renders():
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(model_info_table("cpu"))
    text = console.export_text()
    assert "attention1" in text and "total" in text


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"attn_width": 30, "attn_heads": 4}, "attn_width"),
        ({"attn_width": 12, "attn_heads": 4}, "even"),
        ({"stage_blocks": (1, 1)}, "same length"),
        ({"stage_widths": (16, 30, 64)}, "bottleneck_ratio"),
        ({"stem_kernel": 4}, "odd"),
        ({"upsample_xy": 3}, "upsample_xy"),
        ({"norm": "layer"}, "norm"),
        ({"attn_order": "xxz"}, "attn_order"),
        ({"input_zyx": (30, 32, 32)}, "multiple of 8"),
        ({"stem_width": 0}, "positive"),
        ({"nonsense": 1}, "unknown network option"),
    ],
)
def test_bad_hyperparameters_raise_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        create_model("cpu", **overrides)


def test_config_round_trips_through_json():
    cfg = get_network_preset("paper").config()
    again = NetworkConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 1, 12, 16, 16), "Z=12 is not a multiple of 8"),
        ((1, 1, 16, 16, 18), "X=18 is not a multiple of 4"),
        ((1, 2, 16, 16, 16), r"expects \(B, 1, Z, Y, X\)"),
        ((1, 16, 16, 16), r"expects \(B, 1, Z, Y, X\)"),
    ],
)
def test_bad_input_shape_raises_input_error(shape, message):
    model = tiny_model()
    with pytest.raises(InputError, match=message):
        model(torch.zeros(shape))


# --- forward / backward over every preset ---------------------------------------------------------


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_forward_backward_all_parameters_get_gradients(name):
    torch.manual_seed(0)
    model = create_model(name)
    z, y, x = (32, 16, 16)  # small input; the paper network accepts it (multiples 8, 4, 4)
    inp = torch.randn(2, 1, z, y, x)
    out = model(inp)
    u = model.config.upsample_xy
    assert out.shape == (2, 1, z, y * u, x * u)
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} got an all-zero gradient"


def test_narrow_paper_variant_trains_on_nominal_depth():
    # Full paper layout (3/4/6 blocks, x2 upsampling) at nominal depth 280, narrow widths.
    torch.manual_seed(0)
    model = create_model("paper", **NARROW_PAPER)
    out = model(torch.randn(1, 1, 280, 8, 8))
    assert out.shape == (1, 1, 280, 16, 16)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_group_norm_variant_runs_and_has_no_batch_norm():
    model = tiny_model(norm="group")
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    out = model(torch.randn(1, 1, 16, 16, 16))
    assert torch.isfinite(out).all()


def test_longer_lines_than_span_reuse_clipped_positions():
    model = tiny_model().eval()  # spans (2, 4, 4) at the bottleneck
    with torch.no_grad():
        out = model(torch.randn(1, 1, 32, 24, 16))
    assert out.shape == (1, 1, 32, 24, 16)


# --- attention -------------------------------------------------------------------------------


def test_attention_maps_per_axis_for_a_voxel():
    model = tiny_model().eval()
    inp = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        plain = model(inp)
        out, maps = model(inp, return_attention=True)
    torch.testing.assert_close(out, plain)
    # Bottleneck of a 16^3 input: (16/8, 16/4, 16/4) = (2, 4, 4); 4 heads.
    assert maps["x"].shape == (2, 4, 2, 4, 4, 4)
    assert maps["y"].shape == (2, 4, 2, 4, 4, 4)
    assert maps["z"].shape == (2, 4, 2, 4, 4, 2)
    for m in maps.values():
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]))
    zb, yb, xb = model.bottleneck_index((9, 5, 14))
    assert (zb, yb, xb) == (1, 1, 3)
    weights = maps["z"][0, 1, zb, yb, xb]  # head 1's weights over the 2 depth positions
    assert weights.shape == (2,)
    # Storing is switched off again afterwards.
    assert all(m.last_attention is None for m in model.attention[-1].attn.values())


def test_attention_content_term_uses_queries_and_keys():
    # With all relative embeddings zero, the reference code's content term (built from the
    # positional terms) would vanish and every softmax would be uniform; the q·k term keeps
    # the attention input-dependent.
    torch.manual_seed(0)
    attn = AxialAttention(16, axis="x", heads=2, span=8).eval()
    with torch.no_grad():
        attn.relative.zero_()
    attn.keep_attention = True
    with torch.no_grad():
        attn(torch.randn(1, 16, 1, 1, 8))
    maps = attn.last_attention
    assert maps.shape == (1, 2, 1, 1, 8, 8)
    assert (maps - 1 / 8).abs().max() > 1e-3


def test_attention_norms_are_over_channels():
    attn = AxialAttention(16, axis="y", heads=2, span=8)
    assert attn.qkv_norm.num_features == 32  # 2 * width channels, not a spatial length
    assert attn.logit_norm.num_features == 6  # (qk, qr, kr) x heads
    assert attn.out_norm.num_features == 32


def test_attention_relative_positions_break_ties_between_equal_voxels():
    # Identical voxels along a line: content alone cannot prefer any key, so only the learned
    # relative positions make the attention non-uniform.
    torch.manual_seed(1)
    attn = AxialAttention(8, axis="z", heads=2, span=6).eval()
    attn.keep_attention = True
    line = torch.randn(1, 8, 1, 1, 1).expand(1, 8, 6, 1, 1).contiguous()
    with torch.no_grad():
        attn(line)
        assert (attn.last_attention - 1 / 6).abs().max() > 1e-3
        attn.relative.zero_()
        attn(line)
    torch.testing.assert_close(attn.last_attention, torch.full_like(attn.last_attention, 1 / 6))


def test_attention_bad_config():
    with pytest.raises(ConfigError, match="multiple of heads"):
        AxialAttention(10, axis="x", heads=4, span=4)
    with pytest.raises(ConfigError, match="axis"):
        AxialAttention(8, axis="t", heads=2, span=4)


# --- checkpoints -----------------------------------------------------------------------------


def test_checkpoint_round_trip_keeps_outputs_config_and_provenance(tmp_path):
    model = tiny_model().eval()
    model.io_config["output_affine"] = [2.0, 0.5]
    path = save_checkpoint(
        tmp_path / "net", model, config={"patch_xy": [16, 16]},
        provenance={"data_seeds": [1, 2, 3], "metrics": {"val_pcc": 0.9}},
    )
    assert path.name == "net.safetensors"
    side = json.loads((tmp_path / "net.json").read_text())
    assert side["sha256"] == sha256_file(path)
    loaded, meta = load_checkpoint(path)
    assert meta["preset"] == "cpu"
    assert meta["overrides"]["stem_width"] == 4
    assert meta["provenance"]["data_seeds"] == [1, 2, 3]
    assert meta["provenance"]["code_version"]
    assert meta["config"] == {"patch_xy": [16, 16]}
    assert loaded.io_config["output_affine"] == [2.0, 0.5]
    assert loaded.config == model.config
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    # Loading through the sidecar works too, and a lone weights file carries its metadata.
    load_checkpoint(tmp_path / "net.json")
    (tmp_path / "net.json").unlink()
    assert read_metadata(path)["network"] == model.config.to_dict()
    load_checkpoint(path)


def test_checkpoint_checksum_mismatch_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "net.safetensors", tiny_model())
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # flip bits of the last weight byte
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="checksum mismatch"):
        load_checkpoint(path)


def test_checkpoint_with_wrong_shapes_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "net.safetensors", tiny_model())
    meta = json.loads((tmp_path / "net.json").read_text())
    meta["network"]["stem_width"] = 8
    (tmp_path / "net.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="do not match"):
        load_checkpoint(path)


def test_missing_checkpoint_raises_model_error(tmp_path):
    with pytest.raises(ModelError, match="do not exist"):
        load_checkpoint(tmp_path / "nothing.safetensors")


def test_plain_tensor_pt_file_loads_with_weights_only(tmp_path):
    model = tiny_model().eval()
    save_checkpoint(tmp_path / "ref.safetensors", model)
    meta = read_metadata(tmp_path / "ref.safetensors")
    torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp_path / "net.pt")
    loaded, _ = load_checkpoint(tmp_path / "net.pt")
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    # Build the pickle in a child process so this test process never holds the payload class.
    code = (
        "import pathlib, torch\n"
        "class Evil:\n"
        "    def __reduce__(self):\n"
        f"        return (pathlib.Path.touch, (pathlib.Path({str(marker)!r}),))\n"
        f"torch.save({{'state_dict': Evil()}}, {str(evil)!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert evil.exists() and not marker.exists()
    with pytest.raises(ModelError, match="refusing to load"):
        load_checkpoint(evil)
    assert not marker.exists()
    # Unpickling it without weights_only would run the payload: the test is meaningful.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_model_package_imports_no_services():
    code = (
        "import sys, apt_stream.model\n"
        "bad = [m for m in ('prefect', 'tiled', 'zmq', 'bluesky') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).parent)


# --- input skip (full-resolution skip and global residual) -------------------------------------


def test_input_skip_passes_a_channel_straight_through_when_the_network_is_silenced():
    # With the head zeroed and the residual set to pick channel 1, the output IS that channel:
    # the data-consistent input reaches the output at full resolution, untouched.
    torch.manual_seed(0)
    model = tiny_model(in_channels=2, input_skip=True).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.input_residual.weight.copy_(torch.tensor([0.0, 1.0]).view(1, 2, 1, 1, 1))
        inp = torch.randn(1, 2, 16, 16, 16)
        out = model(inp)
    torch.testing.assert_close(out[0, 0], inp[0, 1])


def test_input_residual_starts_at_zero_and_input_skip_needs_matching_grids():
    plain = tiny_model(in_channels=2)
    skip = tiny_model(in_channels=2, input_skip=True)
    assert skip.input_residual is not None and not skip.input_residual.weight.any()
    assert plain.input_residual is None
    with pytest.raises(ConfigError, match="input_skip needs upsample_xy == 1"):
        tiny_model(input_skip=True, upsample_xy=2)
    with pytest.raises(ConfigError, match="input_skip must be true or false"):
        tiny_model(input_skip="yes")
