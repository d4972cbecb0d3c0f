"""Seeded integrated-circuit phantoms: label volumes of a plate-like back-end-of-line stack.

Axes follow docs/conventions.md: volumes are ``(nz, ny, nx)``, ``z`` is the plate's depth and
index ``z = 0`` is the top surface, the face the beam meets first at θ = 0. From the top down
the stack is

    cap (SiO2) | M_n | V_(n-1) | ... | M_2 | V_1 | M_1 | contact (W plugs in SiO2) | substrate (Si)

Metal layer ``M_k`` holds Cu lines in SiO2; odd layers (M1, M3, ...) run along ``x``, even
ones along ``y``. A via layer ``V_k`` holds a via (Cu or W, one material per via layer) at a
random subset of the places where a line of ``M_k`` crosses one of ``M_(k+1)``; each via fills
the whole crossing, so it touches metal above and below. The contact layer holds W plugs under
M1 lines, standing on the substrate. Lines run to the x/y faces: the volume is a cut of a larger
chip. Layer thicknesses depend only on ``nz`` and the number of metal layers.

Design rules (all in voxels, checked by the tests): every run of metal along x or y is at least
``min_width_px`` long, perpendicular runs across a line at most ``max_width_px``, and every gap
between metal inside the volume is at least ``min_spacing_px``. Line ends (breaks in a line)
leave gaps of ``min_spacing_px`` to ``2 * min_spacing_px``, and a line segment is at least
``2 * min_width_px`` long.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from apt_stream.config import PhantomOptions
from apt_stream.errors import InputError
from apt_stream.sim.materials import CU, MATERIALS, SI, SIO2, W, is_metal

__all__ = ["Layer", "Phantom", "describe", "make_ic_phantom", "phantom_batch"]

# Relative thickness of each kind of layer; scaled to nz, at least one voxel each.
_THICKNESS_WEIGHT = {"substrate": 1.0, "contact": 1.0, "metal": 1.5, "via": 1.0, "cap": 0.5}
# Metal fill of a metal layer is redrawn until it lies in this interval (the tests ask 20-60 %).
_FILL_RANGE = (0.25, 0.55)
_MAX_FILL_TRIES = 64
# Chance that a line is broken into segments, and the most breaks per line.
_BREAK_PROBABILITY = 0.5
_MAX_BREAKS = 3
# Chance that a via layer uses W rather than Cu.
_W_VIA_PROBABILITY = 0.3


@dataclass(frozen=True)
class Layer:
    """One layer of the stack: ``labels[z_start:z_stop]`` (z = 0 is the top surface).

    ``kind`` is ``"cap"``, ``"metal"``, ``"via"``, ``"contact"`` or ``"substrate"``;
    ``direction`` is ``"x"`` or ``"y"`` for metal layers (the lines' long axis), else None;
    ``metal_label`` is the label of the metal the layer holds (None for cap and substrate).
    """

    name: str
    kind: str
    z_start: int
    z_stop: int
    direction: str | None = None
    metal_label: int | None = None

    @property
    def thickness_px(self) -> int:
        return self.z_stop - self.z_start


@dataclass(frozen=True, eq=False)
class Phantom:
    """A label volume ``(nz, ny, nx)`` uint8 (docs/conventions.md labels) and how it was made."""

    labels: np.ndarray
    voxel_size_m: float
    seed: int
    layers: tuple[Layer, ...]

    @property
    def metal(self) -> np.ndarray:
        """Boolean volume of metal voxels (``METAL_LABELS``: Cu, W, Al, Co)."""
        return is_metal(self.labels)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.labels.shape)


def _check_options(options: PhantomOptions) -> None:
    # Options may bypass pydantic (model_copy(update=...)), so the rules that keep generation
    # well defined are checked again here.
    if not isinstance(options, PhantomOptions):
        raise InputError(f"options must be a PhantomOptions, got {type(options).__name__}")
    shape = tuple(options.shape_zyx)
    if len(shape) != 3 or any(int(n) != n or n < 1 for n in shape):
        raise InputError(f"shape_zyx must be three positive integers, got {shape}")
    nz, ny, nx = shape
    n_metal = options.n_metal_layers
    if n_metal < 1:
        raise InputError(f"n_metal_layers must be >= 1, got {n_metal}")
    n_layers = 2 * n_metal + 3
    if nz < n_layers:
        raise InputError(
            f"shape_zyx depth nz={nz} is too thin for {n_metal} metal layers: the stack (cap, "
            f"{n_metal} metal, {n_metal - 1} via, contact, substrate) needs nz >= {n_layers}"
        )
    w_min, w_max, space = options.min_width_px, options.max_width_px, options.min_spacing_px
    if w_min < 1 or space < 1 or w_max < w_min:
        raise InputError(
            f"need 1 <= min_width_px <= max_width_px and min_spacing_px >= 1, got "
            f"min_width_px={w_min}, max_width_px={w_max}, min_spacing_px={space}"
        )
    lateral_min = 2 * w_min + space
    if min(ny, nx) < lateral_min:
        raise InputError(
            f"shape_zyx lateral size (ny={ny}, nx={nx}) is too small for two lines of "
            f"min_width_px={w_min} at min_spacing_px={space}: need >= {lateral_min}"
        )
    if not 0.0 <= options.via_probability <= 1.0:
        raise InputError(f"via_probability must be in [0, 1], got {options.via_probability}")
    if not options.voxel_size_m > 0:
        raise InputError(f"voxel_size_m must be > 0, got {options.voxel_size_m}")


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _thicknesses(nz: int, weights: list[float]) -> list[int]:
    """Integer thicknesses >= 1 summing to nz, as close as possible to proportional."""
    w = np.asarray(weights, dtype=float)
    ideal = w / w.sum() * nz
    t = np.maximum(1, np.floor(ideal)).astype(int)
    while t.sum() < nz:
        t[np.argmax(ideal - t)] += 1
    while t.sum() > nz:
        t[np.argmax(np.where(t > 1, t - ideal, -np.inf))] -= 1
    return [int(v) for v in t]


def _layer_stack(nz: int, n_metal: int) -> list[Layer]:
    """Layers from top (z = 0) to bottom; geometry only, metal labels filled in later."""
    bottom_up: list[tuple[str, str, str | None]] = [
        ("substrate", "substrate", None),
        ("contact", "contact", None),
    ]
    for k in range(1, n_metal + 1):
        if k > 1:
            bottom_up.append((f"V{k - 1}", "via", None))
        bottom_up.append((f"M{k}", "metal", "x" if k % 2 else "y"))
    bottom_up.append(("cap", "cap", None))
    thick = _thicknesses(nz, [_THICKNESS_WEIGHT[kind] for _, kind, _ in bottom_up])
    layers = []
    z_stop = nz
    for (name, kind, direction), t in zip(bottom_up, thick, strict=True):
        layers.append(Layer(name, kind, z_stop - t, z_stop, direction))
        z_stop -= t
    return layers[::-1]


def _segments(
    rng: np.random.Generator, n_px: int, *, min_len_px: int, min_gap_px: int
) -> list[tuple[int, int]]:
    """Split a line of length ``n_px`` into segments separated by line-end gaps."""
    if rng.random() >= _BREAK_PROBABILITY:
        return [(0, n_px)]
    n_breaks = int(rng.integers(1, _MAX_BREAKS + 1))
    gaps = min_gap_px + rng.integers(0, min_gap_px + 1, size=n_breaks)
    # Drop breaks until every segment can be min_len_px long.
    while n_breaks and n_px - gaps[:n_breaks].sum() < (n_breaks + 1) * min_len_px:
        n_breaks -= 1
    if not n_breaks:
        return [(0, n_px)]
    gaps = gaps[:n_breaks]
    free = int(n_px - gaps.sum() - (n_breaks + 1) * min_len_px)
    # Share the spare length among the segments (stars and bars).
    cuts = np.sort(rng.integers(0, free + 1, size=n_breaks))
    lengths = min_len_px + np.diff(np.concatenate([[0], cuts, [free]]))
    out, start = [], 0
    for i, length in enumerate(lengths):
        out.append((start, start + int(length)))
        start += int(length) + (int(gaps[i]) if i < n_breaks else 0)
    return out


def _line_rects(
    rng: np.random.Generator, n_across: int, n_along: int, options: PhantomOptions
) -> list[tuple[int, int, int, int]]:
    """Line segments of one layer as (across0, across1, along0, along1) rectangles."""
    w_min, w_max, space = options.min_width_px, options.max_width_px, options.min_spacing_px
    # A per-layer target fill sets the mean pitch; widths and gaps vary line by line.
    target_fill = rng.uniform(0.3, 0.5)
    mean_gap = 0.5 * (w_min + w_max) * (1 - target_fill) / target_fill
    extra_max = max(0, round(2 * (mean_gap - space)))
    rects = []
    pos = int(rng.integers(0, space + extra_max + 1))  # the gap at the face is a cut: any size
    while pos + w_min <= n_across:
        width = min(int(rng.integers(w_min, w_max + 1)), n_across - pos)
        for a, b in _segments(rng, n_along, min_len_px=2 * w_min, min_gap_px=space):
            rects.append((pos, pos + width, a, b))
        pos += width + space + int(rng.integers(0, extra_max + 1))
    return rects


def _metal_layer(
    rng: np.random.Generator, ny: int, nx: int, direction: str, options: PhantomOptions
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """2D line mask (ny, nx) and rectangles (y0, y1, x0, x1) of one metal layer."""
    n_across, n_along = (ny, nx) if direction == "x" else (nx, ny)
    best = None
    for _ in range(_MAX_FILL_TRIES):
        rects = _line_rects(rng, n_across, n_along, options)
        if direction == "x":
            rects = [(c0, c1, a0, a1) for c0, c1, a0, a1 in rects]
        else:
            rects = [(a0, a1, c0, c1) for c0, c1, a0, a1 in rects]
        mask = np.zeros((ny, nx), dtype=bool)
        for y0, y1, x0, x1 in rects:
            mask[y0:y1, x0:x1] = True
        fill = mask.mean()
        miss = max(_FILL_RANGE[0] - fill, fill - _FILL_RANGE[1], 0.0)
        if best is None or miss < best[0]:
            best = (miss, mask, rects)
        if miss == 0.0:
            break
    return best[1], best[2]


def _contact_mask(
    rng: np.random.Generator,
    rects: list[tuple[int, int, int, int]],
    shape_yx: tuple[int, int],
    direction: str,
    options: PhantomOptions,
) -> np.ndarray:
    """W plugs under M1 segments: full line width, min_width_px..2*min_width_px long."""
    w_min, space = options.min_width_px, options.min_spacing_px
    mask = np.zeros(shape_yx, dtype=bool)
    for y0, y1, x0, x1 in rects:
        a0, a1 = (x0, x1) if direction == "x" else (y0, y1)
        pos = a0 + int(rng.integers(0, space + 1))
        while True:
            length = int(rng.integers(w_min, 2 * w_min + 1))
            if pos + length > a1:
                break
            if rng.random() < options.via_probability:
                if direction == "x":
                    mask[y0:y1, pos : pos + length] = True
                else:
                    mask[pos : pos + length, x0:x1] = True
            pos += length + space + int(rng.integers(0, space + 1))
    return mask


def _via_mask(
    rng: np.random.Generator, below: np.ndarray, above: np.ndarray, *, p: float, min_width_px: int
) -> np.ndarray:
    """Vias filling a random subset (probability p each) of the line crossings.

    Each crossing is the rectangle where a line segment of one layer overlaps one of the other.
    A line end can cut a crossing short; crossings narrower than min_width_px get no via.
    """
    crossings, n = ndimage.label(below & above)
    draws = rng.random(n) < p
    keep = np.zeros(n + 1, dtype=bool)
    for i, box in enumerate(ndimage.find_objects(crossings)):
        if min(sl.stop - sl.start for sl in box) >= min_width_px:
            keep[i + 1] = draws[i]
    return keep[crossings]


def make_ic_phantom(options: PhantomOptions, *, seed: int) -> Phantom:
    """Generate one IC label volume.

    Parameters
    ----------
    options
        Shape, voxel size, number of metal layers and design rules
        (e.g. ``apt_stream.config.PRESETS["demo"].phantom``).
    seed
        Non-negative integer; the same options and seed give the same volume.

    Returns
    -------
    Phantom
        ``labels`` (nz, ny, nx) uint8 with 1 SiO2, 2 Si, 3 Cu, 4 W (no vacuum inside), and
        the layer stack (z-ranges, z = 0 the top surface).

    Raises
    ------
    InputError
        Options that cannot give a valid stack (too thin for the layers, too narrow for two
        lines, via_probability outside [0, 1], ...) or a bad seed.
    """
    _check_options(options)
    seed = _check_seed(seed)
    rng = np.random.default_rng(seed)
    nz, ny, nx = (int(n) for n in options.shape_zyx)
    labels = np.full((nz, ny, nx), SIO2, dtype=np.uint8)

    stack = _layer_stack(nz, options.n_metal_layers)
    metal_layers = [layer for layer in stack if layer.kind == "metal"]
    metal_layers.sort(key=lambda layer: int(layer.name[1:]))  # M1 first
    masks, rects_m1 = [], None
    for layer in metal_layers:
        mask, rects = _metal_layer(rng, ny, nx, layer.direction, options)
        masks.append(mask)
        if layer.name == "M1":
            rects_m1 = rects

    layers = []
    for layer in stack:
        sl = slice(layer.z_start, layer.z_stop)
        metal_label = None
        if layer.kind == "substrate":
            labels[sl] = SI
        elif layer.kind == "metal":
            metal_label = CU
            labels[sl][:, masks[int(layer.name[1:]) - 1]] = CU
        elif layer.kind == "via":
            k = int(layer.name[1:])
            metal_label = W if rng.random() < _W_VIA_PROBABILITY else CU
            vias = _via_mask(
                rng,
                masks[k - 1],
                masks[k],
                p=options.via_probability,
                min_width_px=options.min_width_px,
            )
            labels[sl][:, vias] = metal_label
        elif layer.kind == "contact":
            metal_label = W
            plugs = _contact_mask(rng, rects_m1, (ny, nx), metal_layers[0].direction, options)
            labels[sl][:, plugs] = W
        layers.append(
            Layer(layer.name, layer.kind, layer.z_start, layer.z_stop, layer.direction, metal_label)
        )
    return Phantom(
        labels=labels, voxel_size_m=float(options.voxel_size_m), seed=seed, layers=tuple(layers)
    )


def phantom_batch(options: PhantomOptions, seeds: Iterable[int]) -> Iterator[Phantom]:
    """Phantoms for each seed in turn (lazily); the options are checked before the first."""
    _check_options(options)
    seeds = list(seeds)
    for s in seeds:
        _check_seed(s)
    return (make_ic_phantom(options, seed=s) for s in seeds)


def describe(phantom: Phantom) -> dict:
    """JSON-ready summary: volume fraction per material and the layers' z-ranges.

    Each layer entry has ``name``, ``kind``, ``z_range`` ``[start, stop)`` (z = 0 the top
    surface), ``thickness_px``, ``direction``, ``metal`` (material name or None) and
    ``metal_fraction`` (fraction of the layer's voxels that are metal).
    """
    if not isinstance(phantom, Phantom):
        raise InputError(f"describe needs a Phantom, got {type(phantom).__name__}")
    counts = np.bincount(phantom.labels.ravel(), minlength=len(MATERIALS))
    total = phantom.labels.size
    metal = phantom.metal
    return {
        "shape_zyx": list(phantom.shape_zyx),
        "voxel_size_m": phantom.voxel_size_m,
        "seed": phantom.seed,
        "fractions": {m.name: float(counts[m.label]) / total for m in MATERIALS.values()},
        "metal_fraction": float(metal.mean()),
        "layers": [
            {
                "name": layer.name,
                "kind": layer.kind,
                "z_range": [layer.z_start, layer.z_stop],
                "thickness_px": layer.thickness_px,
                "direction": layer.direction,
                "metal": None if layer.metal_label is None else MATERIALS[layer.metal_label].name,
                "metal_fraction": float(metal[layer.z_start : layer.z_stop].mean()),
            }
            for layer in phantom.layers
        ],
    }
