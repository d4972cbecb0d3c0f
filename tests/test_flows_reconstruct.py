"""reconstruct_scan on the Prefect test harness, fed by a real LiveReconstructor through the
bridge, publishing to the session's real Tiled server. The per-angle compute is a small real
stand-in engine (the physics engine has its own tests)."""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter

import numpy as np
import pytest

from apt_stream.flows.relay import LiveBridge, RunTasks
from apt_stream.publish import TiledPublisher
from apt_stream.stream import FrameBatch, LiveReconstructor, RunHeader, RunStopped, TriggerPolicy

SHAPE = (8, 16, 16)
FRAME = (8, 8)
ANGLES = (-10.0, -5.0, 0.0, 5.0, 10.0)
PATTERN = np.random.default_rng(7).random(SHAPE).astype(np.float32)


class MeanEngine:
    """Stand-in for the streaming Approximant: an angle's result is its mean frame value, the
    volume is a fixed pattern scaled by the mean over finished angles."""

    def __init__(self, header: RunHeader) -> None:
        self.sums: dict[int, float] = {}
        self.counts: dict[int, int] = {}
        self.degs: dict[int, float] = {}
        self.finished: dict[int, float] = {}

    def add_frames(self, angle_id, angle_deg, frames, positions_px):
        self.sums[angle_id] = self.sums.get(angle_id, 0.0) + float(frames.mean()) * len(frames)
        self.counts[angle_id] = self.counts.get(angle_id, 0) + len(frames)
        self.degs[angle_id] = float(angle_deg)

    def finish_angle(self, angle_id):
        self.finished[angle_id] = self.sums[angle_id] / self.counts[angle_id]
        return {"angle_id": angle_id, "angle_deg": self.degs[angle_id],
                "n_frames": self.counts[angle_id], "seconds": 0.01, "loss_pass2": 0.5}

    def volume(self):
        return PATTERN * float(np.mean(list(self.finished.values())))

    def finished_angles_deg(self):
        return sorted(self.degs[a] for a in self.finished)


def double(volume, header):
    return {"apt": volume * 2.0}


def header_for(run_uid: str) -> RunHeader:
    return RunHeader(
        run_uid=run_uid, scan_id=7, sample="flow-test", preset=None, energy_kev=8.8,
        detector_distance_m=1.92, detector_pixel_m=75e-6, object_pixel_m=14e-9,
        field_shape=(24, 24), frame_shape=FRAME, n_slices=3,
        slice_spacing_m=np.full(len(ANGLES), 20e-9), angles_deg=np.array(ANGLES),
        frames_per_angle=(4,) * len(ANGLES), volume_shape_zyx=SHAPE,
        probe=np.ones((1, *FRAME), np.complex64),
    )


def submit_run(live: LiveReconstructor, run_uid: str, *, exit_status: str = "success") -> None:
    live.submit(header_for(run_uid))
    for n, angle in enumerate(ANGLES):
        frames = np.full((4, *FRAME), 1.0 + n, np.float32)
        positions = np.zeros((4, 2))
        live.submit(FrameBatch(run_uid, n, angle, frames[:2], positions[:2]))
        live.submit(FrameBatch(run_uid, n, angle, frames[2:], positions[2:], angle_complete=True))
    live.submit(RunStopped(run_uid, exit_status))


def live_pipeline(publisher, tasks: RunTasks, **bridge_kwargs):
    bridge = LiveBridge(publisher, engine_factory=MeanEngine, reconstruct_fn=double, tasks=tasks,
                        **bridge_kwargs)
    live = LiveReconstructor(bridge, engine_factory=bridge.engine_factory,
                             reconstruct_fn=bridge.reconstruct_fn,
                             policy=TriggerPolicy(n_star=3, theta_star_deg=10.0))
    return bridge, live


def read_artifacts(keys: list[str]) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    return {a.key: a for a in found}


