"""Per-angle work on a real Dask LocalCluster (worker processes on 127.0.0.1).

The distributed engine must give the volume one process gives (the shares of the running
average merged exactly, up to float32 summation order), through the same live loop, and a
worker killed mid-run must cost no angle.
"""

from __future__ import annotations

import contextlib
import os
import threading

import numpy as np
import pytest

from apt_stream.config import get_preset
from apt_stream.physics.engine import approximant_from_scan
from apt_stream.sim.acquire import simulate_scan
from apt_stream.stream import FrameBatch, LiveReconstructor, RunHeader, RunStopped, TriggerPolicy

BATCH = 16


@pytest.fixture(scope="module")
def scan():
    return simulate_scan(get_preset("tiny"), seed=3)


@pytest.fixture(scope="module")
def reference(scan):
    """The single-process engine, fed the same batches."""
    return approximant_from_scan(scan, batch_size=BATCH)


@pytest.fixture(scope="module")
def cluster():
    from apt_stream.cluster import open_cluster

    with open_cluster(workers=2) as cl:
        yield cl


def header_of(scan, run_uid: str) -> RunHeader:
    return RunHeader(
        run_uid=run_uid, scan_id=1, sample="cluster-test", preset="tiny",
        energy_kev=scan.energy_kev, detector_distance_m=scan.detector_distance_m,
        detector_pixel_m=scan.detector_pixel_m, object_pixel_m=scan.object_pixel_m,
        field_shape=tuple(scan.field_shape), frame_shape=tuple(scan.probe.shape[-2:]),
        n_slices=scan.n_slices, slice_spacing_m=np.asarray(scan.slice_spacing_m),
        angles_deg=np.asarray(scan.angles_deg),
        frames_per_angle=tuple(int((scan.angle_index == n).sum()) for n in range(scan.n_angles)),
        volume_shape_zyx=tuple(scan.volume_shape_zyx), probe=scan.probe,
    )


def relative_gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


class FinalVolume:
    """A sink that keeps the last Approximant and the final status."""

    def __init__(self) -> None:
        self.angles: list[int] = []
        self.volume: np.ndarray | None = None
        self.status: str | None = None
        self.stopped = threading.Event()

    def run_started(self, header):
        pass

    def angle_finished(self, run_uid, summary, approximant):
        self.angles.append(summary.angle_id)
        self.volume = approximant.volume()

    def reconstruction_ready(self, run_uid, volumes, *, final):
        pass

    def run_stopped(self, run_uid, status):
        self.status = status
        self.stopped.set()


def test_two_workers_give_the_single_process_volume(scan, reference, cluster):
    sink = FinalVolume()
    engines = []

    def factory(header):
        engines.append(cluster.engine_factory()(header))
        return engines[-1]

    live = LiveReconstructor(sink, engine_factory=factory,
                             reconstruct_fn=lambda v, h: {"apt": v},
                             policy=TriggerPolicy(n_star=scan.n_angles, theta_star_deg=1.0))
    live.submit(header_of(scan, "cluster-same"))
    for n in range(scan.n_angles):
        frames, positions = scan.frames_of(n)
        for s in range(0, len(frames), BATCH):
            live.submit(FrameBatch("cluster-same", n, float(scan.angles_deg[n]),
                                   frames[s:s + BATCH], positions[s:s + BATCH],
                                   angle_complete=s + BATCH >= len(frames)))
    live.submit(RunStopped("cluster-same", "success"))
    assert sink.stopped.wait(120)
    live.close()

    assert sink.status == "done"
    assert sorted(sink.angles) == list(range(scan.n_angles))
    assert relative_gap(sink.volume, reference.volume()) <= 1e-6
    # Both workers did angles, and the run's state left them at its end.
    engine = engines[0]
    assert len(set(engine._holder.values())) == 2
    assert engine._closed.is_set()
    angles, proj = engine.projections()
    ref_angles, ref_proj = reference.projections()
    np.testing.assert_allclose(angles, ref_angles)
    assert relative_gap(proj, ref_proj) <= 1e-6


def test_a_killed_worker_loses_no_angle(scan, reference, cluster):
    engine = cluster.engine_factory()(header_of(scan, "cluster-kill"))
    half = scan.n_angles // 2

    def feed(n):
        frames, positions = scan.frames_of(n)
        for s in range(0, len(frames), BATCH):
            engine.add_frames(n, float(scan.angles_deg[n]), frames[s:s + BATCH],
                              positions[s:s + BATCH])

    for n in range(half):
        feed(n)
        engine.start_finish(n).result(timeout=60)
    for n in range(half, scan.n_angles):
        feed(n)  # queued on both workers, not finished
    victim = max(set(engine._holder.values()),
                 key=lambda w: sum(v == w for v in engine._holder.values()))
    unfinished_on_victim = [a for a in engine.pending_angles()
                            if engine._angles[a].worker == victim]
    finished_on_victim = [a for a, w in engine._holder.items() if w == victim]
    assert finished_on_victim  # the kill costs a share of the average to rebuild
    with contextlib.suppress(Exception):
        cluster.client.run(os._exit, 1, workers=[victim])
    summaries = [engine.start_finish(n).result(timeout=120) for n in range(half, scan.n_angles)]

    assert [s.angle_id for s in summaries] == list(range(half, scan.n_angles))
    assert engine.finished_angles_deg() == reference.finished_angles_deg()
    assert relative_gap(engine.volume(), reference.volume()) <= 1e-6
    assert engine.lost_workers == [victim]
    assert engine.replayed_angles >= len(unfinished_on_victim)
    assert victim not in set(engine._holder.values())
    engine.close()


def test_cluster_options_are_checked():
    from apt_stream.cluster import open_cluster
    from apt_stream.errors import ConfigError

    with pytest.raises(ConfigError, match="either"), open_cluster():
        pass
    with pytest.raises(ConfigError, match=">= 1"), open_cluster(workers=0):
        pass
    with pytest.raises(ConfigError, match="tcp://HOST:PORT"), open_cluster(address="nowhere:1"):
        pass


def test_a_run_without_angles_has_an_empty_volume(scan, cluster):
    engine = cluster.engine_factory()(header_of(scan, "cluster-empty"))
    try:
        assert engine.volume().shape == tuple(scan.volume_shape_zyx)  # no angle yet: zeros
        assert not engine.volume().any()
    finally:
        engine.close()
