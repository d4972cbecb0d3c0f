"""A per-user private folder at a stable path, for files nobody else may plant or read.

A fixed name in the shared temp dir (``/tmp/apt-stream-previews``) can be created first by
another user, as a folder they own or as a symlink to somewhere of their choosing, and whatever
is written there then goes where they want. :func:`private_dir` instead uses the user's cache
folder (``$XDG_CACHE_HOME``, else ``~/.cache``) and, for each folder it is responsible for
(``apt-stream`` and the one below), creates it with mode 0700 and checks with ``os.lstat`` that
it is a real folder (not a symlink), owned by this user and closed to everyone else.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from pathlib import Path

from apt_stream.errors import ConfigError

log = logging.getLogger(__name__)

APP_DIR = "apt-stream"


def cache_root(environ: dict[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME`` (if absolute), else ``~/.cache``."""
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_CACHE_HOME", "")
    return Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"


def _ensure_private(path: Path) -> None:
    """Create ``path`` (mode 0700) unless it exists; refuse anything but our own closed folder."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"{path} is a symlink; refusing to use it (remove it)")
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} is not a folder; refusing to use it")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise ConfigError(f"{path} is owned by uid {st.st_uid}, not by you; refusing to use it")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)  # ours, but open to others: close it


def private_dir(name: str, *, environ: dict[str, str] | None = None,
                fallback_to_temp: bool = False) -> Path:
    """``<cache root>/apt-stream/<name>``, created private (0700) and checked.

    Parameters
    ----------
    name
        One folder name (no separators).
    environ
        Where ``XDG_CACHE_HOME`` is looked up (default ``os.environ``).
    fallback_to_temp
        If the stable folder cannot be used (refused, or the cache root is not writable), log a
        warning and return a fresh ``tempfile.mkdtemp`` folder (random name, 0700) instead of
        raising.

    Raises
    ------
    ConfigError
        A folder on the way is a symlink, not a folder or someone else's (only without
        ``fallback_to_temp``).
    """
    if not name or os.sep in name or (os.altsep and os.altsep in name) or name in (".", ".."):
        raise ConfigError(f"private_dir wants one folder name, got {name!r}")
    root = cache_root(environ)
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        app = root / APP_DIR
        _ensure_private(app)
        target = app / name
        _ensure_private(target)
        return target
    except (ConfigError, OSError) as exc:
        if not fallback_to_temp:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"cannot create a private folder under {root}: {exc}") from None
        fresh = Path(tempfile.mkdtemp(prefix=f"{APP_DIR}-{name}-"))
        log.warning("%s; using %s instead", exc, fresh)
        return fresh
