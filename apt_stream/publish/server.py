"""Where results go: an embedded local Tiled server, or a real one given by URI + API key.

The embedded server is tiled's :class:`~tiled.server.SimpleTiledServer` on a background thread:
an SQLite catalog (``catalog.db``) and file storage (``data/``, plus ``storage.duckdb`` for
appendable tables) under one data folder, listening on 127.0.0.1 on a free port. Keep the data
folder and the scans are still there next time. A real server (``deploy/tiled-config.yml``) is
reached with :func:`endpoint_from_env` (``APT_STREAM_TILED_URI``, ``APT_STREAM_TILED_API_KEY``).

The API key never appears in a log line, a ``repr`` or an error message; it travels in the
``Authorization`` header, not in the URL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from apt_stream.errors import ConfigError, ServiceError

log = logging.getLogger(__name__)

URI_ENV = "APT_STREAM_TILED_URI"
API_KEY_ENV = "APT_STREAM_TILED_API_KEY"
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class TiledEndpoint:
    """A Tiled server's API address and the key that opens it.

    Attributes
    ----------
    uri
        ``http(s)://host:port/api/v1`` (no key in it).
    api_key
        Hidden from ``repr``.
    data_dir
        The embedded server's data folder (None for a remote server).
    """

    uri: str
    api_key: str | None = field(default=None, repr=False)
    data_dir: Path | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.uri)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"Tiled URI must be http(s)://host[:port]/..., got {self.uri!r}")
        if "api_key" in parts.query:
            raise ConfigError("put the Tiled API key in APT_STREAM_TILED_API_KEY, not in the URI")

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
    data_dir: str | os.PathLike | None = None, *, api_key: str | None = None
) -> Iterator[TiledEndpoint]:
    """Run a writable Tiled server on 127.0.0.1 (free port) for the duration of the block.

    Parameters
    ----------
    data_dir
        Folder for the catalog and the data (created; reused if it holds a catalog). None: a
        temporary folder, deleted afterwards.
    api_key
        Key clients must present; default a fresh 256-bit random hex key.

    Yields
    ------
    TiledEndpoint
        With ``uri`` (``http://127.0.0.1:<port>/api/v1``), ``api_key`` and ``data_dir``.

    Raises
    ------
    ServiceError
        The server did not come up (its ``error.log`` in the data folder says why).
    """
    from tiled.server import SimpleTiledServer

    key = api_key or secrets.token_hex(32)
    if not key.isalnum():
        raise ConfigError("a Tiled API key must be letters and digits only")
    if data_dir is not None:
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
    try:
        server = SimpleTiledServer(directory=data_dir, api_key=key)
    except Exception as exc:
        where = f" (see {data_dir / 'error.log'})" if data_dir is not None else ""
        raise ServiceError(f"embedded Tiled server did not start: {exc}{where}") from None
    endpoint = TiledEndpoint(
        uri=f"http://127.0.0.1:{server.port}/api/v1", api_key=key, data_dir=Path(server.directory)
    )
    log.info("embedded Tiled server at %s, data in %s", endpoint.uri, endpoint.data_dir)
    try:
        yield endpoint
    finally:
        server.close()


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
    return text.replace(endpoint.api_key, "***") if endpoint.api_key else text


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
