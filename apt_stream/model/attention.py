"""Multi-head axial self-attention with learned relative positions (Axial-DeepLab style).

One :class:`AxialAttention` attends along a single axis (z, y or x) of a ``(B, C, Z, Y, X)``
feature map: every line of voxels along that axis is an independent sequence. For a query at
position ``o`` and a key at ``p`` of the same line, head ``h`` computes (Wang et al. 2020, Eq. 4)::

    logit(o, p) = q_o · k_p  +  q_o · r^q_{p-o}  +  k_p · r^k_{p-o}
    y_o         = Σ_p softmax_p(logit(o, p)) (v_p + r^v_{p-o})

with ``q, k, v`` from a 1×1×1 conv of the input, and ``r^q, r^k, r^v`` learned per relative
offset ``p − o``. The three logit terms and the two output terms are each normalised over their
channels (BatchNorm or GroupNorm) before they are summed, which replaces the usual 1/√d scaling.

Note on the authors' reference code: it builds the content term from the two positional terms
(``qk = (q·r^q)·(k·r^k)``) and its BatchNorms normalise over a spatial axis instead of channels.
This module computes ``q·k`` from the actual queries and keys and normalises over channels.

Relative offsets are learned for ``|p − o| <= span − 1``; longer lines reuse the outermost
offsets (clipped relative positions, Shaw et al. 2018), so the module accepts any length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from apt_stream.errors import ConfigError
from apt_stream.model.blocks import make_norm

#: Tensor axis of each spatial axis in a (B, C, Z, Y, X) feature map.
AXIS_DIM = {"z": 2, "y": 3, "x": 4}


class AxialAttention(nn.Module):
    """Multi-head self-attention along one spatial axis, ``width`` channels in and out.

    Parameters
    ----------
    width : int
        Channels of input and output; must be divisible by ``heads``, and ``width / heads``
        must be even (queries and keys get half the per-head channels, values all of them).
    axis : {"z", "y", "x"}
        The axis the attention runs along.
    heads : int
        Number of attention heads.
    span : int
        Longest line length with a distinct learned relative position (offsets up to
        ``span − 1``); the bottleneck size along ``axis`` for the network's nominal input.
    norm : {"batch", "group"}
        Channel normalisation of the q/k/v projection, the logit terms and the output terms.

    Attributes
    ----------
    keep_attention : bool
        When True, :meth:`forward` stores the softmax weights in :attr:`last_attention` as a
        ``(B, heads, Z, Y, X, L)`` tensor: the weights a query voxel gives to the ``L`` voxels of
        its line (detached).
    """

    def __init__(self, width: int, *, axis: str, heads: int, span: int, norm: str = "batch") -> None:
        super().__init__()
        if axis not in AXIS_DIM:
            raise ConfigError(f"attention axis must be one of {sorted(AXIS_DIM)}, got {axis!r}")
        if heads < 1 or width < 1 or width % heads:
            raise ConfigError(f"attention width {width} must be a positive multiple of heads {heads}")
        head_ch = width // heads
        if head_ch % 2:
            raise ConfigError(
                f"channels per head (width/heads = {head_ch}) must be even: q and k get half each"
            )
        if span < 1:
            raise ConfigError(f"attention span must be >= 1, got {span}")
        self.width, self.axis, self.heads, self.span = width, axis, heads, span
        self.head_ch = head_ch
        self.qkv = nn.Conv3d(width, 2 * width, 1, bias=False)
        self.qkv_norm = make_norm(norm, 2 * width, dims=3)
        # One norm channel per (term, head): the q·k, q·r and k·r logits are scaled separately.
        self.logit_norm = make_norm(norm, 3 * heads, dims=2, groups=3 * heads)
        self.out_norm = make_norm(norm, 2 * width, dims=1)
        # Rows: r^q (head_ch/2), r^k (head_ch/2), r^v (head_ch); columns: offsets -(span-1)..span-1.
        self.relative = nn.Parameter(torch.randn(2 * head_ch, 2 * span - 1) * head_ch**-0.5)
        nn.init.normal_(self.qkv.weight, std=width**-0.5)
        self.keep_attention = False
        self.last_attention: torch.Tensor | None = None

    def _relative(self, length: int) -> torch.Tensor:
        pos = torch.arange(length, device=self.relative.device)
        offset = (pos[None, :] - pos[:, None]).clamp(-(self.span - 1), self.span - 1)
        return self.relative[:, offset + self.span - 1]  # (2*head_ch, L_query, L_key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = AXIS_DIM[self.axis]
        b = x.shape[0]
        qkv = self.qkv_norm(self.qkv(x))
        # (B, 2C, Z, Y, X) -> (B, o1, o2, 2C, L): every line along `dim` becomes one sequence.
        others = [d for d in (2, 3, 4) if d != dim]
        qkv = qkv.permute(0, *others, 1, dim)
        o1, o2, length = qkv.shape[1], qkv.shape[2], qkv.shape[-1]
        n = b * o1 * o2
        qkv = qkv.reshape(n, self.heads, 2 * self.head_ch, length)
        half = self.head_ch // 2
        q, k, v = torch.split(qkv, [half, half, self.head_ch], dim=2)
        rq, rk, rv = torch.split(self._relative(length), [half, half, self.head_ch], dim=0)

        qk = torch.einsum("nhci,nhcj->nhij", q, k)
        qr = torch.einsum("nhci,cij->nhij", q, rq)
        kr = torch.einsum("nhcj,cij->nhij", k, rk)
        logits = self.logit_norm(torch.cat([qk, qr, kr], dim=1))
        logits = logits.view(n, 3, self.heads, length, length).sum(dim=1)
        attn = torch.softmax(logits, dim=-1)
        if self.keep_attention:
            self.last_attention = self._to_volume(attn.detach(), b, o1, o2)

        sv = torch.einsum("nhij,nhcj->nhci", attn, v)
        svr = torch.einsum("nhij,cij->nhci", attn, rv)
        out = torch.cat([sv.reshape(n, self.width, length), svr.reshape(n, self.width, length)], 1)
        out = self.out_norm(out).view(n, 2, self.width, length).sum(dim=1)
        out = out.reshape(b, o1, o2, self.width, length)
        # Back to (B, C, Z, Y, X): invert the permutation used above.
        perm = [0, *others, 1, dim]
        inverse = [perm.index(i) for i in range(5)]
        return out.permute(*inverse).contiguous()

    def _to_volume(self, attn: torch.Tensor, b: int, o1: int, o2: int) -> torch.Tensor:
        length = attn.shape[-1]
        attn = attn.view(b, o1, o2, self.heads, length, length).movedim(3, 1)
        # (B, h, o1, o2, Lq, Lk): put the query axis back at its place among (Z, Y, X).
        return attn.movedim(4, AXIS_DIM[self.axis]).contiguous()


class AxialAttentionBlock(nn.Module):
    """Residual axial-attention bottleneck block (Axial-DeepLab's block, in 3D).

    1×1×1 conv ``in_ch -> width``, norm, ReLU; axial attention along each axis of ``order`` in
    turn; ReLU; 1×1×1 conv ``width -> out_ch``, norm; plus a 1×1×1 projected shortcut; ReLU.

    Parameters
    ----------
    in_ch, out_ch : int
        Input and output channels.
    width : int
        Channels inside the attention.
    heads : int
        Attention heads per axis.
    span_zyx : sequence of 3 ints
        Relative-position span per axis (see :class:`AxialAttention`).
    order : str
        Axes in the order they are attended, e.g. ``"xyz"``.
    norm : {"batch", "group"}
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        width: int,
        heads: int,
        span_zyx: Sequence[int],
        order: str = "xyz",
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if sorted(order) != ["x", "y", "z"]:
            raise ConfigError(f"attention order must be a permutation of 'xyz', got {order!r}")
        span = dict(zip("zyx", span_zyx, strict=True))
        self.reduce = nn.Sequential(
            nn.Conv3d(in_ch, width, 1, bias=False), make_norm(norm, width), nn.ReLU(inplace=True)
        )
        self.attn = nn.ModuleDict(
            {a: AxialAttention(width, axis=a, heads=heads, span=span[a], norm=norm) for a in order}
        )
        self.expand = nn.Sequential(nn.Conv3d(width, out_ch, 1, bias=False), make_norm(norm, out_ch))
        if in_ch != out_ch:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv3d(in_ch, out_ch, 1, bias=False), make_norm(norm, out_ch)
            )
        else:
            self.shortcut = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.reduce(x)
        for layer in self.attn.values():
            out = layer(out)
        out = self.expand(self.act(out))
        return self.act(out + self.shortcut(x))

    def keep_attention(self, flag: bool) -> None:
        """Switch storing of the softmax maps on or off for every axis (clears old maps)."""
        for layer in self.attn.values():
            layer.keep_attention = flag
            layer.last_attention = None

    def attention_maps(self) -> dict[str, torch.Tensor]:
        """The last stored softmax maps per axis (see :attr:`AxialAttention.keep_attention`)."""
        return {a: m.last_attention for a, m in self.attn.items() if m.last_attention is not None}