def test_reconstruct_scan_runs_angle_tasks_publishes_and_reports(prefect_harness, tiled_root,
                                                                  tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from apt_stream.flows.artifacts import artifact_key
    from apt_stream.flows.reconstruct import reconstruct_scan
    from apt_stream.flows.tasks import LIVE_TASKS

    run_uid = f"flow-{uuid.uuid4()}"
    publisher = TiledPublisher(tiled_root, backup_dir=tmp_path / "backup")
    bridge, live = live_pipeline(publisher, LIVE_TASKS)
    submit_run(live, run_uid)
    channel = bridge.next_run(timeout_s=20)
    assert channel is not None and channel.run_uid == run_uid
    state = reconstruct_scan(channel, run_uid, n_star=3, theta_star_deg=10.0,
                             preview_dir=str(tmp_path / "previews"),
                             truth_fn=lambda header: PATTERN, angles_per_task=1,
                             return_state=True)
    live.close()
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["status"] == "done"
    assert summary["angles"] == len(ANGLES)
    # The trigger fires at the 5th angle (coverage of ±10°); nothing new by the stop, so that
    # reconstruction is published again as the final one.
    assert summary["reconstructions"] == 1
    assert summary["errors"] == []
    assert summary["metrics"]["apt"]["pcc"] == pytest.approx(1.0, abs=1e-4)

    # Every result reached Tiled through the tasks.
    scan = tiled_root[run_uid]
    assert scan.metadata["status"] == "done"
    assert scan.metadata["angles_used"] == len(ANGLES)
    expected = PATTERN * np.mean(1.0 + np.arange(len(ANGLES)))
    np.testing.assert_allclose(scan["approximant"].read(), expected, rtol=1e-6)
    np.testing.assert_allclose(scan["apt"].read(), 2 * expected, rtol=1e-6)
    assert list(scan["angles"].read()["angle_deg"]) == list(ANGLES)
    assert set(scan["metrics"].read()["volume"]) == {"approximant", "apt"}

    # One task per angle (finish + publish), a few per scan.
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    counts = Counter(t.name.rsplit("-", 1)[0] for t in task_runs)
    assert counts == {
        "publish-run-started": 1, "finish-angle": len(ANGLES),
        "reconstruct": 1, "publish-volumes": 2, "preview": 1, "score": 1, "publish-metrics": 1,
        "publish-run-stopped": 1,
    }
    assert all(t.state.is_completed() for t in task_runs)

    key = artifact_key(run_uid)
    arts = read_artifacts([f"{key}-progress", f"{key}-angles", f"{key}-summary",
                           f"{key}-preview-0"])
    assert arts[f"{key}-progress"].type == "progress"
    assert float(arts[f"{key}-progress"].data) == pytest.approx(100.0)
    table = arts[f"{key}-angles"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [r["θ (°)"] for r in rows] == list(ANGLES)
    assert set(rows[0]) == {"angle", "θ (°)", "frames", "time (s)", "loss (pass 2)", "loss (pass 1)"}
    assert "done" in arts[f"{key}-summary"].data and "Prefect overhead" in arts[f"{key}-summary"].data
    assert arts[f"{key}-preview-0"].data.startswith("data:image/png;base64,")
    assert (tmp_path / "previews" / f"{key}-final-0.png").stat().st_size > 0


def test_run_without_a_flow_completes_on_the_worker(tiled_root, tmp_path):
    """If no flow takes the run (listener stopping), the library finishes it without Prefect."""
    from apt_stream.flows.tasks import LIVE_TASKS

    run_uid = f"noflow-{uuid.uuid4()}"
    publisher = TiledPublisher(tiled_root, backup_dir=tmp_path / "backup")
    bridge, live = live_pipeline(publisher, LIVE_TASKS, attach_timeout_s=0.2)
    submit_run(live, run_uid, exit_status="abort")
    assert live.wait_idle(30)
    live.close()
    assert live.status(run_uid) == "done"
    assert tiled_root[run_uid].metadata["status"] == "done"
    assert tiled_root[run_uid].metadata["angles_used"] == len(ANGLES)


def test_closing_the_bridge_releases_a_waiting_worker(tmp_path):
    """A worker blocked on a run whose flow went away continues once the bridge closes."""
    calls = []

    def record(name):
        return lambda *args, **kwargs: calls.append(name)

    def finish(engine, angle_id, publisher, run_uid):
        calls.append("finish")
        return engine.finish_angle(angle_id)

    plain = RunTasks(
        publish_run_started=record("started"), finish_angle=finish,
        publish_angle=record("angle"), reconstruct=lambda fn, v, h: fn(v, h),
        publish_volumes=record("volumes"), publish_run_stopped=record("stopped"),
    )
    offline = TiledPublisher(None, backup_dir=tmp_path / "backup")
    bridge, live = live_pipeline(offline, plain, attach_timeout_s=60)
    run_uid = f"closed-{uuid.uuid4()}"
    submit_run(live, run_uid)
    channel = bridge.next_run(timeout_s=10)
    # A flow takes the first call, then disappears without finishing the run.
    taken = threading.Event()

    def flow_like():
        for call in channel.calls():
            with call:
                call.execute()
            taken.set()
            return

    threading.Thread(target=flow_like).start()
    assert taken.wait(10)
    bridge.close()
    assert live.wait_idle(20)
    live.close()
    # The finish task publishes each angle, so the sink's own angle_finished call is skipped.
    assert calls == ["started"] + ["finish"] * len(ANGLES) + ["volumes", "volumes", "stopped"]
    assert live.status(run_uid) == "done"


class TimedEngine(MeanEngine):
    """MeanEngine whose second pass takes a fixed, real time, and which records when each angle
    was finished (to compare with the artifacts' creation times)."""

    seconds = 0.05

    def __init__(self, header: RunHeader) -> None:
        super().__init__(header)
        self.finished_at: dict[int, float] = {}

    def finish_angle(self, angle_id):
        import time

        time.sleep(self.seconds)
        self.finished_at[angle_id] = time.time()
        return super().finish_angle(angle_id)


def read_artifact_versions(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return sorted(found, key=lambda a: a.created)


def test_live_artifacts_update_while_the_scan_runs_and_cheap_angles_share_tasks(
        prefect_harness, tiled_root, tmp_path):
    """The angles table, progress and Approximant preview get new versions while the angles come
    in (before the last angle is finished), and angles whose compute is cheap next to a task's
    overhead are grouped into finish-angles tasks, chosen from what the flow measured."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from apt_stream.flows.artifacts import artifact_key
    from apt_stream.flows.reconstruct import reconstruct_scan
    from apt_stream.flows.tasks import LIVE_TASKS

    run_uid = f"live-{uuid.uuid4()}"
    publisher = TiledPublisher(tiled_root, backup_dir=tmp_path / "backup")
    engines: list[TimedEngine] = []

    def factory(header):
        engines.append(TimedEngine(header))
        return engines[-1]

    bridge = LiveBridge(publisher, engine_factory=factory, reconstruct_fn=double, tasks=LIVE_TASKS)
    live = LiveReconstructor(bridge, engine_factory=bridge.engine_factory,
                             reconstruct_fn=bridge.reconstruct_fn,
                             policy=TriggerPolicy(n_star=len(ANGLES), theta_star_deg=10.0))
    submit_run(live, run_uid)
    channel = bridge.next_run(timeout_s=20)
    state = reconstruct_scan(channel, run_uid, n_star=len(ANGLES), theta_star_deg=10.0,
                             preview_dir=str(tmp_path / "previews"), live_every=2,
                             return_state=True)
    live.close()
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["angles"] == len(ANGLES) and summary["errors"] == []

    # Live: table versions with 2 and 4 rows, then the final one with 5; the first two were
    # written before the last angle was finished.
    key = artifact_key(run_uid)
    last_angle_at = max(engines[0].finished_at.values())
    tables = read_artifact_versions(f"{key}-angles")
    sizes = [len(json.loads(a.data) if isinstance(a.data, str) else a.data) for a in tables]
    assert sizes == [2, 4, len(ANGLES)]
    assert tables[0].created.timestamp() < last_angle_at
    assert tables[1].created.timestamp() < last_angle_at
    rows = json.loads(tables[-1].data)
    assert rows[0] == {"angle": 0, "θ (°)": -10.0, "frames": 4, "time (s)": 0.01,
                       "loss (pass 2)": 0.5, "loss (pass 1)": None}
    previews = read_artifact_versions(f"{key}-preview-0")
    assert previews[0].created.timestamp() < last_angle_at
    assert previews[0].data.startswith("data:image/png;base64,")
    assert "Approximant, live, 2 of" in previews[0].description
    assert len(summary["live_previews"]) == 2
    assert summary["live_updates"] == 2

    # Granularity from measurement: the first angle is its own task (nothing measured yet);
    # the next angles (50 ms each, next to a task overhead of a few ms) share tasks.
    groups = summary["angles_per_task"]
    assert sum(groups) == len(ANGLES) and groups[0] == 1 and max(groups) > 1
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    names = [t.name for t in task_runs]
    assert sum(n.startswith("finish-angles-from-") for n in names) == len(groups) - 1
    assert sum(n.startswith("finish-angle-") for n in names) == 1
    # Waiting for the next angle inside a grouped task is not counted as overhead: the
    # overhead stays a small share of the angles' 50 ms of compute each.
    assert summary["compute_s"] >= len(ANGLES) * TimedEngine.seconds
    breakdown = summary["prefect_overhead_breakdown_s"]
    assert summary["prefect_overhead_s"] == pytest.approx(sum(breakdown.values()), abs=2e-3)
    assert breakdown["task:finish_angle"] < 0.5 * summary["task_body_s"]["finish_angle"]

    # Everything still reached Tiled.
    assert tiled_root[run_uid].metadata["angles_used"] == len(ANGLES)


def test_overhead_is_task_time_beyond_bodies_plus_artifacts_over_compute():
    from apt_stream.flows.artifacts import ScanBook, tiled_links
    from apt_stream.flows.reconstruct import choose_angles_per_task

    book = ScanBook(run_uid="r", n_star=3, theta_star_deg=10.0)
    book.record("run_started", call_s=0.030, body_s=0.020)
    book.record("finish_angle", call_s=0.210, body_s=0.200, publish_s=0.050)
    book.record("reconstruct", call_s=1.005, body_s=1.000)
    book.record_artifact("table", 0.015)
    s = book.summary()
    # Overhead: (0.010 + 0.010 + 0.005) of tasks + 0.015 of artifacts; compute: the second pass
    # (0.150, publishing left out) and the reconstruction.
    assert s["prefect_overhead_s"] == pytest.approx(0.040)
    assert s["compute_s"] == pytest.approx(1.150)
    assert s["prefect_overhead_pct"] == pytest.approx(100 * 0.040 / 1.150, abs=0.01)
    assert s["prefect_overhead_breakdown_s"] == {
        "artifact:table": 0.015, "task:run_started": 0.01, "task:finish_angle": 0.01,
        "task:reconstruct": 0.005}

    # Angles per task: a task's overhead within 1.5 % of the angles it holds.
    book = ScanBook(run_uid="r", n_star=3, theta_star_deg=10.0)
    assert choose_angles_per_task(book) == 1  # nothing measured yet
    book.task_overheads[:] = [0.006]
    book.angle_compute[:] = [0.2]
    assert choose_angles_per_task(book) == 2  # 6 ms / (1.5 % of 0.2 s) = 2
    book.angle_compute[:] = [60.0]
    assert choose_angles_per_task(book) == 1  # a paper-scale angle: one task each
    book.angle_compute[:] = [0.0001]
    assert choose_angles_per_task(book) == 16  # capped

    # Tiled's client URI has a double slash; the links do not.
    links = tiled_links("http://127.0.0.1:8000/api/v1/metadata//abc-1")
    assert links == {"api": "http://127.0.0.1:8000/api/v1/metadata/abc-1",
                     "ui": "http://127.0.0.1:8000/ui/browse/abc-1"}
