"""The wide, seeded IC design space (apt_stream.sim.design) and the tables behind its materials."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest

from apt_stream.config import PRESETS
from apt_stream.errors import InputError
from apt_stream.sim.design import (
    ChipDesign,
    DesignOptions,
    classic_design,
    describe_design,
    make_design_phantom,
    render_design,
    sample_design,
)
from apt_stream.sim.materials import (
    ABSORPTION_EDGES_KEV,
    AL,
    CO,
    CU,
    MATERIALS,
    SI,
    SI3N4,
    SICOH,
    VACUUM,
    W,
    is_metal,
    refractive_index,
)
from apt_stream.sim.phantom import Phantom, make_ic_phantom

SHAPE = (32, 64, 64)
VOXEL = 14e-9
SEEDS = range(30)
# Untilted, unshifted and defect-free: the patterns exactly as the rules draw them.
CLEAN = DesignOptions(max_tilt_deg=0.0, max_offset_px=0.0, defect_rate=(0.0, 0.0))


@pytest.fixture(scope="module")
def designs() -> list[ChipDesign]:
    return [sample_design(s, SHAPE) for s in SEEDS]


@pytest.fixture(scope="module")
def phantoms(designs) -> list[Phantom]:
    return [render_design(d, voxel_size_m=VOXEL) for d in designs]


@pytest.fixture(scope="module")
def clean() -> list[tuple[ChipDesign, Phantom]]:
    out = []
    for s in SEEDS:
        d = sample_design(s, SHAPE, CLEAN)
        out.append((d, render_design(d, voxel_size_m=VOXEL)))
    return out


def _runs_1d(row: np.ndarray):
    """(start, stop, value) of the runs of equal values in a 1D boolean array."""
    edges = np.flatnonzero(row[1:] != row[:-1]) + 1
    starts = np.concatenate([[0], edges])
    stops = np.concatenate([edges, [row.size]])
    return zip(starts.tolist(), stops.tolist(), row[starts].tolist(), strict=True)


def _violations(mask: np.ndarray, *, min_width: int, min_spacing: int, max_width: int | None,
                lines_along: str | None) -> list[tuple]:
    """Design-rule breaks of one 2D (y, x) metal mask, scanning every row and column.

    Metal runs must be >= min_width (also at the faces: the generator keeps cuts valid); gaps
    between two metal runs >= min_spacing; runs across the lines (only for one-direction
    levels) <= max_width.
    """
    bad = []
    for axis, rows in (("x", mask), ("y", mask.T)):
        across = lines_along in ("x", "y") and axis != lines_along
        for i, row in enumerate(rows):
            for a, b, metal in _runs_1d(row):
                n = b - a
                if metal and n < min_width:
                    bad.append(("narrow", axis, i, a, b))
                elif metal and across and max_width is not None and n > max_width:
                    bad.append(("wide", axis, i, a, b))
                elif not metal and 0 < a and b < row.size and n < min_spacing:
                    bad.append(("gap", axis, i, a, b))
    return bad


def _layer(phantom: Phantom, name: str):
    return next(layer for layer in phantom.layers if layer.name == name)


# --------------------------------------------------------------------------- determinism, labels


def test_same_seed_same_volume_and_different_seeds_differ():
    a = make_design_phantom(7, shape_zyx=SHAPE)
    b = make_design_phantom(7, shape_zyx=SHAPE)
    assert np.array_equal(a.labels, b.labels) and a.layers == b.layers
    assert sample_design(7, SHAPE) == sample_design(7, SHAPE)
    c = make_design_phantom(8, shape_zyx=SHAPE)
    assert not np.array_equal(a.labels, c.labels)


def test_render_is_deterministic_given_the_design(designs):
    for d in designs[:3]:
        assert np.array_equal(render_design(d, voxel_size_m=VOXEL).labels,
                              render_design(d, voxel_size_m=VOXEL).labels)


def test_phantom_fields_and_labels_in_table(designs, phantoms):
    for d, p in zip(designs, phantoms, strict=True):
        assert isinstance(p, Phantom) and p.labels.dtype == np.uint8 and p.shape_zyx == SHAPE
        assert p.seed == d.seed and p.voxel_size_m == VOXEL
        assert np.isin(p.labels, list(MATERIALS)).all()
        assert not (p.labels == VACUUM).any(), "the volume is a cut of a chip: no vacuum inside"
        # Layers tile the volume in z order, as in make_ic_phantom.
        z = [(layer.z_start, layer.z_stop) for layer in p.layers]
        assert z[0][0] == 0 and z[-1][1] == SHAPE[0]
        assert all(b == c for (_, b), (c, _) in zip(z[:-1], z[1:], strict=True))


# --------------------------------------------------------------------------- spread of the space


def test_levels_sit_at_random_depths_and_counts(designs):
    counts = {len(d.metal_levels) for d in designs}
    assert counts == set(range(1, 7))
    # The main point of the space: the top level's depth is not fixed.
    top_starts = {min(s.z_start for s in d.metal_levels) for d in designs if not d.flip}
    assert len(top_starts) >= 6
    m1 = {(d.metal_levels[0].z_start, d.metal_levels[0].z_stop) for d in designs}
    assert len(m1) >= 15
    thick = [s.thickness_px for d in designs for s in d.metal_levels]
    assert min(thick) <= 2 and max(thick) >= 8
    subs = [sum(s.thickness_px for s in d.layers if s.kind == "substrate") for d in designs]
    assert 0 in subs and max(subs) <= 0.3 * SHAPE[0] + 1 and len(set(subs)) >= 5


def test_directions_patterns_and_layouts_all_occur(designs):
    levels = [s for d in designs for s in d.metal_levels]
    assert {s.direction for s in levels} == {"x", "y", "both"}
    assert {s.pattern for s in levels} == {"routed", "cut"}
    assert {s.layout for s in levels} == {"lines", "mesh", "bends", "tiles"}
    assert len({(s.min_width_px, s.max_width_px, s.min_spacing_px) for s in levels}) >= 8
    assert len({round(s.via_density, 3) for d in designs for s in d.layers if s.kind == "via"}) > 5


def test_materials_of_the_training_space(phantoms):
    seen = set(np.unique(np.concatenate([np.unique(p.labels) for p in phantoms])).tolist())
    assert {CU, W, AL, SICOH, SI3N4, SI} <= seen
    assert CO not in seen, "Co is only in the space when the options ask for it"


def test_cobalt_when_asked():
    options = DesignOptions(metals=("Cu", "W", "Al", "Co"))
    seen = set()
    for s in range(30):
        labels = make_design_phantom(s, shape_zyx=(16, 32, 32), options=options).labels
        seen |= set(np.unique(labels).tolist())
    assert CO in seen
    only = make_design_phantom(3, shape_zyx=(16, 32, 32), options=DesignOptions(metals=("co",)))
    metal = np.unique(only.labels[is_metal(only.labels)])
    assert metal.tolist() == [CO]


def test_flipped_chips_have_the_substrate_on_top(designs, phantoms):
    flipped = unflipped = 0
    for d, p in zip(designs, phantoms, strict=True):
        sub = [layer for layer in p.layers if layer.kind == "substrate"]
        if not sub or sub[0].thickness_px < 3:
            continue
        face = p.labels[0] if d.flip else p.labels[-1]
        assert (face == SI).mean() > 0.9
        assert (sub[0].z_start == 0) if d.flip else (sub[0].z_stop == SHAPE[0])
        flipped += d.flip
        unflipped += not d.flip
    assert flipped >= 2 and unflipped >= 2


def test_every_design_has_a_structured_metal_level(clean):
    for d, p in clean:
        fills = [float(p.metal[layer.z_start : layer.z_stop].mean())
                 for layer in p.layers if layer.kind == "metal"]
        assert any(0.1 <= f <= 0.6 for f in fills), (d.seed, fills)


def test_defects_tilt_and_offset_change_the_volume():
    base = sample_design(5, SHAPE, CLEAN)
    ref = render_design(base, voxel_size_m=VOXEL).labels
    for change in (dict(tilt_deg=(1.5, -1.0)), dict(offset_px=(2, -3)),
                   dict(defects=dataclasses.replace(base.defects, voids=0.05, bridges=0.05))):
        other = render_design(dataclasses.replace(base, **change), voxel_size_m=VOXEL).labels
        assert not np.array_equal(ref, other), change
        assert np.isin(other, list(MATERIALS)).all() and not (other == VACUUM).any()


# --------------------------------------------------------------------------- design rules


def test_rule_checker_catches_breaks():
    ok = np.zeros((10, 12), dtype=bool)
    ok[2:4, :] = ok[6:8, :] = True  # two x lines, width 2, gap 2
    rules = dict(min_width=2, min_spacing=2, max_width=2, lines_along="x")
    assert not _violations(ok, **rules)
    narrow, gap, wide = ok.copy(), ok.copy(), ok.copy()
    narrow[3, :] = False
    gap[:, 8] = False  # a 1-voxel line-end gap in both lines
    wide[4, :] = True
    assert {b[0] for b in _violations(narrow, **rules)} == {"narrow"}
    assert {b[0] for b in _violations(gap, **rules)} == {"gap"}
    assert "wide" in {b[0] for b in _violations(wide, **rules)}


def test_design_rules_hold_in_clean_designs(clean):
    layouts = {s.layout for d, _ in clean for s in d.metal_levels}
    assert layouts == {"lines", "mesh", "bends", "tiles"}, "the check must see every layout"
    for d, p in clean:
        for spec in d.metal_levels:
            block = p.metal[spec.z_start : spec.z_stop]
            assert (block == block[0]).all(), "a metal level is the same through its thickness"
            bad = _violations(
                block[0], min_width=spec.min_width_px, min_spacing=spec.min_spacing_px,
                max_width=spec.max_width_px, lines_along=spec.direction,
            )
            assert not bad, (d.seed, spec.name, spec.layout, bad[:5])
            assert spec.min_width_px >= CLEAN.min_width_px
            assert spec.max_width_px <= CLEAN.max_width_px
            assert spec.min_spacing_px >= CLEAN.min_spacing_px


def test_vias_and_contacts_touch_metal_on_both_sides(clean):
    n_vias = 0
    for d, p in clean:
        for spec in d.layers:
            if spec.kind not in ("via", "contact"):
                continue
            vias = p.metal[spec.z_start]
            n_vias += int(vias.sum())
            assert (p.metal[spec.z_start : spec.z_stop] == vias).all()
            if not vias.any():
                continue
            assert not _violations(vias, min_width=spec.min_width_px, min_spacing=1,
                                   max_width=None, lines_along=None)
            # The layer's neighbours in z: metal lines, or etch stops the vias pass through.
            for z in (spec.z_start - 1, spec.z_stop):
                if not 0 <= z < SHAPE[0]:
                    continue
                kind = next(s.kind for s in d.layers if s.z_start <= z < s.z_stop)
                if kind == "substrate":
                    assert (p.labels[z][vias] == SI).all()
                else:
                    assert p.metal[z][vias].all(), (d.seed, spec.name, kind)
    assert n_vias > 1000


# --------------------------------------------------------------------------- classic, describe


@pytest.mark.parametrize("preset", ["tiny", "demo"])
def test_classic_design_reproduces_the_fixed_stack(preset):
    opts = PRESETS[preset].phantom
    classic = make_ic_phantom(opts, seed=0)
    design = classic_design(opts.shape_zyx, opts.n_metal_layers)
    rendered = render_design(design, voxel_size_m=opts.voxel_size_m)
    key = [(layer.name, layer.kind, layer.z_start, layer.z_stop, layer.direction)
           for layer in classic.layers]
    assert [(s.name, s.kind, s.z_start, s.z_stop, s.direction) for s in design.layers] == key
    assert [(layer.name, layer.kind, layer.z_start, layer.z_stop, layer.direction)
            for layer in rendered.layers] == key
    metals = {layer.name: layer.metal_label for layer in rendered.layers}
    assert metals["M1"] == CU and metals["contact"] == W and metals["cap"] is None
    sub = _layer(rendered, "substrate")
    assert (rendered.labels[sub.z_start : sub.z_stop] == SI).all()


def test_describe_design_is_json_ready(designs):
    for d in designs[:10]:
        info = describe_design(d)
        back = json.loads(json.dumps(info))
        assert back["n_metal_levels"] == len(d.metal_levels)
        assert back["flip"] == d.flip and len(back["layers"]) == len(d.layers)
        assert set(back["materials"]) == {s.material for s in d.layers} | {
            s.metal for s in d.layers if s.metal is not None}
        for entry, spec in zip(back["layers"], d.layers, strict=True):
            assert entry["z_range"] == [spec.z_start, spec.z_stop]


# --------------------------------------------------------------------------- bad inputs, speed


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: sample_design(0, (3, 64, 64), DesignOptions(n_metal_levels=(2, 6))), "too thin"),
        (lambda: sample_design(0, (32, 5, 64)), "lateral"),
        (lambda: sample_design(-1, SHAPE), "seed"),
        (lambda: sample_design(1.5, SHAPE), "seed"),
        (lambda: sample_design(0, (32, 64)), "shape_zyx"),
        (lambda: DesignOptions(metals=()), "metals"),
        (lambda: DesignOptions(metals=("Au",)), "metal"),
        (lambda: DesignOptions(dielectrics=()), "dielectrics"),
        (lambda: DesignOptions(n_metal_levels=(3, 2)), "n_metal_levels"),
        (lambda: DesignOptions(min_width_px=3, max_width_px=2), "max_width_px"),
        (lambda: DesignOptions(via_density=(0.5, 1.5)), "via_density"),
        (lambda: DesignOptions(flip_probability=2.0), "flip_probability"),
        (lambda: classic_design((8, 64, 64), 3), "too thin"),
        (lambda: render_design(sample_design(0, SHAPE), voxel_size_m=0.0), "voxel_size_m"),
        (lambda: render_design("chip", voxel_size_m=VOXEL), "ChipDesign"),
        (lambda: describe_design(None), "ChipDesign"),
    ],
)
def test_bad_inputs_raise_input_error(call, match):
    with pytest.raises(InputError, match=match):
        call()


def test_thin_volumes_get_fewer_levels():
    d = sample_design(0, (6, 32, 32), DesignOptions(n_metal_levels=(1, 6)))
    assert 1 <= len(d.metal_levels) <= 3
    p = render_design(d, voxel_size_m=VOXEL)
    assert p.shape_zyx == (6, 32, 32) and not (p.labels == VACUUM).any()


def test_fast_enough():
    make_design_phantom(0, shape_zyx=SHAPE)  # warm caches
    times = []
    for s in range(5):
        t0 = time.perf_counter()
        make_design_phantom(s, shape_zyx=SHAPE)
        times.append(time.perf_counter() - t0)
    assert float(np.median(times)) < 0.3, times


# --------------------------------------------------------------------------- Henke vs Chantler


def _near_edge(material: str, energy_kev: float) -> bool:
    if material == "Cu" and 8.98 <= energy_kev <= 9.1:
        return True
    return material == "W" and any(abs(energy_kev - e) <= 0.1 for e in ABSORPTION_EDGES_KEV["W"])


@pytest.mark.parametrize("material", ["SiO2", "Si", "Cu", "W"])
@pytest.mark.parametrize("energy_kev", [6.0, 8.8, 12.0])
def test_henke_subset_agrees_with_chantler(material, energy_kev):
    """Backs the claim in materials._chantler_factors that mixing the two tables is consistent.

    δ agrees to < 1 %. β (photoabsorption f2) agrees within 4 % except for the heavy metals at
    6 keV, where Henke's and Chantler's f2 differ by 6–7 % (a known difference of the tables).
    """
    xraydb = pytest.importorskip("xraydb")
    if _near_edge(material, energy_kev):
        pytest.skip("too close to an absorption edge for table comparisons")
    density = next(m.density_g_cm3 for m in MATERIALS.values() if m.name == material)
    delta, beta = refractive_index(material, energy_kev)
    ref_delta, ref_beta, _ = xraydb.xray_delta_beta(material, density, energy_kev * 1e3)
    assert delta == pytest.approx(ref_delta, rel=0.04)
    beta_tol = 0.08 if material in ("Cu", "W") and energy_kev < 7 else 0.04
    assert beta == pytest.approx(ref_beta, rel=beta_tol)


def test_hand_built_design_must_be_consistent():
    design = classic_design((16, 32, 32), 2)
    no_m2 = tuple(s for s in design.layers if s.name != "M2")
    with pytest.raises(InputError, match="contiguous"):
        render_design(dataclasses.replace(design, layers=no_m2), voxel_size_m=VOXEL)
    gone = tuple(dataclasses.replace(s, kind="cap") if s.name == "M2" else s for s in design.layers)
    with pytest.raises(InputError, match="M2"):
        render_design(dataclasses.replace(design, layers=gone), voxel_size_m=VOXEL)
