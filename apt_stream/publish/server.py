"""Where results go: an embedded local Tiled server, or a real one given by URI + API key.

The embedded server is Tiled's app, served by uvicorn from a daemon thread
(:mod:`apt_stream.publish.embedded`: one table request at a time, bounded shutdown): an SQLite
catalog (``catalog.db``) and file storage (``data/``, plus ``storage.duckdb`` for
appendable tables) under one data folder, listening on 127.0.0.1 on a free port. Keep the data
folder and the scans are still there next time, also after a copy or a move (stored paths
are pointed at the folder's present place: :func:`apt_stream.publish.serve.relocate_catalog`).
``apt-stream serve DIR`` serves such a folder, web UI included (:mod:`apt_stream.publish.serve`).
A real server (``deploy/tiled-config.yml``) is reached with :func:`endpoint_from_env`
(``APT_STREAM_TILED_URI``, ``APT_STREAM_TILED_API_KEY``).

The API key never appears in a log line, a ``repr``, an error message or a Prefect parameter
(:class:`TiledEndpoint` excludes it from every dump); it travels in the ``Authorization``
header, not in the URL. The embedded server's logs and those of :func:`serve_tiled`
(``python -m apt_stream.publish serve CONFIG``: ``tiled serve config``, which prints the key at
start-up, with its output redacted) go through :func:`redact`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import secrets
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from apt_stream.errors import ConfigError, ServiceError

log = logging.getLogger(__name__)

URI_ENV = "APT_STREAM_TILED_URI"
API_KEY_ENV = "APT_STREAM_TILED_API_KEY"
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class TiledEndpoint(BaseModel):
    """A Tiled server's API address and the key that opens it.

    A frozen pydantic model whose key is excluded from every dump: ``repr``, ``model_dump`` and
    the JSON encoders Prefect uses for parameters (``jsonable_encoder``) never contain it, so an
    endpoint handed to a flow or task does not end up in Prefect's database.

    Attributes
    ----------
    uri
        ``http(s)://host:port/api/v1`` (no key in it).
    api_key
        Hidden from ``repr`` and excluded from serialisation.
    data_dir
        The embedded server's data folder (None for a remote server).
    """

    model_config = ConfigDict(frozen=True)

    uri: str
    api_key: str | None = Field(default=None, repr=False, exclude=True)
    data_dir: Path | None = None

    def __init__(
        self, uri: str, api_key: str | None = None, data_dir: str | os.PathLike | None = None
    ) -> None:
        parts = urlsplit(uri)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"Tiled URI must be http(s)://host[:port]/..., got {uri!r}")
        if "api_key" in parts.query:
            raise ConfigError("put the Tiled API key in APT_STREAM_TILED_API_KEY, not in the URI")
        super().__init__(uri=uri, api_key=api_key, data_dir=data_dir)

    @property
    def is_loopback(self) -> bool:
        return urlsplit(self.uri).hostname in _LOOPBACK


def endpoint_from_env(environ: Mapping[str, str] | None = None) -> TiledEndpoint | None:
    """The endpoint named by ``APT_STREAM_TILED_URI`` / ``APT_STREAM_TILED_API_KEY``, else None."""
    env = os.environ if environ is None else environ
    uri = env.get(URI_ENV, "").strip()
    if not uri:
        return None
    return TiledEndpoint(uri=uri, api_key=env.get(API_KEY_ENV) or None)


@contextlib.contextmanager
def local_tiled_server(
    data_dir: str | os.PathLike | None = None, *, api_key: str | None = None,
    readable_storage: Sequence[str | os.PathLike] | None = None,
) -> Iterator[TiledEndpoint]:
    """Run a writable Tiled server on 127.0.0.1 (free port) for the duration of the block.

    Parameters
    ----------
    data_dir
        Folder for the catalog and the data (created; reused if it holds a catalog). None: a
        temporary folder, deleted afterwards.
    api_key
        Key clients must present; default a fresh 256-bit random hex key.
    readable_storage
        Folders of external files the server may serve (the detector files raw runs stored by
        ``TiledWriter`` reference: :mod:`apt_stream.publish.raw`).

    Yields
    ------
    TiledEndpoint
        With ``uri`` (``http://127.0.0.1:<port>/api/v1``), ``api_key`` and ``data_dir``.

    Raises
    ------
    ServiceError
        The server did not come up (its ``error.log`` in the data folder says why).
    """
    import shutil
    import tempfile

    from apt_stream.publish.embedded import CATALOG, TiledThread, results_catalog, tiled_app

    key = api_key or secrets.token_hex(32)
    if not key.isalnum():
        raise ConfigError("a Tiled API key must be letters and digits only")
    temporary = data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="apt-tiled-") if temporary else data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    if (data_dir / CATALOG).is_file():  # a copied or moved folder: its own files
        from apt_stream.publish.serve import relocate_catalog

        relocate_catalog(data_dir)
    (data_dir / "data").mkdir(exist_ok=True)
    # The server logs to error.log / access.log in its folder; a browser that opens a
    # ``?api_key=`` link would put the key there. Redact it (and any other key) on the way out.
    _SERVER_LOG_FILTER.secrets.add(key)
    server = None
    try:
        try:
            catalog = results_catalog(
                data_dir, create=True,
                readable_storage=[str(Path(p).resolve()) for p in readable_storage or ()],
            )
            server = TiledThread(tiled_app(catalog, key), port=0, log_folder=data_dir,
                                 name="apt-tiled", log_filter=_SERVER_LOG_FILTER)
            port = server.start()
        except ServiceError:
            raise
        except Exception as exc:
            raise ServiceError(f"embedded Tiled server did not start: {exc} "
                               f"(see {data_dir / 'error.log'})") from None
        endpoint = TiledEndpoint(uri=f"http://127.0.0.1:{port}/api/v1", api_key=key,
                                 data_dir=data_dir)
        log.info("embedded Tiled server at %s, data in %s", endpoint.uri, endpoint.data_dir)
        yield endpoint
    finally:
        if server is not None:
            server.close()
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)


#: Appendable tables in Tiled's embedded (and default SQL) storage live in DuckDB behind one
#: shared ADBC connection (tiled.storage: a StaticPool for duckdb). Two appends at once from
#: two writer threads of this process (the publisher's ``angles`` rows, TiledWriter's event
#: tables) were seen to hang the server in ``Connection.commit`` for good, and the demo with
#: it. This process's table writers take turns.
TABLE_WRITE_LOCK = threading.RLock()


def connect(endpoint: TiledEndpoint, *, timeout_s: float = 10.0) -> Any:
    """A Tiled client for the server's root container.

    Raises
    ------
    ServiceError
        Unreachable server or a refused key (the message names the URI, never the key).
    """
    import httpx
    from tiled.client import from_uri

    try:
        return from_uri(
            endpoint.uri,
            api_key=endpoint.api_key,
            structure_clients="numpy",
            timeout=httpx.Timeout(timeout_s),
            # Proxy variables must not divert loopback traffic (CI machines often set them).
            trust_env=not endpoint.is_loopback,
        )
    except Exception as exc:
        raise ServiceError(
            f"cannot use Tiled at {endpoint.uri}: {type(exc).__name__}: {_redact(str(exc), endpoint)}"
        ) from None


def _redact(text: str, endpoint: TiledEndpoint) -> str:
    return redact(text, [endpoint.api_key] if endpoint.api_key else ())


# -- keeping keys out of logs --------------------------------------------------------------------
#: ``api_key=<value>`` in a URL (also percent-encoded), and ``Apikey`` / ``Bearer`` credentials.
_KEY_IN_URL = re.compile(r"(?i)(api_key(?:=|%3D))[^&\s\"'<>]+")
_CREDENTIAL = re.compile(
    r"(?i)\b(apikey(?=\s+[A-Za-z0-9_-]{16,})|bearer(?=\s+[A-Za-z0-9._~+/=-]{16,}))(\s+)\S+"
)
#: Environment variables whose values are treated as secrets by :func:`serve_tiled`.
_SECRET_NAME = re.compile(r"KEY|SECRET|PASSWORD|PASSWD|TOKEN|AUTH_STRING", re.IGNORECASE)
_MIN_SECRET = 6  # shorter values would redact ordinary words


def redact(text: str, secrets_: Iterable[str] = ()) -> str:
    """``text`` with every given secret, every ``api_key=…`` value and every ``Apikey …`` /
    ``Bearer …`` credential replaced by ``***``."""
    for secret in sorted((s for s in secrets_ if s and len(s) >= _MIN_SECRET), key=len,
                         reverse=True):
        text = text.replace(secret, "***")
    text = _KEY_IN_URL.sub(r"\1***", text)
    return _CREDENTIAL.sub(r"\1\2***", text)


def environment_secrets(environ: Mapping[str, str] | None = None) -> set[str]:
    """Values of the environment variables whose names say they are secrets (``*KEY*``,
    ``*SECRET*``, ``*PASSWORD*``, ``*TOKEN*``, ``*AUTH_STRING*``)."""
    env = os.environ if environ is None else environ
    return {v for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_SECRET}


class RedactingFilter(logging.Filter):
    """A logging filter that :func:`redact` s each record's message, arguments and traceback.

    Put it on handlers (records from child loggers reach a handler without passing the parent
    logger's filters). ``secrets`` is a set: add keys as they become known.
    """

    def __init__(self, secrets_: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets: set[str] = {s for s in secrets_ if s}

    def _clean(self, value: Any) -> Any:
        text = value if isinstance(value, str) else str(value)
        cleaned = redact(text, self.secrets)
        return value if cleaned == text else cleaned

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg, self.secrets)
        if isinstance(record.args, tuple):
            record.args = tuple(self._clean(a) for a in record.args)
        elif isinstance(record.args, Mapping):
            record.args = {k: self._clean(v) for k, v in record.args.items()}
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        return True


#: Tiled's and uvicorn's loggers (the embedded server's error.log and access.log).
_SERVER_LOG_FILTER = RedactingFilter()


class RedactingStream(io.TextIOBase):
    """A text stream that passes whole lines to ``stream`` with :func:`redact` applied.

    A line is held until its newline (or :meth:`flush`), so a key split across two writes is
    still caught.
    """

    def __init__(self, stream: Any, secrets_: Iterable[str] = ()) -> None:
        super().__init__()
        self._stream = stream
        self.secrets: set[str] = {s for s in secrets_ if s}
        self._pending = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self._pending += text
            head, newline, tail = self._pending.rpartition("\n")
            if newline:
                self._stream.write(redact(head + newline, self.secrets))
                self._pending = tail
            if len(self._pending) > 65536:
                self._stream.write(redact(self._pending, self.secrets))
                self._pending = ""
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._stream.write(redact(self._pending, self.secrets))
                self._pending = ""
        self._stream.flush()

    def isatty(self) -> bool:
        return bool(getattr(self._stream, "isatty", lambda: False)())

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", "utf-8")

    def writable(self) -> bool:
        return True


SERVE_USAGE = """usage: python -m apt_stream.publish serve CONFIG [tiled serve config options]

Runs `tiled serve config CONFIG ...` with its output redacted: the single-user API key, every
?api_key=... in a URL and the values of *KEY* / *SECRET* / *PASSWORD* / *TOKEN* environment
variables are written as ***. In single-user mode TILED_SINGLE_USER_API_KEY must be set
(a key that Tiled generates would only ever be printed, and that print is redacted).
"""


def serve_tiled(argv: Sequence[str] | None = None) -> int:
    """``tiled serve config`` with every secret redacted from its stdout and stderr.

    ``tiled serve config`` prints ``http://host:port?api_key=<key>`` to stderr whenever the key
    was not given as ``--api-key`` (which would put it in the process list instead), i.e. also
    when it comes from ``TILED_SINGLE_USER_API_KEY``. This runs the same command with
    ``sys.stdout`` / ``sys.stderr`` wrapped in :class:`RedactingStream` (uvicorn's log handlers
    pick up the wrapped streams), so neither the terminal nor a log file sees the key.

    Parameters
    ----------
    argv
        ``CONFIG [options of tiled serve config]`` (default ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status (2 for a usage error or a missing key).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stderr.write(SERVE_USAGE)
        return 0 if args else 2
    if "--api-key" in args or any(a.startswith("--api-key=") for a in args):
        sys.stderr.write("refusing --api-key: it shows in the process list; "
                         "set TILED_SINGLE_USER_API_KEY instead\n")
        return 2
    problem = _single_user_key_missing(args[0])
    if problem:
        sys.stderr.write(problem + "\n")
        return 2
    secrets_ = environment_secrets()
    sys.stdout = RedactingStream(sys.stdout, secrets_)
    sys.stderr = RedactingStream(sys.stderr, secrets_)
    from tiled.commandline.main import cli_app

    try:
        cli_app(["serve", "config", *args], prog_name="tiled")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return 0


def _single_user_key_missing(config_path: str) -> str | None:
    """Why a single-user server would start with a generated (unknowable) key, or None."""
    try:
        from tiled.config import parse_configs

        parsed = parse_configs(config_path)
    except Exception:
        return None  # tiled reports it, with the config's own error message
    auth = parsed.authentication
    if auth.providers or auth.single_user_api_key or os.environ.get("TILED_SINGLE_USER_API_KEY"):
        return None
    return ("TILED_SINGLE_USER_API_KEY is not set: Tiled would generate a key and print it "
            "(redacted here). Set it, e.g. "
            "export TILED_SINGLE_USER_API_KEY=$(python -c \"import secrets; "
            "print(secrets.token_hex(32))\")")


#: Container the flight check writes to (one per catalog, reused every time).
FLIGHT_CHECK_KEY = "apt-stream-flight-check"


def check_writable(endpoint: TiledEndpoint, *, timeout_s: float = 10.0) -> dict[str, Any]:
    """Prove the server answers and the key may write: stamp a fixed container's metadata.

    Returns ``{"uri", "seconds", "server_version"}``; raises :class:`ServiceError` otherwise.
    """
    import datetime as _dt
    import time

    t0 = time.perf_counter()
    root = connect(endpoint, timeout_s=timeout_s)
    stamp = _dt.datetime.now(_dt.UTC).isoformat()
    try:
        try:
            node = root[FLIGHT_CHECK_KEY]
        except KeyError:
            node = root.create_container(key=FLIGHT_CHECK_KEY, metadata={"purpose": "flight check"})
        # drop_revision: a scheduled check must not pile up metadata history.
        node.update_metadata(metadata={"last_check": stamp}, drop_revision=True)
        if root[FLIGHT_CHECK_KEY].metadata.get("last_check") != stamp:
            raise ServiceError("Tiled accepted the write but does not return it")
    except ServiceError:
        raise
    except Exception as exc:
        raise ServiceError(
            f"Tiled at {endpoint.uri} refused a write: {type(exc).__name__}: "
            f"{_redact(str(exc), endpoint)}"
        ) from None
    return {
        "uri": endpoint.uri,
        "seconds": round(time.perf_counter() - t0, 3),
        "server_version": root.context.server_info.library_version,
    }
