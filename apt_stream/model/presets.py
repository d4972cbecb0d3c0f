"""Named network presets (timm style) and a per-layer summary for ``apt-stream model info``.

``create_model("paper")`` builds the paper's network; ``create_model("cpu", attn_heads=2)``
builds a preset with overrides. :func:`register_preset` adds new ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from apt_stream.errors import ConfigError, InputError
from apt_stream.model.network import APTNet, NetworkConfig


@dataclass(frozen=True)
class NetworkPreset:
    """A registered preset: its name, a one-line description and the network options."""

    name: str
    description: str
    options: dict[str, Any]

    def config(self, **overrides: Any) -> NetworkConfig:
        return NetworkConfig.from_dict({**self.options, **overrides})


_PRESETS: dict[str, NetworkPreset] = {}

#: The preset used when none is named.
DEFAULT_PRESET = "cpu"


def register_preset(name: str, *, description: str = "", **options: Any) -> NetworkPreset:
    """Register network options under ``name`` (validated now, so a bad preset fails early).

    Raises
    ------
    ConfigError
        If the name is taken or the options are invalid.
    """
    if name in _PRESETS:
        raise ConfigError(f"network preset {name!r} is already registered")
    NetworkConfig.from_dict(options)
    preset = NetworkPreset(name=name, description=description, options=dict(options))
    _PRESETS[name] = preset
    return preset


def list_presets() -> list[str]:
    """Names of the registered network presets, sorted."""
    return sorted(_PRESETS)


def get_network_preset(name: str) -> NetworkPreset:
    """The preset called ``name``; ConfigError listing the valid names otherwise."""
    try:
        return _PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown network preset {name!r}; choose one of {list_presets()}"
        ) from None


def create_model(name: str = DEFAULT_PRESET, **overrides: Any) -> APTNet:
    """Build the network of preset ``name`` with ``overrides`` of :class:`NetworkConfig` fields.

    The model remembers its preset in ``model.preset_name`` and ``model.preset_overrides``
    (checkpoints store both).
    """
    preset = get_network_preset(name)
    model = APTNet(preset.config(**overrides))
    model.preset_name = name
    model.preset_overrides = dict(overrides)
    return model


register_preset(
    "paper",
    description=(
        "Kang et al.'s network: 64x64x280 (XxYxZ) -> 128x128x280, stages 3/4/6 of 3³ bottlenecks "
        "(128/256/512 ch), one 8-head axial-attention block 1024->2048 ch, decoder 256/128/64, "
        "x2 lateral upsampling; ~59 M parameters"
    ),
    stem_width=32, stem_kernel=7, stem_stride_z=2,
    stage_blocks=(3, 4, 6), stage_widths=(128, 256, 512), bottleneck_ratio=4,
    block_kernels=(3, 3, 3), shortcut_kernel=3,
    attn_blocks=1, attn_heads=8, attn_width=1024, attn_out=2048,
    decoder_widths=(256, 128, 64), upsample_xy=2, input_zyx=(280, 64, 64),
)

register_preset(
    "cpu",
    description=(
        "Same architecture, narrow and shallow: stages 1/1/1 (16/32/64 ch), 4-head attention "
        "32->64 ch, decoder 32/16/8, no lateral upsampling; 32³ patches; trains on 2 CPU cores"
    ),
    stem_width=8, stem_kernel=7, stem_stride_z=2,
    stage_blocks=(1, 1, 1), stage_widths=(16, 32, 64), bottleneck_ratio=4,
    block_kernels=(3, 3, 3), shortcut_kernel=3,
    attn_blocks=1, attn_heads=4, attn_width=32, attn_out=64,
    decoder_widths=(32, 16, 8), upsample_xy=1, input_zyx=(32, 32, 32),
)


register_preset(
    "cpu-wide",
    description=(
        "The cpu preset at 1.5x width (stages 24/48/96 ch, attention 48->96 ch, decoder 48/24/12) "
        "with the input fed to the last decoder block at full resolution and a learned linear "
        "residual of the input channels; 32³ patches; trains on 2 CPU cores"
    ),
    stem_width=12, stem_kernel=7, stem_stride_z=2,
    stage_blocks=(1, 1, 1), stage_widths=(24, 48, 96), bottleneck_ratio=4,
    block_kernels=(3, 3, 3), shortcut_kernel=3,
    attn_blocks=1, attn_heads=4, attn_width=48, attn_out=96,
    decoder_widths=(48, 24, 12), upsample_xy=1, input_skip=True, input_zyx=(32, 32, 32),
)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _summary_modules(model: APTNet) -> list[tuple[str, nn.Module]]:
    rows: list[tuple[str, nn.Module]] = [("stem", model.stem)]
    rows += [(f"stage{i + 1}", m) for i, m in enumerate(model.stages)]
    rows += [(f"attention{i + 1}", m) for i, m in enumerate(model.attention)]
    rows += [(f"decoder{i + 1}", m) for i, m in enumerate(model.decoder)]
    rows.append(("head", model.head))
    return rows


def model_info(
    name: str = DEFAULT_PRESET,
    *,
    input_zyx: Sequence[int] | None = None,
    batch: int = 1,
    **overrides: Any,
) -> tuple[list[tuple[str, tuple[int, ...], int]], int]:
    """Per-layer summary of a preset: rows ``(layer, output shape, params)`` and the total.

    Shapes come from a forward pass on PyTorch's ``meta`` device, so even the ``paper`` preset
    is summarised instantly without allocating its weights.

    Parameters
    ----------
    name : str
        Preset name.
    input_zyx : (Z, Y, X), optional
        Input volume size; default the preset's nominal ``input_zyx``.
    batch : int
        Batch size shown in the shapes.
    **overrides
        Network option overrides.
    """
    with torch.device("meta"):
        model = create_model(name, **overrides)
    zyx = tuple(int(v) for v in (input_zyx or model.config.input_zyx))
    if len(zyx) != 3:
        raise InputError(f"input_zyx must be (Z, Y, X), got {input_zyx}")
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    modules = _summary_modules(model)
    for label, module in modules:
        def hook(_m, _inp, out, label=label):
            shapes[label] = tuple(out.shape)
        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.empty((batch, model.config.in_channels, *zyx), device="meta"))
    finally:
        for h in hooks:
            h.remove()
    rows = [(label, shapes[label], count_parameters(m)) for label, m in modules]
    return rows, count_parameters(model)


def model_info_table(name: str = DEFAULT_PRESET, **kwargs: Any):
    """:func:`model_info` as a ``rich.table.Table`` (layer, output shape, parameters)."""
    from rich.table import Table

    rows, total = model_info(name, **kwargs)
    preset = get_network_preset(name)
    table = Table(title=f"APT network preset {name!r}", caption=preset.description)
    table.add_column("layer")
    table.add_column("output (B, C, Z, Y, X)")
    table.add_column("parameters", justify="right")
    for label, shape, params in rows:
        table.add_row(label, str(shape), f"{params:,}")
    table.add_section()
    table.add_row("total", "", f"{total:,}")
    return table
