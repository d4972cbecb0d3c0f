"""Publishing is idempotent, and a Tiled outage heals itself: real Tiled servers on loopback.

A listener restart replays the run's documents (the publisher sees ``run_started`` and every
``angle_finished`` again); a backup may be replayed more than once; an outage must land in Tiled
by itself once the server is back. Each case counts rows against angles.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid

import numpy as np
import pytest
from test_publish_writer import DEPLOY_CONFIG, SHAPE, make_header

from apt_stream.publish import TiledPublisher, connect, read_backup, replay_backup

N_ANGLES = 7
#: Frames per angle, summing to 819 (the issue's run).
FRAMES = (117, 116, 118, 117, 115, 119, 117)
DEG = np.linspace(-17.0, 17.0, N_ANGLES)


def angle(i: int, *, frames: int | None = None) -> dict:
    return {"angle_id": i, "angle_deg": float(DEG[i]), "n_frames": FRAMES[i] if frames is None
            else frames, "seconds": 0.5, "loss_pass1": 2.0, "loss_pass2": 1.0}


def publish(publisher: TiledPublisher, run_uid: str, scan_id: int, angles=range(N_ANGLES), *,
            stop: str | None = "success") -> None:
    """What a listener sends for one run (the Approximant of angle i is full of i)."""
    publisher.run_started(make_header(run_uid, scan_id=scan_id))
    for i in angles:
        publisher.angle_finished(run_uid, angle(i), np.full(SHAPE, float(i), np.float32))
    if stop is not None:
        publisher.reconstruction_ready(run_uid, {"apt": np.ones(SHAPE)}, final=True)
        publisher.run_stopped(run_uid, stop)


def table_counts(root, run_uid: str) -> dict:
    table = root[run_uid]["angles"].read()
    md = root[run_uid].metadata
    return {"rows": len(table), "angles": int(table["angle_id"].nunique()),
            "frames": int(table["frames"].sum()), "angles_used": md["angles_used"],
            "status": md["status"]}


EXPECTED_DONE = {"rows": N_ANGLES, "angles": N_ANGLES, "frames": 819, "angles_used": N_ANGLES,
                 "status": "done"}


@pytest.fixture
def run_uid() -> str:
    return f"test-{uuid.uuid4()}"


@pytest.fixture
def scan_id() -> int:
    return int(uuid.uuid4().int % 1_000_000_000)


# -- (a) a listener restart replays the run ------------------------------------------------------
def test_restart_replay_keeps_one_row_per_angle(tiled_root, tmp_path, run_uid, scan_id):
    publish(TiledPublisher(tiled_root, backup_dir=tmp_path / "b1"), run_uid, scan_id)
    assert table_counts(tiled_root, run_uid) == EXPECTED_DONE
    first = tiled_root[run_uid]["angles"].read()
    # The restarted listener's publisher: a new object, the same documents from the spool.
    publish(TiledPublisher(tiled_root, backup_dir=tmp_path / "b2"), run_uid, scan_id)
    assert table_counts(tiled_root, run_uid) == EXPECTED_DONE
    again = tiled_root[run_uid]["angles"].read()
    # The rows are the first pass's (a replayed angle with the same data is skipped).
    assert list(again["seconds"]) == list(first["seconds"])
    assert list(tiled_root).count(run_uid) == 1
    md = tiled_root[run_uid].metadata
    assert md["angles_finished_deg"] == sorted(DEG.tolist())
    assert md["volumes"] == ["apt"]


def test_restart_mid_run_then_the_full_run(tiled_root, tmp_path, run_uid, scan_id):
    """The listener died after 4 angles; its successor replays the run from the start."""
    publish(TiledPublisher(tiled_root, backup_dir=tmp_path / "b1"), run_uid, scan_id,
            angles=range(4), stop=None)
    assert table_counts(tiled_root, run_uid)["rows"] == 4
    second = TiledPublisher(tiled_root, backup_dir=tmp_path / "b2")
    second.run_started(make_header(run_uid, scan_id=scan_id))
    # Reopening reads the rows back: the scan still says 4 angles, not 0.
    assert tiled_root[run_uid].metadata["angles_used"] == 4
    for i in range(N_ANGLES):
        second.angle_finished(run_uid, angle(i), np.full(SHAPE, float(i), np.float32))
        assert tiled_root[run_uid].metadata["angles_used"] == max(4, i + 1)
    # Angles 0-3 were skipped, so the Approximant went up from angle 4 on: the newest one.
    np.testing.assert_array_equal(tiled_root[run_uid]["approximant"].read(),
                                  np.full(SHAPE, 6.0))
    second.reconstruction_ready(run_uid, {"apt": np.ones(SHAPE)}, final=True)
    second.run_stopped(run_uid, "success")
    assert table_counts(tiled_root, run_uid) == EXPECTED_DONE


def test_an_angle_with_other_data_replaces_its_row(tiled_root, tmp_path, run_uid, scan_id):
    publisher = TiledPublisher(tiled_root, backup_dir=tmp_path / "backup")
    publish(publisher, run_uid, scan_id, angles=range(3), stop=None)
    publisher.angle_finished(run_uid, angle(1, frames=90), np.zeros(SHAPE))
    table = tiled_root[run_uid]["angles"].read()
    assert list(table["angle_id"]) == [0, 1, 2]
    assert list(table["frames"]) == [FRAMES[0], 90, FRAMES[2]]
    assert tiled_root[run_uid].metadata["angles_used"] == 3


def test_reopening_repairs_a_table_with_duplicate_rows(tiled_root, tmp_path, run_uid, scan_id):
    """Scans written before publishing was idempotent get one row per angle back."""
    import pyarrow as pa

    publish(TiledPublisher(tiled_root, backup_dir=tmp_path / "b1"), run_uid, scan_id)
    node = tiled_root[run_uid]["angles"]
    dup = node.read().iloc[:2]
    node.append_partition(0, pa.Table.from_pandas(dup, preserve_index=False))
    assert len(tiled_root[run_uid]["angles"].read()) == N_ANGLES + 2
    TiledPublisher(tiled_root, backup_dir=tmp_path / "b2").run_started(
        make_header(run_uid, scan_id=scan_id))
    counts = table_counts(tiled_root, run_uid)
    assert (counts["rows"], counts["frames"], counts["angles_used"]) == (N_ANGLES, 819, N_ANGLES)


def test_reopening_keeps_the_runs_timings_and_volumes(tiled_root, tmp_path, run_uid, scan_id):
    """A second publisher adding volumes to a stopped scan (the demo's baselines) keeps the
    timings since the run's start and the volumes it already has."""
    publish(TiledPublisher(tiled_root, backup_dir=tmp_path / "b1"), run_uid, scan_id)
    before = dict(tiled_root[run_uid].metadata["timings"])
    time.sleep(0.3)
    later = TiledPublisher(tiled_root, backup_dir=tmp_path / "b2")
    later.run_started(make_header(run_uid, scan_id=scan_id))
    later.reconstruction_ready(run_uid, {"baselines/sart": np.zeros(SHAPE)}, final=True)
    later.run_stopped(run_uid, "success")
    md = tiled_root[run_uid].metadata
    after = md["timings"]
    for key in ("started_at", "last_angle_s", "final_reconstruction_s"):
        assert after[key] == before[key], key
    # Still counted from the original start: the reopening came 0.3 s after the first stop.
    assert after["total_s"] >= before["total_s"] + 0.3
    assert {"apt", "baselines/sart"} <= set(md["volumes"])


# -- (c) replaying a backup twice ------------------------------------------------------------------
def test_replay_backup_twice_duplicates_nothing(tiled_root, tmp_path, run_uid, scan_id):
    """The first angles reached Tiled before the outage; the backup holds the rest."""
    online = TiledPublisher(tiled_root, backup_dir=tmp_path / "unused")
    publish(online, run_uid, scan_id, angles=range(2), stop=None)
    # The outage: a publisher without Tiled (and no way back) takes the rest of the run.
    offline = TiledPublisher(None, backup_dir=tmp_path / "backup")
    for i in range(2, N_ANGLES):
        offline.angle_finished(run_uid, angle(i), np.full(SHAPE, float(i), np.float32))
    offline.reconstruction_ready(run_uid, {"apt": np.ones(SHAPE)}, final=True)
    offline.run_stopped(run_uid, "success")
    assert offline.stats()["pending_backups"] == []  # nothing it could replay to

    path = tmp_path / "backup" / f"{run_uid}.jsonl"
    for _ in range(2):
        assert replay_backup(path, TiledPublisher(tiled_root, backup_dir=tmp_path / "r")) == 8
        assert table_counts(tiled_root, run_uid) == EXPECTED_DONE
    np.testing.assert_array_equal(tiled_root[run_uid]["approximant"].read(),
                                  np.full(SHAPE, 6.0))


# -- statuses the reconstructor is about to report -------------------------------------------
@pytest.mark.parametrize(
    ("status", "kwargs", "expected"),
    [
        ("done_with_gaps", {"frames_missing": 3, "angles_with_gaps": [2, 5]},
         {"frames_missing": 3, "angles_with_gaps": [2, 5]}),
        ("abandoned", {"metadata": {"idle_s": 600.0, "reason": "no stop document"}},
         {"idle_s": 600.0, "reason": "no stop document"}),
        ("paused_by_operator", {}, {}),
    ],
)
def test_any_final_status_and_its_metadata_are_stored(tiled_root, tmp_path, run_uid, scan_id,
                                                      status, kwargs, expected):
    publisher = TiledPublisher(tiled_root, backup_dir=tmp_path / "backup")
    publish(publisher, run_uid, scan_id, angles=range(3), stop=None)
    publisher.update_status(run_uid, "waiting_for_frames", frames_late=np.int64(4))
    assert tiled_root[run_uid].metadata["status"] == "waiting_for_frames"
    assert tiled_root[run_uid].metadata["frames_late"] == 4
    publisher.run_stopped(run_uid, status, **kwargs)
    md = tiled_root[run_uid].metadata
    assert md["status"] == status
    assert {k: md[k] for k in expected} == expected
    assert md["timings"]["total_s"] >= 0
    assert publisher.stats()["open_runs"] == []


def test_new_statuses_survive_the_backup_and_its_replay(tiled_root, tmp_path, run_uid, scan_id):
    offline = TiledPublisher(None, backup_dir=tmp_path / "backup")
    publish(offline, run_uid, scan_id, angles=range(3), stop=None)
    offline.run_stopped(run_uid, "done_with_gaps", frames_missing=7, angles_with_gaps=[1])
    replay_backup(tmp_path / "backup", TiledPublisher(tiled_root, backup_dir=tmp_path / "r"))
    md = tiled_root[run_uid].metadata
    assert (md["status"], md["frames_missing"], md["angles_with_gaps"]) == (
        "done_with_gaps", 7, [1])
    # The run's own timings, not the replaying publisher's.
    stopped = [r for r in read_backup(tmp_path / "backup" / f"{run_uid}.jsonl")
               if r["call"] == "run_stopped"]
    assert md["timings"]["total_s"] == stopped[0]["args"]["metadata"]["timings"]["total_s"]


# -- (b) an outage heals itself ---------------------------------------------------------------------
class FlakyTiled:
    """``tiled serve config deploy/tiled-config.yml`` in a subprocess that a test takes down and
    brings back (same port, key and data), like a real server restart. A start costs seconds."""

    def __init__(self, tmp_path) -> None:
        self.data_dir = tmp_path / "tiled"
        self.api_key = uuid.uuid4().hex
        self.port: int | None = None
        self._stack: contextlib.ExitStack | None = None
        self.endpoint = None

    def up(self) -> None:
        from apt_stream.plugins.tiled import serve_config

        self._stack = contextlib.ExitStack()
        self.endpoint, self.proc = self._stack.enter_context(serve_config(
            DEPLOY_CONFIG, data_dir=self.data_dir, api_key=self.api_key, port=self.port))
        self.port = int(self.endpoint.uri.rsplit(":", 1)[1].split("/")[0])

    def down(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._stack.close()

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()


class Gate:
    """A loopback TCP forwarder in front of a Tiled server: ``down()`` closes its port and every
    connection through it (clients get "connection refused"), ``up()`` opens the same port
    again. An outage in milliseconds, without restarting the server."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.up()

    def up(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone leaves it listening.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._conns.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def gated(tiled_server):
    """The session's Tiled server behind a :class:`Gate`: (gate, endpoint through it)."""
    from apt_stream.publish import TiledEndpoint

    target = int(tiled_server.uri.rsplit(":", 1)[1].split("/")[0])
    gate = Gate(target)
    endpoint = TiledEndpoint(uri=f"http://127.0.0.1:{gate.port}/api/v1",
                             api_key=tiled_server.api_key)
    yield gate, endpoint
    gate.down()


def wait_for(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def failing_at_once():
    """Tiled's client fails a refused request at once instead of retrying it for 45 s."""
    import stamina

    return stamina.set_testing(True, attempts=1)


def test_outage_over_the_end_of_the_run_lands_by_itself(tmp_path, run_uid, scan_id):
    """The deployed server stops mid-run and is started again after the run ended."""
    flaky = FlakyTiled(tmp_path)
    flaky.up()
    publisher = TiledPublisher(connect(flaky.endpoint), backup_dir=tmp_path / "backup",
                               retry_every_s=0.2)
    try:
        publish(publisher, run_uid, scan_id, angles=range(2), stop=None)
        flaky.down()
        with failing_at_once():
            for i in range(2, N_ANGLES):
                publisher.angle_finished(run_uid, angle(i), np.full(SHAPE, float(i), np.float32))
            publisher.reconstruction_ready(run_uid, {"apt": np.ones(SHAPE)}, final=True)
            publisher.run_stopped(run_uid, "success")
            assert publisher.stats()["pending_backups"] == [run_uid]
            time.sleep(0.5)  # checks while Tiled is down replay nothing
            assert publisher.stats()["pending_backups"] == [run_uid]
        flaky.up()
        # No call comes any more: the publisher's own check notices Tiled and replays.
        wait_for(lambda: publisher.stats()["pending_backups"] == [])
        root = connect(flaky.endpoint)
        assert table_counts(root, run_uid) == EXPECTED_DONE
        np.testing.assert_array_equal(root[run_uid]["approximant"].read(), np.full(SHAPE, 6.0))
        np.testing.assert_array_equal(root[run_uid]["apt"].read(), np.ones(SHAPE))
        stats = publisher.stats()
        assert stats["failures"] == 1 and stats["replayed_files"] == 1
        # Replayed once, then moved aside: a later check or replay of the folder finds nothing.
        assert list((tmp_path / "backup").glob("*.jsonl")) == []
        (archived,) = (tmp_path / "backup" / "replayed").glob("*/*.jsonl")
        assert replay_backup(tmp_path / "backup", publisher) == 0
        # Replaying the archived copy by hand changes nothing either.
        replay_backup(archived, TiledPublisher(root, backup_dir=tmp_path / "r"))
        assert table_counts(root, run_uid) == EXPECTED_DONE
    finally:
        publisher.close()
        flaky.close()


def test_outage_mid_run_then_the_run_goes_on_live(gated, tiled_root, tmp_path, run_uid,
                                                  scan_id):
    """The issue's case: Tiled gone for a while, back before the run ends."""
    gate, endpoint = gated
    publisher = TiledPublisher(connect(endpoint), backup_dir=tmp_path / "backup",
                               retry_every_s=0.2)
    root = tiled_root
    try:
        publish(publisher, run_uid, scan_id, angles=range(2), stop=None)
        gate.down()
        with failing_at_once():
            for i in range(2, 5):
                publisher.angle_finished(run_uid, angle(i), np.full(SHAPE, float(i), np.float32))
            time.sleep(0.5)  # checks while Tiled is down replay nothing
            assert publisher.stats()["pending_backups"] == [run_uid]
        assert table_counts(root, run_uid)["rows"] == 2
        gate.up()
        wait_for(lambda: publisher.stats()["pending_backups"] == [])
        # The backup is in, and the run is live again: each new angle shows up at once.
        assert table_counts(root, run_uid)["rows"] == 5
        assert root[run_uid].metadata["status"] == "acquiring"
        before = publisher.backup.n_records
        for i in range(5, N_ANGLES):
            publisher.angle_finished(run_uid, angle(i), np.full(SHAPE, float(i), np.float32))
            assert root[run_uid].metadata["angles_used"] == i + 1
        publisher.reconstruction_ready(run_uid, {"apt": np.ones(SHAPE)}, final=True)
        publisher.run_stopped(run_uid, "success")
        assert publisher.backup.n_records == before
        assert table_counts(root, run_uid) == EXPECTED_DONE
        np.testing.assert_array_equal(root[run_uid]["approximant"].read(), np.full(SHAPE, 6.0))
        assert publisher.stats()["failures"] == 1
    finally:
        publisher.close()


def test_backup_of_an_earlier_process_lands_when_tiled_is_back(gated, tiled_root, tmp_path,
                                                               run_uid, scan_id):
    """The listener restarted during the outage: its old backup is picked up by the new one."""
    gate, endpoint = gated
    first = TiledPublisher(connect(endpoint), backup_dir=tmp_path / "backup",
                           retry_every_s=None)
    publish(first, run_uid, scan_id, angles=range(3), stop=None)
    gate.down()
    with failing_at_once():
        for i in range(3, 5):
            first.angle_finished(run_uid, angle(i), np.full(SHAPE, float(i), np.float32))
    assert first.stats()["pending_backups"] == []  # retry_every_s=None: it never replays
    lines = [json.loads(t) for t in
             (tmp_path / "backup" / f"{run_uid}.jsonl").read_text().splitlines()]
    assert [rec["call"] for rec in lines] == ["run_started", "angle_finished", "angle_finished"]
    gate.up()
    # The restarted listener's publisher finds the file and replays it before the run's spool.
    second = TiledPublisher(connect(endpoint), backup_dir=tmp_path / "backup",
                            retry_every_s=0.2)
    try:
        assert second.stats()["pending_backups"] == [run_uid]
        publish(second, run_uid, scan_id)
        wait_for(lambda: second.stats()["pending_backups"] == [])
        assert second.stats()["replayed_files"] == 1
        assert table_counts(tiled_root, run_uid) == EXPECTED_DONE
    finally:
        second.close()


def test_a_run_whose_old_backup_waits_joins_it(gated, tiled_root, tmp_path, run_uid, scan_id):
    """Restarted while Tiled is still down: the run goes after its old backup, not before."""
    gate, endpoint = gated
    first = TiledPublisher(connect(endpoint), backup_dir=tmp_path / "backup", retry_every_s=None)
    publish(first, run_uid, scan_id, angles=range(3), stop=None)
    gate.down()
    with failing_at_once():
        first.angle_finished(run_uid, angle(3), np.full(SHAPE, 3.0, np.float32))
        # The new process's client (connecting needs Tiled; the old one stands in for it).
        second = TiledPublisher(first.root,
                                backup_dir=tmp_path / "backup", retry_every_s=0.2)
        try:
            publish(second, run_uid, scan_id)
            # Straight to the backup: no Tiled call, no retry window spent.
            assert second.stats()["failures"] == 0
            assert second.stats()["pending_backups"] == [run_uid]
            gate.up()
            wait_for(lambda: second.stats()["pending_backups"] == [])
        finally:
            second.close()
    calls = [r["call"] for r in read_backup(next((tmp_path / "backup").glob("replayed/*/*.jsonl")))]
    assert calls == ["run_started", "angle_finished"] + ["run_started"] + [
        "angle_finished"] * N_ANGLES + ["reconstruction_ready", "run_stopped"]
    assert table_counts(tiled_root, run_uid) == EXPECTED_DONE
