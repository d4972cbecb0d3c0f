"""PNG figures: xy / xz / yz cross-sections of volumes side by side (matplotlib, no display).

:func:`cross_sections_png` is the preview every part of apt-stream writes (the live flow, the demo,
``reconstruct --png``, ``approximant --png``, the evaluation). A preview a scientist can read:

- one colour scale for every volume in δ (the refractive-index decrement, dimensionless) shown as
  ``δ (×10⁻⁶)`` on a colour bar, so the same δ is the same grey for APT, the baselines and the
  ground truth; the limits are the truth's range (from δ = 0 to its 99th percentile) when it is
  shown, else the pooled 1st–99.5th percentiles. A volume whose values are not on that scale (a count volume, a network output in
  arbitrary units: amplitude more than :data:`OWN_SCALE_FACTOR` off) gets its own colour bar, marked
  "own scale";
- a scale bar in nm on each xy section (voxels are isotropic, ``voxel_size_m``);
- each panel's metric against the ground truth (PCC unless told otherwise) in its row label;
- a note, in the figure and in :attr:`PreviewInfo.note`, when a baseline (FBP, SIRT, SART or the
  Approximant) beats APT on that metric.

:func:`cross_sections_figure` builds the figure without saving it (tests inspect it);
:func:`preview_png` saves it and returns a :class:`PreviewInfo` (limits, metrics, note, scale bar).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Names (case-insensitive, any ``baselines/`` prefix dropped) of the volumes APT is compared with.
BASELINE_NAMES = ("fbp", "sirt", "sart", "approximant")
#: Names that mark a volume as the ground truth.
TRUTH_NAMES = ("truth", "ground truth", "ground truth δ", "ground-truth")
#: A volume whose robust amplitude differs from the shared scale's by more than this factor is
#: drawn on its own colour scale.
OWN_SCALE_FACTOR = 10.0
#: Metrics where larger is better (BER: smaller is better).
_HIGHER_IS_BETTER = {"pcc": True, "ms_ssim": True, "dsc": True, "ber": False}
_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


@dataclass
class PreviewInfo:
    """What a preview shows, for callers (the demo summary) and tests."""

    path: Path | None
    names: list[str]
    #: Colour limits of each row, in δ (the units of the data, before the display factor).
    clim: dict[str, tuple[float, float]]
    #: Rows drawn on the shared δ scale (the others have their own colour bar).
    shared: list[str]
    #: Display factor: the colour bar reads δ / ``scale`` (1e-6 -> "δ (×10⁻⁶)").
    scale: float
    metric: str
    #: Each row's metric against the ground truth (rows without one are left out).
    metrics: dict[str, float] = field(default_factory=dict)
    #: "… beats APT …" when a baseline beats APT on ``metric``, else None.
    note: str | None = None
    scale_bar_nm: float | None = None
    scale_bar_px: float | None = None
    truth: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": None if self.path is None else str(self.path),
            "metric": self.metric,
            "metrics": {k: round(v, 4) for k, v in self.metrics.items()},
            "note": self.note,
            "clim_delta": [float(v) for v in self.clim[self.shared[0]]] if self.shared else None,
            "scale_bar_nm": self.scale_bar_nm,
        }


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short(name: str) -> str:
    return name.lower().removeprefix("baselines/").strip()


def _is_truth(name: str) -> bool:
    return _short(name) in TRUTH_NAMES


def _is_apt(name: str) -> bool:
    return _short(name) == "apt"


def _is_baseline(name: str) -> bool:
    return _short(name) in BASELINE_NAMES


def _display_name(name: str) -> str:
    short = _short(name)
    if short in ("apt", "fbp", "sirt", "sart"):
        return short.upper()
    if short == "approximant":
        return "Approximant"
    if _is_truth(name):
        return "ground truth"
    return name


def _truth_array(truth: Any) -> np.ndarray:
    return np.asarray(getattr(truth, "delta", truth), dtype=np.float32)


def _amplitude(vol: np.ndarray) -> float:
    finite = vol[np.isfinite(vol)]
    return float(np.percentile(np.abs(finite), 99)) if finite.size else 0.0


def _sample(vol: np.ndarray, n: int = 200_000) -> np.ndarray:
    flat = vol[np.isfinite(vol)].ravel()
    if flat.size > n:
        flat = flat[:: int(math.ceil(flat.size / n))]
    return flat


def _limits(values: np.ndarray, q: tuple[float, float] = (1.0, 99.0)) -> tuple[float, float]:
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(values, q))
    if not hi > lo:
        hi = lo + (abs(lo) or 1.0) * 1e-3
    return lo, hi


def display_scale(lo: float, hi: float) -> float:
    """A power of 1000 (10⁻⁶, 10⁻³, 1, …) that puts the colour-bar ticks near 1–1000."""
    top = max(abs(lo), abs(hi))
    if not top > 0 or not math.isfinite(top):
        return 1.0
    return 10.0 ** (3 * math.floor(math.log10(top) / 3))


def _scale_label(scale: float) -> str:
    if scale == 1.0:
        return "δ"
    return f"δ (×10{str(round(math.log10(scale))).translate(_SUPERSCRIPT)})"


def nice_scale_bar(width_px: int, voxel_nm: float, fraction: float = 0.25) -> tuple[float, float]:
    """A 1/2/5 × 10ᵏ nm bar at most ``fraction`` of a ``width_px`` panel: (length nm, length px)."""
    target = max(fraction * width_px * voxel_nm, voxel_nm)
    power = 10.0 ** math.floor(math.log10(target))
    length = max(m * power for m in (1, 2, 5) if m * power <= target)
    return float(length), float(length / voxel_nm)


def _metric_values(
    names: list[str], arrays: dict[str, np.ndarray], truth: np.ndarray | None,
    metrics: Mapping[str, Any] | None, metric: str,
) -> dict[str, float]:
    values: dict[str, float] = {}
    for name in names:
        if _is_truth(name):
            continue
        given = None if metrics is None else metrics.get(name, metrics.get(_short(name)))
        if isinstance(given, Mapping):
            given = given.get(metric)
        if given is not None:
            if math.isfinite(float(given)):
                values[name] = float(given)
            continue
        if truth is None or metric != "pcc" or arrays[name].shape != truth.shape:
            continue
        from apt_stream.metrics import pcc

        try:
            values[name] = pcc(arrays[name], truth)
        except Exception:  # constant or non-finite volume: no number rather than no figure
            continue
    return values


def baseline_note(metrics: Mapping[str, float], metric: str = "pcc") -> str | None:
    """"SART (0.47) beats APT (0.42) on PCC …" when a baseline beats APT, else None.

    ``metrics`` maps volume names to one number each (``{"apt": 0.42, "sart": 0.47}``); names are
    matched as in the figures (``baselines/sart`` is SART).
    """
    apt = next((v for k, v in metrics.items() if _is_apt(k)), None)
    if apt is None or not math.isfinite(apt):
        return None
    higher = _HIGHER_IS_BETTER.get(metric, True)
    better = [(k, v) for k, v in metrics.items() if _is_baseline(k) and math.isfinite(v)
              and (v > apt if higher else v < apt)]
    if not better:
        return None
    better.sort(key=lambda kv: kv[1], reverse=higher)
    parts = [f"{_display_name(k)} ({v:.3f})" for k, v in better]
    who = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    verb = "beats" if len(better) == 1 else "beat"
    label = metric.upper().replace("_", "-")
    return f"Note: {who} {verb} APT ({apt:.3f}) on {label} against the ground truth."


def cross_sections_figure(
    volumes: Mapping[str, np.ndarray],
    *,
    z: int | None = None,
    y: int | None = None,
    x: int | None = None,
    title: str | None = None,
    truth: Any = None,
    voxel_size_m: float | None = None,
    metrics: Mapping[str, Any] | None = None,
    metric: str = "pcc",
    shared_limits: bool = True,
):
    """The section grid as a matplotlib Figure (not saved) and its :class:`PreviewInfo`.

    Parameters
    ----------
    volumes
        Named (nz, ny, nx) volumes of one shape, one row each, in δ. A volume named ``truth`` or
        ``ground truth δ`` is the ground truth.
    z, y, x
        Section indices (default: the centre).
    title
        Figure title (wrapped to the figure's width).
    truth
        The ground truth (an array or an object with ``.delta``), shown as the last row when it
        is not among ``volumes``; metrics are computed against it.
    voxel_size_m
        Voxel edge: with it each xy section gets a scale bar in nm.
    metrics
        Precomputed metrics, ``{name: {metric: value}}`` or ``{name: value}``; missing rows get
        their PCC against the truth computed here.
    metric
        The metric shown and compared ("pcc", "ms_ssim", "dsc", "ber"; only PCC is computed here).
    shared_limits
        One colour scale for every volume on the δ scale (default); False: each row its own.
    """
    plt = _mpl()
    arrays = {name: np.asarray(vol, dtype=np.float32) for name, vol in volumes.items()}
    if truth is not None and not any(_is_truth(n) for n in arrays):
        arrays["ground truth"] = _truth_array(truth)
    names = list(arrays)
    if not names:
        raise ValueError("no volumes to plot")
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"volumes must be 3D and of one shape, got {sorted(shapes)}")
    nz, ny, nx = next(iter(shapes))
    z = nz // 2 if z is None else z
    y = ny // 2 if y is None else y
    x = nx // 2 if x is None else x
    truth_name = next((n for n in names if _is_truth(n)), None)
    truth_arr = arrays[truth_name] if truth_name else None

    # One δ scale: the truth's range when shown (the physical one), else pooled percentiles;
    # volumes far off that scale (counts, arbitrary units) keep their own.
    amps = {n: _amplitude(a) for n, a in arrays.items()}
    ref_amp = amps[truth_name] if truth_name else float(np.median(list(amps.values())))
    shared = [n for n in names if shared_limits and ref_amp > 0 and amps[n] > 0
              and 1 / OWN_SCALE_FACTOR <= amps[n] / ref_amp <= OWN_SCALE_FACTOR]
    if truth_name in shared:
        # The truth's materials set the range (its 99th percentile: the rarest, densest one may
        # saturate, and so may a reconstruction's overshoot), from δ = 0 (vacuum) when the truth
        # is non-negative, so a reconstruction that loses the mean (FBP) or the amplitude (few
        # angles) stays visible instead of black.
        values = _sample(truth_arr)
        lo, hi = (float(v) for v in np.percentile(values, [0, 99])) if values.size else (0, 1)
        if not hi > lo:  # almost all one material: its full range
            hi = float(values.max()) if values.size else lo + 1.0
        lo = min(lo, 0.0)
        shared_lim = (lo, hi) if hi > lo else _limits(values)
    elif shared:
        # No truth: the pooled 1st–99.5th percentiles of the volumes on the scale.
        shared_lim = _limits(np.concatenate([_sample(arrays[n]) for n in shared]), (1.0, 99.5))
    else:
        shared_lim = (0.0, 1.0)
    clim = {n: (shared_lim if n in shared else _limits(_sample(arrays[n]))) for n in names}
    scale = display_scale(*shared_lim)

    values = _metric_values(names, arrays, truth_arr, metrics, metric)
    note = baseline_note(values, metric)
    label = metric.upper().replace("_", "-")

    # Size: panels keep their aspect; 9 in wide, rows as tall as their tallest section.
    widths = [nx, nx, ny]
    avail_w = 9.0 - 2.2
    row_h = max(avail_w * nx / sum(widths) * ny / nx, avail_w * nx / sum(widths) * nz / nx)
    fig_h = len(names) * (row_h + 0.3) + 0.9 + (0.35 if note else 0.0)
    fig = plt.figure(figsize=(9.0, max(fig_h, 2.4)), layout="constrained")
    axes = fig.subplots(len(names), 3, squeeze=False, gridspec_kw={"width_ratios": widths})
    bar = None
    if voxel_size_m:
        bar = nice_scale_bar(nx, float(voxel_size_m) * 1e9)
    shared_im = None
    for row, name in enumerate(names):
        vol = arrays[name]
        lo, hi = clim[name]
        row_scale = scale if name in shared else display_scale(lo, hi)
        sections = [
            (vol[z], f"xy, z = {z}"),
            (vol[:, y, :], f"xz, y = {y}"),
            (vol[:, :, x], f"yz, x = {x}"),
        ]
        im = None
        for col, (img, col_title) in enumerate(sections):
            ax = axes[row, col]
            im = ax.imshow(img / row_scale, cmap="gray", vmin=lo / row_scale, vmax=hi / row_scale,
                           interpolation="nearest", aspect="equal")
            if row == 0:
                ax.set_title(col_title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        row_label = textwrap.fill(_display_name(name), width=18)
        if name in values:
            row_label += f"\n{label} {values[name]:.3f}"
        elif name == truth_name:
            row_label += "\n(reference)"
        if name not in shared:
            row_label += "\nown scale"
        axes[row, 0].set_ylabel(row_label, fontsize=8,
                                fontweight="bold" if _is_apt(name) else "normal")
        if bar is not None:
            _add_scale_bar(axes[row, 0], *bar)
        if name in shared:
            shared_im = im
        else:
            cb = fig.colorbar(im, ax=list(axes[row]), shrink=0.9, aspect=12, pad=0.02)
            cb.set_label(f"{_scale_label(row_scale)}, own scale", fontsize=7)
            cb.ax.tick_params(labelsize=7)
    if shared_im is not None:
        rows = [axes[names.index(n), c] for n in shared for c in range(3)]
        cb = fig.colorbar(shared_im, ax=rows, shrink=min(0.9, 0.5 + 0.15 * len(shared)),
                          aspect=10 + 5 * len(shared), pad=0.02)
        cb.set_label(f"{_scale_label(scale)}, refractive-index decrement", fontsize=8)
        cb.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(textwrap.fill(title, width=95), fontsize=10)
    footer = []
    if values:
        better = "higher" if _HIGHER_IS_BETTER.get(metric, True) else "lower"
        footer.append(f"{label} of each volume against the ground truth ({better} is better)")
    if note:
        footer.append(note)
    if footer:
        fig.supxlabel("\n".join(textwrap.fill(line, width=110) for line in footer),
                      fontsize=8, color="darkred" if note else "black")
    info = PreviewInfo(
        path=None, names=names, clim=clim, shared=shared, scale=scale, metric=metric,
        metrics=values, note=note, truth=truth_name,
        scale_bar_nm=None if bar is None else bar[0], scale_bar_px=None if bar is None else bar[1],
    )
    return fig, info


def _add_scale_bar(ax, length_nm: float, length_px: float) -> None:
    from matplotlib.font_manager import FontProperties
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    text = f"{length_nm / 1000:g} µm" if length_nm >= 1000 else f"{length_nm:g} nm"
    sb = AnchoredSizeBar(
        ax.transData, length_px, text, "lower left", pad=0.25, borderpad=0.3, sep=2,
        color="white", frameon=True, size_vertical=max(0.6, 0.012 * ax.get_xlim()[1]),
        fontproperties=FontProperties(size=7),
    )
    sb.patch.set(facecolor="black", alpha=0.55, edgecolor="none")
    sb.set_gid("scale-bar")
    ax.add_artist(sb)


def preview_png(volumes: Mapping[str, np.ndarray], path: str | Path, **options: Any) -> PreviewInfo:
    """Write :func:`cross_sections_figure`'s figure to ``path``; its :class:`PreviewInfo`."""
    plt = _mpl()
    fig, info = cross_sections_figure(volumes, **options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    info.path = path
    return info


def cross_sections_png(
    volumes: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    z: int | None = None,
    y: int | None = None,
    x: int | None = None,
    title: str | None = None,
    **options: Any,
) -> Path:
    """Write a grid of xy (at z), xz (at y) and yz (at x) sections, one row per named volume.

    Volumes are (nz, ny, nx) in δ. Options (``truth``, ``voxel_size_m``, ``metrics``, ``metric``,
    ``shared_limits``) as in :func:`cross_sections_figure`; :func:`preview_png` also returns what
    the figure shows (limits, metrics, the "baseline beats APT" note).
    """
    return preview_png(volumes, path, z=z, y=y, x=x, title=title, **options).path


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


def convergence_png(rows: list[Mapping[str, Any]], path: str | Path, *,
                    n_star: int | None = None, title: str | None = None) -> Path:
    """The live convergence estimates against the number of angles, as a PNG.

    Top: half-split agreement (FRC) and resolution (× Nyquist), both in [0, 1]. Bottom, on a
    log axis: the change between successive estimates and the held-out residual. The angle
    count of a stop advice and N* are marked.
    """
    plt = _mpl()
    n = [int(r["n_angles"]) for r in rows]

    def series(key: str) -> list[float]:
        return [float(r[key]) if r.get(key) is not None else math.nan for r in rows]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.0, 4.6), sharex=True,
                                      layout="constrained")
    top.plot(n, series("frc_half"), "o-", label="half-split FRC")
    top.plot(n, series("resolution"), "s-", label="resolution (× Nyquist)")
    top.set_ylim(0, 1.05)
    top.set_ylabel("agreement")
    plotted = False
    for key, label, marker in (("change", "change between estimates", "o-"),
                               ("heldout_residual", "held-out residual", "^-")):
        values = [v if v > 0 else math.nan for v in series(key)]
        if any(math.isfinite(v) for v in values):
            bottom.plot(n, values, marker, label=label)
            plotted = True
    if plotted:
        bottom.set_yscale("log")
    else:  # the first estimate: nothing to compare with yet
        bottom.text(0.5, 0.5, "change and held-out residual: from the second estimate on",
                    transform=bottom.transAxes, ha="center", va="center", fontsize=8, color="0.4")
    bottom.set_xlabel("finished angles")
    bottom.set_ylabel("relative")
    stops = [int(r["n_angles"]) for r in rows if r.get("stop")]
    for ax in (top, bottom):
        if stops:
            ax.axvline(stops[0], color="tab:red", linestyle="--",
                       label=f"stop advised ({stops[0]})" if ax is top else None)
        if n_star:
            ax.axvline(n_star, color="0.5", linestyle=":",
                       label=f"N* = {n_star}" if ax is top else None)
        ax.grid(alpha=0.3)
    top.legend(fontsize=7, loc="lower right")
    if plotted:
        bottom.legend(fontsize=7, loc="upper right")
    if title:
        top.set_title(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

