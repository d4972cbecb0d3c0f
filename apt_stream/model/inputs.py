"""What the network reads: the Approximant, and (for physics-in-the-loop models) a SART volume.

The first-round network read only the Approximant — the running average of back-rotated
per-angle multislice estimates, i.e. an *unfiltered* back-projection smeared along the beam.
Out of family it scored below SART at the same angles, and from vacuum it returned its training
set's layer stack. A model whose ``io_config["inputs"]`` is ``["approximant", "sart"]`` also reads
a few SART sweeps on the per-angle projections of the *measured* angles (the engine's
``projections()``, the same two ptychographic iterations the Approximant is made of, so live
reconstruction costs no extra engine work). SART is linear (no clipping here), so the input
stays scale- and flip-equivariant: vacuum projections give a noise-only channel, a chip mounted
upside down gives the flipped channel. The network then corrects a data-consistent inversion
instead of inventing one (issue "data consistency": an unrolled, physics-in-the-loop input).

Channel 0 is always the Approximant: its RMS sets the output's physical scale (inference.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from apt_stream.errors import InputError, ModelError

APPROXIMANT = "approximant"
SART = "sart"
KNOWN_INPUTS = (APPROXIMANT, SART)
#: SART sweeps and relaxation of the input channel: 5 sweeps on the demo volume take ~0.7 s on
#: 2 cores (measured), inside the 2 s budget for inference + data consistency.
SART_SWEEPS = 5
SART_RELAXATION = 0.25


def model_inputs(model) -> tuple[str, ...]:
    """The channels ``model`` reads (``io_config["inputs"]``; old models: the Approximant only)."""
    names = tuple((getattr(model, "io_config", None) or {}).get("inputs") or (APPROXIMANT,))
    unknown = [n for n in names if n not in KNOWN_INPUTS]
    if unknown or not names or names[0] != APPROXIMANT:
        raise ModelError(f"model input channels {list(names)} are not supported (known: {list(KNOWN_INPUTS)}, "
                         "the Approximant first)")
    return names


def sart_settings(model) -> dict:
    io = getattr(model, "io_config", None) or {}
    cfg = dict(io.get("sart") or {})
    return {"n_iter": int(cfg.get("n_iter", SART_SWEEPS)),
            "relaxation": float(cfg.get("relaxation", SART_RELAXATION))}


def sart_channel(
    angles_deg: np.ndarray, projections: np.ndarray, shape_zyx: Sequence[int], *,
    n_iter: int = SART_SWEEPS, relaxation: float = SART_RELAXATION, device: str | None = None,
) -> np.ndarray:
    """Unclipped SART from zero on (N, ny, W) projections at ``angles_deg``: (nz, ny, nx) float32."""
    from apt_stream.physics import tomo

    ang = np.asarray(angles_deg, dtype=np.float64)
    proj = np.asarray(projections, dtype=np.float32)
    if proj.ndim != 3 or proj.shape[0] != ang.size or ang.size == 0:
        raise InputError(f"need (N, ny, W) projections for N >= 1 angles, got {proj.shape} for {ang.size}")
    order = np.argsort(ang, kind="stable")
    vol = tomo.sart(proj[order], ang[order], tuple(int(s) for s in shape_zyx), n_iter=n_iter,
                    relaxation=relaxation, nonneg=False, device=device)
    return np.asarray(vol, dtype=np.float32)


def network_input(
    model, approximant: np.ndarray, projections: tuple[np.ndarray, np.ndarray] | None, *,
    device: str | None = None,
) -> np.ndarray:
    """The array ``predict_volume`` takes: (Z, Y, X) for Approximant-only models, else (C, Z, Y, X)."""
    names = model_inputs(model)
    if names == (APPROXIMANT,):
        return approximant
    if projections is None or len(projections[0]) == 0:
        raise ModelError(
            "this model also reads a SART volume of the measured angles: pass the per-angle "
            "projections (engine.projections()) with the Approximant")
    channels = [np.asarray(approximant, np.float32)]
    for name in names[1:]:
        if name == SART:
            channels.append(sart_channel(projections[0], projections[1], approximant.shape,
                                         device=device, **sart_settings(model)))
    return np.stack(channels)
