"""Build the live reconstructor's callables from configuration (for deployments).

In-process callers (the demo, tests) pass their own engine factory and reconstruct function;
a deployment only has JSON parameters, so it gets the library's defaults from here. No numerics:
each function picks library objects and ties them together.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def engine_factory(*, device: str = "cpu", data_consistency: bool = False,
                   cluster: Any = None) -> Callable[[Any], Any]:
    """``factory(header)`` -> the physics engine's streaming Approximant for that run.

    With ``data_consistency`` each finished angle keeps iterating to the projections the
    consistency sweeps need (``DC_PROJECTION_ITERATIONS``); without it that work is skipped.
    With a ``cluster`` (:class:`apt_stream.cluster.Cluster`) the angles run on its Dask workers.
    """
    from apt_stream.physics.consistency import DC_PROJECTION_ITERATIONS
    from apt_stream.physics.engine import ScanGeometry, StreamingApproximant

    iterations = DC_PROJECTION_ITERATIONS if data_consistency else None
    if cluster is not None:
        return cluster.engine_factory(projection_iterations=iterations, device=device)

    def make(header: Any) -> Any:
        return StreamingApproximant(ScanGeometry.from_scan(header), device=device,
                                    projection_iterations=iterations)

    return make


def model_reconstructor(
    checkpoint: str | os.PathLike | None, *, device: str = "cpu"
) -> tuple[Callable[[Any, Any], dict], dict[str, Any]]:
    """Load a checkpoint (None: the shipped model); return ``reconstruct_fn(volume, header,
    projections=None) -> {"apt": ..., "apt-raw": ...}`` and the model's ``model_name`` / ``model_checksum`` for the scans' metadata.

    Raises
    ------
    ModelError
        The checkpoint is missing, cannot be loaded safely or does not match its network.
    """
    from apt_stream.model import load_checkpoint, sha256_file
    from apt_stream.reconstruct import DEFAULT_CHECKPOINT, apt_volumes, dc_sweeps

    if checkpoint is None:
        checkpoint = DEFAULT_CHECKPOINT
    if not Path(checkpoint).exists():
        from apt_stream.errors import ModelError

        raise ModelError(f"model checkpoint {checkpoint} does not exist")

    path = Path(checkpoint)
    model, meta = load_checkpoint(path, map_location=device)

    def reconstruct(volume: Any, header: Any, projections: Any = None, input_projections: Any = None) -> dict:
        return apt_volumes(model, volume, projections=projections, input_projections=input_projections,
                           device=device)

    weights = path.with_name(meta["weights_file"]) if meta.get("weights_file") else path
    info = {
        "model_name": meta.get("preset") or path.stem,
        "model_checksum": meta.get("sha256") or sha256_file(weights),
        "data_consistency_sweeps": dc_sweeps(model),
    }
    return reconstruct, info
