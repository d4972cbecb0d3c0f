"""Per-angle work on a real Dask LocalCluster (worker processes on 127.0.0.1).

The distributed engine must give the volume one process gives (the shares of the running
average merged exactly, up to float32 summation order), through the same live loop, and a
worker killed mid-run must cost no angle.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import numpy as np
import pytest

from apt_stream.config import get_preset
from apt_stream.errors import InputError
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
    # The client gathers batches into larger sends (their boundaries move float32 sums; the six
    # refinement iterations behind these projections carry that further than the volume).
    assert relative_gap(proj, ref_proj) <= 1e-5


def test_small_batches_go_to_a_worker_together_and_give_the_same_volume(scan, reference, cluster):
    """Batches are gathered on the client into one send per angle (each send costs a scatter
    and a task whatever its size); the volume is still the single-process one."""
    engine = cluster.engine(reference.geometry, run_uid="cluster-gather", send_frames=10**6, hold_s=60)
    try:
        for n in range(scan.n_angles):
            frames, positions = scan.frames_of(n)
            for s in range(0, len(frames), BATCH):
                engine.add_frames(n, float(scan.angles_deg[n]), frames[s:s + BATCH],
                                  positions[s:s + BATCH])
            angle = engine._angles[n]
            assert angle.sent == [] and angle.held_frames == len(frames)
            future = engine.start_finish(n)
            assert len(angle.sent) == 1 and angle.held == []  # one pass-1 task for the angle
            future.result(timeout=60)
        assert relative_gap(engine.volume(), reference.volume()) <= 1e-6
    finally:
        engine.close()


def test_held_frames_go_out_after_hold_s_without_waiting_for_the_angle_to_end(scan, reference, cluster):
    engine = cluster.engine(reference.geometry, run_uid="cluster-hold", send_frames=10**6, hold_s=0.2)
    try:
        frames, positions = scan.frames_of(0)
        engine.add_frames(0, float(scan.angles_deg[0]), frames[:BATCH], positions[:BATCH])
        angle = engine._angles[0]
        deadline = time.monotonic() + 10
        while not angle.sent and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(angle.sent) == 1 and angle.held == []
        angle.sent[0].result(timeout=30)  # pass 1 ran on the worker before the angle ended
        engine.add_frames(0, float(scan.angles_deg[0]), frames[BATCH:], positions[BATCH:])
        summary = engine.start_finish(0).result(timeout=60)
        assert relative_gap(summary.projection, reference.summaries[0].projection) <= 1e-5
    finally:
        engine.close()


def test_the_client_side_send_options_are_checked(cluster, reference):
    with pytest.raises(InputError, match="send_frames"):
        cluster.engine(reference.geometry, run_uid="bad", send_frames=0)


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


def test_listen_on_a_running_dask_scheduler(prefect_harness, tiled_server, tiled_root, tmp_path,
                                           scan, reference, cluster, monkeypatch):
    """`apt-stream listen --dask ADDRESS`: a real RunEngine scan through the listen flow, its
    angles on an existing cluster, the Approximant in Tiled equal to one process's."""
    from tiled.queries import Key

    from apt_stream.flows.listen import ListenConfig, LiveResources, listen
    from apt_stream.plugins.bluesky import replay_scan, start_proxy

    monkeypatch.setenv("APT_STREAM_TILED_URI", tiled_server.uri)
    monkeypatch.setenv("APT_STREAM_TILED_API_KEY", tiled_server.api_key)
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    published: list[str] = []

    with start_proxy() as proxy:
        def publish_scan(listener) -> None:
            threading.Thread(target=lambda: published.append(replay_scan(
                scan, zmq_address=proxy.in_address, data_root=runs_dir)), daemon=True).start()

        config = ListenConfig(
            proxy_address=proxy.out_address, data_roots=[str(runs_dir)],
            spool_dir=str(tmp_path / "spool"), backup_dir=str(tmp_path / "backup"),
            preview_dir=str(tmp_path / "previews"), n_star=scan.n_angles,
            theta_star_deg=float(np.max(np.abs(scan.angles_deg))), max_runs=1,
            max_duration_s=180, approximant_every_s=0, dask_address=cluster.address,
        )
        result = listen(config, LiveResources(on_ready=publish_scan))

    assert {k: result["cluster"][k] for k in ("address", "workers")} == {
        "address": cluster.address, "workers": 2}
    (summary,) = result["scans"]
    assert summary["status"] == "done", summary
    node = tiled_root.search(Key("run_uid") == published[0]).values().first()
    assert node.metadata["angles_used"] == scan.n_angles
    # The listener batches frames as they arrive, not as the reference does: pass 1 sums the
    # same gradients in another grouping (the same batches agree to 1e-6, test above).
    assert relative_gap(node["approximant"].read(), reference.volume()) <= 1e-5
    # The network ran on a worker, which loaded the shipped model once and kept it.
    apt = node["apt"].read()
    assert apt.shape == tuple(scan.volume_shape_zyx) and np.isfinite(apt).all() and apt.any()

    def models_loaded() -> int:
        from apt_stream.cluster import on_worker

        return len(on_worker._MODELS)

    assert sum(cluster.client.run(models_loaded).values()) == 1


