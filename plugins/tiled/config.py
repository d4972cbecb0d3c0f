"""Configuration of a real Tiled server for apt-stream (the shape of deploy/tiled-config.yml).

A catalog in SQLite, arrays as files and appendable tables in a second SQLite file, all under one
data folder; the API key comes from ``TILED_SINGLE_USER_API_KEY`` (Tiled reads it itself), so
no config file ever holds it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from apt_stream.errors import ConfigError

DATA_ENV = "APT_STREAM_TILED_DATA"
SERVER_KEY_ENV = "TILED_SINGLE_USER_API_KEY"
_VARIABLE = re.compile(r"\$\{(\w+)\}")


def server_config(
    data_dir: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000,
    readable_storage: list[str | os.PathLike] | None = None,
) -> dict[str, Any]:
    """The Tiled service configuration (a dict ready for YAML) for one data folder.

    ``data_dir`` may be ``"${APT_STREAM_TILED_DATA}"`` to leave it to the environment, as
    deploy/tiled-config.yml does (with ``readable_storage=["${APT_STREAM_DATA_ROOT}"]``: the
    folders of the detector files that raw runs reference).
    """
    if not 0 <= int(port) <= 65535:
        raise ConfigError(f"port must be within 0..65535, got {port}")
    data = str(data_dir)
    args: dict[str, Any] = {
        "uri": f"sqlite:///{data}/catalog.db",
        "init_if_not_exists": True,
        "writable_storage": [f"{data}/data", f"sqlite:///{data}/tables.sqlite"],
    }
    if readable_storage:
        args["readable_storage"] = [str(p) for p in readable_storage]
    return {
        "authentication": {"allow_anonymous_access": False},
        "trees": [
            {
                "path": "/",
                "tree": "catalog",
                "args": args,
            }
        ],
        "uvicorn": {"host": host, "port": int(port)},
    }


def write_server_config(path: str | os.PathLike, data_dir: str | os.PathLike, **kwargs: Any) -> Path:
    """Write :func:`server_config` as YAML to ``path``; returns the path."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(server_config(data_dir, **kwargs), sort_keys=False))
    return path


def check_server_config(
    path: str | os.PathLike, *, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Validate a Tiled config file the way ``tiled serve config`` will read it.

    Environment variables in the file are expanded from ``environ`` (default ``os.environ``).

    Returns
    -------
    dict
        ``host``, ``port`` and the catalog ``uri``.

    Raises
    ------
    ConfigError
        Unreadable or invalid file, or no ``TILED_SINGLE_USER_API_KEY`` to protect the server.
    """
    import yaml
    from tiled.config import Config

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Tiled config {path} does not exist")
    env = os.environ if environ is None else environ
    if not env.get(SERVER_KEY_ENV):
        raise ConfigError(f"{SERVER_KEY_ENV} is not set: the server would have no API key")
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    missing = sorted(_variables(raw) - set(env))
    if missing:
        raise ConfigError(f"{path} uses unset environment variables: {missing}")
    try:
        parsed = Config.model_validate(_expand(raw, env))
    except Exception as exc:
        raise ConfigError(f"{path} is not a valid Tiled config: {exc}") from None
    tree = parsed.trees[0]
    return {
        "host": parsed.uvicorn.get("host", "127.0.0.1"),
        "port": parsed.uvicorn.get("port", 8000),
        "uri": (tree.args or {}).get("uri"),
    }


def _variables(value: Any) -> set[str]:
    if isinstance(value, str):
        return set(_VARIABLE.findall(value))
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return set().union(*(_variables(v) for v in value)) if value else set()
    return set()


def _expand(value: Any, env: Mapping[str, str]) -> Any:
    """``${VAR}`` expansion from ``env`` (what Tiled does with os.environ when it parses)."""
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: env[m.group(1)], value)
    if isinstance(value, dict):
        return {k: _expand(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, env) for v in value]
    return value
