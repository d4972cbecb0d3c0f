"""Complex refractive index decrements (δ, β) of the IC materials.

The refractive index is ``n = 1 − δ + iβ`` (docs/conventions.md). For a material with ``n_a``
atoms of element ``a`` per unit volume,

    δ = r_e λ² / (2π) · Σ_a n_a f1_a(E),    β = r_e λ² / (2π) · Σ_a n_a f2_a(E),

with ``r_e`` the classical electron radius and ``f1``, ``f2`` the forward atomic scattering
factors. The factors below are a small subset of the tables of

    B. L. Henke, E. M. Gullikson and J. C. Davis, "X-ray interactions: photoabsorption,
    scattering, transmission, and reflection at E = 50–30,000 eV, Z = 1–92",
    Atomic Data and Nuclear Data Tables 54, 181–342 (1993) (the CXRO tables),

kept at about one point per 5–13 % in energy away from absorption edges and at every table point
close to them. They are approximate: interpolation is linear in log(f) against log(E)
and reproduces the full tables to better than 0.5 % between 5 and 20 keV, except within a few
tens of eV of an edge, where the tables themselves are coarse. The densities are bulk values
(Cu 8.96, W 19.3, Si 2.33, SiO₂ 2.2 g/cm³); thin-film values differ by a few per cent.

Absorption edges inside the range (Cu K at 8.979 keV; W L3, L2, L1 at 10.207, 11.544 and
12.100 keV) split each element's table into segments, and an energy is only ever interpolated
within the segment it falls in, never across an edge. An energy exactly at an edge takes the
value above it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from apt_stream.config import wavelength_m
from apt_stream.errors import InputError

__all__ = [
    "ABSORPTION_EDGES_KEV",
    "CU",
    "ENERGY_RANGE_KEV",
    "LABELS",
    "MATERIALS",
    "Material",
    "SI",
    "SIO2",
    "VACUUM",
    "W",
    "AL",
    "CO",
    "SICOH",
    "SI3N4",
    "METAL_LABELS",
    "delta_beta_volumes",
    "is_metal",
    "refractive_index",
    "scattering_factors",
]

#: Classical electron radius, metres (CODATA 2018).
R_E_M = 2.8179403262e-15
#: Avogadro constant, 1/mol.
N_A_PER_MOL = 6.02214076e23

#: Energies (keV) the tables support; outside them refractive_index raises InputError.
ENERGY_RANGE_KEV = (5.0, 20.0)

#: Standard atomic weights, g/mol.
_ATOMIC_MASS_G_MOL = {
    "O": 15.999, "Si": 28.085, "Cu": 63.546, "W": 183.84,
    "H": 1.008, "C": 12.011, "N": 14.007, "Al": 26.982, "Co": 58.933,
}

#: Absorption edges (keV) inside the tables' range: the segment boundaries below.
ABSORPTION_EDGES_KEV: dict[str, tuple[float, ...]] = {
    "O": (),
    "Si": (),
    "Cu": (8.979,),
    "W": (10.2068, 11.544, 12.0998),
}

# Henke, Gullikson & Davis (1993): rows of (energy keV, f1, f2), one tuple of rows per segment
# between absorption edges. A segment's last row and the next one's first row sit at the edge
# energy and hold the values just below and just above it.
_HENKE_F1F2: dict[str, tuple[tuple[tuple[float, float, float], ...], ...]] = {
    "Cu": (
        (
            (4.5173, 28.54, 1.682),
            (4.8167, 28.45, 1.507),
            (5.1360, 28.35, 1.349),
            (5.4764, 28.24, 1.207),
            (5.8394, 28.12, 1.079),
            (6.2264, 27.99, 0.9639),
            (6.6391, 27.84, 0.8603),
            (7.0792, 27.65, 0.7671),
            (7.5484, 27.4, 0.6832),
            (8.0488, 27.02, 0.6075),
            (8.5823, 26.25, 0.5394),
            (8.7211, 25.83, 0.5234),
            (8.8622, 25.05, 0.5079),
            (8.9790, 17.57, 0.4955),
        ),
        (
            (8.9790, 17.57, 3.853),
            (9.0055, 23.57, 3.837),
            (9.1512, 25.64, 3.748),
            (9.2992, 26.35, 3.66),
            (9.4496, 26.8, 3.574),
            (10.0759, 27.79, 3.243),
            (10.7438, 28.32, 2.934),
            (11.4559, 28.66, 2.648),
            (12.2153, 28.89, 2.384),
            (13.0250, 29.05, 2.142),
            (13.8883, 29.16, 1.921),
            (14.8089, 29.24, 1.721),
            (15.7904, 29.3, 1.538),
            (16.8371, 29.33, 1.373),
            (17.9531, 29.35, 1.225),
            (19.1431, 29.35, 1.091),
            (20.4120, 29.35, 0.9705),
            (20.7421, 29.35, 0.9424),
        ),
    ),
    "W": (
        (
            (4.5300, 70.38, 14),
            (4.7710, 70.5, 12.95),
            (5.0260, 70.56, 11.97),
            (5.2940, 70.56, 11.06),
            (5.5760, 70.51, 10.22),
            (5.8730, 70.43, 9.435),
            (6.1860, 70.3, 8.709),
            (6.5160, 70.14, 8.035),
            (6.8630, 69.93, 7.411),
            (7.2290, 69.68, 6.833),
            (7.6140, 69.38, 6.297),
            (8.0190, 69.01, 5.802),
            (8.4470, 68.54, 5.342),
            (8.8970, 67.91, 4.917),
            (9.3710, 66.98, 4.523),
            (9.9006, 64.97, 4.143),
            (10.0607, 63.6, 4.041),
            (10.2068, 49.26, 3.951),
        ),
        (
            (10.2068, 49.26, 10.19),
            (10.2234, 59.34, 10.16),
            (10.3888, 64.1, 9.864),
            (10.5568, 65.33, 9.581),
            (10.7276, 65.97, 9.305),
            (11.2566, 66.3, 8.526),
            (11.4386, 65.58, 8.281),
            (11.5440, 58.61, 8.145),
        ),
        (
            (11.5440, 58.61, 11.4),
            (11.6236, 65.48, 11.27),
            (11.8117, 66.8, 10.97),
            (12.0027, 67.09, 10.68),
            (12.0998, 64.01, 10.54),
        ),
        (
            (12.0998, 64.01, 12.09),
            (12.1968, 67.69, 11.94),
            (12.3941, 68.72, 11.65),
            (12.5946, 69.37, 11.37),
            (12.7983, 69.88, 11.1),
            (13.6466, 71.27, 10.04),
            (14.5511, 72.13, 9.077),
            (15.5156, 72.71, 8.192),
            (16.5441, 73.1, 7.384),
            (17.6406, 73.37, 6.649),
            (18.8099, 73.55, 5.981),
            (20.0567, 73.66, 5.376),
            (20.7108, 73.69, 5.095),
        ),
    ),
    "Si": (
        (
            (4.5680, 14.41, 0.9376),
            (5.1937, 14.39, 0.7413),
            (5.9050, 14.35, 0.5841),
            (6.6418, 14.32, 0.4683),
            (7.5514, 14.28, 0.367),
            (8.5856, 14.24, 0.2869),
            (9.7615, 14.2, 0.2238),
            (11.0985, 14.17, 0.1742),
            (12.6185, 14.14, 0.1352),
            (14.3468, 14.11, 0.1047),
            (16.3117, 14.09, 0.0809),
            (18.5458, 14.07, 0.0623),
            (20.7502, 14.06, 0.04942),
        ),
    ),
    "O": (
        (
            (4.5173, 8.128, 0.1123),
            (5.1360, 8.106, 0.08638),
            (5.8394, 8.088, 0.06626),
            (6.6391, 8.072, 0.05067),
            (7.5484, 8.058, 0.03864),
            (8.5823, 8.047, 0.02937),
            (9.7577, 8.037, 0.02225),
            (11.0942, 8.03, 0.01681),
            (12.6136, 8.023, 0.01266),
            (14.3412, 8.018, 0.009504),
            (16.3054, 8.014, 0.00712),
            (18.5386, 8.01, 0.005328),
            (20.7421, 8.007, 0.004136),
        ),
    ),
}


@dataclass(frozen=True)
class Material:
    """One label of the phantoms: name, bulk density and composition (element, atoms)."""

    label: int
    name: str
    density_g_cm3: float
    composition: tuple[tuple[str, int], ...]

    @property
    def molar_mass_g_mol(self) -> float:
        return sum(_ATOMIC_MASS_G_MOL[el] * count for el, count in self.composition)


#: Label values of docs/conventions.md.
VACUUM, SIO2, SI, CU, W = 0, 1, 2, 3, 4
#: Labels of the wide design space (apt_stream.sim.design): two more metals, two more dielectrics.
AL, CO, SICOH, SI3N4 = 5, 6, 7, 8
#: The metal labels: the "1" class of DSC/BER. Dielectrics and Si are the "0" class.
METAL_LABELS = (CU, W, AL, CO)

#: The label table of docs/conventions.md: label -> material. "Metal" is METAL_LABELS (is_metal).
MATERIALS: dict[int, Material] = {
    VACUUM: Material(VACUUM, "vacuum", 0.0, ()),
    SIO2: Material(SIO2, "SiO2", 2.2, (("Si", 1), ("O", 2))),
    SI: Material(SI, "Si", 2.33, (("Si", 1),)),
    CU: Material(CU, "Cu", 8.96, (("Cu", 1),)),
    W: Material(W, "W", 19.3, (("W", 1),)),
    AL: Material(AL, "Al", 2.70, (("Al", 1),)),
    CO: Material(CO, "Co", 8.90, (("Co", 1),)),
    # Porous low-k carbon-doped oxide; composition Si:O:C:H about 5:9:4:11 (atomic fractions
    # 0.17 / 0.31 / 0.14 / 0.38 as reported for PECVD SiCOH films), film density 1.3 g/cm³.
    SICOH: Material(SICOH, "SiCOH", 1.30, (("Si", 5), ("O", 9), ("C", 4), ("H", 11))),
    SI3N4: Material(SI3N4, "Si3N4", 3.17, (("Si", 3), ("N", 4))),
}


def is_metal(labels: np.ndarray) -> np.ndarray:
    """Boolean mask of the metal voxels (``METAL_LABELS``) of a label volume."""
    return np.isin(np.asarray(labels), METAL_LABELS)

#: Material name (lower case) -> label.
LABELS: dict[str, int] = {m.name.lower(): m.label for m in MATERIALS.values()}


def _check_energy(energy_kev: float) -> float:
    try:
        e = float(energy_kev)
    except (TypeError, ValueError):
        raise InputError(f"energy_kev must be a number, got {energy_kev!r}") from None
    lo, hi = ENERGY_RANGE_KEV
    if not lo <= e <= hi:
        raise InputError(
            f"energy_kev={e!r} is outside the tabulated range {lo}–{hi} keV of apt_stream.sim.materials"
        )
    return e


def scattering_factors(element: str, energy_kev: float) -> tuple[float, float]:
    """Forward atomic scattering factors ``(f1, f2)`` of one element (O, Si, Cu or W).

    Interpolated log-log within the table segment (between absorption edges) that holds
    ``energy_kev``; at an edge the value above it is returned.

    Raises
    ------
    InputError
        Unknown element or energy outside ``ENERGY_RANGE_KEV``.
    """
    e = _check_energy(energy_kev)
    if element not in _HENKE_F1F2:
        return _chantler_factors(element, e)
    segment = sum(e >= edge for edge in ABSORPTION_EDGES_KEV[element])
    rows = np.asarray(_HENKE_F1F2[element][segment], dtype=float)
    log_e = np.log(rows[:, 0])
    f1 = math.exp(np.interp(math.log(e), log_e, np.log(rows[:, 1])))
    f2 = math.exp(np.interp(math.log(e), log_e, np.log(rows[:, 2])))
    return f1, f2


#: Elements whose factors come from xraydb's copy of the Chantler (FFAST) tables.
CHANTLER_ELEMENTS = ("H", "C", "N", "Al", "Co")


def _chantler_factors(element: str, energy_kev: float) -> tuple[float, float]:
    """(f1, f2) from C. T. Chantler, J. Phys. Chem. Ref. Data 29, 597 (2000) via ``xraydb``.

    ``xraydb.f1_chantler`` is the anomalous part f′ only, so the forward factor is f1 = Z + f′,
    on the same footing as Henke's f1; across 6–12 keV the two tables agree to better than 1 %
    in δ and 4 % in β for O, Si, Cu and W, except β of Cu and W at 6 keV (+6–7 %)
    (tests/test_design_space.py).
    """
    if element not in CHANTLER_ELEMENTS:
        raise InputError(
            f"no scattering factors for element {element!r}; have "
            f"{sorted([*_HENKE_F1F2, *CHANTLER_ELEMENTS])}"
        )
    import xraydb

    e_ev = energy_kev * 1e3
    z = xraydb.atomic_number(element)
    return z + float(xraydb.f1_chantler(element, e_ev)), float(xraydb.f2_chantler(element, e_ev))


def _material(material: str | int) -> Material:
    if isinstance(material, (int, np.integer)) and not isinstance(material, bool):
        if int(material) in MATERIALS:
            return MATERIALS[int(material)]
    elif isinstance(material, str) and material.lower() in LABELS:
        return MATERIALS[LABELS[material.lower()]]
    names = [m.name for m in MATERIALS.values()]
    raise InputError(
        f"unknown material {material!r}; use one of {names} or labels 0–{max(MATERIALS)}"
    )


def refractive_index(material: str | int, energy_kev: float) -> tuple[float, float]:
    """Refractive index decrements ``(δ, β)`` of a phantom material at a photon energy.

    Parameters
    ----------
    material
        ``"vacuum"``, ``"SiO2"``, ``"Si"``, ``"Cu"`` or ``"W"`` (any case), or its label.
    energy_kev
        Photon energy, keV, within ``ENERGY_RANGE_KEV``.

    Returns
    -------
    (delta, beta)
        With ``n = 1 − δ + iβ``; both are 0 for vacuum.

    Raises
    ------
    InputError
        Unknown material or energy outside the tables.
    """
    mat = _material(material)
    e = _check_energy(energy_kev)
    if not mat.composition:
        return 0.0, 0.0
    # molecules per m^3 (density g/cm^3 -> g/m^3 is 1e6)
    n_mol_m3 = mat.density_g_cm3 * 1e6 / mat.molar_mass_g_mol * N_A_PER_MOL
    lam_m = wavelength_m(e)
    prefactor = R_E_M * lam_m**2 / (2 * math.pi) * n_mol_m3
    f1_sum = f2_sum = 0.0
    for element, count in mat.composition:
        f1, f2 = scattering_factors(element, e)
        f1_sum += count * f1
        f2_sum += count * f2
    return prefactor * f1_sum, prefactor * f2_sum


def delta_beta_volumes(labels: np.ndarray, energy_kev: float) -> tuple[np.ndarray, np.ndarray]:
    """Turn a label volume into float32 volumes of δ and β (same shape).

    Parameters
    ----------
    labels
        Integer array of material labels (``MATERIALS`` keys), any shape.
    energy_kev
        Photon energy, keV.

    Raises
    ------
    InputError
        Not an integer array, labels outside the table, or energy outside the tables.
    """
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "ui":
        got = labels.dtype if isinstance(labels, np.ndarray) else type(labels).__name__
        raise InputError(f"labels must be an integer numpy array, got {got}")
    n_labels = max(MATERIALS) + 1
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise InputError(
            f"labels must lie in 0..{n_labels - 1}, got values in {labels.min()}..{labels.max()}"
        )
    table = np.array([refractive_index(lab, energy_kev) for lab in range(n_labels)])
    delta = table[:, 0].astype(np.float32)[labels]
    beta = table[:, 1].astype(np.float32)[labels]
    return delta, beta
