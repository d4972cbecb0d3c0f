"""``apt-stream serve [DIR]``: a results folder served by a real Tiled server, web UI included.

The folder is the data folder of a Tiled catalog as the embedded server writes it
(:func:`apt_stream.publish.server.local_tiled_server`: ``catalog.db``, Zarr arrays under
``data/``, appendable tables in ``storage.duckdb``), or a folder holding one as ``tiled/`` (the
demo's ``apt-stream-demo``). The server listens on 127.0.0.1 only.

**Stored paths.** Tiled's catalog records every array and table by absolute URI
(``file://localhost/<folder>/data/...``, ``duckdb://localhost//<folder>/storage.duckdb``), so a
copied or moved folder would serve nothing from its own files: arrays answer 500 ("outside the
readable storage area"), tables 400 ("No such field duckdb://..."). :func:`relocate_catalog`
rewrites those URIs to the folder's present place before the server opens the catalog (only
where the file is really there under the new place), so a folder survives restarts, copies and
moves.

**The API key.** ``$APT_STREAM_TILED_API_KEY`` if set (its value is never printed or logged);
otherwise a key generated once and kept in ``<folder>/api_key`` (mode 0600, reused next time, so
clients and a browser's cookie keep working across restarts). Only that generated local key is
ever shown: in the web UI link, which needs it once to set its cookie.

**Out-of-range slices.** Tiled 0.2.x answers ``GET /api/v1/array/full/<path>?slice=40`` on an
array 12 deep with HTTP 500: composing the request's slice with the Zarr adapter's stencil
raises ``ValueError("Composition with out-of-bounds index")``
(``tiled/ndslice.py``) and the route turns only ``IndexError`` into 400. This server answers
400 with the reason instead (:func:`_slice_out_of_range`).

**Tables in the web UI.** Tiled 0.2.x's web UI cannot parse the table rows its server sends
("No rows" for every table); :class:`_UiTableRows` sends the UI rows it can read.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sqlite3
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from apt_stream.errors import ConfigError
from apt_stream.publish.embedded import CATALOG, HOST

log = logging.getLogger(__name__)

#: Where ``apt-stream demo`` writes (its ``--workdir`` default, relative to the working folder).
DEFAULT_DIR = Path("apt-stream-demo")
DEFAULT_PORT = 8000
KEY_FILE = "api_key"


def default_uri(port: int = DEFAULT_PORT) -> str:
    return f"http://{HOST}:{port}/api/v1"


# -- which folder -----------------------------------------------------------------------------


def find_data_dir(folder: str | os.PathLike = DEFAULT_DIR) -> Path:
    """The Tiled data folder (the one holding ``catalog.db``) in or under ``folder``.

    ``folder`` itself, else ``folder/tiled``, else the newest ``folder/*/tiled`` or ``folder/*``
    holding a catalog.

    Raises
    ------
    ConfigError
        No catalog there (the message says where it looked).
    """
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise ConfigError(f"{folder}: no such folder (run `apt-stream demo` first, or name the "
                          "folder that holds the results)")
    for cand in (root, root / "tiled"):
        if (cand / CATALOG).is_file():
            return cand
    found = [p.parent for p in (*root.glob(f"*/tiled/{CATALOG}"), *root.glob(f"*/{CATALOG}"))]
    if found:
        return max(found, key=lambda p: (p / CATALOG).stat().st_mtime)
    raise ConfigError(f"{root} holds no Tiled catalog (looked for {CATALOG} in it, in tiled/ "
                      "and one folder down)")


# -- stored paths -------------------------------------------------------------------------------


def _asset_path(uri: str) -> Path | None:
    parts = urlsplit(uri)
    if parts.scheme == "file":
        return Path(parts.path)
    if parts.scheme in ("duckdb", "sqlite"):
        return Path("/" + parts.path.lstrip("/"))
    return None


def _new_uri(uri: str, path: Path, root: Path) -> str | None:
    """``uri`` pointed at ``root`` if its file is there, else None."""
    scheme = urlsplit(uri).scheme
    if scheme == "file":
        text = path.as_posix()
        start = 0
        while (i := text.find("/data/", start)) >= 0:
            cand = root / "data" / text[i + len("/data/"):]
            if cand.exists():
                return f"file://localhost{quote(cand.as_posix())}"
            start = i + 1
        return None
    cand = root / path.name
    # Tiled's own spelling (ensure_uri of "duckdb:///<abs path>"), which its storage lookup
    # matches against the server's writable storage.
    return f"{scheme}://localhost/{cand.as_posix()}" if cand.exists() else None


