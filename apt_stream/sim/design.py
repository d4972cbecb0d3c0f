"""A wide, seeded design space of IC label volumes (the training family).

:func:`apt_stream.sim.phantom.make_ic_phantom` draws every phantom from one fixed stack (same z
positions, Cu lines in SiO₂, W contacts), and a network trained on it memorised that stack. This
module draws a :class:`ChipDesign` — an explicit, frozen list of layer specs plus the chip's
flip, tilt, lateral offset and defect rates — from a much wider space (:class:`DesignOptions`),
and renders it into the same :class:`~apt_stream.sim.phantom.Phantom` as ``make_ic_phantom``,
so everything downstream works unchanged.

The chip, from its top surface down (z = 0 is the face the beam meets first, docs/conventions.md):

    cap | [ES_n] M_n | V_(n-1) | [ES_(n-1)] M_(n-1) | ... | V_1 | [ES_1] M_1 | [contact] | [Si]

* 1–6 metal levels ``M_k`` at random depths: every layer thickness is drawn per seed (the
  substrate takes 0 to 30 % of ``nz``, the cap 1 voxel to a thick passivation, upper levels are
  sometimes much thicker), so no z position is fixed.
* Per level: line direction ``x``, ``y`` or ``both`` (a mesh, nested L-shaped bends, or two
  tiles of opposite direction), pattern ``routed`` (long lines with breaks) or ``cut`` (short
  segments), and its own design rules (min/max width, min spacing, target fill) inside the
  options' limits.
* Metals Cu, W, Al (Co when asked) for lines, vias and contacts; dielectrics SiO₂ and SiCOH;
  thin Si₃N₄ etch stops (1–2 voxels) above some levels, which vias pass through.
* Vias ``V_k`` at a random subset of the places where lines of ``M_k`` and ``M_(k+1)`` overlap;
  contacts under ``M_1`` lines stand on the Si substrate.
* A flip (the chip mounted upside down: substrate at z = 0), a small tilt about y and x and a
  lateral offset of the whole chip; voids, missing vias and bridges as defects.

Every voxel holds a material: the volume is a cut of a larger chip, so lines run to the faces and
tilted corners take the nearest material. Layer z ranges in the specs and in ``Phantom.layers``
are those of the untilted chip in volume coordinates (after the flip).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from apt_stream.errors import InputError
from apt_stream.sim.materials import LABELS
from apt_stream.sim.phantom import Layer, Phantom, _check_seed, _layer_stack, _segments

__all__ = [
    "ChipDesign",
    "DefectSpec",
    "DesignOptions",
    "LayerSpec",
    "classic_design",
    "describe_design",
    "make_design_phantom",
    "render_design",
    "sample_design",
]

_METAL_NAMES = ("Cu", "W", "Al", "Co")
_DIELECTRIC_NAMES = ("SiO2", "SiCOH", "Si3N4")
# How likely each metal is as a chip's main line metal (renormalised over the allowed ones):
# Cu damascene dominates, Al subtractive is common in older/upper levels, W and Co are local
# interconnect metals.
_LINE_METAL_WEIGHT = {"Cu": 0.55, "Al": 0.30, "Co": 0.10, "W": 0.05}
# A level keeps the chip's main metal / dielectric with this probability, else draws again.
_KEEP_MAIN = 0.75
_W_VIA_PROBABILITY = 0.35
_AL_TOP_PROBABILITY = 0.3
_BOTH_PROBABILITY = 0.2
_ALTERNATE_PROBABILITY = 0.8
_CUT_PROBABILITY = 0.4
_NO_SUBSTRATE_PROBABILITY = 0.2
_MAX_SUBSTRATE_FRACTION = 0.3
_THICK_UPPER_PROBABILITY = 0.35
# Metal fill of a level is redrawn until it lies here, so every level has structure.
_FILL_RANGE = (0.12, 0.55)
_MAX_FILL_TRIES = 48
# Independent RNG streams (SeedSequence keys) so one part changing never reshuffles another.
_STREAM_SAMPLE, _STREAM_PATTERN, _STREAM_VIAS, _STREAM_DEFECTS = 0, 1, 2, 3


# ------------------------------------------------------------------------------------------------
# Options and specs
# ------------------------------------------------------------------------------------------------


def _canonical(names, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    if isinstance(names, str) or not names:
        raise InputError(f"{what} must be a non-empty tuple of names from {allowed}, got {names!r}")
    lookup = {a.lower(): a for a in allowed}
    out = []
    for name in names:
        if not isinstance(name, str) or name.lower() not in lookup:
            raise InputError(f"unknown {what[:-1]} {name!r} in {what}; allowed: {allowed}")
        if lookup[name.lower()] not in out:
            out.append(lookup[name.lower()])
    return tuple(out)


def _check_range(value, what: str, lo: float, hi: float) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a (low, high) pair, got {value!r}") from None
    if not (lo <= a <= b <= hi):
        raise InputError(f"{what} must satisfy {lo} <= low <= high <= {hi}, got {value!r}")
    return a, b


@dataclass(frozen=True)
class DesignOptions:
    """The ranges of the design space; the defaults are the training space.

    Attributes
    ----------
    metals : tuple of str
        Metals allowed for lines, vias and contacts, from ``("Cu", "W", "Al", "Co")``.
    dielectrics : tuple of str
        Inter-layer dielectrics allowed, from ``("SiO2", "SiCOH", "Si3N4")``. Si₃N₄ etch stops
        are governed by ``etch_stop_probability`` whatever this holds.
    n_metal_levels : (int, int)
        Inclusive range of the number of metal levels (fewer are used when ``nz`` is too thin).
    min_width_px, min_spacing_px, max_width_px : int
        Design-rule limits in voxels; each level draws its own rules inside them.
    via_density : (float, float)
        Range of the chance that a line crossing (or contact site) gets a via, drawn per layer.
    defect_rate : (float, float)
        Range of the void, missing-via and bridge rates, each drawn per chip.
    max_tilt_deg : float
        Largest tilt of the whole chip about y and about x.
    max_offset_px : float
        Largest lateral offset (voxels) of the whole chip along y and x.
    flip_probability : float
        Chance the chip is mounted upside down (substrate at z = 0).
    etch_stop_probability : float
        Chance that a metal level has a Si₃N₄ etch stop on top of it.
    """

    metals: tuple[str, ...] = ("Cu", "W", "Al")
    dielectrics: tuple[str, ...] = ("SiO2", "SiCOH")
    n_metal_levels: tuple[int, int] = (1, 6)
    min_width_px: int = 2
    min_spacing_px: int = 2
    max_width_px: int = 6
    via_density: tuple[float, float] = (0.1, 0.6)
    defect_rate: tuple[float, float] = (0.0, 0.05)
    max_tilt_deg: float = 1.5
    max_offset_px: float = 3.0
    flip_probability: float = 0.25
    etch_stop_probability: float = 0.5

    def __post_init__(self) -> None:
        # Frozen, so normalised values go in through object.__setattr__; an invalid option is
        # reported when it is made, not deep inside a render.
        set_ = object.__setattr__
        set_(self, "metals", _canonical(self.metals, _METAL_NAMES, "metals"))
        set_(self, "dielectrics", _canonical(self.dielectrics, _DIELECTRIC_NAMES, "dielectrics"))
        lo, hi = _check_range(self.n_metal_levels, "n_metal_levels", 1, 12)
        if lo != int(lo) or hi != int(hi):
            raise InputError(f"n_metal_levels must be integers, got {self.n_metal_levels!r}")
        set_(self, "n_metal_levels", (int(lo), int(hi)))
        rules = (self.min_width_px, self.min_spacing_px, self.max_width_px)
        if any(isinstance(r, bool) or not isinstance(r, (int, np.integer)) for r in rules):
            raise InputError(f"width/spacing rules must be integers, got {rules}")
        w_min, w_max, space = self.min_width_px, self.max_width_px, self.min_spacing_px
        if w_min < 1 or space < 1 or w_max < w_min:
            raise InputError(
                "need 1 <= min_width_px <= max_width_px and min_spacing_px >= 1, got "
                f"min_width_px={self.min_width_px}, max_width_px={self.max_width_px}, "
                f"min_spacing_px={self.min_spacing_px}"
            )
        set_(self, "via_density", _check_range(self.via_density, "via_density", 0.0, 1.0))
        set_(self, "defect_rate", _check_range(self.defect_rate, "defect_rate", 0.0, 1.0))
        for name, top in (("max_tilt_deg", 10.0), ("max_offset_px", 1e6)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= top:
                raise InputError(f"{name} must be in [0, {top}], got {v!r}")
        for name in ("flip_probability", "etch_stop_probability"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise InputError(f"{name} must be in [0, 1], got {v!r}")


@dataclass(frozen=True)
class LayerSpec:
    """One layer of a :class:`ChipDesign`: ``labels[z_start:z_stop]`` in volume coordinates.

    Attributes
    ----------
    name, kind : str
        ``kind`` is ``"cap"``, ``"metal"``, ``"via"``, ``"etch_stop"``, ``"contact"`` or
        ``"substrate"``; names are ``M1`` (nearest the substrate) …, ``V1`` …, ``ES1`` ….
    z_start, z_stop : int
        Range along z after the flip (z = 0 the face the beam meets first), untilted.
    material : str
        The layer's fill: a dielectric, ``"Si"`` (substrate) or ``"Si3N4"`` (etch stop).
    metal : str or None
        Metal of the layer's lines, vias or plugs; for an etch stop the metal of the vias that
        pass through it (None when none do).
    direction : str or None
        Metal levels: ``"x"``, ``"y"`` or ``"both"``.
    layout : str or None
        How a ``"both"`` level is drawn: ``"mesh"``, ``"bends"`` (nested L-shaped routes) or
        ``"tiles"`` (two tiles of opposite direction); ``"lines"`` for x / y levels.
    pattern : str or None
        ``"routed"`` (long lines, some broken) or ``"cut"`` (short segments).
    min_width_px, max_width_px, min_spacing_px : int
        The level's own design rules (vias and contacts: the smallest via edge in min_width_px).
    target_fill : float
        Line fill that sets the mean pitch of a metal level.
    via_density : float
        Via, contact: chance that each candidate site gets a via.
    """

    name: str
    kind: str
    z_start: int
    z_stop: int
    material: str
    metal: str | None = None
    direction: str | None = None
    layout: str | None = None
    pattern: str | None = None
    min_width_px: int = 0
    max_width_px: int = 0
    min_spacing_px: int = 0
    target_fill: float = 0.0
    via_density: float = 0.0

    @property
    def thickness_px(self) -> int:
        return self.z_stop - self.z_start


@dataclass(frozen=True)
class DefectSpec:
    """Defect rates of a chip (0 = none).

    ``voids``: about ``voids * metal_voxels / 20`` dielectric holes of 1–2 voxels per edge inside
    each metal level; ``missing_vias``: chance that a via the density kept is dropped;
    ``bridges``: about ``bridges * 20`` short metal links across a gap per metal level.
    """

    voids: float = 0.0
    missing_vias: float = 0.0
    bridges: float = 0.0


@dataclass(frozen=True)
class ChipDesign:
    """A point of the design space: everything :func:`render_design` needs, explicitly.

    Attributes
    ----------
    shape_zyx : (int, int, int)
        Volume shape.
    seed : int
        Seeds the pattern, via and defect RNGs of the render (not the sampling of the specs).
    layers : tuple of LayerSpec
        Contiguous, covering ``0..nz`` in z order (z = 0 first).
    flip : bool
        The chip is mounted upside down (already applied to the layers' z ranges).
    tilt_deg : (float, float)
        Rotation of the whole volume about y and about x, degrees.
    offset_px : (int, int)
        Lateral offset (y, x) of the chip in voxels.
    defects : DefectSpec
        Defect rates.
    """

    shape_zyx: tuple[int, int, int]
    seed: int
    layers: tuple[LayerSpec, ...]
    flip: bool = False
    tilt_deg: tuple[float, float] = (0.0, 0.0)
    offset_px: tuple[int, int] = (0, 0)
    defects: DefectSpec = field(default_factory=DefectSpec)

    @property
    def metal_levels(self) -> tuple[LayerSpec, ...]:
        """The metal levels, ``M1`` first."""
        return tuple(sorted((s for s in self.layers if s.kind == "metal"), key=_level_number))


def _level_number(spec: LayerSpec) -> int:
    return int(spec.name.lstrip("MVES"))


def _label(name: str) -> int:
    return LABELS[name.lower()]


# ------------------------------------------------------------------------------------------------
# Sampling the specs
# ------------------------------------------------------------------------------------------------


def _check_shape(shape_zyx) -> tuple[int, int, int]:
    try:
        shape = tuple(int(n) for n in shape_zyx)
        exact = all(int(n) == n for n in shape_zyx)
    except (TypeError, ValueError):
        raise InputError(f"shape_zyx must be three positive integers, got {shape_zyx!r}") from None
    if len(shape) != 3 or not exact or min(shape) < 1:
        raise InputError(f"shape_zyx must be three positive integers, got {shape_zyx!r}")
    return shape


def _check_fits(shape: tuple[int, int, int], options: DesignOptions) -> None:
    nz, ny, nx = shape
    lo = options.n_metal_levels[0]
    if nz < 2 * lo:
        raise InputError(
            f"shape_zyx depth nz={nz} is too thin for n_metal_levels >= {lo}: {lo} metal, "
            f"{lo - 1} via and a cap layer need nz >= {2 * lo}"
        )
    lateral = 2 * options.min_width_px + options.min_spacing_px
    if min(ny, nx) < lateral:
        raise InputError(
            f"shape_zyx lateral size (ny={ny}, nx={nx}) is too small for two lines of "
            f"min_width_px={options.min_width_px} at min_spacing_px={options.min_spacing_px}: "
            f"need >= {lateral}"
        )


def _weighted_choice(rng: np.random.Generator, names: tuple[str, ...], weight: dict) -> str:
    p = np.array([weight.get(n, 0.0) for n in names], dtype=float)
    if p.sum() == 0:
        p = np.ones(len(names))
    return str(names[int(rng.choice(len(names), p=p / p.sum()))])


def _draw_skeleton(rng: np.random.Generator, nz: int, n: int, p_es: float) -> list[dict]:
    """Layers bottom-up with minimum thicknesses; optional layers only where nz leaves room."""
    metal_min = 2 if nz >= 3 * n + 1 else 1
    need = n * metal_min + (n - 1) + 1  # metals, vias, cap
    sub_frac = 0.0 if rng.random() < _NO_SUBSTRATE_PROBABILITY else rng.uniform(0.03, 1.0)
    substrate = int(round(sub_frac * _MAX_SUBSTRATE_FRACTION * nz))
    # Without a substrate the cut may also miss the contact level.
    want_contact = substrate > 0 or rng.random() < 0.5
    es_thick = [int(rng.integers(1, 3)) if rng.random() < p_es else 0 for _ in range(n)]
    bottom_up: list[dict] = []
    if want_contact and need + 1 <= nz:
        bottom_up.append(dict(name="contact", kind="contact", t=1))
        need += 1
    for k in range(1, n + 1):
        if k > 1:
            bottom_up.append(dict(name=f"V{k - 1}", kind="via", t=1))
        bottom_up.append(dict(name=f"M{k}", kind="metal", t=metal_min))
        if es_thick[k - 1] and need + es_thick[k - 1] <= nz:
            bottom_up.append(dict(name=f"ES{k}", kind="etch_stop", t=es_thick[k - 1]))
            need += es_thick[k - 1]
    bottom_up.append(dict(name="cap", kind="cap", t=1))
    substrate = min(substrate, nz - need)
    if substrate > 0:
        bottom_up.insert(0, dict(name="substrate", kind="substrate", t=substrate))
    return bottom_up


def _grow_thicknesses(rng: np.random.Generator, bottom_up: list[dict], nz: int) -> None:
    """Share the voxels left over after the minima among the layers at random weights."""
    n = sum(layer["kind"] == "metal" for layer in bottom_up)
    thick_from = n + 1  # levels from here up are thick (global / power levels), if any
    if n > 1 and rng.random() < _THICK_UPPER_PROBABILITY:
        thick_from = int(rng.integers(2, n + 1))
    weights = []
    for layer in bottom_up:
        kind = layer["kind"]
        if kind == "metal":
            w = rng.uniform(1.0, 2.0)
            if int(layer["name"][1:]) >= thick_from:
                w *= rng.uniform(1.8, 3.0)
                layer["thick"] = True
        elif kind in ("via", "contact"):
            w = rng.uniform(0.5, 1.2)
        elif kind == "cap":
            # Sometimes a thick passivation / top oxide pushes the whole stack down.
            w = rng.uniform(0.2, 1.5) * (rng.uniform(2.0, 4.0) if rng.random() < 0.25 else 1.0)
        else:  # etch stops stay 1–2 voxels; the substrate was drawn on its own
            w = 0.0
        weights.append(w)
    spare = nz - sum(layer["t"] for layer in bottom_up)
    w = np.asarray(weights)
    extra = rng.multinomial(spare, w / w.sum()) if spare > 0 else np.zeros(len(w), dtype=int)
    for layer, e in zip(bottom_up, extra, strict=True):
        layer["t"] += int(e)


def _level_rules(
    rng: np.random.Generator, options: DesignOptions, lateral: int, thick: bool
) -> dict:
    lo, hi, s_min = options.min_width_px, options.max_width_px, options.min_spacing_px
    mid = (lo + hi) // 2
    # Thick upper levels carry wide (power, global) lines.
    w_lo = int(rng.integers(mid, hi + 1)) if thick else int(rng.integers(lo, mid + 1))
    w_hi = int(rng.integers(w_lo, hi + 1))
    space = int(rng.integers(s_min, s_min + 3))
    if 2 * w_lo + space > lateral:  # too wide for two lines: fall back to the limits
        w_lo, w_hi, space = lo, lo, s_min
    return dict(min_width_px=w_lo, max_width_px=w_hi, min_spacing_px=space)


def _level_direction(rng: np.random.Generator, previous: str | None) -> str:
    if rng.random() < _BOTH_PROBABILITY:
        return "both"
    if previous in ("x", "y"):
        other = "y" if previous == "x" else "x"
        return other if rng.random() < _ALTERNATE_PROBABILITY else previous
    return "x" if rng.random() < 0.5 else "y"


def _level_layout(rng: np.random.Generator, direction: str, pattern: str) -> str:
    if direction != "both":
        return "lines"
    if pattern == "cut":
        return "tiles"
    return str(rng.choice(["mesh", "bends", "tiles"]))


def _metal_plan(rng: np.random.Generator, options: DesignOptions, n: int) -> dict:
    """Metal of each level, via layer and the contacts."""
    metals = options.metals
    main = _weighted_choice(rng, metals, _LINE_METAL_WEIGHT)
    levels = [
        main if rng.random() < _KEEP_MAIN else _weighted_choice(rng, metals, _LINE_METAL_WEIGHT)
        for _ in range(n)
    ]
    if n >= 2 and "Al" in metals and rng.random() < _AL_TOP_PROBABILITY:
        levels[-1] = "Al"  # an Al pad / power level on top
    # A via is W plugs or the metal of the line above it (dual damascene).
    vias = [
        "W" if "W" in metals and rng.random() < _W_VIA_PROBABILITY else levels[k + 1]
        for k in range(n - 1)
    ]
    if "W" in metals and rng.random() < 0.85:
        contact = "W"
    elif "Co" in metals:
        contact = "Co"
    else:
        contact = levels[0]
    return dict(levels=levels, vias=vias, contact=contact)


def _dielectric_plan(rng: np.random.Generator, options: DesignOptions, n: int) -> dict:
    diel = options.dielectrics
    main = str(rng.choice(diel))
    levels = [main if rng.random() < _KEEP_MAIN else str(rng.choice(diel)) for _ in range(n)]
    cap = "Si3N4" if rng.random() < 0.5 * options.etch_stop_probability else str(rng.choice(diel))
    # Pre-metal dielectric around the contacts is an oxide where the options allow one.
    contact = "SiO2" if "SiO2" in diel else diel[0]
    return dict(levels=levels, cap=cap, contact=contact)


def _layer_specs(rng: np.random.Generator, shape, options: DesignOptions, n: int) -> list:
    """Bottom-up LayerSpecs in chip coordinates (z ranges filled in by the caller)."""
    nz, ny, nx = shape
    skeleton = _draw_skeleton(rng, nz, n, options.etch_stop_probability)
    _grow_thicknesses(rng, skeleton, nz)
    metal = _metal_plan(rng, options, n)
    diel = _dielectric_plan(rng, options, n)
    specs, previous = [], None
    for layer in skeleton:
        name, kind = layer["name"], layer["kind"]
        spec = dict(name=name, kind=kind, t=layer["t"])
        if kind == "metal":
            k = int(name[1:])
            direction = _level_direction(rng, previous)
            previous = direction if direction != "both" else previous
            pattern = "cut" if rng.random() < _CUT_PROBABILITY else "routed"
            spec.update(
                material=diel["levels"][k - 1], metal=metal["levels"][k - 1],
                direction=direction, pattern=pattern,
                layout=_level_layout(rng, direction, pattern),
                target_fill=float(rng.uniform(0.25, 0.5)),
                **_level_rules(rng, options, min(ny, nx), bool(layer.get("thick"))),
            )
        elif kind in ("via", "contact"):
            k = int(name[1:]) if kind == "via" else 0
            spec.update(
                material=diel["levels"][k] if kind == "via" else diel["contact"],
                metal=metal["vias"][k - 1] if kind == "via" else metal["contact"],
                min_width_px=options.min_width_px,
                via_density=float(rng.uniform(*options.via_density)),
            )
        elif kind == "etch_stop":
            k = int(name[2:])
            spec.update(material="Si3N4", metal=metal["vias"][k - 1] if k < n else None)
        elif kind == "cap":
            spec.update(material=diel["cap"])
        else:
            spec.update(material="Si")
        specs.append(spec)
    return specs


def _place(specs: list[dict], nz: int, flip: bool) -> tuple[LayerSpec, ...]:
    """Bottom-up specs with thicknesses -> LayerSpecs in volume z order."""
    out, z_stop = [], nz
    for spec in specs:
        t = spec.pop("t")
        z0, z1 = z_stop - t, z_stop
        if flip:
            z0, z1 = nz - z1, nz - z0
        out.append(LayerSpec(z_start=z0, z_stop=z1, **spec))
        z_stop -= t
    return tuple(sorted(out, key=lambda s: s.z_start))


def sample_design(
    seed: int, shape_zyx: tuple[int, int, int], options: DesignOptions = DesignOptions()
) -> ChipDesign:
    """Draw one chip design from the design space.

    Parameters
    ----------
    seed : int
        Non-negative; the same seed, shape and options give the same design.
    shape_zyx : (nz, ny, nx)
        Volume shape the design fills.
    options : DesignOptions
        The ranges of the space.

    Returns
    -------
    ChipDesign

    Raises
    ------
    InputError
        Bad seed, options or shape (too thin for ``n_metal_levels[0]`` levels, too narrow for
        two lines).
    """
    seed = _check_seed(seed)
    if not isinstance(options, DesignOptions):
        raise InputError(f"options must be a DesignOptions, got {type(options).__name__}")
    shape = _check_shape(shape_zyx)
    _check_fits(shape, options)
    rng = np.random.default_rng([seed, _STREAM_SAMPLE])
    lo, hi = options.n_metal_levels
    n = min(int(rng.integers(lo, hi + 1)), shape[0] // 2)
    specs = _layer_specs(rng, shape, options, n)
    flip = bool(rng.random() < options.flip_probability)
    tilt = tuple(float(rng.uniform(-1.0, 1.0) * options.max_tilt_deg) for _ in range(2))
    reach = int(math.floor(options.max_offset_px))
    offset = tuple(int(rng.integers(-reach, reach + 1)) for _ in range(2))
    defects = DefectSpec(*(float(rng.uniform(*options.defect_rate)) for _ in range(3)))
    return ChipDesign(
        shape_zyx=shape, seed=seed, layers=_place(specs, shape[0], flip), flip=flip,
        tilt_deg=tilt, offset_px=offset, defects=defects,
    )


def classic_design(
    shape_zyx: tuple[int, int, int],
    n_metal_layers: int,
    *,
    seed: int = 0,
    min_width_px: int = 2,
    min_spacing_px: int = 2,
    max_width_px: int = 6,
    via_density: float = 0.25,
) -> ChipDesign:
    """The :func:`~apt_stream.sim.phantom.make_ic_phantom` stack as one point of the space.

    Same layer names, kinds and z ranges as ``make_ic_phantom`` (its ``_layer_stack``): a SiO₂
    cap, ``M_n`` … ``M1`` of routed Cu lines alternating x (odd) / y (even), Cu vias, W contacts,
    a Si substrate; no flip, tilt, offset or defects. The line patterns are this module's, so
    the labels differ from ``make_ic_phantom``'s.

    Raises
    ------
    InputError
        A shape too thin for the stack (``nz < 2 * n_metal_layers + 3``) or bad rules.
    """
    nz, ny, nx = _check_shape(shape_zyx)
    n_ok = isinstance(n_metal_layers, (int, np.integer)) and not isinstance(n_metal_layers, bool)
    if not n_ok or n_metal_layers < 1:
        raise InputError(f"n_metal_layers must be an integer >= 1, got {n_metal_layers!r}")
    if nz < 2 * n_metal_layers + 3:
        raise InputError(
            f"shape_zyx depth nz={nz} is too thin for {n_metal_layers} metal layers: the classic "
            f"stack needs nz >= {2 * n_metal_layers + 3}"
        )
    options = DesignOptions(min_width_px=min_width_px, min_spacing_px=min_spacing_px,
                            max_width_px=max_width_px)
    _check_fits((nz, ny, nx), options)
    rules = dict(
        min_width_px=min_width_px, max_width_px=max_width_px, min_spacing_px=min_spacing_px
    )
    fill = dict(cap="SiO2", metal="SiO2", via="SiO2", contact="SiO2", substrate="Si")
    metal = dict(metal="Cu", via="Cu", contact="W")
    specs = []
    for layer in _layer_stack(nz, int(n_metal_layers)):
        extra: dict = {}
        if layer.kind == "metal":
            extra = dict(direction=layer.direction, layout="lines", pattern="routed",
                         target_fill=0.4, **rules)
        elif layer.kind in ("via", "contact"):
            extra = dict(min_width_px=min_width_px, via_density=via_density)
        specs.append(LayerSpec(layer.name, layer.kind, layer.z_start, layer.z_stop,
                               fill[layer.kind], metal.get(layer.kind), **extra))
    return ChipDesign(shape_zyx=(nz, ny, nx), seed=_check_seed(seed), layers=tuple(specs))


# ------------------------------------------------------------------------------------------------
# 2D patterns: every generator keeps the level's rules (widths >= min, <= max across the lines,
# interior gaps >= spacing), also at the faces, so a cut of the pattern is a valid chip.
# ------------------------------------------------------------------------------------------------


def _tracks(rng, n_across: int, rules: dict, fill: float) -> list[tuple[int, int]]:
    """(start, stop) of parallel tracks across ``n_across`` voxels at a mean fill."""
    w_lo, w_hi, space = rules["min_width_px"], rules["max_width_px"], rules["min_spacing_px"]
    mean_gap = 0.5 * (w_lo + w_hi) * (1 - fill) / fill
    extra_max = max(0, round(2 * (mean_gap - space)))
    out = []
    pos = int(rng.integers(0, space + extra_max + 1))  # the gap at the face is a cut: any size
    while pos + w_lo <= n_across:
        width = min(int(rng.integers(w_lo, w_hi + 1)), n_across - pos)
        out.append((pos, pos + width))
        pos += width + space + int(rng.integers(0, extra_max + 1))
    return out


def _cut_segments(rng, n_along: int, rules: dict) -> list[tuple[int, int]]:
    """Short segments (islands) along one track: length w_lo..3*w_hi, gaps >= spacing."""
    w_lo, w_hi, space = rules["min_width_px"], rules["max_width_px"], rules["min_spacing_px"]
    out = []
    pos = int(rng.integers(0, 2 * space + 1))
    while pos + w_lo <= n_along:
        length = min(int(rng.integers(w_lo, 3 * w_hi + 1)), n_along - pos)
        out.append((pos, pos + length))
        pos += length + space + int(rng.integers(0, 2 * space + 1))
    return out


def _lines(rng, shape_yx, direction: str, pattern: str, rules: dict, fill: float) -> np.ndarray:
    """Lines along x (rows) or y (columns), routed with breaks or cut into segments."""
    ny, nx = shape_yx
    n_across, n_along = (ny, nx) if direction == "x" else (nx, ny)
    mask = np.zeros((n_across, n_along), dtype=bool)
    for c0, c1 in _tracks(rng, n_across, rules, fill):
        if pattern == "cut":
            segments = _cut_segments(rng, n_along, rules)
        else:
            segments = _segments(rng, n_along, min_len_px=2 * rules["min_width_px"],
                                 min_gap_px=rules["min_spacing_px"])
        for a0, a1 in segments:
            mask[c0:c1, a0:a1] = True
    return mask if direction == "x" else mask.T


def _mesh(rng, shape_yx, rules: dict, fill: float) -> np.ndarray:
    """Unbroken lines in both directions: the gaps are rectangles, so the rules hold."""
    ny, nx = shape_yx
    per_axis = 1.0 - math.sqrt(1.0 - fill)  # 1 - (1 - f)^2 = fill
    rows = np.zeros(ny, dtype=bool)
    cols = np.zeros(nx, dtype=bool)
    for a, b in _tracks(rng, ny, rules, per_axis):
        rows[a:b] = True
    for a, b in _tracks(rng, nx, rules, per_axis):
        cols[a:b] = True
    return rows[:, None] | cols[None, :]


def _bends(rng, shape_yx, rules: dict, fill: float) -> np.ndarray:
    """Nested L-shaped routes (a bus turning a corner), flipped to a random corner.

    Route i runs along x from the left face to its corner, then along y to the bottom face; the
    next route starts one pitch lower and turns one pitch further left, so parallel parts keep
    the gap on both legs.
    """
    ny, nx = shape_yx
    w_lo, w_hi, space = rules["min_width_px"], rules["max_width_px"], rules["min_spacing_px"]
    mean_gap = 0.5 * (w_lo + w_hi) * (1 - fill) / fill
    extra_max = max(0, round(2 * (mean_gap - space)))
    mask = np.zeros((ny, nx), dtype=bool)
    top = int(rng.integers(0, space + extra_max + 1))
    right = nx - int(rng.integers(0, space + extra_max + 1))
    while True:
        width = int(rng.integers(w_lo, w_hi + 1))
        corner = right - width
        if top + width > ny or corner < 0:
            break
        mask[top : top + width, : corner + width] = True
        mask[top:, corner : corner + width] = True
        gap = space + int(rng.integers(0, extra_max + 1))
        top += width + gap
        right = corner - gap
    if rng.random() < 0.5:
        mask = mask[::-1]
    if rng.random() < 0.5:
        mask = mask[:, ::-1]
    return np.ascontiguousarray(mask)


def _tiles(rng, shape_yx, pattern: str, rules: dict, fill: float) -> np.ndarray:
    """Two tiles side by side with lines of opposite directions, a guard gap between them."""
    ny, nx = shape_yx
    axis = int(rng.integers(0, 2))
    n = shape_yx[axis]
    space = rules["min_spacing_px"]
    guard = space + int(rng.integers(0, space + 1))
    tile_min = 2 * rules["min_width_px"] + space
    if n < 2 * tile_min + guard:  # no room for two tiles: one direction only
        return _lines(rng, shape_yx, "x" if axis else "y", pattern, rules, fill)
    split = int(rng.integers(tile_min, n - guard - tile_min + 1))
    first = "x" if rng.random() < 0.5 else "y"
    second = "y" if first == "x" else "x"
    mask = np.zeros((ny, nx), dtype=bool)
    if axis == 0:
        mask[:split] = _lines(rng, (split, nx), first, pattern, rules, fill)
        mask[split + guard :] = _lines(rng, (ny - split - guard, nx), second, pattern, rules, fill)
    else:
        mask[:, :split] = _lines(rng, (ny, split), first, pattern, rules, fill)
        rest = (ny, nx - split - guard)
        mask[:, split + guard :] = _lines(rng, rest, second, pattern, rules, fill)
    return mask


def _level_mask_once(rng, shape_yx, spec: LayerSpec) -> np.ndarray:
    rules = dict(min_width_px=spec.min_width_px, max_width_px=spec.max_width_px,
                 min_spacing_px=spec.min_spacing_px)
    fill = spec.target_fill
    if spec.layout == "mesh":
        return _mesh(rng, shape_yx, rules, fill)
    if spec.layout == "bends":
        return _bends(rng, shape_yx, rules, fill)
    if spec.layout == "tiles":
        return _tiles(rng, shape_yx, spec.pattern, rules, fill)
    return _lines(rng, shape_yx, spec.direction, spec.pattern, rules, fill)


def _level_mask(rng, shape_yx, spec: LayerSpec) -> np.ndarray:
    """A level's 2D line mask, redrawn until its fill lies in _FILL_RANGE (else the closest)."""
    best = None
    for _ in range(_MAX_FILL_TRIES):
        mask = _level_mask_once(rng, shape_yx, spec)
        f = float(mask.mean())
        miss = max(_FILL_RANGE[0] - f, f - _FILL_RANGE[1], 0.0)
        if best is None or miss < best[0]:
            best = (miss, mask)
        if miss == 0.0:
            break
    return best[1]


# ------------------------------------------------------------------------------------------------
# Vias, contacts and defects
# ------------------------------------------------------------------------------------------------


def _site_grid(rng, shape_yx, size: int, space: int) -> np.ndarray:
    """Squares of edge ``size`` on a jittered grid: cuts long overlaps into via-sized pieces."""
    rules = dict(min_width_px=size, max_width_px=size, min_spacing_px=space)
    rows = np.zeros(shape_yx[0], dtype=bool)
    cols = np.zeros(shape_yx[1], dtype=bool)
    for a, b in _tracks(rng, shape_yx[0], rules, 0.4):
        rows[a:b] = True
    for a, b in _tracks(rng, shape_yx[1], rules, 0.4):
        cols[a:b] = True
    return rows[:, None] & cols[None, :]


def _pick_sites(rng, candidates: np.ndarray, p: float, min_width: int) -> np.ndarray:
    """Keep rectangular candidate components at least ``min_width`` across, each with prob p."""
    comps, n = ndimage.label(candidates)
    if n == 0:
        return np.zeros_like(candidates)
    draws = rng.random(n) < p
    keep = np.zeros(n + 1, dtype=bool)
    for i, box in enumerate(ndimage.find_objects(comps)):
        if draws[i] and min(s.stop - s.start for s in box) >= min_width:
            # Only full rectangles, so a via never has a narrow neck.
            keep[i + 1] = bool(np.all(comps[box] == i + 1))
    return keep[comps]


def _crossing_candidates(rng, below: LayerSpec, above: LayerSpec, m_below, m_above, via):
    overlap = m_below & m_above
    crossing = {below.direction, above.direction} == {"x", "y"}
    if crossing:  # line crossings are already via-sized rectangles
        return overlap
    size = int(rng.integers(via.min_width_px, max(via.min_width_px, below.min_width_px) + 1))
    return overlap & _site_grid(rng, overlap.shape, size, below.min_spacing_px)


def _contact_candidates(rng, m1: LayerSpec, mask: np.ndarray, contact: LayerSpec) -> np.ndarray:
    w = contact.min_width_px
    length = int(rng.integers(w, 2 * w + 1))
    grid = _site_grid(rng, mask.shape, length, max(m1.min_spacing_px, contact.min_width_px))
    if m1.direction in ("x", "y"):
        # Plugs span the line's full width: stripes across the lines, not squares.
        axis = 1 if m1.direction == "y" else 0
        grid = np.broadcast_to(grid.any(axis=axis, keepdims=True), mask.shape)
    return mask & grid


def _bridge(rng, mask: np.ndarray, max_gap: int, width: int) -> bool:
    """Join two metal runs across one gap of <= max_gap voxels with a short link (in place)."""
    options = []
    for axis in (0, 1):
        m = mask if axis == 0 else mask.T
        n = m.shape[0]
        for g in range(1, max_gap + 1):
            if n < g + 2:
                break
            ok = m[: n - g - 1] & m[g + 1 :]
            for k in range(1, g + 1):
                ok &= ~m[k : n - g - 1 + k]
            hits = np.argwhere(ok)
            if len(hits):
                options.append((axis, g, hits))
    if not options:
        return False
    axis, g, hits = options[int(rng.integers(len(options)))]
    i, j = hits[int(rng.integers(len(hits)))]
    if axis == 0:
        mask[i + 1 : i + 1 + g, j : j + width] = True
    else:
        mask[j : j + width, i + 1 : i + 1 + g] = True
    return True


def _voids(rng, block: np.ndarray, metal: np.ndarray, rate: float, dielectric: int) -> None:
    """Small dielectric holes (1–2 voxels per edge) fully inside the metal of one level."""
    idx = np.flatnonzero(metal)
    n = int(rng.poisson(rate * idx.size / 20.0)) if idx.size else 0
    for flat in rng.choice(idx, size=min(n, idx.size), replace=False) if n else ():
        z, y, x = np.unravel_index(flat, metal.shape)
        dz, dy, dx = (int(v) for v in rng.integers(1, 3, size=3))
        box = (slice(z, z + dz), slice(y, y + dy), slice(x, x + dx))
        if np.all(metal[box]):
            block[box] = dielectric


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------


def _check_design(design: ChipDesign) -> None:
    if not isinstance(design, ChipDesign):
        raise InputError(f"render_design needs a ChipDesign, got {type(design).__name__}")
    nz = design.shape_zyx[0]
    z = 0
    for spec in design.layers:
        if spec.z_start != z or spec.z_stop <= spec.z_start:
            raise InputError(
                f"design layers must be contiguous from z=0 with positive thickness; layer "
                f"{spec.name!r} spans {spec.z_start}..{spec.z_stop}, expected start {z}"
            )
        for name in (spec.material, spec.metal):
            if name is not None and name.lower() not in LABELS:
                raise InputError(f"unknown material {name!r} in layer {spec.name!r}")
        z = spec.z_stop
    names = {spec.name for spec in design.layers if spec.kind == "metal"}
    for spec in design.layers:
        k = _level_number(spec) if spec.kind == "via" else 0
        needs = {f"M{k}", f"M{k + 1}"} if spec.kind == "via" else {"M1"}
        if spec.kind in ("via", "contact") and not needs <= names:
            raise InputError(
                f"layer {spec.name!r} connects {sorted(needs)}, which the design lacks"
            )
    if z != nz:
        raise InputError(f"design layers end at z={z}, not at nz={nz}")


def _level_masks(design: ChipDesign, shape_yx: tuple[int, int]) -> dict[str, np.ndarray]:
    """2D line masks of the metal levels (bridges included), each from its own RNG stream."""
    index = {spec.name: i for i, spec in enumerate(design.layers)}
    masks = {}
    for spec in design.metal_levels:
        rng = np.random.default_rng([design.seed, _STREAM_PATTERN, index[spec.name]])
        mask = _level_mask(rng, shape_yx, spec)
        for _ in range(int(rng.poisson(design.defects.bridges * 20))):
            _bridge(rng, mask, 2 * spec.min_spacing_px + 1, spec.min_width_px)
        masks[spec.name] = mask
    return masks


def _via_masks(design: ChipDesign, lines: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """2D masks of the via and contact layers, from the line masks they connect."""
    index = {spec.name: i for i, spec in enumerate(design.layers)}
    levels = {spec.name: spec for spec in design.metal_levels}
    masks = {}
    for spec in design.layers:
        if spec.kind not in ("via", "contact"):
            continue
        rng = np.random.default_rng([design.seed, _STREAM_VIAS, index[spec.name]])
        if spec.kind == "via":
            k = _level_number(spec)
            below, above = levels[f"M{k}"], levels[f"M{k + 1}"]
            pair = lines[below.name], lines[above.name]
            cand = _crossing_candidates(rng, below, above, *pair, spec)
        else:
            cand = _contact_candidates(rng, levels["M1"], lines["M1"], spec)
        vias = _pick_sites(rng, cand, spec.via_density, spec.min_width_px)
        if design.defects.missing_vias > 0 and vias.any():
            comps, n = ndimage.label(vias)
            drop = np.concatenate([[False], rng.random(n) < design.defects.missing_vias])
            vias &= ~drop[comps]
        masks[spec.name] = vias
    return masks


def _padded_masks(design: ChipDesign, pad: int) -> dict[str, np.ndarray]:
    """2D metal masks of every metal, via and contact layer on the padded lateral grid."""
    _, ny, nx = design.shape_zyx
    lines = _level_masks(design, (ny + 2 * pad, nx + 2 * pad))
    return {**lines, **_via_masks(design, lines)}


def _etch_stop_vias(design: ChipDesign) -> dict[str, str]:
    """Etch stop name -> the via layer whose vias pass through it (the one touching it)."""
    out = {}
    vias = [s for s in design.layers if s.kind == "via"]
    for es in (s for s in design.layers if s.kind == "etch_stop"):
        for via in vias:
            if via.z_stop == es.z_start or via.z_start == es.z_stop:
                out[es.name] = via.name
    return out


def _tilt(labels: np.ndarray, tilt_deg: tuple[float, float]) -> np.ndarray:
    """Rotate the volume about y and x (nearest neighbour) around its centre."""
    ay, ax = (math.radians(a) for a in tilt_deg)
    rot_y = np.array([[math.cos(ay), 0, -math.sin(ay)], [0, 1, 0], [math.sin(ay), 0, math.cos(ay)]])
    rot_x = np.array([[math.cos(ax), -math.sin(ax), 0], [math.sin(ax), math.cos(ax), 0], [0, 0, 1]])
    matrix = rot_y @ rot_x
    centre = (np.asarray(labels.shape) - 1) / 2.0
    offset = centre - matrix @ centre
    return ndimage.affine_transform(labels, matrix, offset=offset, order=0, mode="nearest")


def render_design(design: ChipDesign, *, voxel_size_m: float) -> Phantom:
    """Render a chip design into a label volume.

    Deterministic given the design: the line patterns, vias and defects come from RNGs seeded
    by ``design.seed``.

    Parameters
    ----------
    design : ChipDesign
        From :func:`sample_design` or :func:`classic_design` (or built by hand).
    voxel_size_m : float
        Voxel edge, metres (> 0), recorded in the phantom.

    Returns
    -------
    Phantom
        ``labels`` uint8 (nz, ny, nx) with labels of :data:`apt_stream.sim.materials.MATERIALS`
        (never vacuum), and ``layers`` with the specs' untilted z ranges (z = 0 first).

    Raises
    ------
    InputError
        Not a ChipDesign, layers that do not tile ``0..nz``, unknown materials, bad voxel size.
    """
    _check_design(design)
    if not isinstance(voxel_size_m, (int, float)) or not voxel_size_m > 0:
        raise InputError(f"voxel_size_m must be > 0, got {voxel_size_m!r}")
    nz, ny, nx = design.shape_zyx
    dy, dx = design.offset_px
    # Draw on a grid larger by the offset, then cut the volume out of it: a shifted chip is a
    # different cut of the same larger chip, and lines still run to the faces.
    pad = max(abs(dy), abs(dx))
    masks = {name: m[pad + dy : pad + dy + ny, pad + dx : pad + dx + nx]
             for name, m in _padded_masks(design, pad).items()}
    through = _etch_stop_vias(design)
    labels = np.empty((nz, ny, nx), dtype=np.uint8)
    layers = []
    defect_rng = np.random.default_rng([design.seed, _STREAM_DEFECTS])
    for spec in design.layers:
        block = labels[spec.z_start : spec.z_stop]
        block[...] = _label(spec.material)
        mask = masks.get(spec.name, masks.get(through.get(spec.name)))
        metal_label = None
        if mask is not None and spec.metal is not None:
            metal_label = _label(spec.metal)
            block[:, mask] = metal_label
        if spec.kind == "metal" and design.defects.voids > 0:
            _voids(defect_rng, block, np.broadcast_to(mask, block.shape), design.defects.voids,
                   _label(spec.material))
        layers.append(Layer(spec.name, spec.kind, spec.z_start, spec.z_stop,
                            spec.direction, metal_label))
    if any(design.tilt_deg):
        labels = _tilt(labels, design.tilt_deg)
    return Phantom(labels=labels, voxel_size_m=float(voxel_size_m), seed=design.seed,
                   layers=tuple(layers))


def make_design_phantom(
    seed: int,
    *,
    shape_zyx: tuple[int, int, int] = (32, 64, 64),
    voxel_size_m: float = 14e-9,
    options: DesignOptions = DesignOptions(),
) -> Phantom:
    """A seeded phantom of the wide design space: :func:`sample_design` + :func:`render_design`.

    Parameters
    ----------
    seed : int
        Non-negative; the same arguments give the same labels.
    shape_zyx : (nz, ny, nx)
        Volume shape.
    voxel_size_m : float
        Voxel edge, metres.
    options : DesignOptions
        The design space.

    Returns
    -------
    Phantom

    Raises
    ------
    InputError
        Bad seed, shape, options or voxel size.
    """
    design = sample_design(seed, shape_zyx, options)
    return render_design(design, voxel_size_m=voxel_size_m)


def describe_design(design: ChipDesign) -> dict:
    """JSON-ready summary of a design: levels, depths, materials, flip, tilt, offset, defects.

    Layer entries carry ``z_range`` ``[start, stop)`` in volume coordinates (after the flip,
    untilted) and every non-empty field of their :class:`LayerSpec`.
    """
    if not isinstance(design, ChipDesign):
        raise InputError(f"describe_design needs a ChipDesign, got {type(design).__name__}")
    layers = []
    for spec in design.layers:
        entry = {"name": spec.name, "kind": spec.kind, "z_range": [spec.z_start, spec.z_stop],
                 "thickness_px": spec.thickness_px, "material": spec.material, "metal": spec.metal}
        if spec.kind == "metal":
            entry.update(direction=spec.direction, layout=spec.layout, pattern=spec.pattern,
                         min_width_px=spec.min_width_px, max_width_px=spec.max_width_px,
                         min_spacing_px=spec.min_spacing_px, target_fill=spec.target_fill)
        if spec.kind in ("via", "contact"):
            entry.update(via_density=spec.via_density, min_width_px=spec.min_width_px)
        layers.append(entry)
    materials = {spec.material for spec in design.layers}
    materials |= {spec.metal for spec in design.layers if spec.metal is not None}
    substrate = [s.thickness_px for s in design.layers if s.kind == "substrate"]
    levels = design.metal_levels
    return {
        "shape_zyx": list(design.shape_zyx),
        "seed": design.seed,
        "n_metal_levels": len(levels),
        "metal_level_z_ranges": {s.name: [s.z_start, s.z_stop] for s in levels},
        "substrate_thickness_px": substrate[0] if substrate else 0,
        "flip": design.flip,
        "tilt_deg": list(design.tilt_deg),
        "offset_px": list(design.offset_px),
        "defects": {"voids": design.defects.voids, "missing_vias": design.defects.missing_vias,
                    "bridges": design.defects.bridges},
        "materials": sorted(materials, key=lambda m: _label(m)),
        "labels": {m: _label(m) for m in sorted(materials, key=_label)},
        "layers": layers,
    }

