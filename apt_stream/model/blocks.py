"""Convolutional building blocks of the APT network: norms, stem, bottlenecks, decoder blocks.

Every block takes and returns ``(B, C, Z, Y, X)`` tensors. Normalisation is always over the
channel dimension (BatchNorm, or GroupNorm with groups of channels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from apt_stream.errors import ConfigError

NormKind = Literal["batch", "group"]
NORM_KINDS: tuple[str, ...] = ("batch", "group")

#: Channels per GroupNorm group aimed for when ``norm="group"``.
_GROUP_NORM_MAX_GROUPS = 8


def make_norm(kind: str, channels: int, *, dims: int = 3, groups: int | None = None) -> nn.Module:
    """A normalisation layer over the channel axis of a ``dims``-D feature map.

    Parameters
    ----------
    kind : {"batch", "group"}
        BatchNorm (statistics over batch and space, per channel) or GroupNorm (per sample, over
        groups of channels and space).
    channels : int
        Size of the channel axis (axis 1).
    dims : {1, 2, 3}
        Spatial dimensionality of the input (BatchNorm1d/2d/3d).
    groups : int, optional
        GroupNorm groups; default the largest divisor of ``channels`` up to 8.
    """
    if kind == "batch":
        cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}.get(dims)
        if cls is None:
            raise ConfigError(f"norm dims must be 1, 2 or 3, got {dims}")
        return cls(channels)
    if kind == "group":
        g = groups if groups is not None else math.gcd(channels, _GROUP_NORM_MAX_GROUPS)
        if channels % g:
            raise ConfigError(f"GroupNorm groups {g} must divide channels {channels}")
        return nn.GroupNorm(g, channels)
    raise ConfigError(f"norm must be one of {NORM_KINDS}, got {kind!r}")


def conv3d(
    in_ch: int,
    out_ch: int,
    kernel: int,
    *,
    stride: int | Sequence[int] = 1,
    bias: bool = False,
) -> nn.Conv3d:
    """A 3D convolution with 'same' padding for odd ``kernel`` (output = ceil(input / stride))."""
    return nn.Conv3d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=bias)


class ConvNormAct(nn.Sequential):
    """conv3d -> norm -> optional ReLU."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        *,
        stride: int | Sequence[int] = 1,
        norm: str = "batch",
        act: bool = True,
    ) -> None:
        layers: list[nn.Module] = [conv3d(in_ch, out_ch, kernel, stride=stride), make_norm(norm, out_ch)]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class Stem(nn.Module):
    """ResNet-style stem: a large conv (stride in depth only by default) and a 3³ max-pool.

    The pool keeps the resolution (stride 1) as in the authors' network: the lateral patch is
    already small (64²), so the stem only halves the depth (280 -> 140).
    """

    def __init__(
        self, in_ch: int, width: int, *, kernel: int = 7, stride_z: int = 2, norm: str = "batch"
    ) -> None:
        super().__init__()
        self.conv = ConvNormAct(in_ch, width, kernel, stride=(stride_z, 1, 1), norm=norm)
        self.pool = nn.MaxPool3d(3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(x))


class Bottleneck(nn.Module):
    """3D bottleneck residual block: reduce -> conv -> expand, plus a (projected) shortcut.

    ``kernels`` gives the three conv kernel sizes. ResNet-50 uses ``(1, 3, 1)``; the authors'
    APT network uses ``(3, 3, 3)`` with a 3³ projection shortcut, which is what the ``paper``
    preset reproduces (and where most of its ~59 M parameters live).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        mid_ch: int,
        stride: int = 1,
        kernels: Sequence[int] = (3, 3, 3),
        shortcut_kernel: int = 3,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        k1, k2, k3 = kernels
        # The stride sits on the first conv (as the authors' block does), not the middle one.
        self.conv1 = ConvNormAct(in_ch, mid_ch, k1, stride=stride, norm=norm)
        self.conv2 = ConvNormAct(mid_ch, mid_ch, k2, norm=norm)
        self.conv3 = ConvNormAct(mid_ch, out_ch, k3, norm=norm, act=False)
        if stride != 1 or in_ch != out_ch:
            self.shortcut: nn.Module = ConvNormAct(
                in_ch, out_ch, shortcut_kernel, stride=stride, norm=norm, act=False
            )
        else:
            self.shortcut = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.conv2(self.conv1(x)))
        return self.act(out + self.shortcut(x))


def make_stage(
    in_ch: int,
    out_ch: int,
    *,
    blocks: int,
    stride: int,
    bottleneck_ratio: int,
    kernels: Sequence[int],
    shortcut_kernel: int,
    norm: str,
) -> nn.Sequential:
    """``blocks`` bottlenecks; the first changes width and (optionally) strides by 2 in z, y, x."""
    mid = out_ch // bottleneck_ratio
    layers = [
        Bottleneck(
            in_ch if i == 0 else out_ch,
            out_ch,
            mid_ch=mid,
            stride=stride if i == 0 else 1,
            kernels=kernels,
            shortcut_kernel=shortcut_kernel,
            norm=norm,
        )
        for i in range(blocks)
    ]
    return nn.Sequential(*layers)


class DecoderBlock(nn.Module):
    """conv -> norm -> ReLU -> upsample, then add a conv-processed encoder skip (if any).

    Skips are *added* (not concatenated), as in the authors' network, so the skip branch maps the
    encoder feature to the decoder width with its own conv.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        skip_ch: int | None,
        scale_zyx: tuple[int, int, int],
        kernel: int = 3,
        mode: str = "nearest",
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.conv = ConvNormAct(in_ch, out_ch, kernel, norm=norm)
        self.skip = ConvNormAct(skip_ch, out_ch, kernel, norm=norm) if skip_ch else None
        self.scale_zyx = tuple(int(s) for s in scale_zyx)
        self.mode = mode

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.conv(x)
        if self.scale_zyx != (1, 1, 1):
            align = False if self.mode == "trilinear" else None
            x = F.interpolate(
                x, scale_factor=[float(s) for s in self.scale_zyx], mode=self.mode, align_corners=align
            )
        if self.skip is not None:
            if skip is None:
                raise ConfigError("this decoder block was built with a skip connection; pass one")
            x = x + self.skip(skip)
        return x