def relocate_catalog(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Point the catalog's stored file URIs at ``data_dir`` where they point elsewhere.

    Idempotent and cheap (one SQLite transaction); an asset whose file is not under
    ``data_dir`` is left as it was and counted as missing.

    Returns
    -------
    dict
        ``{"rewritten": n, "missing": m, "from": [old folders]}``.
    """
    root = Path(data_dir).resolve()
    catalog = root / CATALOG
    if not catalog.is_file():
        raise ConfigError(f"{root}: no {CATALOG}")
    rewritten, missing, old_roots = 0, 0, set()
    con = sqlite3.connect(catalog, timeout=30)
    try:
        with con:
            # External assets (the detector files of raw runs, apt_stream.publish.raw) are
            # not the catalog's own files: handled below.
            external = "(SELECT a.asset_id FROM data_source_asset_association a JOIN " \
                       "data_sources d ON a.data_source_id = d.id WHERE d.management = 'external')"
            rows = con.execute(
                f"SELECT id, data_uri FROM assets WHERE id NOT IN {external}").fetchall()
            for asset_id, uri in rows:
                path = _asset_path(uri or "")
                if path is None or path.is_relative_to(root):
                    continue
                new = _new_uri(uri, path, root)
                if new is None:
                    missing += 1
                    continue
                new_path = _asset_path(new)
                old_roots.add(str(path)[: len(str(path)) - len(str(new_path.relative_to(root)))]
                              .rstrip("/"))
                con.execute("UPDATE assets SET data_uri = ? WHERE id = ?", (new, asset_id))
                rewritten += 1
            # A raw run's detector file that lay beside the old catalog folder (the demo's
            # run-NNN/runs/...) and was copied or moved with it is pointed at the new place;
            # any other (the beamline's own files) stays as it is.
            beside = {Path(r).parent for r in old_roots}
            for asset_id, uri in con.execute(
                    f"SELECT id, data_uri FROM assets WHERE id IN {external}").fetchall():
                path = _asset_path(uri or "")
                if path is None:
                    continue
                for old in beside:
                    if path.is_relative_to(old) and (root.parent / path.relative_to(old)).exists():
                        cand = root.parent / path.relative_to(old)
                        con.execute("UPDATE assets SET data_uri = ? WHERE id = ?",
                                    (f"file://localhost{quote(cand.as_posix())}", asset_id))
                        rewritten += 1
                        break
    finally:
        con.close()
    if rewritten:
        log.info("catalog moved from %s to %s: %d stored paths rewritten",
                 ", ".join(sorted(old_roots)), root, rewritten)
    if missing:
        log.warning("%d stored paths of %s point outside it and are not in it", missing, catalog)
    return {"rewritten": rewritten, "missing": missing, "from": sorted(old_roots)}


# -- the API key --------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeySource:
    """Where the server's key comes from; ``describe`` never contains the key."""

    env: str | None = None  # the variable's name
    file: Path | None = None

    def describe(self) -> str:
        if self.env:
            return f"${self.env} (from your environment; not shown)"
        return f"{self.file} (generated for this folder, mode 0600; set " \
               f"$APT_STREAM_TILED_API_KEY to use your own)"

    def python(self) -> str:
        """A Python expression that evaluates to the key, for a client snippet."""
        if self.env:
            return f"os.environ[{self.env!r}]"
        return f"Path({str(self.file)!r}).read_text().strip()"


def _read_key_file(path: Path) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the API key file ({exc.strerror}; a symlink is "
                          "refused)") from None
    with os.fdopen(fd) as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path} is not a regular file")
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise ConfigError(f"{path} is owned by uid {st.st_uid}, not by you; refusing it")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fh.fileno(), 0o600)
        key = fh.read().strip()
    if not key.isalnum():
        raise ConfigError(f"{path}: a Tiled API key must be letters and digits only")
    return key


def resolve_key(data_dir: str | os.PathLike,
                environ: Mapping[str, str] | None = None) -> tuple[str, KeySource]:
    """The key to serve with and where it came from (environment, else ``<data_dir>/api_key``,
    created with a fresh 256-bit key the first time)."""
    from apt_stream.publish.server import API_KEY_ENV

    env = os.environ if environ is None else environ
    key = env.get(API_KEY_ENV, "").strip()
    if key:
        if not key.isalnum():
            raise ConfigError(f"${API_KEY_ENV} must be letters and digits only")
        return key, KeySource(env=API_KEY_ENV)
    path = Path(data_dir).resolve() / KEY_FILE
    existing = _read_key_file(path)
    if existing:
        return existing, KeySource(file=path)
    key = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key, KeySource(file=path)


# -- what the user is told ----------------------------------------------------------------------


