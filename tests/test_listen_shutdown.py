"""``apt-stream listen`` stops cleanly on SIGINT and SIGTERM and leaves no Prefect server behind,
not even after ``kill -9``.

Real processes throughout: the CLI runs as a subprocess in a session of its own, so the tests can
signal its whole process group the way a terminal's Ctrl-C does; it starts its real temporary
Prefect server and loads the shipped model. Processes are found through ``/proc`` (Linux).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from apt_stream.flows.prefect_server import SERVER_APP
from apt_stream.flows.settings import OFFLINE_ENV

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="/proc and PR_SET_PDEATHSIG are Linux")

STOP_WITHIN_S = 5.0
READY_TIMEOUT_S = 150.0


# ------------------------------------------------------------------------------------------------
# /proc
# ------------------------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgid, session) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3])


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def prefect_servers(prefect_home: Path) -> list[int]:
    """Living Prefect API server processes that use ``prefect_home``."""
    marker = f"PREFECT_HOME={prefect_home}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            if SERVER_APP.encode() not in cmdline:
                continue
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ and _alive(int(entry)):
            found.append(int(entry))
    return found


# ------------------------------------------------------------------------------------------------
# the listener
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    """One Prefect home for the module: its database is migrated once, by the first server."""
    return tmp_path_factory.mktemp("prefect-home")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Listening:
    def __init__(self, proc: subprocess.Popen, work: Path) -> None:
        self.proc, self.work = proc, work

    @property
    def stderr(self) -> str:
        return (self.work / "stderr.txt").read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return (self.work / "stdout.txt").read_text(errors="replace")

    def wait_for(self, text: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.stderr:
            if self.proc.poll() is not None:
                pytest.fail(f"listen exited ({self.proc.returncode}) before {text!r}:\n{self.stderr}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {text!r} within {timeout_s:g} s:\n{self.stderr}")
            time.sleep(0.1)

    def stop_time(self, send) -> tuple[int, float]:
        """Call ``send()``; returns (exit code, seconds until the process exited)."""
        t0 = time.monotonic()
        send()
        try:
            code = self.proc.wait(timeout=STOP_WITHIN_S + 25)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"listen did not exit within {STOP_WITHIN_S + 25:g} s:\n{self.stderr}")
        return code, time.monotonic() - t0


def start_listen(work: Path, prefect_home: Path, zmq: str | None = None) -> Listening:
    work.mkdir(parents=True, exist_ok=True)
    data_root = work / "runs"
    data_root.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_") and not k.startswith("APT_STREAM_TILED")}
    env.update(OFFLINE_ENV, PREFECT_HOME=str(prefect_home), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    script = Path(sys.executable).with_name("apt-stream")
    command = ([str(script)] if script.exists()
               else [sys.executable, "-c", "from apt_stream.cli import main; main()"])
    command += ["listen", "--zmq", zmq or f"tcp://127.0.0.1:{_free_port()}",
                "--data-root", str(data_root)]
    with open(work / "stdout.txt", "wb") as out, open(work / "stderr.txt", "wb") as err:
        # A session of its own: signalling its group below is what a terminal's Ctrl-C does.
        proc = subprocess.Popen(command, cwd=work, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, start_new_session=True)
    return Listening(proc, work)


@pytest.fixture
def listening(tmp_path, prefect_home):
    """A listener that is up: subscribed, its temporary Prefect server found."""
    started = start_listen(tmp_path / "listen", prefect_home)
    try:
        started.wait_for("ready: listening on")
        yield started
    finally:
        if started.proc.poll() is None:
            os.killpg(started.proc.pid, signal.SIGKILL)
            started.proc.wait()


def _the_server(listening: Listening, prefect_home: Path) -> int:
    """The listener's temporary Prefect server: its child, in a session of its own."""
    servers = prefect_servers(prefect_home)
    assert len(servers) == 1, servers
    _state, ppid, pgid, session = _stat(servers[0])
    assert ppid == listening.proc.pid
    assert pgid == session == servers[0], "the server must not share the terminal's group"
    return servers[0]


