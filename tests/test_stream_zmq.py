"""End to end on loopback: RunEngine + simulated devices + Publisher + proxy + listener + live loop."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest
from bluesky.callbacks.zmq import Publisher

from apt_stream.plugins.bluesky import (
    SimPtychoDetector,
    make_publisher,
    make_run_engine,
    make_stages,
    ptycho_tomo_plan,
    replay_scan,
    start_proxy,
    synthetic_scan,
    wait_for_link,
)
from apt_stream.stream import (
    FrameBatch,
    Listener,
    LiveReconstructor,
    RunHeader,
    RunStopped,
    TriggerPolicy,
)
from apt_stream.stream.decode import PROBE_NAME, encode_msgpack

SCAN = synthetic_scan(n_angles=3, frames_per_angle=4, seed=21)


class Collector:
    """Records the listener's messages; wait_stopped() blocks until a run's RunStopped."""

    def __init__(self) -> None:
        self.messages: list = []
        self._cond = threading.Condition()

    def __call__(self, message) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def wait_stopped(self, n_runs: int = 1, timeout: float = 20.0) -> list[RunStopped]:
        with self._cond:
            self._cond.wait_for(
                lambda: sum(isinstance(m, RunStopped) for m in self.messages) >= n_runs, timeout
            )
            return [m for m in self.messages if isinstance(m, RunStopped)]

    def frames(self, run_uid: str) -> dict[int, np.ndarray]:
        out: dict[int, list] = {}
        for m in self.messages:
            if isinstance(m, FrameBatch) and m.run_uid == run_uid:
                out.setdefault(m.angle_id, []).append(m.frames)
        return {k: np.concatenate(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def RE():
    return make_run_engine()


@pytest.fixture
def beamline(tmp_path):
    """A proxy, a publisher and a data root; listeners are made by the tests."""
    proxy = start_proxy()
    publisher = make_publisher(proxy.in_address)
    listeners: list[Listener] = []

    def make_listener(collector, **kwargs):
        listener = Listener(proxy.out_address, emit=collector, data_roots=[tmp_path / "data"],
                            spool_dir=tmp_path / "spool", **kwargs)
        listener.start()
        listeners.append(listener)
        listener.source.probe_seen.clear()
        wait_for_link(publisher, listener.source.probe_seen)
        return listener

    (tmp_path / "data").mkdir()
    yield proxy, publisher, make_listener, tmp_path / "data"
    for listener in listeners:
        listener.stop()
    publisher.close()
    proxy.stop()


def run_plan(RE, publisher, root, scan, *, extra=(), **kwargs):
    tokens = [RE.subscribe(publisher)] + [RE.subscribe(cb) for cb in extra]
    try:
        rot, stage_x, stage_y = make_stages()
        (uid,) = RE(ptycho_tomo_plan(SimPtychoDetector(root=root), rot, stage_x, stage_y,
                                     scan_source=scan, **kwargs))
    finally:
        for token in tokens:
            RE.unsubscribe(token)
    return uid


def assert_frames(collector, run_uid, scan, angles):
    frames = collector.frames(run_uid)
    assert sorted(frames) == sorted(angles)
    for n in angles:
        np.testing.assert_array_equal(frames[n], scan.frames_of(n)[0])


def test_end_to_end_frames_arrive_intact(RE, beamline):
    _, publisher, make_listener, root = beamline
    collector = Collector()
    listener = make_listener(collector, strict=True)
    uid = run_plan(RE, publisher, root, SCAN, angle_order=[1, 2, 0])
    (stopped,) = collector.wait_stopped()
    assert stopped.run_uid == uid and stopped.n_frames == 12 and stopped.n_dropped == 0
    header = collector.messages[0]
    assert isinstance(header, RunHeader) and header.run_uid == uid
    np.testing.assert_array_equal(header.probe, SCAN.probe)
    assert_frames(collector, uid, SCAN, [0, 1, 2])
    completed = [m.angle_id for m in collector.messages if isinstance(m, FrameBatch) and m.angle_complete]
    assert completed == [1, 2, 0]
    stats = listener.stats()
    assert stats["dropped"] == 0 and stats["pipeline"]["recovered_runs"] == 0
    assert (root.parent / "spool" / f"{uid}.jsonl").is_file()


def test_bad_messages_are_dropped_and_the_next_run_works(RE, beamline):
    proxy, publisher, make_listener, root = beamline
    collector = Collector()
    listener = make_listener(collector)
    raw = Publisher(proxy.in_address, serializer=bytes)  # sends the payload we give it, as is
    try:
        listener.source.probe_seen.clear()
        while not listener.source.probe_seen.wait(0.05):
            raw(PROBE_NAME, encode_msgpack({}))
        raw("start", b"\xc1\xc1 garbage bytes")
        raw("start", pickle.dumps({"uid": "p", "time": 1.0}))  # pickle, while not allowed
        raw("start", encode_msgpack({"uid": "no-time"}))  # fails the event-model schema
        raw("event", encode_msgpack({"uid": "e", "time": 1.0, "descriptor": "nobody",
                                     "seq_num": 1, "data": {}, "timestamps": {}}))  # no run
        listener.source.probe_seen.clear()
        while not listener.source.probe_seen.wait(0.05):  # in order: the bad ones are through
            raw(PROBE_NAME, encode_msgpack({}))
    finally:
        raw.close()
    assert listener.stats()["dropped"] == 3
    reasons = list(listener.source.stats.errors)
    assert "msgpack payload could not be decoded" in reasons[0]
    assert "allow_pickle" in reasons[1]
    assert "invalid start document (uid 'no-time')" in reasons[2]
    assert listener.pipeline.n_orphans == 1  # the orphan event waits for a run that never comes
    uid = run_plan(RE, publisher, root, SCAN)
    (stopped,) = collector.wait_stopped()
    assert stopped.run_uid == uid and stopped.n_frames == 12
    assert_frames(collector, uid, SCAN, [0, 1, 2])


def test_late_joiner_recovers_the_start_from_the_run_journal(RE, beamline):
    _, publisher, make_listener, root = beamline
    collector = Collector()
    seen = {"events": 0}
    joined = []

    def join_late(name, doc):
        # Runs on the RunEngine's thread, so the scan waits while the listener connects: the
        # start, descriptors, resource and first frames were published to nobody.
        if name == "event":
            seen["events"] += 1
            if seen["events"] == 3:
                joined.append(make_listener(collector))

    uid = run_plan(RE, publisher, root, SCAN, extra=[join_late])
    (stopped,) = collector.wait_stopped()
    assert stopped.run_uid == uid and stopped.n_frames == 12
    assert sum(isinstance(m, RunHeader) for m in collector.messages) == 1
    assert_frames(collector, uid, SCAN, [0, 1, 2])
    assert joined[0].stats()["pipeline"]["recovered_runs"] == 1


def test_stop_before_trigger_then_a_full_run_through_the_live_loop(RE, beamline, tmp_path):
    _, publisher, make_listener, root = beamline

    class Engine:  # averages frames; enough to follow the trigger and the statuses
        def __init__(self, header):
            self.shape, self.means, self.deg = header.volume_shape_zyx, {}, {}
            self.sums = {}

        def add_frames(self, angle_id, angle_deg, frames, positions_px):
            self.sums.setdefault(angle_id, []).append(frames.mean(axis=(1, 2)))
            self.deg[angle_id] = angle_deg

        def finish_angle(self, angle_id):
            self.means[angle_id] = float(np.concatenate(self.sums.pop(angle_id)).mean())
            return {"angle_id": angle_id}

        def volume(self):
            return np.full(self.shape, np.mean(list(self.means.values())), np.float32)

        def finished_angles_deg(self):
            return sorted(self.deg[a] for a in self.means)

    statuses = {}
    done = threading.Event()

    class Sink:
        def run_started(self, header): ...
        def angle_finished(self, run_uid, summary, approximant): ...
        def reconstruction_ready(self, run_uid, volumes, *, final): ...

        def run_stopped(self, run_uid, status):
            statuses[run_uid] = status
            if len(statuses) == 2:
                done.set()

    live = LiveReconstructor(Sink(), engine_factory=Engine,
                             reconstruct_fn=lambda v, h: {"apt": v},
                             policy=TriggerPolicy(n_star=3, theta_star_deg=17.0))
    make_listener(live.submit)
    first = run_plan(RE, publisher, root, SCAN, max_angles=2)
    second = replay_scan(SCAN, data_root=root, publisher=publisher, run_engine=RE, rate_hz=1000.0)
    assert done.wait(20)
    live.close()
    assert statuses == {first: "stopped_before_trigger", second: "done"}
    assert live.run_stats[second]["fired_at_n"] == 3
    assert live.metrics()["frames_processed"] == 8 + 12