def test_demo_with_two_workers(prefect_harness, tmp_path):
    """`apt-stream demo --workers 2` end to end on the tiny preset."""
    from apt_stream.demo import live_demo

    summary = live_demo(tmp_path, preset="tiny", seed=1000, rate_hz=None, workers=2,
                        say=lambda _m: None)
    assert summary["status"] == "done" and summary["dask_workers"] == 2
    assert summary["angles"] == 7 and np.isfinite(summary["metrics_vs_truth"]["apt"]["pcc"])


def test_bench_scale_quick_reports_speedup_identity_and_sizing():
    """`apt-stream bench scale --quick --json`: the figures docs/deployment.md quotes exist and
    hang together (their values are measured in docs/benchmarks.md, not asserted here)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "apt_stream.cli", "bench", "scale", "--quick",
                          "--json"], capture_output=True, text=True, timeout=600, check=True)
    result = json.loads(out.stdout)
    tp = result["throughput"]
    assert set(tp["seconds"]) == {"single_process", "dask_1_worker", "dask_2_workers",
                                  "two_single_processes_at_once"}
    assert tp["efficiency_2_workers"] == pytest.approx(tp["speedup_2_vs_1_worker"]["value"] / 2)
    # the machine's own ceiling for two workers, from two plain processes running at once
    assert tp["pair_ran_in_two_processes"]
    assert tp["speedup_vs_ceiling"] == pytest.approx(
        tp["speedup_2_vs_1_worker"]["value"] / tp["ceiling_speedup"]["value"])
    assert tp["measurement_fault"] == (tp["speedup_vs_ceiling"] > 1)
    assert tp["max_relative_difference_vs_single_process"] <= 1e-6
    cpu = result["paper_scale"]["cpu"]
    assert (cpu["frame_px"], cpu["modes"], cpu["slices"]) == (128, 12, 5)
    assert cpu["workers_to_keep_up"] >= 500 * cpu["seconds_per_frame"]["median"]


def test_the_network_on_a_worker_gives_the_local_volumes(scan, reference, cluster):
    """Inference on a worker (model loaded there once) = inference in the listener."""
    from apt_stream.flows.wiring import model_reconstructor
    from apt_stream.reconstruct import DEFAULT_CHECKPOINT

    local, _info = model_reconstructor(None)
    remote = cluster.reconstruct_fn(str(DEFAULT_CHECKPOINT))
    volume = reference.volume()
    kwargs = {"projections": reference.projections(),
              "input_projections": reference.projections(refined=False)}
    here, there = local(volume, None, **kwargs), remote(volume, None, **kwargs)
    assert set(here) == set(there) and "apt" in here
    for name in here:
        assert relative_gap(there[name], here[name]) <= 1e-4, name