def _wait_gone(pid: int, prefect_home: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while (_alive(pid) or prefect_servers(prefect_home)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), f"Prefect server {pid} left behind"
    assert prefect_servers(prefect_home) == []


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_to_the_group_stops_listen_cleanly(listening, prefect_home, sig):
    server = _the_server(listening, prefect_home)
    code, took = listening.stop_time(lambda: os.killpg(listening.proc.pid, sig))
    err = listening.stderr
    print(f"{sig.name}: exit {code} after {took:.2f} s")
    assert code == 0, err
    assert took < STOP_WITHIN_S, err
    assert "Traceback" not in err, err
    assert f"stopped on {sig.name}" in err
    summary = json.loads(listening.stdout)  # the flow returned: its finally closed everything
    assert summary["scans"] == [] and "live" in summary and "listener" in summary
    # Stopped before the CLI exited: gone at once, not only eventually.
    _wait_gone(server, prefect_home, timeout_s=0.5)


def test_kill_9_leaves_no_prefect_server(listening, prefect_home):
    server = _the_server(listening, prefect_home)
    code, _took = listening.stop_time(lambda: os.kill(listening.proc.pid, signal.SIGKILL))
    assert code == -signal.SIGKILL
    _wait_gone(server, prefect_home, timeout_s=5.0)


def test_sigint_flushes_the_run_in_flight(tmp_path, prefect_home):
    """A scan is streaming when SIGINT comes: its run is flushed (backup written, summary has it).

    The signal goes to the listener alone here: a group signal also reaches the listener's own
    helper processes (e.g. the detector-file reader), which are not this test's subject.
    """
    from apt_stream.plugins.bluesky import replay_scan, start_proxy, synthetic_scan

    scan = synthetic_scan(n_angles=4, frames_per_angle=4, range_deg=10.0, seed=3)
    with start_proxy() as proxy:
        started = start_listen(tmp_path / "listen", prefect_home, zmq=proxy.out_address)
        published: list[str] = []
        replay = threading.Thread(target=lambda: published.append(replay_scan(
            scan, zmq_address=proxy.in_address, data_root=started.work / "runs", rate_hz=4)),
            daemon=True)
        try:
            started.wait_for("ready: listening on")
            replay.start()
            started.wait_for("finish-angle-0", timeout_s=60)
            code, took = started.stop_time(lambda: os.kill(started.proc.pid, signal.SIGINT))
        finally:
            if started.proc.poll() is None:
                os.killpg(started.proc.pid, signal.SIGKILL)
                started.proc.wait()
            replay.join(30)
    err = started.stderr
    print(f"SIGINT with a run in flight: exit {code} after {took:.2f} s")
    assert code == 0, err
    assert took < STOP_WITHIN_S, err
    assert "Traceback" not in err, err
    (run_uid,) = published
    (scan_summary,) = json.loads(started.stdout)["scans"]
    assert scan_summary["run_uid"] == run_uid
    assert scan_summary["status"] == "detached" and scan_summary["angles"] >= 1
    assert (started.work / "apt-stream-backup" / f"{run_uid}.jsonl").stat().st_size > 0
    assert prefect_servers(prefect_home) == []


# ------------------------------------------------------------------------------------------------
# the pieces, in process
# ------------------------------------------------------------------------------------------------


def test_external_prefect_api_starts_no_server():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from apt_stream.flows.prefect_server import prefect_api

    url = "http://127.0.0.1:9/api"

    def server_children() -> set[int]:
        # Other tests' session-wide Prefect harness may be our child already: compare, do not
        # count.
        children = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                    if (_stat(pid) or ("", 0))[1] == os.getpid()]
        return {pid for pid in children if _alive(pid)
                and SERVER_APP.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()}

    before = server_children()
    with temporary_settings(updates={PREFECT_API_URL: url}), prefect_api() as api:
        assert api.url == url and api.server is None
        assert server_children() <= before


def _signal_later(*delays_s: float, sig=signal.SIGINT) -> threading.Thread:
    def send() -> None:
        for delay in delays_s:
            time.sleep(delay)
            os.kill(os.getpid(), sig)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_first_signal_is_graceful_second_forces():
    from apt_stream.flows.prefect_server import SignalStop, run_until_signalled

    before = signal.getsignal(signal.SIGINT)
    stop = threading.Event()
    with SignalStop(stop) as signals:
        _signal_later(0.2, sig=signal.SIGTERM)
        outcome = run_until_signalled(lambda: stop.wait(10) and "done", signals, grace_s=3)
    assert (outcome.how, outcome.result, outcome.signal_name) == ("returned", "done", "SIGTERM")

    stuck = threading.Event()  # never set: a flow that ignores its stop event
    stop = threading.Event()
    with SignalStop(stop) as signals:
        _signal_later(0.2, 0.2)
        t0 = time.monotonic()
        outcome = run_until_signalled(lambda: stuck.wait(10), signals, grace_s=5)
    assert outcome.how == "forced" and outcome.signal_name == "SIGINT"
    assert time.monotonic() - t0 < 2
    assert signal.getsignal(signal.SIGINT) is before


def test_a_stuck_graceful_stop_is_bounded():
    from apt_stream.flows.prefect_server import SignalStop, run_until_signalled

    stuck, stop = threading.Event(), threading.Event()
    with SignalStop(stop) as signals:
        _signal_later(0.1)
        t0 = time.monotonic()
        outcome = run_until_signalled(lambda: stuck.wait(10), signals, grace_s=0.5)
    assert outcome.how == "timeout" and outcome.signal_name == "SIGINT"
    assert time.monotonic() - t0 < 2


def test_a_signal_before_the_flow_starts_aborts_at_once():
    from apt_stream.flows.prefect_server import SignalStop, StartAborted

    stop = threading.Event()
    with pytest.raises(StartAborted), SignalStop(stop):
        _signal_later(0.1, sig=signal.SIGTERM)
        time.sleep(5)  # e.g. slow imports while the Prefect server boots
    assert stop.is_set()


def test_the_proxy_command_binds_loopback_and_stops_on_sigint(tmp_path):
    import socket as socket_
    import subprocess
    import sys

    ports = []
    for _ in range(2):
        with socket_.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    proc = subprocess.Popen(
        [sys.executable, "-m", "apt_stream.cli", "proxy", "--in-port", str(ports[0]),
         "--out-port", str(ports[1])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stderr.readline()  # status lines go to stderr
        assert f"tcp://127.0.0.1:{ports[0]}" in line, line
        listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
        local = {row.split()[1] for row in listening if row.split()[3] == "0A"}  # LISTEN
        for port in ports:
            assert f"0100007F:{port:04X}" in local  # 127.0.0.1, not 0.0.0.0
            assert f"00000000:{port:04X}" not in local
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0 and "proxy stopped" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