def key_expression(data_dir: str | os.PathLike) -> str:
    """Python for the key that ``apt-stream serve`` will use on ``data_dir``, said before it
    runs: ``$APT_STREAM_TILED_API_KEY`` if the client's environment has it, else the folder's
    key file (which ``serve`` creates the first time)."""
    path = str(Path(data_dir).resolve() / KEY_FILE)
    return f"os.environ.get('APT_STREAM_TILED_API_KEY') or Path({path!r}).read_text().strip()"


def client_snippet(run_uid: str | None, *, key: str, uri: str = default_uri()) -> str:
    """Python that finds a scan (``run_uid``, else the newest) and slices its volume.

    ``key`` is a Python expression for the API key (:meth:`KeySource.python`). Runs as printed
    while a server answers at ``uri``.
    """
    find = (f"scan = client.search(Key('run_uid') == {run_uid!r}).values().first()\n"
            if run_uid else "scan = client.search(Key('status') == 'done').values().last()\n")
    return (
        "import os\n"
        "from pathlib import Path\n"
        "\n"
        "from tiled.client import from_uri\n"
        "from tiled.queries import Key\n"
        "\n"
        f"client = from_uri({uri!r}, api_key={key})\n"
        f"{find}"
        "print(scan.metadata['run_uid'], scan.metadata['status'], scan.metadata['angles_used'])\n"
        "vol = scan['apt'] if 'apt' in scan else scan['approximant']\n"
        "section = vol[:, vol.shape[1] // 2, :]   # an xz cross-section, read lazily\n"
        "print(vol.shape, section.shape)\n"
        "print(scan['angles'].read().head())\n"
    )


def _newest_scan(data_dir: Path) -> str | None:
    """The run uid of the newest scan container (top level, with a ``run_uid``), if any."""
    con = sqlite3.connect(f"file:{data_dir / CATALOG}?mode=ro", uri=True)
    try:
        row = con.execute(
            "SELECT key FROM nodes WHERE parent = (SELECT id FROM nodes WHERE parent IS NULL) "
            "AND structure_family = 'container' AND json_extract(metadata, '$.run_uid') = key "
            "ORDER BY id DESC LIMIT 1").fetchone()
    except sqlite3.Error:
        return None
    finally:
        con.close()
    return row[0] if row else None


# -- the server ----------------------------------------------------------------------------------


def _slice_out_of_range(app: Any) -> None:
    """Answer an out-of-range ``?slice=`` with 400 and the reason (Tiled 0.2.x says 500)."""
    from fastapi.responses import JSONResponse

    async def handler(request: Any, exc: ValueError) -> Any:
        if "/array/" in request.url.path and "out-of-bounds" in str(exc):
            wanted = request.query_params.get("slice", "")
            node = request.url.path.split("/array/", 1)[1].split("/", 1)[-1]
            return JSONResponse(status_code=400, content={"detail": (
                f"slice {wanted!r} is out of range for this array: each index must be below "
                f"the array's size in that dimension (structure.shape at "
                f"/api/v1/metadata/{node})")})
        raise exc  # Tiled's own handling (logged, 500)

    app.add_exception_handler(ValueError, handler)


