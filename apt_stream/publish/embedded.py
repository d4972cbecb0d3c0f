"""A Tiled app served by uvicorn on 127.0.0.1 from a daemon thread, with bounded start and stop.

Both servers this package runs in-process use it: the writable one of
:func:`apt_stream.publish.server.local_tiled_server` (the demo's, the tests') and
``apt-stream serve`` (:class:`apt_stream.publish.serve.ResultsServer`).

**One table request at a time.** Tiled keeps appendable tables in DuckDB behind one shared ADBC
connection (``tiled.storage``: a ``StaticPool`` for duckdb), and its sync table routes run on
the server's thread pool. Two such requests at once (appends from two client processes, or an
append beside a read) can hang that connection for good in ``commit``: four processes
appending to their own tables of one server hung three of them within a second
(``ReadTimeout``), and uvicorn's shutdown then waited on the stuck request forever, which is how
a CI run once never finished. :class:`SerialTableAccess` lets one request that may reach DuckDB
run at a time (every request that writes, and reads of data: ``/table/``, ``/array/``,
``/container/full``, ``/node/full``); metadata, search and the web UI's pages do not wait.
A real deployment (``deploy/tiled-config.yml``, PostgreSQL) does not need this.

**Stopping.** ``close()`` gives open requests a few seconds, then uvicorn cancels them; a
thread still stuck after that is left behind (it is a daemon: the process can still exit) with
a warning, instead of keeping the caller waiting.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from pathlib import Path
from typing import Any

from apt_stream.errors import ServiceError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
#: A results folder: the catalog's SQLite file and the DuckDB file of its appendable tables
#: (arrays go under ``data/``).
CATALOG = "catalog.db"
TABLE_STORE = "storage.duckdb"
STARTUP_TIMEOUT_S = 60.0
#: Seconds open requests get to finish when the server stops.
SHUTDOWN_GRACE_S = 5
#: Request paths (under ``/api/v1``) whose GETs read table or array data.
_DATA_READS = ("/table/", "/array/", "/container/full", "/node/full")
_READ_ONLY = frozenset({"GET", "HEAD", "OPTIONS"})


class SerialTableAccess:
    """ASGI wrapper: requests that may touch the DuckDB table store run one at a time."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._lock: asyncio.Lock | None = None  # made in the server's own event loop

    @staticmethod
    def reaches_tables(scope: Any) -> bool:
        if scope.get("type") != "http":
            return False
        if scope.get("method", "GET") not in _READ_ONLY:
            return True
        path = scope.get("path", "")
        return path.startswith("/api/") and any(part in path for part in _DATA_READS)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if not self.reaches_tables(scope):
            await self.app(scope, receive, send)
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            await self.app(scope, receive, send)


def file_log_config(folder: Path) -> dict[str, Any]:
    """Tiled's uvicorn logging, to ``error.log`` / ``access.log`` in ``folder``, no colours."""
    from tiled.server.logging_config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    for name, file in (("access", "access.log"), ("default", "error.log")):
        handler = config["handlers"][name]
        handler["class"] = "logging.FileHandler"
        handler.pop("stream", None)
        handler["filename"] = str(folder / file)
    for formatter in config["formatters"].values():
        formatter["use_colors"] = False
    return config


def results_catalog(folder: Path, *, readable_storage: list[str] | None, create: bool) -> Any:
    """The Tiled catalog of a results folder (``CATALOG``, ``data/``, ``TABLE_STORE``).

    ``create`` makes an empty catalog where there is none (the demo's writable server);
    ``apt-stream serve`` opens an existing one. ``readable_storage``: folders whose files the
    catalog may register in place (raw detector files).
    """
    from tiled.catalog import from_uri
    from tiled.config import StreamingCacheConfig

    folder = Path(folder)
    return from_uri(
        folder / CATALOG,
        writable_storage=[folder / "data", f"duckdb:///{folder / TABLE_STORE}"],
        readable_storage=readable_storage or None,
        init_if_not_exists=create,
        cache_config=StreamingCacheConfig(uri="memory").model_dump(),
    )


def tiled_app(catalog: Any, api_key: str) -> Any:
    """Tiled's FastAPI app over ``catalog``, opened by ``api_key`` alone."""
    from tiled.config import Authentication
    from tiled.server.app import build_app
    from tiled.server.settings import get_settings

    # Tiled 0.2.x writes each app's settings (its API key among them) into one process-wide
    # cached Settings object, so a second server in the same process would make the first
    # refuse its own key (401). A fresh cache per app gives each its own object.
    get_settings.cache_clear()
    return build_app(catalog, authentication=Authentication(single_user_api_key=api_key))


class TiledThread:
    """uvicorn serving ``app`` (wrapped in :class:`SerialTableAccess`) on 127.0.0.1.

    ``log_filter`` goes on every handler of the server's loggers (key redaction) once uvicorn
    has configured them, which it does when the server is set up in :meth:`start`.
    """

    def __init__(self, app: Any, *, port: int, log_folder: Path, name: str,
                 log_filter: logging.Filter | None = None) -> None:
        self.app = app
        self.log_filter = log_filter
        self.requested_port = port
        self.log_folder = Path(log_folder)
        self.name = name
        self.port: int | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Serve; return the port once ``/healthz`` answers.

        Raises
        ------
        ServiceError
            The server did not come up within a minute (``error.log`` says why).
        """
        import httpx
        import uvicorn

        config = uvicorn.Config(
            SerialTableAccess(self.app), host=HOST, port=self.requested_port, loop="asyncio",
            log_config=file_log_config(self.log_folder),
            # A browser tab's keep-alive connection would otherwise hold shutdown open.
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        )
        if self.log_filter is not None:  # on the handlers the config just made
            for name in (*config.log_config["loggers"], "uvicorn"):
                for handler in logging.getLogger(name).handlers:
                    handler.addFilter(self.log_filter)
        server = uvicorn.Server(config)
        server.install_signal_handlers = lambda: None  # the caller owns Ctrl-C
        self._server = server
        self._thread = threading.Thread(target=server.run, name=self.name, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        errors = self.log_folder / "error.log"
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.close()
                raise ServiceError(f"Tiled did not start on {HOST}:{self.requested_port} "
                                   f"(see {errors})")
            time.sleep(0.05)
        self.port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(trust_env=False) as client:
            while True:
                try:
                    if client.get(f"http://{HOST}:{self.port}/healthz", timeout=1).status_code \
                            == 200:
                        return self.port
                except httpx.RequestError:
                    pass
                if not self._thread.is_alive() or time.monotonic() > deadline:
                    self.close()
                    raise ServiceError(f"Tiled on port {self.port} never answered /healthz "
                                       f"(see {errors})")
                time.sleep(0.1)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=SHUTDOWN_GRACE_S + 5)
            if self._thread.is_alive():
                log.warning("Tiled's server thread did not stop within %s s; leaving it",
                            SHUTDOWN_GRACE_S + 5)
        self._server = self._thread = None
