"""The live reconstruction loop: engine per run, trigger, sink calls, statuses, backlog."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest

from apt_stream.errors import ConfigError, InputError
from apt_stream.plugins.bluesky import synthetic_scan
from apt_stream.stream import (
    FrameBatch,
    LiveReconstructor,
    ReconstructionSink,
    RunHeader,
    RunStopped,
    TriggerPolicy,
)


class AveragingEngine:
    """A small real stand-in for the physics engine: each angle's result is its mean frame
    value; the "Approximant" volume is the mean over finished angles."""

    def __init__(self, header: RunHeader, *, gate: threading.Event | None = None) -> None:
        self.shape = header.volume_shape_zyx
        self.frame_shape = header.frame_shape
        self.gate = gate
        self._sum: dict[int, float] = {}
        self._count: dict[int, int] = {}
        self._deg: dict[int, float] = {}
        self.means: dict[int, float] = {}

    def add_frames(self, angle_id, angle_deg, frames, positions_px):
        if self.gate is not None:
            self.gate.wait()
        if frames.shape[1:] != self.frame_shape or positions_px.shape != (len(frames), 2):
            raise InputError(f"frames {frames.shape} do not match {self.frame_shape}")
        if angle_id in self.means:
            raise InputError(f"angle {angle_id} is already finished")
        self._sum[angle_id] = self._sum.get(angle_id, 0.0) + float(frames.sum())
        self._count[angle_id] = self._count.get(angle_id, 0) + frames[..., 0, 0].size
        self._deg[angle_id] = angle_deg

    def finish_angle(self, angle_id):
        h, w = self.frame_shape
        self.means[angle_id] = self._sum[angle_id] / (self._count[angle_id] * h * w)
        return {"angle_id": angle_id, "angle_deg": self._deg[angle_id],
                "n_frames": self._count[angle_id]}

    def volume(self):
        return np.full(self.shape, np.mean(list(self.means.values())), dtype=np.float32)

    def finished_angles_deg(self):
        return sorted(self._deg[a] for a in self.means)


def reconstruct(volume, header):
    return {"apt": volume * 2.0}


class RecordingSink:
    def __init__(self, *, fail_on: str | None = None) -> None:
        self.calls: list[tuple] = []
        self.fail_on = fail_on
        self.stopped = threading.Event()

    def _record(self, *call):
        self.calls.append(call)
        if call[0] == self.fail_on:
            raise RuntimeError("sink is down")

    def run_started(self, header):
        self._record("run_started", header.run_uid)

    def angle_finished(self, run_uid, summary, approximant):
        self._record("angle_finished", run_uid, summary["angle_id"], approximant.volume().mean())

    def reconstruction_ready(self, run_uid, volumes, *, final):
        self._record("reconstruction_ready", run_uid, final, float(volumes["apt"].mean()))

    def run_stopped(self, run_uid, status):
        self._record("run_stopped", run_uid, status)
        self.stopped.set()

    def of(self, run_uid):
        return [c for c in self.calls if c[1] == run_uid]


def header_for(scan, run_uid):
    return RunHeader(
        run_uid=run_uid, scan_id=1, sample="s", preset=None, energy_kev=scan.energy_kev,
        detector_distance_m=scan.detector_distance_m, detector_pixel_m=scan.detector_pixel_m,
        object_pixel_m=scan.object_pixel_m, field_shape=scan.field_shape,
        frame_shape=scan.frame_shape, n_slices=scan.n_slices,
        slice_spacing_m=np.asarray(scan.slice_spacing_m), angles_deg=np.asarray(scan.angles_deg),
        frames_per_angle=tuple(np.bincount(scan.angle_index)), volume_shape_zyx=scan.volume_shape_zyx,
        probe=scan.probe,
    )


def messages_for(scan, run_uid, order, *, batch=2, exit_status="success"):
    yield header_for(scan, run_uid)
    for n in order:
        frames, positions = scan.frames_of(n)
        for i in range(0, len(frames), batch):
            yield FrameBatch(run_uid, n, float(scan.angles_deg[n]), frames[i : i + batch],
                             positions[i : i + batch])
        yield FrameBatch(run_uid, n, float(scan.angles_deg[n]), frames[:0], positions[:0],
                         angle_complete=True)
    yield RunStopped(run_uid, exit_status)


SCAN = synthetic_scan(n_angles=5, frames_per_angle=4, seed=9)  # angles -17, -8.5, 0, 8.5, 17
MEANS = [float(SCAN.frames_of(n)[0].mean()) for n in range(5)]


def live(sink, **kwargs):
    kwargs.setdefault("policy", TriggerPolicy(n_star=3, theta_star_deg=17.0))
    kwargs.setdefault("engine_factory", AveragingEngine)
    return LiveReconstructor(sink, reconstruct_fn=reconstruct, **kwargs)


def test_fires_once_at_n_star_then_final_at_stop():
    sink = RecordingSink()
    assert isinstance(sink, ReconstructionSink)
    with live(sink) as rec:
        for msg in messages_for(SCAN, "r1", [0, 4, 2, 1, 3]):
            rec.submit(msg)
        assert rec.wait_idle(30)
    names = [c[0] for c in sink.calls]
    assert names == ["run_started"] + ["angle_finished"] * 3 + ["reconstruction_ready"] + [
        "angle_finished"] * 2 + ["reconstruction_ready", "run_stopped"]
    triggered, final = [c for c in sink.calls if c[0] == "reconstruction_ready"]
    assert triggered[2] is False and triggered[3] == pytest.approx(2 * np.mean([MEANS[i] for i in (0, 4, 2)]))
    assert final[2] is True and final[3] == pytest.approx(2 * np.mean(MEANS), rel=1e-6)
    assert sink.calls[-1] == ("run_stopped", "r1", "done")
    assert rec.status("r1") == "done" and rec.run_stats["r1"]["fired_at_n"] == 3
    m = rec.metrics()
    assert m["frames_processed"] == 20 and m["angles_finished"] == 5 and m["queued_frames"] == 0


def test_stop_before_trigger_keeps_the_approximant():
    sink = RecordingSink()
    with live(sink) as rec:
        for msg in messages_for(SCAN, "r2", [0, 2]):  # never reaches +17°
            rec.submit(msg)
        assert rec.wait_idle(30)
    assert [c[0] for c in sink.calls] == ["run_started", "angle_finished", "angle_finished",
                                          "run_stopped"]
    # The Approximant went to the sink after each angle; the last holds both angles.
    assert sink.calls[2][3] == pytest.approx(np.mean([MEANS[0], MEANS[2]]), rel=1e-6)
    assert sink.calls[-1] == ("run_stopped", "r2", "stopped_before_trigger")


def test_two_runs_back_to_back_and_interleaved():
    sink = RecordingSink()
    other = synthetic_scan(n_angles=5, frames_per_angle=4, seed=10)
    with live(sink) as rec:
        for msg in messages_for(SCAN, "a", range(5)):  # back to back ...
            rec.submit(msg)
        b = messages_for(other, "b", [4, 3, 2, 1, 0])
        c = messages_for(SCAN, "c", [1, 3])
        for pair in itertools.zip_longest(b, c):  # ... and interleaved
            for msg in pair:
                if msg is not None:
                    rec.submit(msg)
        assert rec.wait_idle(30)
    assert [rec.status(r) for r in "abc"] == ["done", "done", "stopped_before_trigger"]
    final_b = [c for c in sink.of("b") if c[0] == "reconstruction_ready" and c[2]]
    assert final_b[0][3] == pytest.approx(
        2 * np.mean([other.frames_of(n)[0].mean() for n in range(5)]), rel=1e-6
    )


def test_a_batch_the_engine_refuses_costs_its_frames_not_the_run():
    sink = RecordingSink()
    bad = list(messages_for(SCAN, "bad", range(5)))
    bad.insert(1, FrameBatch("bad", 0, -17.0, np.zeros((2, 3, 3), np.float32), np.zeros((2, 2))))
    with live(sink) as rec:
        for msg in bad + list(messages_for(SCAN, "good", range(5))):
            rec.submit(msg)
        assert rec.wait_idle(30)
    stats = rec.run_stats["bad"]
    assert stats["status"] == "done_with_gaps"
    assert (stats["frames_missing"], stats["angles_with_gaps"]) == (2, [0])
    assert stats["angles_finished"] == 5
    assert rec.metrics()["frames_failed"] == 2
    assert sink.of("bad")[-1] == ("run_stopped", "bad", "done_with_gaps")
    assert rec.status("good") == "done"


def test_an_engine_that_cannot_be_built_fails_the_run_and_the_next_run_works():
    sink = RecordingSink()

    def factory(header):
        if header.run_uid == "bad":
            raise RuntimeError("no GPU left")
        return AveragingEngine(header)

    with live(sink, engine_factory=factory) as rec:
        for msg in list(messages_for(SCAN, "bad", range(5))) + list(messages_for(SCAN, "good",
                                                                                  range(5))):
            rec.submit(msg)
        assert rec.wait_idle(30)
    assert sink.of("bad") == [("run_started", "bad"), ("run_stopped", "bad", "failed")]
    assert "no GPU left" in rec.run_stats["bad"]["error"]
    assert rec.status("good") == "done"


def test_a_failing_sink_does_not_stop_the_reconstruction():
    sink = RecordingSink(fail_on="angle_finished")
    with live(sink) as rec:
        for msg in messages_for(SCAN, "r", range(5)):
            rec.submit(msg)
        assert rec.wait_idle(30)
        assert rec.metrics()["sink_errors"] == 5
    assert rec.status("r") == "done"


def test_backlog_is_bounded_and_measured():
    gate = threading.Event()
    sink = RecordingSink()
    rec = LiveReconstructor(
        sink, engine_factory=lambda h: AveragingEngine(h, gate=gate), reconstruct_fn=reconstruct,
        policy=TriggerPolicy(n_star=3), max_queued_frames=4,
    )
    msgs = list(messages_for(SCAN, "slow", [0], batch=2))  # header, 2 batches of 2, complete, stop
    rec.submit(msgs[0])
    rec.submit(msgs[1])  # the worker takes it and blocks on the gate
    rec.submit(msgs[2])
    assert rec.metrics()["queued_frames"] == 4
    extra = FrameBatch("slow", 1, -8.5, *SCAN.frames_of(1))  # 4 more frames: over the bound
    blocked = threading.Thread(target=rec.submit, args=(extra,))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()  # the submitter waits for the worker instead of dropping frames
    gate.set()
    blocked.join(10)
    assert not blocked.is_alive()
    for msg in msgs[3:]:
        rec.submit(msg)
    assert rec.wait_idle(30)
    m = rec.metrics()
    assert m["max_backlog_frames"] == 4 and m["listener_wait_s"] > 0 and m["queued_frames"] == 0
    rec.close()
    with pytest.raises(Exception, match="closed"):
        rec.submit(msgs[0])
    with pytest.raises(ConfigError):
        LiveReconstructor(sink, engine_factory=AveragingEngine, reconstruct_fn=reconstruct,
                          max_queued_frames=0)
