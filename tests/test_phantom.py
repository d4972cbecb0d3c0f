"""IC phantoms (apt_stream.sim.phantom) and material constants (apt_stream.sim.materials)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from apt_stream.config import PRESETS, PhantomOptions
from apt_stream.errors import InputError
from apt_stream.sim.materials import (
    ABSORPTION_EDGES_KEV,
    CU,
    MATERIALS,
    SI,
    SIO2,
    VACUUM,
    W,
    delta_beta_volumes,
    refractive_index,
    scattering_factors,
)
from apt_stream.sim.phantom import Phantom, describe, make_ic_phantom, phantom_batch

TINY = PRESETS["tiny"].phantom
DEMO = PRESETS["demo"].phantom
PAPER = PRESETS["paper"].phantom
SEEDS = range(6)


def _runs(row: np.ndarray) -> list[tuple[int, int, bool]]:
    """(start, stop, is_metal) runs of a 1D boolean array."""
    row = np.asarray(row, dtype=np.int8)
    edges = np.flatnonzero(np.diff(row)) + 1
    starts = np.concatenate([[0], edges])
    stops = np.concatenate([edges, [row.size]])
    return [(int(a), int(b), bool(row[a])) for a, b in zip(starts, stops, strict=True)]


def _rule_violations(mask_yx: np.ndarray, opts: PhantomOptions, lines_along: str | None) -> list:
    """Design-rule check of one 2D metal mask by scanning runs along y (axis 0) and x (axis 1).

    Every metal run is >= min width; interior gaps (not touching a face) are >= min spacing;
    across the lines (perpendicular to ``lines_along``) every metal run is <= max width.
    """
    bad = []
    for axis_name, rows in (("y", mask_yx.T), ("x", mask_yx)):
        across = lines_along is not None and axis_name != lines_along
        for i, row in enumerate(rows):
            for a, b, metal in _runs(row):
                n = b - a
                if metal and n < opts.min_width_px:
                    bad.append(("narrow", axis_name, i, a, b))
                if metal and across and n > opts.max_width_px:
                    bad.append(("wide", axis_name, i, a, b))
                if not metal and a > 0 and b < row.size and n < opts.min_spacing_px:
                    bad.append(("gap", axis_name, i, a, b))
    return bad


def _layer(phantom: Phantom, name: str):
    return next(layer for layer in phantom.layers if layer.name == name)


@pytest.fixture(scope="module")
def demo_phantoms() -> list[Phantom]:
    return [make_ic_phantom(DEMO, seed=s) for s in SEEDS]


@pytest.fixture(scope="module")
def tiny_phantoms() -> list[Phantom]:
    return [make_ic_phantom(TINY, seed=s) for s in SEEDS]


# --------------------------------------------------------------------------- materials


@pytest.mark.parametrize(
    ("material", "delta_range", "beta_range"),
    [
        ("Cu", (1.9e-5, 2.4e-5), (3e-7, 5e-7)),
        ("W", (3.5e-5, 4.2e-5), (2e-6, 3.5e-6)),
        ("Si", (6.2e-6, 6.5e-6), (1.0e-7, 1.4e-7)),
        ("SiO2", (5.8e-6, 6.1e-6), (6e-8, 8e-8)),
    ],
)
def test_refractive_index_at_paper_energy(material, delta_range, beta_range):
    delta, beta = refractive_index(material, 8.8)
    assert delta_range[0] <= delta <= delta_range[1]
    assert beta_range[0] <= beta <= beta_range[1]


def test_refractive_index_accepts_labels_and_any_case():
    assert refractive_index("vacuum", 10.0) == (0.0, 0.0)
    assert refractive_index(CU, 8.8) == refractive_index("cu", 8.8) == refractive_index("Cu", 8.8)
    assert refractive_index(SIO2, 8.8) == refractive_index("sio2", 8.8)


def test_delta_scales_as_wavelength_squared_away_from_edges():
    # f1 of Si and O barely changes between 5 and 20 keV, so delta * E^2 is nearly constant.
    for material in ("Si", "SiO2"):
        d5 = refractive_index(material, 5.0)[0] * 5.0**2
        d20 = refractive_index(material, 20.0)[0] * 20.0**2
        assert d20 == pytest.approx(d5, rel=0.03)
    # ... and beta falls much faster (photoabsorption ~ E^-3 in f2 * lambda^2).
    assert refractive_index("Si", 20.0)[1] < refractive_index("Si", 5.0)[1] / 50


@pytest.mark.parametrize(("element", "edge_kev"), [("Cu", 8.979), ("W", 10.2068)])
def test_no_interpolation_across_edges(element, edge_kev):
    below = scattering_factors(element, edge_kev - 0.002)
    above = scattering_factors(element, edge_kev)
    # f2 jumps at the edge: a value interpolated across it would lie in between.
    assert above[1] > 2.0 * below[1]
    # Just below the edge f2 continues the smooth pre-edge trend (within 5 % of 50 eV lower).
    lower = scattering_factors(element, edge_kev - 0.05)
    assert below[1] == pytest.approx(lower[1], rel=0.05)
    assert edge_kev in ABSORPTION_EDGES_KEV[element]


def test_beta_jumps_at_cu_k_edge():
    beta_below = refractive_index("Cu", 8.97)[1]
    beta_above = refractive_index("Cu", 8.99)[1]
    assert beta_above > 5 * beta_below


@pytest.mark.parametrize("energy_kev", [4.0, 4.99, 20.5, 0.0, -8.8, float("nan"), "high"])
def test_energy_outside_table_raises(energy_kev):
    with pytest.raises(InputError, match="energy_kev"):
        refractive_index("Cu", energy_kev)


@pytest.mark.parametrize("material", ["Au", "gold", 9, -1, None])
def test_unknown_material_raises(material):
    with pytest.raises(InputError, match="material"):
        refractive_index(material, 8.8)


def test_material_table_matches_conventions():
    assert {label: m.name for label, m in MATERIALS.items()} == {
        0: "vacuum",
        1: "SiO2",
        2: "Si",
        3: "Cu",
        4: "W",
        5: "Al",
        6: "Co",
        7: "SiCOH",
        8: "Si3N4",
    }
    assert (VACUUM, SIO2, SI, CU, W) == (0, 1, 2, 3, 4)


def test_delta_beta_volumes():
    labels = np.array([[0, 1, 2], [3, 4, 3]], dtype=np.uint8)
    delta, beta = delta_beta_volumes(labels, 8.8)
    assert delta.dtype == np.float32 and beta.dtype == np.float32
    assert delta.shape == beta.shape == labels.shape
    assert delta[0, 0] == 0 and beta[0, 0] == 0
    for label in range(1, 5):
        d, b = refractive_index(label, 8.8)
        assert delta[labels == label] == pytest.approx(d, rel=1e-6)
        assert beta[labels == label] == pytest.approx(b, rel=1e-6)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.array([0, 1, 9], dtype=np.uint8), "labels must lie"),
        (np.array([-1, 1], dtype=np.int16), "labels must lie"),
        (np.zeros(3, dtype=np.float32), "integer"),
        ([0, 1, 2], "integer"),
    ],
)
def test_delta_beta_volumes_bad_labels(labels, match):
    with pytest.raises(InputError, match=match):
        delta_beta_volumes(labels, 8.8)


# --------------------------------------------------------------------------- phantoms


@pytest.mark.parametrize("opts", [TINY, DEMO, PAPER], ids=["tiny", "demo", "paper"])
def test_labels_dtype_shape_and_no_vacuum(opts):
    p = make_ic_phantom(opts, seed=0)
    assert p.labels.dtype == np.uint8
    assert p.labels.shape == tuple(opts.shape_zyx)
    assert p.voxel_size_m == opts.voxel_size_m and p.seed == 0
    assert p.labels.min() >= SIO2 and p.labels.max() <= W  # vacuum nowhere
    np.testing.assert_array_equal(p.metal, p.labels >= 3)


def test_deterministic_per_seed_and_different_across_seeds():
    a = make_ic_phantom(DEMO, seed=7)
    b = make_ic_phantom(DEMO, seed=7)
    c = make_ic_phantom(DEMO, seed=8)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.layers == b.layers
    assert (a.labels != c.labels).mean() > 0.05


@pytest.mark.parametrize("opts", [TINY, DEMO, PAPER], ids=["tiny", "demo", "paper"])
def test_layer_stack_scales_with_depth(opts):
    p = make_ic_phantom(opts, seed=0)
    nz = opts.shape_zyx[0]
    n = opts.n_metal_layers
    names = [layer.name for layer in p.layers]
    # Top (z = 0) down: cap, M_n, V_(n-1), ..., M1, contact, substrate.
    expected = ["cap"]
    for k in range(n, 0, -1):
        expected.append(f"M{k}")
        if k > 1:
            expected.append(f"V{k - 1}")
    expected += ["contact", "substrate"]
    assert names == expected
    assert p.layers[0].z_start == 0 and p.layers[-1].z_stop == nz
    for upper, lower in zip(p.layers[:-1], p.layers[1:], strict=True):
        assert upper.z_stop == lower.z_start
    assert all(layer.thickness_px >= 1 for layer in p.layers)
    metal_thick = [layer.thickness_px for layer in p.layers if layer.kind == "metal"]
    assert max(metal_thick) - min(metal_thick) <= 1
    # Layers follow nz: each metal layer is ~1.5/(sum of weights) of the depth.
    weight = 1.0 + 1.0 + 1.5 * n + 1.0 * (n - 1) + 0.5
    assert abs(metal_thick[0] - 1.5 / weight * nz) <= 1.5
    sub = _layer(p, "substrate")
    assert (p.labels[sub.z_start : sub.z_stop] == SI).all()
    assert (p.labels[: sub.z_start] != SI).all()
    cap = _layer(p, "cap")
    assert (p.labels[cap.z_start : cap.z_stop] == SIO2).all()


def test_alternating_directions_and_lines_reach_faces(demo_phantoms):
    opts = DEMO
    for p in demo_phantoms:
        for layer in (lay for lay in p.layers if lay.kind == "metal"):
            k = int(layer.name[1:])
            assert layer.direction == ("x" if k % 2 else "y")
            m = p.metal[layer.z_start]
            # Every z of the layer holds the same pattern (lines are prisms through the layer).
            assert (p.metal[layer.z_start : layer.z_stop] == m).all()
            along_axis = 1 if layer.direction == "x" else 0
            across_runs = [
                b - a
                for row in np.moveaxis(m, along_axis, 0)
                for a, b, metal in _runs(row)
                if metal
            ]
            along_runs = [
                b - a
                for row in np.moveaxis(m, 1 - along_axis, 0)
                for a, b, metal in _runs(row)
                if metal
            ]
            assert max(across_runs) <= opts.max_width_px < max(along_runs)
            # Lines run to the faces the lines point at (a cut of a larger chip).
            face = m[:, 0] if layer.direction == "x" else m[0, :]
            assert face.any()


@pytest.mark.parametrize("preset", ["tiny", "demo", "paper"])
def test_design_rules(preset):
    opts = PRESETS[preset].phantom
    seeds = range(2) if preset == "paper" else SEEDS
    for seed in seeds:
        p = make_ic_phantom(opts, seed=seed)
        for layer in p.layers:
            if layer.kind in ("cap", "substrate"):
                assert not p.metal[layer.z_start : layer.z_stop].any()
                continue
            bad = _rule_violations(p.metal[layer.z_start], opts, layer.direction)
            assert not bad, f"{preset} seed {seed} {layer.name}: {bad[:5]}"


def test_rule_checker_catches_violations():
    # The checker must fail on a too-narrow line, a too-wide line and a too-small gap.
    m = np.zeros((20, 20), dtype=bool)
    m[2:3, :] = True  # 1 px wide line along x
    assert any(v[0] == "narrow" for v in _rule_violations(m, DEMO, "x"))
    m = np.zeros((20, 20), dtype=bool)
    m[2:12, :] = True  # 10 px > max 6
    assert any(v[0] == "wide" for v in _rule_violations(m, DEMO, "x"))
    m = np.zeros((20, 20), dtype=bool)
    m[2:5, :] = True
    m[6:9, :] = True  # 1 px gap
    assert any(v[0] == "gap" for v in _rule_violations(m, DEMO, "x"))


@pytest.mark.parametrize("preset", ["tiny", "demo", "paper"])
def test_metal_fill_fraction(preset):
    opts = PRESETS[preset].phantom
    for seed in range(3):
        p = make_ic_phantom(opts, seed=seed)
        for layer in (lay for lay in p.layers if lay.kind == "metal"):
            fill = p.metal[layer.z_start : layer.z_stop].mean()
            assert 0.2 <= fill <= 0.6, (preset, seed, layer.name, fill)
            assert (
                p.labels[layer.z_start : layer.z_stop][p.metal[layer.z_start : layer.z_stop]] == CU
            ).all()


def test_vias_connect_adjacent_metal_layers(demo_phantoms, tiny_phantoms):
    n_vias = 0
    for p in demo_phantoms + tiny_phantoms:
        for layer in (lay for lay in p.layers if lay.kind == "via"):
            slab = p.metal[layer.z_start : layer.z_stop]
            cols = slab.any(axis=0)
            # A via is a full-height column ...
            assert (slab == cols).all()
            # ... touching metal of the layer above and the layer below.
            assert p.metal[layer.z_start - 1][cols].all()
            assert p.metal[layer.z_stop][cols].all()
            metal_labels = np.unique(p.labels[layer.z_start : layer.z_stop][slab])
            assert len(metal_labels) <= 1 and set(metal_labels) <= {CU, W}
            if metal_labels.size:
                assert layer.metal_label == metal_labels[0]
            n_vias += int(cols.sum() > 0)
    assert n_vias > 0


def test_contacts_stand_between_m1_and_substrate(demo_phantoms):
    for p in demo_phantoms:
        contact = _layer(p, "contact")
        slab = p.labels[contact.z_start : contact.z_stop]
        plugs = (slab == W).any(axis=0)
        assert plugs.any()
        assert ((slab == W) == plugs).all()
        assert set(np.unique(slab)) <= {SIO2, W}
        assert p.metal[contact.z_start - 1][plugs].all()  # M1 above
        assert (p.labels[contact.z_stop][plugs] == SI).all()  # substrate below


def test_via_probability_extremes():
    none = make_ic_phantom(DEMO.model_copy(update={"via_probability": 0.0}), seed=1)
    for layer in none.layers:
        if layer.kind in ("via", "contact"):
            assert not none.metal[layer.z_start : layer.z_stop].any()
    full = make_ic_phantom(DEMO.model_copy(update={"via_probability": 1.0}), seed=1)
    below = full.metal[_layer(full, "M1").z_start]
    above = full.metal[_layer(full, "M2").z_start]
    vias = full.metal[_layer(full, "V1").z_start]
    # Every crossing that is at least min width both ways gets a via.
    assert vias.sum() > 0 and not (vias & ~(below & above)).any()
    assert vias.sum() >= 0.8 * (below & above).sum()


@pytest.mark.parametrize(
    ("update", "match"),
    [
        ({"via_probability": 2.0}, "via_probability"),
        ({"via_probability": -0.1}, "via_probability"),
        ({"shape_zyx": (6, 24, 32)}, "too thin"),
        ({"shape_zyx": (12, 5, 32)}, "lateral"),
        ({"max_width_px": 1}, "max_width_px"),
        ({"n_metal_layers": 0}, "n_metal_layers"),
    ],
)
def test_bad_options_raise(update, match):
    # model_copy(update=...) skips pydantic validation: the generator must check on its own.
    with pytest.raises(InputError, match=match):
        make_ic_phantom(TINY.model_copy(update=update), seed=0)


def test_bad_options_rejected_by_pydantic_too():
    fields = TINY.model_dump()
    with pytest.raises(ValidationError):
        PhantomOptions(**{**fields, "via_probability": 2})
    with pytest.raises(ValidationError):
        PhantomOptions(**{**fields, "shape_zyx": (3, 24, 32)})


@pytest.mark.parametrize("seed", [-1, 1.5, "1", None, True])
def test_bad_seed_raises(seed):
    with pytest.raises(InputError, match="seed"):
        make_ic_phantom(TINY, seed=seed)


def test_options_type_checked():
    with pytest.raises(InputError, match="PhantomOptions"):
        make_ic_phantom(PRESETS["tiny"], seed=0)


def test_phantom_batch():
    batch = phantom_batch(TINY, [3, 4, 3])
    phantoms = list(batch)
    assert [p.seed for p in phantoms] == [3, 4, 3]
    np.testing.assert_array_equal(phantoms[0].labels, phantoms[2].labels)
    np.testing.assert_array_equal(phantoms[1].labels, make_ic_phantom(TINY, seed=4).labels)
    with pytest.raises(InputError, match="seed"):
        phantom_batch(TINY, [1, -2])  # checked before any phantom is made


def test_describe(tiny_phantoms):
    p = tiny_phantoms[0]
    d = describe(p)
    json.dumps(d)  # JSON-ready
    assert d["shape_zyx"] == list(TINY.shape_zyx)
    assert sum(d["fractions"].values()) == pytest.approx(1.0)
    assert d["fractions"]["vacuum"] == 0.0
    assert d["fractions"]["Cu"] == pytest.approx((p.labels == CU).mean())
    assert d["metal_fraction"] == pytest.approx(p.metal.mean())
    assert [entry["name"] for entry in d["layers"]] == [layer.name for layer in p.layers]
    m1 = next(e for e in d["layers"] if e["name"] == "M1")
    assert m1["direction"] == "x" and m1["metal"] == "Cu"
    z0, z1 = m1["z_range"]
    assert m1["thickness_px"] == z1 - z0
    assert m1["metal_fraction"] == pytest.approx(p.metal[z0:z1].mean())
    with pytest.raises(InputError):
        describe(p.labels)


def test_phantom_delta_volume_phase_is_plausible():
    # A demo phantom's projected phase at 8.8 keV along z: a few tenths of a radian.
    p = make_ic_phantom(DEMO, seed=0)
    delta, _ = delta_beta_volumes(p.labels, 8.8)
    k = 2 * math.pi / (1.239841984e-9 / 8.8)
    phase = k * delta.sum(axis=0) * p.voxel_size_m
    assert 0.05 < phase.mean() < 1.0
