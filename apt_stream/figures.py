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
