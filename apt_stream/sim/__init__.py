"""Simulation: IC phantoms and their X-ray optical constants (numpy/scipy only).

``make_ic_phantom`` builds seeded label volumes (docs/phantoms.md); ``delta_beta_volumes``
turns labels into δ and β at a photon energy (Henke, Gullikson & Davis 1993 tables).
"""

from apt_stream.sim.materials import MATERIALS, delta_beta_volumes, refractive_index
from apt_stream.sim.phantom import Layer, Phantom, describe, make_ic_phantom, phantom_batch

__all__ = [
    "MATERIALS",
    "Layer",
    "Phantom",
    "delta_beta_volumes",
    "describe",
    "make_ic_phantom",
    "phantom_batch",
    "refractive_index",
]
