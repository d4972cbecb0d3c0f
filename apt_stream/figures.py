"""PNG figures: xy / xz / yz cross-sections of volumes side by side (matplotlib, no display)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np


def cross_sections_png(
    volumes: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    z: int | None = None,
    y: int | None = None,
    x: int | None = None,
    title: str | None = None,
) -> Path:
    """Write a grid of xy (at z), xz (at y) and yz (at x) sections, one row per named volume.

    Volumes are (nz, ny, nx); each row is scaled to its own 1st–99th percentile so volumes in
    different units (δ, network output) compare by structure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(volumes)
    if not names:
        raise ValueError("no volumes to plot")
    nz, ny, nx = np.asarray(volumes[names[0]]).shape
    z = nz // 2 if z is None else z
    y = ny // 2 if y is None else y
    x = nx // 2 if x is None else x
    fig, axes = plt.subplots(
        len(names), 3, figsize=(9, 2.6 * len(names)), squeeze=False,
        gridspec_kw={"width_ratios": [nx, nx, ny]},
    )
    for row, name in enumerate(names):
        vol = np.asarray(volumes[name], dtype=np.float32)
        lo, hi = np.percentile(vol, [1, 99])
        hi = hi if hi > lo else lo + 1
        sections = [
            (vol[z], f"{name}: xy @ z={z}"),
            (vol[:, y, :], f"xz @ y={y}"),
            (vol[:, :, x], f"yz @ x={x}"),
        ]
        for col, (img, label) in enumerate(sections):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest", aspect="equal")
            ax.set_title(label, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def power_spectra_png(volumes: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Central k_x–k_z slices of each volume's 3D power spectrum (the paper's Fig. 6a).

    Rotation about y leaves a missing wedge around the k_z axis for a limited angular range; the
    slice through k_y = 0 shows it directly.
    """
    plt = _mpl()
    names = list(volumes)
    fig, axes = plt.subplots(1, len(names), figsize=(2.4 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        vol = np.asarray(volumes[name], dtype=np.float64)
        spec = np.abs(np.fft.fftshift(np.fft.fftn(vol - vol.mean()))) ** 2
        kxkz = spec[:, spec.shape[1] // 2, :]
        ax.imshow(np.log10(kxkz + 1e-12 * kxkz.max() + 1e-30), cmap="magma", aspect="auto")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("k_x", fontsize=7)
        ax.set_ylabel("k_z", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("log power spectrum, k_y = 0", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweeps_png(sweep_n: list[dict], sweep_theta: list[dict], path: str | Path) -> Path:
    """Metrics of APT and SART over N (fixed range) and over θ (fixed N): the paper's Figs. 3, 5."""
    plt = _mpl()
    metrics = ("pcc", "ms_ssim", "dsc", "ber")
    fig, axes = plt.subplots(2, 4, figsize=(12, 5.5))
    for row, (rows, key, label) in enumerate(
        [(sweep_n, "n", "number of angles N (±17°)"), (sweep_theta, "range_deg", "range ±θ (N = 29)")]
    ):
        x = [r[key] for r in rows]
        for col, metric in enumerate(metrics):
            ax = axes[row, col]
            for method, style in (("apt", "o-"), ("sart", "s--")):
                ax.plot(x, [r[f"{method}_{metric}"] for r in rows], style, label=method.upper())
            ax.set_xlabel(label, fontsize=8)
            ax.set_title(metric.upper().replace("_", "-"), fontsize=9)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def attention_png(model, approximant: np.ndarray, path: str | Path, *, voxel=None, head: int = 0) -> Path:
    """Attention weights along x, y and z for one voxel (the paper's Fig. 7)."""
    import torch

    plt = _mpl()
    cfg = model.config
    pz, py, px = cfg.input_zyx
    vol = np.asarray(approximant, dtype=np.float32)
    vol = vol[None] if vol.ndim == 3 else vol  # (C, Z, Y, X): what the network reads
    patch = vol[:, :pz, :py, :px]
    patch = patch / (np.sqrt(np.mean(patch**2, axis=(1, 2, 3), keepdims=True)) + 1e-12)
    x = torch.from_numpy(np.ascontiguousarray(patch))[None]
    with torch.inference_mode():
        _, maps = model(x, return_attention=True)
    voxel = voxel or (pz // 2, py // 2, px // 2)
    bz, by, bx = model.bottleneck_index(voxel)
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
    for ax, axis in zip(axes, ("x", "y", "z"), strict=True):
        weights = maps[axis][0, head, bz, by, bx].cpu().numpy()
        ax.bar(np.arange(len(weights)), weights, color="tab:red")
        pos = {"x": bx, "y": by, "z": bz}[axis]
        ax.axvline(pos, color="tab:blue", lw=2, label="attending voxel")
        ax.set_title(f"axis {axis} (head {head}, voxel {voxel})", fontsize=8)
        ax.set_xlabel("position along the axis (bottleneck grid)", fontsize=7)
    axes[0].set_ylabel("attention weight")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