class _UiTableRows:
    """Tables for Tiled's web UI as it reads them: without RFC 7464 record separators.

    Tiled 0.2.x frames each ``application/json-seq`` row with ``\\x1e`` (RS) while its bundled
    web UI splits the body on newlines and ``JSON.parse``s each line, which fails: every table
    (``angles``, ``metrics``) shows "No rows" in the browser. For requests the UI itself makes
    (``/table/`` with ``format=application/json-seq``, ``Referer`` under ``/ui/``) this ASGI
    wrapper drops the RS bytes (JSON never holds a raw RS) and asks for an uncompressed body;
    every other client gets Tiled's answer unchanged.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    @staticmethod
    def _from_ui(scope: Mapping[str, Any]) -> bool:
        if scope.get("type") != "http" or "/table/" not in scope.get("path", ""):
            return False
        if b"json-seq" not in scope.get("query_string", b""):
            return False
        referer = dict(scope.get("headers") or ()).get(b"referer", b"")
        return b"/ui/" in referer

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if not self._from_ui(scope):
            await self.app(scope, receive, send)
            return
        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"]
                                      if k.lower() != b"accept-encoding"]}
        encoded = False

        async def send_rows(message: dict) -> None:
            nonlocal encoded
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or ())
                encoded = any(k.lower() == b"content-encoding" for k, _ in headers)
                if not encoded:
                    headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not encoded:
                message = {**message, "body": message.get("body", b"").replace(b"\x1e", b"")}
            await send(message)

        await self.app(scope, receive, send_rows)


def _check_port_free(port: int) -> None:
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            raise ConfigError(f"{HOST}:{port} is in use (another `apt-stream serve` or Tiled?); "
                              "pass --port N, or --port 0 for a free one") from None


class ResultsServer:
    """A Tiled server over one results folder on 127.0.0.1, run on a background thread.

    ``start()`` relocates the catalog, opens it, and returns once ``/healthz`` answers;
    ``close()`` stops it. Logs go to ``error.log`` / ``access.log`` in the folder, with every
    key redacted.
    """

    def __init__(self, data_dir: str | os.PathLike, *, port: int = DEFAULT_PORT,
                 environ: Mapping[str, str] | None = None) -> None:
        self.data_dir = find_data_dir(data_dir)
        self.requested_port = port
        self.api_key, self.key_source = resolve_key(self.data_dir, environ)
        self.relocation: dict[str, Any] = {}
        self.port: int | None = None
        self.app: Any = None
        self._tiled: Any = None  # an apt_stream.publish.embedded.TiledThread while serving

    @property
    def uri(self) -> str:
        return default_uri(self.port or self.requested_port)

    def start(self) -> ResultsServer:
        from apt_stream.publish.embedded import TiledThread, results_catalog, tiled_app
        from apt_stream.publish.server import _SERVER_LOG_FILTER

        _check_port_free(self.requested_port)
        self.relocation = relocate_catalog(self.data_dir)
        d = self.data_dir
        # The raw runs' detector files (apt_stream.publish.raw) sit beside the catalog folder
        # (the demo's run-NNN/runs/...).
        catalog = results_catalog(d, readable_storage=[str(d.parent)], create=False)
        app = tiled_app(catalog, self.api_key)
        _slice_out_of_range(app)
        self.app = app
        _SERVER_LOG_FILTER.secrets.add(self.api_key)
        self._tiled = TiledThread(_UiTableRows(app), port=self.requested_port, log_folder=d,
                                  name="apt-serve-tiled", log_filter=_SERVER_LOG_FILTER)
        self.port = self._tiled.start()
        log.info("serving %s at %s", d, self.uri)
        return self

    def alive(self) -> bool:
        return self._tiled is not None and self._tiled.alive()

    def close(self) -> None:
        if self._tiled is not None:
            self._tiled.close()
        self._tiled = None

    def __enter__(self) -> ResultsServer:
        return self.start() if self._tiled is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def web_ui(self, run_uid: str | None = None) -> str:
        """The browser link; with ``?api_key=`` (once, it sets a cookie) only for the generated
        local key, else a shell-expanded ``$APT_STREAM_TILED_API_KEY``."""
        page = f"http://{HOST}:{self.port}/ui/browse/" + (quote(run_uid) if run_uid else "")
        if self.key_source.env:
            return f'"{page}?api_key=${self.key_source.env}"   (your shell fills in the key)'
        return f"{page}?api_key={self.api_key}"

    def banner(self) -> str:
        """What ``apt-stream serve`` prints once the server answers."""
        run_uid = _newest_scan(self.data_dir)
        moved = self.relocation.get("rewritten")
        lines = [
            f"Tiled is serving {self.data_dir}",
            f"  API:     {self.uri}",
            f"  web UI:  {self.web_ui(run_uid)}",
            f"  API key: {self.key_source.describe()}",
        ]
        if moved:
            lines.append(f"  moved:   {moved} stored paths now point into this folder "
                         f"(were under {', '.join(self.relocation['from'])})")
        lines += ["", "Python (runs as printed while this server is up):", "",
                  client_snippet(run_uid, uri=self.uri, key=self.key_source.python()),
                  "Ctrl-C stops the server."]
        return "\n".join(lines)


def serve(folder: str | os.PathLike = DEFAULT_DIR, *, port: int = DEFAULT_PORT,
          say: Callable[[str], None] = print, stop: threading.Event | None = None,
          exit_deadline_s: float | None = None) -> None:
    """Serve ``folder`` until Ctrl-C / SIGTERM (or ``stop`` is set).

    ``exit_deadline_s``: for a command that ends when this returns, a daemon timer ends the
    process (``os._exit(0)``) that many seconds after the stop began, should closing the server
    hang (a safety net: the one such hang seen in CI was an ignored SIGINT, handled below).
    """
    import signal

    stop = stop or threading.Event()
    server = ResultsServer(folder, port=port).start()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C as well as SIGTERM: a process started by one that ignores SIGINT inherits
        # SIG_IGN, and Python then raises no KeyboardInterrupt (seen in CI: the command was still
        # running 30 s after SIGINT when a test suite had set SIGINT to ignored).
        previous = {sig: signal.signal(sig, lambda *_: stop.set())
                    for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        say(server.banner())
        while server.alive() and not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if exit_deadline_s is not None:
            watchdog = threading.Timer(exit_deadline_s, os._exit, args=(0,))
            watchdog.daemon = True
            watchdog.start()
        server.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
