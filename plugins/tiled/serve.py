"""Run ``tiled serve config <file>`` in a subprocess: the deployed server, started from Python.

For trying deploy/tiled-config.yml on one machine, and for tests that need a server they can
take down (an outage) without touching the rest of the process.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from apt_stream.errors import ConfigError, ServiceError
from apt_stream.publish.server import TiledEndpoint

from .config import DATA_ENV, SERVER_KEY_ENV


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_config(
    config_path: str | os.PathLike,
    *,
    data_dir: str | os.PathLike,
    api_key: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    startup_timeout_s: float = 60.0,
) -> Iterator[tuple[TiledEndpoint, subprocess.Popen]]:
    """Serve ``config_path`` with ``APT_STREAM_TILED_DATA=data_dir`` until the block ends.

    Yields the endpoint and the server process (terminate it to simulate an outage). The
    server's output goes to ``data_dir/server.log``.

    Raises
    ------
    ServiceError
        The server exited or did not answer ``/healthz`` within ``startup_timeout_s``.
    """
    import httpx

    key = api_key or secrets.token_hex(32)
    if not key.isalnum():
        raise ConfigError("a Tiled API key must be letters and digits only")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port(host) if port is None else int(port)
    env = {**os.environ, DATA_ENV: str(data_dir), SERVER_KEY_ENV: key}
    # `tiled serve config` through apt_stream.publish's redacting launcher: plain tiled prints
    # the key (…?api_key=<key>) into server.log.
    cmd = [sys.executable, "-m", "apt_stream.publish", "serve", str(config_path),
           "--host", host, "--port", str(port)]
    log_path = data_dir / "server.log"
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    base = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        with httpx.Client(trust_env=False) as client:
            while True:
                if proc.poll() is not None:
                    raise ServiceError(f"tiled serve exited with {proc.returncode}; see {log_path}")
                try:
                    if client.get(f"{base}/healthz", timeout=1.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise ServiceError(f"tiled serve did not answer within {startup_timeout_s} s; "
                                       f"see {log_path}")
                time.sleep(0.1)
        yield TiledEndpoint(uri=f"{base}/api/v1", api_key=key, data_dir=data_dir), proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
