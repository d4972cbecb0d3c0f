"""Process lifecycle of a long-running flow (``apt-stream listen``): its Prefect API and its stop.

Two pieces, both used by the CLI:

:func:`prefect_api`
    The Prefect API the flow reports to. With ``PREFECT_API_URL`` set (environment or active
    Prefect profile) that server is used and nothing is started. Otherwise a temporary server
    (the same uvicorn app Prefect's own "ephemeral" mode runs) is started *by us*, so that

    - it runs in its own session: a terminal's Ctrl-C (SIGINT to the foreground process group)
      does not reach it, and it outlives the flow's last state report;
    - it dies with its parent on Linux (``PR_SET_PDEATHSIG`` = SIGKILL), so ``kill -9`` of the
      listener leaves no server behind;
    - on a normal exit Prefect's log and event workers are drained (bounded) while it is still up,
      then it is stopped (SIGTERM, SIGKILL after a short wait).

    Prefect's own ephemeral server is a child in the caller's process group: Ctrl-C killed it
    before the flow had reported its final state, and the client then retried a dead server.

:func:`run_until_signalled`
    Runs the flow in a worker thread while the main thread owns SIGINT and SIGTERM
    (:class:`SignalStop`). Before the flow starts, a signal aborts at once
    (:class:`StartAborted`: nothing to finish yet). Once it runs, the first signal sets the
    flow's stop event (graceful: the flow's loop ends and its ``finally`` flushes the runs in
    flight); the flow then has ``grace_s`` to return. A second signal, or a graceful stop that
    takes longer than ``grace_s``, is reported to the caller, who exits at once.
    The worker thread also keeps Prefect from installing its SIGTERM bridge (it installs one only
    in the main thread), which would turn SIGTERM into a crashed flow run.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apt_stream.child_process import die_with_parent_preexec as _die_with_parent_preexec
from apt_stream.errors import ServiceError

#: Marker in the temporary server's command line (tests and operators can find it by it).
SERVER_APP = "prefect.server.api.server:create_app"


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class StartAborted(BaseException):
    """Asked to stop before the flow started (``should_abort``, or a :class:`SignalStop`).

    A BaseException, like KeyboardInterrupt, so that ``except Exception`` does not swallow it.
    """


class TemporaryPrefectServer:
    """A Prefect API server on 127.0.0.1 that lives exactly as long as this process.

    Start it from a thread that lives as long as the process (the main thread): Linux delivers
    the parent-death signal when the *thread* that started the child exits.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port
        self.process: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _command(self) -> list[str]:
        import prefect

        return [
            sys.executable, "-m", "uvicorn",
            "--app-dir", str(prefect.__module_path__.parent),
            "--factory", SERVER_APP,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--log-level", "error", "--lifespan", "on",
        ]

    def _env(self) -> dict[str, str]:
        from prefect.settings import get_current_settings

        return {
            **os.environ,
            # What Prefect's own temporary server gets: no UI, ephemeral-mode services.
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **get_current_settings().to_environment_variables(exclude_unset=True),
        }

    def _stdio(self) -> dict[str, Any]:
        """Where the server's output goes (default: this process's)."""
        return {}

    def start(self, timeout_s: float = 120.0, should_abort: Callable[[], bool] | None = None,
              while_starting: Callable[[], object] | None = None) -> str:
        """Start the server and wait until ``/api/health`` answers; returns the API URL.

        ``should_abort`` is polled while waiting: when it returns True the server is stopped
        and :class:`StartAborted` raised. ``while_starting`` is called once the server process
        is launched, before waiting for it (e.g. slow imports, overlapped with its boot).
        """
        if self.process is not None:
            return self.api_url
        deadline = time.monotonic() + timeout_s
        fixed_port = self.port is not None
        for _attempt in range(3):
            if not fixed_port:
                self.port = _free_port()
            self.process = subprocess.Popen(
                self._command(), env=self._env(), stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=_die_with_parent_preexec(), **self._stdio(),
            )
            atexit.register(self.stop)
            if while_starting is not None:
                try:
                    while_starting()
                except BaseException:
                    self.stop()
                    raise
                while_starting = None
            while time.monotonic() < deadline:
                if should_abort is not None and should_abort():
                    self.stop()
                    raise StartAborted("stopped while the Prefect server was starting")
                if self.process.poll() is not None:
                    break  # exited (e.g. the port was taken meanwhile): try another port
                try:
                    with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as resp:
                        if resp.status == 200:
                            return self.api_url
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                    pass
                time.sleep(0.1)
            code = self.process.poll()
            self.stop()
            if code is None or fixed_port:
                break
        raise ServiceError(
            f"the temporary Prefect server did not come up on 127.0.0.1:{self.port} "
            f"within {timeout_s:g} s (set PREFECT_API_URL to use a running server)"
        )

    def stop(self, timeout_s: float = 1.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s`` (0: SIGKILL at once); idempotent."""
        proc, self.process = self.process, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            if proc.poll() is None:
                if timeout_s > 0:
                    proc.terminate()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=timeout_s)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=5)
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)


class PrefectUIServer(TemporaryPrefectServer):
    """``prefect server start`` with its web UI, on a free 127.0.0.1 port, state under ``home``.

    The demo's default Prefect: a real server (API + UI, SQLite database in ``home``) that an
    operator opens in a browser while the scan runs, started and stopped like
    :class:`TemporaryPrefectServer` (own session, dies with this process). Telemetry is off in its
    environment: the server's analytics heartbeat and the client's (``DO_NOT_TRACK``).
    """

    def __init__(self, home: str | os.PathLike, port: int | None = None) -> None:
        super().__init__(port)
        self.home = Path(home).resolve()

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                "--port", str(self.port), "--analytics-off", "--log-level", "WARNING"]

    def _stdio(self) -> dict[str, Any]:
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.home / "server.log", "ab")  # noqa: SIM115 (the child keeps it open)
        self._log = log
        return {"stdout": log, "stderr": subprocess.STDOUT}

    def stop(self, timeout_s: float = 1.0) -> None:
        super().stop(timeout_s)
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()
            self._log = None

    def _env(self) -> dict[str, str]:
        from .settings import OFFLINE_ENV

        self.home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        return {
            **env,
            **OFFLINE_ENV,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL":
                f"sqlite+aiosqlite:///{self.home / 'prefect.db'}",
            "PREFECT_SERVER_UI_ENABLED": "true",
            "PREFECT_UI_API_URL": self.api_url,
            "PREFECT_SERVER_UI_STATIC_DIRECTORY": str(self.home / "ui-build"),
            "PREFECT_LOGGING_SERVER_LEVEL": "WARNING",
        }


def ui_url_for(api_url: str | None) -> str | None:
    """The web UI address that goes with a Prefect API URL (``…/api`` dropped), or None."""
    if not api_url:
        return None
    url = str(api_url).rstrip("/")
    return url[: -len("/api")] if url.endswith("/api") else None


def flow_run_ui_url(api_url: str | None, flow_run_id: str | None) -> str | None:
    """The UI page of a flow run (None: no UI address known, or no flow run)."""
    base = ui_url_for(api_url)
    return f"{base}/runs/flow-run/{flow_run_id}" if base and flow_run_id else None


@contextlib.contextmanager
def prefect_ui_server(home: str | os.PathLike, *, startup_timeout_s: float = 180.0,
                      say: Callable[[str], None] | None = None,
                      while_starting: Callable[[], object] | None = None) -> Iterator[PrefectAPI]:
    """Start :class:`PrefectUIServer` and point this process's flows at it while inside.

    Call it after :func:`apt_stream.flows.settings.apply_offline_env`, from a thread that lives
    as long as the server should (the main thread). ``while_starting`` runs while it boots.
    Leaving drains Prefect's log and event workers, then stops the server.
    """

    server = PrefectUIServer(home)
    try:
        url = server.start(startup_timeout_s, while_starting=while_starting)
        if say is not None:
            say(f"Prefect UI: {server.ui_url} (server state in {server.home})")
        with _pointed_at(url, server) as api:
            yield api
    finally:
        server.stop(timeout_s=5.0)


@contextlib.contextmanager
def _pointed_at(url: str, server) -> Iterator[PrefectAPI]:
    """PREFECT_API_URL (environment and settings) at ``url`` for the block; restored after."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    saved = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield PrefectAPI(url, server)
            finally:
                drain_prefect_clients()
    finally:
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved


def configured_api_url() -> str | None:
    """The Prefect API URL from the environment or the active profile (None: none set)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


def drain_prefect_clients(timeout_s: float = 0.5) -> None:
    """Send Prefect's queued logs and events now, waiting at most ``timeout_s`` for each."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout_s)


@dataclass
class PrefectAPI:
    """The API flows report to; ``server`` is the temporary one we started (None: external)."""

    url: str
    server: TemporaryPrefectServer | None = None

    def kill(self) -> None:
        """Stop a temporary server now (no grace): for an immediate exit."""
        if self.server is not None:
            self.server.stop(timeout_s=0)


@contextlib.contextmanager
def prefect_api(
    *, startup_timeout_s: float = 120.0, should_abort: Callable[[], bool] | None = None,
    while_starting: Callable[[], object] | None = None, say: Callable[[str], None] | None = None,
) -> Iterator[PrefectAPI]:
    """The Prefect API for this process's flows: the configured one, else a temporary server.

    Call it after :func:`apt_stream.flows.settings.apply_offline_env`. While inside, flows in
    this process (and subprocesses started with its environment) report to the yielded
    :class:`PrefectAPI`'s URL.
    Leaving it drains Prefect's log and event workers (bounded), then stops a server it started.
    ``while_starting`` runs while a temporary server boots (or at once, with an external API).
    """

    url = configured_api_url()
    if url is not None:
        if while_starting is not None:
            while_starting()
        try:
            yield PrefectAPI(url)
        finally:
            drain_prefect_clients()
        return
    server = TemporaryPrefectServer()
    try:
        url = server.start(startup_timeout_s, should_abort=should_abort,
                           while_starting=while_starting)
        if say is not None:
            say(f"Prefect: temporary server on {url} (stops with this process)")
        with _pointed_at(url, server) as api:
            yield api
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------
# signals
# ------------------------------------------------------------------------------------------------


@dataclass
class RunOutcome:
    """How :func:`run_until_signalled` ended.

    ``how`` is ``"returned"`` (the flow returned ``result`` — after a graceful stop when
    ``signal`` is set), ``"raised"`` (``error``), ``"forced"`` (a second signal) or
    ``"timeout"`` (the graceful stop took longer than the grace).
    """

    how: str
    result: Any = None
    error: BaseException | None = None
    signal: int | None = None
    signals: list[int] = field(default_factory=list)

    @property
    def signal_name(self) -> str | None:
        return None if self.signal is None else signal.Signals(self.signal).name


class ForcedExit(BaseException):
    """Raised in the main thread by a second signal: the caller should exit at once.

    A BaseException, so that ``except Exception`` on the way up does not swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class SignalStop:
    """SIGINT/SIGTERM handlers (main thread) that set ``stop``; a second signal raises.

    Use as a context manager; the previous handlers come back on exit. ``say`` gets one line
    per signal (written from the handler: keep it simple, e.g. a write to stderr).

    Until :func:`run_until_signalled` starts the flow (``starting`` is True), there is nothing
    to finish: the first signal raises :class:`StartAborted` in the main thread at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, stop: threading.Event, say: Callable[[str], None] | None = None) -> None:
        self.stop = stop
        self.say = say
        self.received: list[int] = []
        self.first_at: float | None = None
        self.starting = True
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received.append(signum)
        if len(self.received) == 1:
            self.first_at = time.monotonic()
            self.stop.set()
            if self.starting:
                if self.say is not None:
                    self.say(f"{signal.Signals(signum).name}: stopping")
                raise StartAborted(f"{signal.Signals(signum).name} before the flow started")
            if self.say is not None:
                self.say(f"{signal.Signals(signum).name}: stopping (finishing runs in flight); "
                         "Ctrl-C again quits at once")
            return
        raise ForcedExit(signum)

    def __enter__(self) -> SignalStop:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def run_until_signalled(
    target: Callable[[], Any], signals: SignalStop, *, grace_s: float = 3.0,
    poll_s: float = 0.1,
) -> RunOutcome:
    """Run ``target`` in a daemon thread until it returns, or the stop it was given times out.

    Call from the main thread inside ``signals`` (a :class:`SignalStop`). The grace counts from
    the moment ``signals.stop`` is set (by a signal or by anyone else).
    """
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = target()
        except BaseException as exc:  # handed to the main thread
            box["error"] = exc

    # The thread runs in a copy of this context: Prefect's settings (the API URL set by
    # prefect_api) live in a context variable, which a new thread would not see.
    context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(work,), name="apt-stream-flow",
                              daemon=True)
    stop_seen: float | None = None

    def outcome(how: str, **kw: Any) -> RunOutcome:
        first = signals.received[0] if signals.received else None
        return RunOutcome(how, signal=kw.pop("signal", first), signals=list(signals.received),
                          **kw)

    try:
        signals.starting = False
        thread.start()
        while thread.is_alive():
            thread.join(poll_s)
            if signals.stop.is_set():
                now = time.monotonic()
                if stop_seen is None:
                    stop_seen = signals.first_at or now
                if thread.is_alive() and now - stop_seen > grace_s:
                    return outcome("timeout")
    except ForcedExit as forced:
        return outcome("forced", signal=forced.signum)
    if "error" in box:
        return outcome("raised", error=box["error"])
    return outcome("returned", result=box.get("result"))
