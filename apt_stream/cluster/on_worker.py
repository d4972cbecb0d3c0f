"""What runs inside a Dask worker process: one streaming engine per run, holding this
worker's angles and its share of the Approximant's running average.

Each function is a Dask task restricted to one worker (the one that holds the angle's state),
so state lives in this module, per process. An angle's pass-1 tasks carry their batch's
sequence number and may run in any order (and on workers with several threads, at once): each
puts its batch into the engine in sequence, holding back batches that came early. The finish
task takes all of them as ``after``, so it runs last. Angles of different runs and workers run independently.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from apt_stream.physics.engine import EngineOptions, ScanGeometry, StreamingApproximant


@dataclass(frozen=True)
class RunSetup:
    """What a worker needs to build a run's engine (scattered once per worker and run)."""

    run_uid: str
    geometry: ScanGeometry
    options: EngineOptions
    projection_iterations: int | None
    #: torch threads per task: a worker's share of the machine (1 when workers = cores)
    threads: int = 1
    device: str = "cpu"


def _this_workers(device: str):
    """``device`` for this worker: plain ``cuda`` becomes this worker's share of the GPUs.

    A LocalCluster names its workers 0, 1, …; a worker with another name (one started by hand
    or by dask-cuda, which gives each worker one visible GPU) keeps GPU 0 of what it sees.
    """
    from apt_stream.devices import worker_device

    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):  # not on a worker (called in-process by a test)
        name = 0
    return worker_device(device, name if isinstance(name, int) else 0)


_ENGINES: dict[str, StreamingApproximant] = {}
_ARRIVALS: dict[tuple[str, int], _Arrivals] = {}
_LOCK = threading.Lock()


def _engine(setup: RunSetup) -> StreamingApproximant:
    with _LOCK:
        engine = _ENGINES.get(setup.run_uid)
        if engine is None:
            import torch

            torch.set_num_threads(max(1, int(setup.threads)))
            engine = StreamingApproximant(setup.geometry, options=setup.options,
                                          keep_slices=True, device=_this_workers(setup.device),
                                          projection_iterations=setup.projection_iterations)
            _ENGINES[setup.run_uid] = engine
        return engine


@dataclass
class _Arrivals:
    """An angle's batches that ran ahead of an earlier one, held until their turn."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    attempt: int = 0
    next_seq: int = 0
    waiting: dict[int, tuple[float, np.ndarray, np.ndarray]] = field(default_factory=dict)


def _arrivals(run_uid: str, angle_id: int) -> _Arrivals:
    with _LOCK:
        return _ARRIVALS.setdefault((run_uid, angle_id), _Arrivals())


def add_frames(setup: RunSetup, angle_id: int, angle_deg: float, attempt: int, seq: int,
               batch: tuple[np.ndarray, np.ndarray]) -> int:
    """Pass 1 on the angle's batch number ``seq`` (frames, positions), in arrival order whatever order the tasks
    run in (so the sums, and the result, are the single-process engine's to the last bit);
    returns how many batches went into the engine now.

    ``attempt`` counts the angle's replays: a newer one starts the angle afresh (a replay may
    come to a worker that had the angle), batches of an older one are ignored.
    """
    frames, positions_px = batch
    engine = _engine(setup)
    arrivals = _arrivals(setup.run_uid, angle_id)
    with arrivals.lock:
        if attempt < arrivals.attempt:
            return 0
        if attempt > arrivals.attempt:
            engine.forget_angle(angle_id)
            arrivals.attempt, arrivals.next_seq = attempt, 0
            arrivals.waiting.clear()
        arrivals.waiting[int(seq)] = (angle_deg, frames, positions_px)
        done = 0
        while arrivals.next_seq in arrivals.waiting:
            deg, f, p = arrivals.waiting.pop(arrivals.next_seq)
            engine.add_frames(angle_id, deg, f, p)
            arrivals.next_seq += 1
            done += 1
        return done


def finish_angle(after: Any, setup: RunSetup, angle_id: int) -> Any:
    """Pass 2, rotate back and add to this worker's share; the summary, with the angle's
    per-slab δ (what a lost worker's share is rebuilt from) but not its complex slices."""
    engine = _engine(setup)
    arrivals = _arrivals(setup.run_uid, angle_id)
    with arrivals.lock:
        if arrivals.waiting:  # cannot happen: the finish task depends on every batch's task
            raise RuntimeError(f"angle {angle_id}: batches {sorted(arrivals.waiting)} are "
                               f"waiting for batch {arrivals.next_seq}")
        summary = engine.finish_angle(angle_id)
    with _LOCK:
        _ARRIVALS.pop((setup.run_uid, angle_id), None)
    delta = None if summary.delta is None else summary.delta.cpu().numpy()
    return replace(summary, slices=None, delta=delta)


def add_deltas(setup: RunSetup, items: list[tuple[float, np.ndarray]]) -> int:
    """Rebuild another (lost) worker's share here: rotate back and add finished angles' δ."""
    import torch

    engine = _engine(setup)
    for angle_deg, delta in items:
        engine.accumulator.add_delta(angle_deg, torch.as_tensor(delta))
    return len(items)


def share(run_uid: str) -> tuple[np.ndarray, np.ndarray, int] | None:
    """This worker's share of the running average: (sum, count, angles), or None."""
    engine = _ENGINES.get(run_uid)
    if engine is None:
        return None
    acc = engine.accumulator
    return acc.total.cpu().numpy(), acc.count.cpu().numpy(), acc.n_angles


def drop_run(run_uid: str) -> bool:
    """Forget a run (its frames and share); True when this worker held it."""
    with _LOCK:
        for key in [k for k in _ARRIVALS if k[0] == run_uid]:
            del _ARRIVALS[key]
        return _ENGINES.pop(run_uid, None) is not None


_MODELS: dict[tuple[str, str], Any] = {}


def reconstruct(checkpoint: str, device: str, threads: int, volume: np.ndarray,
                projections: Any = None, input_projections: Any = None) -> dict[str, np.ndarray]:
    """The APT volumes of a merged Approximant, with the network loaded once per worker
    (and device): a worker keeps the model it loaded for every later trigger."""
    from apt_stream.model import load_checkpoint
    from apt_stream.reconstruct import apt_volumes

    device = str(_this_workers(device))
    key = (str(checkpoint), device)
    with _LOCK:
        model = _MODELS.get(key)
        if model is None:
            import torch

            torch.set_num_threads(max(1, int(threads)))
            model, _meta = load_checkpoint(checkpoint, map_location=device)
            _MODELS[key] = model
    return apt_volumes(model, volume, projections=projections,
                       input_projections=input_projections, device=device)

