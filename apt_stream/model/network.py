"""The APT network: a 3D U-Net (ResNet-50-like encoder) with an axial-attention bottleneck.

Layout, for ``n`` encoder stages (paper: 3)::

    input (B, 1, Z, Y, X)
    stem        7³ conv (stride sz in z only) + 3³ max-pool (stride 1)     (Z/sz, Y, X)
    stage 1     bottleneck blocks, stride 1                                same
    stage i>1   bottleneck blocks, first one strides 2 in z, y, x          /2 per stage
    attention   axial-attention block(s) along x, y, z                     bottleneck
    decoder i   conv, upsample x2, + conv(skip from stage n-i)             back up
    decoder n   conv, upsample (sz, u, u) (no skip)                        (Z, uY, uX)
    head        3³ conv -> out_channels (linear output)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from apt_stream.errors import ConfigError, InputError
from apt_stream.model.attention import AxialAttentionBlock
from apt_stream.model.blocks import NORM_KINDS, DecoderBlock, Stem, conv3d, make_stage

UPSAMPLE_MODES = ("nearest", "trilinear")


@dataclass(frozen=True)
class NetworkConfig:
    """Hyperparameters of :class:`APTNet` (all JSON-serialisable; see :meth:`to_dict`).

    Attributes
    ----------
    in_channels, out_channels : int
        Channels of input and output volumes (1 and 1 for APT).
    stem_width, stem_kernel, stem_stride_z : int
        Stem conv width, kernel edge and its stride along depth (lateral stride is 1).
    stage_blocks : tuple of int
        Residual blocks per encoder stage (ResNet-50: 3, 4, 6, 3; APT uses the first three).
    stage_widths : tuple of int
        Output channels per stage; the inner (bottleneck) width is ``width / bottleneck_ratio``.
    bottleneck_ratio : int
        Expansion of the bottleneck blocks (ResNet: 4).
    block_kernels : tuple of 3 int
        Kernel edges of the three convs of a bottleneck (ResNet: 1, 3, 1; APT: 3, 3, 3).
    shortcut_kernel : int
        Kernel edge of the projection shortcut (ResNet: 1; APT: 3).
    attn_blocks : int
        Number of axial-attention blocks at the bottleneck (0 disables attention).
    attn_heads, attn_width, attn_out : int
        Heads, inner channels and output channels of the attention block(s).
    attn_span_zyx : tuple of 3 int or None
        Learned relative-position span per axis; default the bottleneck size of ``input_zyx``.
    attn_order : str
        Order in which the axes are attended.
    decoder_widths : tuple of int
        Channels of the decoder blocks, deepest first; one per encoder stage.
    decoder_kernel : int
        Kernel edge of the decoder convs.
    upsample_xy : int
        Lateral upsampling of the output (1 or 2): output (Z, u*Y, u*X).
    upsample_mode : {"nearest", "trilinear"}
    norm : {"batch", "group"}
    input_skip : bool
        Feed the input itself, at full resolution, to the last decoder block as its skip, and add
        a learned per-channel linear map of the input to the head's output (a global residual).
        Off in the paper's network, whose stem halves the depth before any skip, so the finest
        depth detail has to be re-invented by the decoder; on, a data-consistent input channel
        (SART) passes straight through and the network learns the correction (needs
        ``upsample_xy == 1``).
    input_zyx : tuple of 3 int
        Nominal input patch (Z, Y, X): sizes the attention spans and :func:`model_info`.
    """

    in_channels: int = 1
    out_channels: int = 1
    stem_width: int = 32
    stem_kernel: int = 7
    stem_stride_z: int = 2
    stage_blocks: tuple[int, ...] = (3, 4, 6)
    stage_widths: tuple[int, ...] = (128, 256, 512)
    bottleneck_ratio: int = 4
    block_kernels: tuple[int, int, int] = (3, 3, 3)
    shortcut_kernel: int = 3
    attn_blocks: int = 1
    attn_heads: int = 8
    attn_width: int = 1024
    attn_out: int = 2048
    attn_span_zyx: tuple[int, int, int] | None = None
    attn_order: str = "xyz"
    decoder_widths: tuple[int, ...] = (256, 128, 64)
    decoder_kernel: int = 3
    upsample_xy: int = 2
    upsample_mode: str = "nearest"
    norm: str = "batch"
    input_skip: bool = False
    input_zyx: tuple[int, int, int] = field(default=(280, 64, 64))

    def __post_init__(self) -> None:
        # Lists from JSON become tuples so configs compare and hash equal.
        for name in ("stage_blocks", "stage_widths", "block_kernels", "decoder_widths", "input_zyx"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.attn_span_zyx is not None:
            object.__setattr__(self, "attn_span_zyx", tuple(int(v) for v in self.attn_span_zyx))
        self._validate()

    def _validate(self) -> None:
        def positive(name: str, value: int) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

        for name in (
            "in_channels", "out_channels", "stem_width", "stem_kernel", "stem_stride_z",
            "bottleneck_ratio", "shortcut_kernel", "attn_heads", "attn_width", "attn_out",
            "decoder_kernel", "upsample_xy",
        ):
            positive(name, getattr(self, name))
        n = len(self.stage_blocks)
        if n < 1:
            raise ConfigError("stage_blocks needs at least one stage")
        if len(self.stage_widths) != n or len(self.decoder_widths) != n:
            raise ConfigError(
                f"stage_blocks ({n}), stage_widths ({len(self.stage_widths)}) and decoder_widths "
                f"({len(self.decoder_widths)}) must have the same length"
            )
        for name in ("stage_blocks", "stage_widths", "decoder_widths", "input_zyx"):
            for v in getattr(self, name):
                positive(name, v)
        for w in self.stage_widths:
            if w % self.bottleneck_ratio:
                raise ConfigError(
                    f"stage width {w} is not divisible by bottleneck_ratio {self.bottleneck_ratio}"
                )
        if len(self.block_kernels) != 3:
            raise ConfigError(f"block_kernels needs 3 kernel sizes, got {self.block_kernels}")
        for name, k in [("stem_kernel", self.stem_kernel), ("shortcut_kernel", self.shortcut_kernel),
                        ("decoder_kernel", self.decoder_kernel)] + [
                            ("block_kernels", k) for k in self.block_kernels]:
            if k < 1 or k % 2 == 0:
                raise ConfigError(f"{name} must be odd (for 'same' padding), got {k}")
        if not isinstance(self.attn_blocks, int) or self.attn_blocks < 0:
            raise ConfigError(f"attn_blocks must be an integer >= 0, got {self.attn_blocks!r}")
        if self.attn_width % self.attn_heads or (self.attn_width // self.attn_heads) % 2:
            raise ConfigError(
                f"attn_width {self.attn_width} must be a multiple of attn_heads {self.attn_heads} "
                "with an even number of channels per head"
            )
        if sorted(self.attn_order) != ["x", "y", "z"]:
            raise ConfigError(f"attn_order must be a permutation of 'xyz', got {self.attn_order!r}")
        if self.upsample_xy not in (1, 2, 4):
            raise ConfigError(f"upsample_xy must be 1, 2 or 4, got {self.upsample_xy}")
        if self.upsample_mode not in UPSAMPLE_MODES:
            raise ConfigError(f"upsample_mode must be one of {UPSAMPLE_MODES}, got {self.upsample_mode!r}")
        if not isinstance(self.input_skip, bool):
            raise ConfigError(f"input_skip must be true or false, got {self.input_skip!r}")
        if self.input_skip and self.upsample_xy != 1:
            raise ConfigError("input_skip needs upsample_xy == 1 (the input and output grids must match)")
        if self.norm not in NORM_KINDS:
            raise ConfigError(f"norm must be one of {NORM_KINDS}, got {self.norm!r}")
        if len(self.input_zyx) != 3:
            raise ConfigError(f"input_zyx must be (Z, Y, X), got {self.input_zyx}")
        bad = [
            f"{a}={s} (multiple of {m})"
            for a, s, m in zip("ZYX", self.input_zyx, self.input_multiple_zyx, strict=True)
            if s % m
        ]
        if bad:
            raise ConfigError(f"input_zyx {self.input_zyx} violates the size constraints: {', '.join(bad)}")
        if self.attn_span_zyx is not None:
            if len(self.attn_span_zyx) != 3 or min(self.attn_span_zyx) < 1:
                raise ConfigError(f"attn_span_zyx must be 3 positive ints, got {self.attn_span_zyx}")

    @property
    def n_stages(self) -> int:
        return len(self.stage_blocks)

    @property
    def input_multiple_zyx(self) -> tuple[int, int, int]:
        """Every input size must be a multiple of these (Z, Y, X) (the total downsampling)."""
        lateral = 2 ** (self.n_stages - 1)
        return (self.stem_stride_z * lateral, lateral, lateral)

    @property
    def span_zyx(self) -> tuple[int, int, int]:
        """Attention span per axis: given, or the bottleneck size of the nominal input."""
        if self.attn_span_zyx is not None:
            return self.attn_span_zyx  # type: ignore[return-value]
        return tuple(s // m for s, m in zip(self.input_zyx, self.input_multiple_zyx, strict=True))  # type: ignore[return-value]

    def output_shape_zyx(self, input_zyx: Sequence[int]) -> tuple[int, int, int]:
        z, y, x = (int(v) for v in input_zyx)
        return (z, y * self.upsample_xy, x * self.upsample_xy)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (tuples become lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NetworkConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown network option(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(data))


class APTNet(nn.Module):
    """3D U-Net with a ResNet-50-style encoder and a multi-head axial-attention bottleneck.

    Input and output are ``(B, C, Z, Y, X)`` with ``Z`` the sample depth. The output has shape
    ``(B, out_channels, Z, u*Y, u*X)`` with ``u = upsample_xy``.

    Input-size constraints: ``Z`` must be a multiple of ``stem_stride_z * 2**(n_stages-1)``
    and ``Y``, ``X`` multiples of ``2**(n_stages-1)`` (``paper``: 8 and 4; ``cpu``: 8 and 4);
    see :attr:`NetworkConfig.input_multiple_zyx`. Other sizes raise :class:`InputError`. Any size
    obeying them works: longer bottleneck lines than the attention span reuse the outermost
    learned relative positions.

    Parameters
    ----------
    config : NetworkConfig, optional
        Hyperparameters; keyword arguments override its fields (or build one from defaults).
    **overrides
        Fields of :class:`NetworkConfig`.

    Raises
    ------
    ConfigError
        For invalid hyperparameters, with the reason.
    """

    def __init__(self, config: NetworkConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        base = config.to_dict() if config is not None else {}
        cfg = NetworkConfig.from_dict({**base, **overrides})
        self.config = cfg
        #: How :func:`apt_stream.model.inference.predict_volume` maps data in and out; training
        #: fills ``output_affine`` (truth ≈ a * output + b) and checkpoints store it.
        self.io_config: dict[str, Any] = {"input_norm": "standardize", "output_affine": None}
        #: Set by :func:`apt_stream.model.presets.create_model`; checkpoints record them.
        self.preset_name: str | None = None
        self.preset_overrides: dict[str, Any] = {}

        self.stem = Stem(
            cfg.in_channels, cfg.stem_width, kernel=cfg.stem_kernel, stride_z=cfg.stem_stride_z,
            norm=cfg.norm,
        )
        stages = []
        ch = cfg.stem_width
        for i, (blocks, width) in enumerate(zip(cfg.stage_blocks, cfg.stage_widths, strict=True)):
            stages.append(
                make_stage(
                    ch, width, blocks=blocks, stride=1 if i == 0 else 2,
                    bottleneck_ratio=cfg.bottleneck_ratio, kernels=cfg.block_kernels,
                    shortcut_kernel=cfg.shortcut_kernel, norm=cfg.norm,
                )
            )
            ch = width
        self.stages = nn.ModuleList(stages)

        attn = []
        for _ in range(cfg.attn_blocks):
            attn.append(
                AxialAttentionBlock(
                    ch, cfg.attn_out, width=cfg.attn_width, heads=cfg.attn_heads,
                    span_zyx=cfg.span_zyx, order=cfg.attn_order, norm=cfg.norm,
                )
            )
            ch = cfg.attn_out
        self.attention = nn.ModuleList(attn)

        decoders = []
        n = cfg.n_stages
        for i, width in enumerate(cfg.decoder_widths):
            last = i == n - 1
            decoders.append(
                DecoderBlock(
                    ch, width,
                    skip_ch=(cfg.in_channels if cfg.input_skip else None) if last else cfg.stage_widths[n - 2 - i],
                    scale_zyx=(cfg.stem_stride_z, cfg.upsample_xy, cfg.upsample_xy) if last else (2, 2, 2),
                    kernel=cfg.decoder_kernel, mode=cfg.upsample_mode, norm=cfg.norm,
                )
            )
            ch = width
        self.decoder = nn.ModuleList(decoders)
        self.head = conv3d(ch, cfg.out_channels, cfg.decoder_kernel, bias=True)
        # 1x1x1, no bias, zero at start: training decides how much of each input passes through.
        self.input_residual = (
            nn.Conv3d(cfg.in_channels, cfg.out_channels, 1, bias=False) if cfg.input_skip else None
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv3d) and m.kernel_size != (1, 1, 1):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.head.bias)
        if self.input_residual is not None:
            nn.init.zeros_(self.input_residual.weight)

    @property
    def upsample_xy(self) -> int:
        return self.config.upsample_xy

    @property
    def input_multiple_zyx(self) -> tuple[int, int, int]:
        return self.config.input_multiple_zyx

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`InputError` naming the shape if ``x`` breaks the size constraints."""
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise InputError(
                f"APTNet expects (B, {self.config.in_channels}, Z, Y, X), got {tuple(x.shape)}"
            )
        bad = [
            f"{a}={s} is not a multiple of {m}"
            for a, s, m in zip("ZYX", x.shape[2:], self.input_multiple_zyx, strict=True)
            if s % m
        ]
        if bad:
            raise InputError(f"input shape {tuple(x.shape)}: {'; '.join(bad)}")

    def forward(
        self, x: torch.Tensor, *, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruct a batch of volumes.

        Parameters
        ----------
        x : Tensor (B, C, Z, Y, X)
        return_attention : bool
            Also return the softmax maps of the last attention block, per axis, as a dict
            ``{"x"|"y"|"z": (B, heads, Zb, Yb, Xb, L)}`` at bottleneck resolution: entry
            ``[b, h, z, y, x, :]`` holds the weights that voxel gives to the ``L`` voxels of its
            line along that axis (rows sum to 1). :meth:`bottleneck_index` maps input voxels.
        """
        self.check_input(x)
        if return_attention and not self.attention:
            raise ConfigError("this network has no attention block (attn_blocks=0)")
        if return_attention:
            self.attention[-1].keep_attention(True)
        try:
            out = self._forward(x)
            maps = self.attention[-1].attention_maps() if return_attention else None
        finally:
            if return_attention:
                self.attention[-1].keep_attention(False)
        return (out, maps) if return_attention else out

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        h = self.stem(x)
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        for block in self.attention:
            h = block(h)
        n = len(self.decoder)
        for i, dec in enumerate(self.decoder):
            if i < n - 1:
                h = dec(h, feats[n - 2 - i])
            else:
                h = dec(h, x if self.config.input_skip else None)
        out = self.head(h)
        if self.input_residual is not None:
            out = out + self.input_residual(x)
        return out

    def bottleneck_index(self, zyx: Sequence[int]) -> tuple[int, int, int]:
        """Bottleneck voxel (attention-map index) that covers input voxel ``(z, y, x)``."""
        return tuple(int(v) // m for v, m in zip(zyx, self.input_multiple_zyx, strict=True))  # type: ignore[return-value]
