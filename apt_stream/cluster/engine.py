"""The streaming Approximant on a Dask cluster: angles run on workers as they complete.

:class:`DaskApproximant` is a streaming engine (the interface
:class:`~apt_stream.stream.live.LiveReconstructor` drives) whose angles live on Dask workers.
An angle is given to the worker with the fewest unfinished angles when its first batch
arrives; its batches go straight to that worker (``scatter(direct=True)``: frames never pass
through the scheduler) and pass 1 runs there as they come. Small batches are first gathered on
the client into sends of at least ``send_frames`` frames (or whatever has waited ``hold_s``):
every send costs a scatter and a task on the client and the scheduler whatever its size, and
on the demo scan those fixed costs, not the workers, were what kept 2 workers from doing twice
one's work (docs/benchmarks.md, *Dask*). When the angle is complete,
``start_finish`` queues pass 2, the rotation back and the addition to the worker's share of the
running average on that worker and returns at once, so the next angle's frames flow to another
worker meanwhile. ``volume()`` merges the shares (sums and counts, added, then divided once:
the same average one process computes, up to float32 summation order).

A lost worker loses nothing: the client keeps each unfinished angle's batches until the angle
is finished and each finished angle's per-slab δ, so a dead worker's unfinished angles are
replayed on a live worker and its share of the average is rebuilt (rotation only) from the
δ it returned. Memory on the client: the in-flight angles' frames plus L × Ny × Nx float32 per
finished angle.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from apt_stream.cluster import on_worker
from apt_stream.errors import InputError, ServiceError
from apt_stream.physics.engine import AngleSummary, EngineOptions, ScanGeometry

log = logging.getLogger(__name__)

#: How often the watcher asks the scheduler which workers are alive.
LIVENESS_EVERY_S = 0.5
#: Frames gathered on the client before they go to a worker as one pass-1 task.
SEND_FRAMES = 128
#: The longest frames wait on the client for more of their angle (a slow stream still starts
#: pass 1 while the angle is being scanned).
HOLD_S = 0.25


@dataclass
class _Angle:
    angle_id: int
    angle_deg: float
    worker: str
    batches: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # sent, kept
    held: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # not sent yet
    held_frames: int = 0
    held_since: float = 0.0
    sent: list = field(default_factory=list)  # the angle's pass-1 tasks (Dask futures)
    finish: Any = None          # the finish task, once asked for
    done: concurrent.futures.Future | None = None
    replays: int = 0


def _lost_worker(error: BaseException) -> bool:
    """Whether a task failed because its worker (or its inputs' worker) died."""
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker

    return isinstance(error, KilledWorker | FutureCancelledError | concurrent.futures.CancelledError)


class DaskApproximant:
    """One run's streaming Approximant spread over the workers of a Dask ``client``.

    Parameters
    ----------
    geometry
        The run's geometry (as for :class:`~apt_stream.physics.engine.StreamingApproximant`).
    client
        A ``distributed.Client``.
    run_uid
        Names the run's state on the workers (two runs never share it).
    options, projection_iterations
        As for the single-process engine.
    threads_per_task
        torch threads each worker task uses.
    device
        torch device of the workers' engines (``cuda``: each worker uses its process's GPU).
    max_replays
        How often one angle may be replayed after losing its worker before it counts as failed.
    send_frames, hold_s
        Batches are sent once ``send_frames`` frames of an angle are in, once the oldest has
        waited ``hold_s`` seconds, or when the angle finishes (1 and 0: every batch at once).
    """

    def __init__(self, geometry: ScanGeometry, client: Any, *, run_uid: str,
                 options: EngineOptions | None = None, projection_iterations: int | None = None,
                 threads_per_task: int = 1, device: str = "cpu", max_replays: int = 3,
                 send_frames: int = SEND_FRAMES, hold_s: float = HOLD_S) -> None:
        if int(send_frames) < 1 or not hold_s >= 0:
            raise InputError(f"send_frames must be >= 1 and hold_s >= 0, got {send_frames} and {hold_s}")
        self.send_frames, self.hold_s = int(send_frames), float(hold_s)
        self.geometry = geometry
        self.client = client
        self.run_uid = str(run_uid)
        self.setup = on_worker.RunSetup(self.run_uid, geometry, options or EngineOptions(),
                                        projection_iterations, int(threads_per_task),
                                        str(device))
        self.max_replays = int(max_replays)
        self.summaries: dict[int, AngleSummary] = {}
        self.replayed_angles = 0
        self.lost_workers: list[str] = []
        self._angles: dict[int, _Angle] = {}
        self._deltas: dict[int, tuple[float, np.ndarray]] = {}
        self._holder: dict[int, str] = {}      # finished angle -> the worker whose share has it
        self._setups: dict[str, Any] = {}      # worker -> its scattered RunSetup
        self._rebuilding: list[Any] = []       # add_deltas tasks not yet done
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._alive = self._ask_alive()
        if not self._alive:
            raise ServiceError("the Dask cluster has no workers")
        self._watcher = threading.Thread(target=self._watch, name=f"dask-angles-{run_uid}",
                                         daemon=True)
        self._watcher.start()

    # -- the streaming-engine interface ------------------------------------------------------------
    def add_frames(self, angle_id: int, angle_deg: float, frames: Any, positions_px: Any) -> None:
        """Queue pass 1 of one batch on the angle's worker (returns before it ran)."""
        frames = np.ascontiguousarray(frames, dtype=np.float32)
        positions = np.ascontiguousarray(positions_px, dtype=np.float64)
        if frames.ndim != 3 or positions.shape != (frames.shape[0], 2):
            raise InputError(f"frames must be (B, h, w) with positions (B, 2), got "
                             f"{frames.shape} and {positions.shape}")
        with self._lock:
            if angle_id in self.summaries:
                raise InputError(f"angle {angle_id} is already finished")
            angle = self._angles.get(angle_id)
            if angle is None:
                angle = _Angle(angle_id, float(angle_deg), self._least_loaded())
                self._angles[angle_id] = angle
            if angle.finish is not None:
                raise InputError(f"angle {angle_id} is already being finished")
            if not angle.held:
                angle.held_since = time.monotonic()
            angle.held.append((frames, positions))
            angle.held_frames += len(frames)
            if angle.held_frames >= self.send_frames or self.hold_s == 0:
                self._flush(angle)

    def start_finish(self, angle_id: int) -> concurrent.futures.Future:
        """Queue the angle's pass 2 on its worker; the future gives its :class:`AngleSummary`."""
        with self._lock:
            angle = self._angles.get(angle_id)
            if angle is None:
                if angle_id in self.summaries:
                    done: concurrent.futures.Future = concurrent.futures.Future()
                    done.set_result(self.summaries[angle_id])
                    return done
                raise InputError(f"angle {angle_id} received no frames")
            if angle.done is None:
                angle.done = concurrent.futures.Future()
                self._flush(angle)
                if angle.finish is None and not angle.done.done():  # not replayed by the flush
                    self._send_finish(angle)
            return angle.done

    def finish_angle(self, angle_id: int) -> AngleSummary:
        """The angle's summary, waiting for its worker if it is still running."""
        return self.start_finish(angle_id).result()

    def finished_angles_deg(self) -> list[float]:
        with self._lock:
            return sorted(s.angle_deg for s in self.summaries.values())

    def pending_angles(self) -> list[int]:
        with self._lock:
            return sorted(self._angles)

    def volume(self) -> np.ndarray:
        """The Approximant (nz, ny, nx): every worker's share merged, then averaged."""
        import torch

        for attempt in range(self.max_replays + 1):
            with self._lock:
                rebuilding = list(self._rebuilding)
                holders = sorted(set(self._holder.values()))
            try:
                for future in rebuilding:
                    future.result()  # a failed rebuild raises: the check below redoes it
                shares = [self.client.submit(on_worker.share, self.run_uid, workers=[w],
                                             allow_other_workers=False, pure=False)
                          for w in holders]
                results = self.client.gather(shares) if shares else []
            except Exception as exc:
                if attempt == self.max_replays:
                    raise ServiceError(f"could not read the Approximant's shares from the Dask "
                                       f"workers: {type(exc).__name__}: {exc}") from exc
                with self._lock:
                    self._rebuilding = [f for f in self._rebuilding if f.status != "error"]
                time.sleep(LIVENESS_EVERY_S)
                self._check_workers()
                continue
            shape = tuple(self.geometry.volume_shape_zyx)
            total = torch.zeros(shape, dtype=torch.float32)
            count = torch.zeros(shape, dtype=torch.float32)
            for part in results:
                if part is not None:
                    total += torch.as_tensor(part[0])
                    count += torch.as_tensor(part[1])
            return (total / count.clamp(min=1)).numpy()
        raise AssertionError("unreachable")

    def projections(self, *, refined: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`StreamingApproximant.projections`: the finished angles', sorted by angle."""
        with self._lock:
            items = sorted(self.summaries.values(), key=lambda s: s.angle_deg)
        key = "projection" if refined else "input_projection"
        return (
            np.array([s.angle_deg for s in items]),
            np.stack([getattr(s, key) for s in items]) if items else np.zeros((0, 0, 0), np.float32),
        )

    def close(self) -> None:
        """Stop watching and free the run's state on every worker."""
        if self._closed.is_set():
            return
        self._closed.set()
        with self._lock:
            workers = sorted(set(self._setups) | set(self._holder.values()))
            self._angles.clear()
        try:
            drops = [self.client.submit(on_worker.drop_run, self.run_uid, workers=[w],
                                        allow_other_workers=False, pure=False) for w in workers]
            self.client.gather(drops, errors="skip")
        except Exception as exc:  # a closing cluster: its state goes with it
            log.debug("run %s: dropping worker state failed: %s", self.run_uid, exc)

    # -- sending work -----------------------------------------------------------------------------
    def _setup_on(self, worker: str) -> Any:
        future = self._setups.get(worker)
        if future is None:
            future = self.client.scatter(self.setup, workers=[worker], direct=True, hash=False)
            self._setups[worker] = future
        return future

    def _flush(self, angle: _Angle) -> None:
        """Send the angle's held frames as one batch (kept for a replay like every sent one)."""
        if not angle.held:
            return
        held, angle.held, angle.held_frames = angle.held, [], 0
        if len(held) == 1:
            frames, positions = held[0]
        else:
            frames = np.concatenate([f for f, _ in held])
            positions = np.concatenate([p for _, p in held])
        angle.batches.append((frames, positions))
        try:
            sent = self._send_batch(angle, frames, positions)
        except Exception:
            # Not a lost worker: keep the frames held (the next send retries them) and say so.
            angle.batches.pop()
            angle.held, angle.held_frames = held + angle.held, angle.held_frames + len(frames)
            raise
        if not sent:
            self._replay(angle, avoid=angle.worker)  # every kept batch, this one too

    def _send_batch(self, angle: _Angle, frames: np.ndarray, positions: np.ndarray) -> bool:
        """Scatter one batch to the angle's worker and queue its pass 1; False if that worker
        died before the watcher noticed (the caller replays the angle elsewhere)."""
        w = angle.worker
        try:
            batch = self.client.scatter((frames, positions), workers=[w], direct=True, hash=False)
        except Exception as exc:
            self._alive = self._ask_alive() or self._alive
            if w in self._alive:
                raise
            log.warning("run %s: angle %d: worker %s is gone (%s); sending it elsewhere",
                        self.run_uid, angle.angle_id, w, type(exc).__name__)
            return False
        angle.sent.append(self.client.submit(
            on_worker.add_frames, self._setup_on(w), angle.angle_id, angle.angle_deg,
            angle.replays, len(angle.sent), batch, workers=[w], allow_other_workers=False,
            pure=False))
        return True

    def _send_finish(self, angle: _Angle) -> None:
        w = angle.worker
        # After every batch of the angle: the finish task depends on all of its pass-1 tasks.
        angle.finish = self.client.submit(
            on_worker.finish_angle, angle.sent, self._setup_on(w), angle.angle_id,
            workers=[w], allow_other_workers=False, pure=False)

    def _least_loaded(self, avoid: str | None = None) -> str:
        alive = (self._alive or self._ask_alive()) - {avoid}
        if not alive:
            raise ServiceError("the Dask cluster has no live workers")
        load = {w: 0 for w in alive}
        for angle in self._angles.values():
            if angle.worker in load:
                load[angle.worker] += 1
        return min(sorted(load), key=load.get)

    # -- watching: results and lost workers -------------------------------------------------------
    def _ask_alive(self) -> set[str]:
        try:
            return set(self.client.nthreads())
        except Exception as exc:
            log.warning("run %s: the Dask scheduler did not answer: %s", self.run_uid, exc)
            return set()

    def _watch(self) -> None:
        from distributed import wait

        last_check = time.monotonic()
        while not self._closed.is_set():
            with self._lock:
                waiting = [a for a in self._angles.values()
                           if a.finish is not None and a.done is not None and not a.done.done()]
                futures = [a.finish for a in waiting]
            if futures:
                try:
                    wait(futures, timeout=0.2, return_when="FIRST_COMPLETED")
                except Exception:
                    pass
            else:
                self._closed.wait(0.05)
            for angle in waiting:
                if angle.finish is not None and angle.finish.done():
                    self._resolve(angle, angle.finish)
            self._flush_overdue()
            if time.monotonic() - last_check >= LIVENESS_EVERY_S:
                last_check = time.monotonic()
                self._check_workers()

    def _flush_overdue(self) -> None:
        now = time.monotonic()
        with self._lock:
            for angle in list(self._angles.values()):
                if angle.held and now - angle.held_since >= self.hold_s:
                    try:
                        self._flush(angle)
                    except Exception as exc:  # still held: the next send or the finish retries
                        log.warning("run %s: angle %d: sending held frames failed: %s",
                                    self.run_uid, angle.angle_id, exc)

    def _resolve(self, angle: _Angle, future: Any) -> None:
        with self._lock:
            if angle.finish is not future or angle.done is None or angle.done.done():
                return  # replayed meanwhile: the newer finish decides
            error: BaseException | None = None
            if future.status == "finished":
                try:
                    summary = future.result()
                except Exception as exc:  # the result could not come back from its worker
                    error = exc
                else:
                    self._record(angle, summary)
                    return
            elif future.status == "error":
                error = future.exception()
            if error is None or _lost_worker(error) or angle.worker not in self._ask_alive():
                # Not the angle's fault: its worker (or the data on it) went away.
                self._replay(angle)
                return
            self._angles.pop(angle.angle_id, None)
            angle.done.set_exception(error)

    def _record(self, angle: _Angle, summary: AngleSummary) -> None:
        delta, summary.delta = summary.delta, None
        self._deltas[angle.angle_id] = (angle.angle_deg, delta)
        self._holder[angle.angle_id] = angle.worker
        self.summaries[angle.angle_id] = summary
        self._angles.pop(angle.angle_id, None)
        angle.batches.clear()
        angle.sent, angle.finish = [], None
        angle.done.set_result(summary)

    def _replay(self, angle: _Angle, avoid: str | None = None) -> None:
        """Run an unfinished angle again, from its kept batches, on a live worker (not
        ``avoid``, one a send just failed to reach, even if the scheduler still lists it)."""
        if angle.replays >= self.max_replays:
            self._angles.pop(angle.angle_id, None)
            if angle.done is not None and not angle.done.done():
                angle.done.set_exception(ServiceError(
                    f"angle {angle.angle_id} lost its Dask worker {angle.replays + 1} times"))
            return
        angle.replays += 1
        self.replayed_angles += 1
        self._alive = self._ask_alive() or self._alive
        angle.worker = self._least_loaded(avoid)
        angle.sent, angle.finish = [], None
        for frames, positions in angle.batches:
            if not self._send_batch(angle, frames, positions):
                self._replay(angle, avoid=angle.worker)  # died too: the next, within max_replays
                return
        if angle.done is not None:
            self._send_finish(angle)

    def _check_workers(self) -> None:
        alive = self._ask_alive()
        if not alive:
            return  # the scheduler is away or restarting workers: look again next time
        with self._lock:
            self._alive = alive
            used = {a.worker for a in self._angles.values()} | set(self._holder.values())
            for dead in sorted(used - alive):
                self._recover(dead)

    def _recover(self, dead: str) -> None:
        """Replay a lost worker's unfinished angles elsewhere and rebuild its share."""
        log.warning("run %s: Dask worker %s is gone; replaying its angles", self.run_uid, dead)
        self.lost_workers.append(dead)
        self._setups.pop(dead, None)
        for angle in [a for a in self._angles.values() if a.worker == dead]:
            self._replay(angle)
        lost = sorted(i for i, w in self._holder.items() if w == dead)
        if lost:
            target = self._least_loaded()
            items = [self._deltas[i] for i in lost]
            self._rebuilding.append(self.client.submit(
                on_worker.add_deltas, self._setup_on(target), items, workers=[target],
                allow_other_workers=False, pure=False))
            for i in lost:
                self._holder[i] = target
        self._rebuilding = [f for f in self._rebuilding if not f.done()]
