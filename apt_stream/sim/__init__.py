"""Simulation: IC phantoms and their X-ray optical constants (numpy/scipy only).

``make_ic_phantom`` builds seeded label volumes (docs/phantoms.md); ``delta_beta_volumes``
turns labels into δ and β at a photon energy (Henke, Gullikson & Davis 1993 tables).
``make_design_phantom`` draws from the wide design space of ``apt_stream.sim.design``.
"""

from apt_stream.sim.design import (
    ChipDesign,
    DesignOptions,
    classic_design,
    describe_design,
    make_design_phantom,
    render_design,
    sample_design,
)
from apt_stream.sim.materials import MATERIALS, delta_beta_volumes, refractive_index
from apt_stream.sim.phantom import Layer, Phantom, describe, make_ic_phantom, phantom_batch

__all__ = [
    "ChipDesign",
    "DesignOptions",
    "MATERIALS",
    "Layer",
    "Phantom",
    "classic_design",
    "delta_beta_volumes",
    "describe",
    "describe_design",
    "make_design_phantom",
    "make_ic_phantom",
    "phantom_batch",
    "refractive_index",
    "render_design",
    "sample_design",
]
