"""Data roots: the only folders a listener reads detector frames and probe files from.

Documents come from the network, so a file path inside one is untrusted. Every path a document
names is turned into an absolute, symlink-resolved path and must lie inside one of the configured
roots; anything else (another scheme, a relative path, ``..`` that climbs out, a symlink that
points out) is refused with :class:`DocumentError`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from apt_stream.errors import ConfigError, DocumentError


def file_uri(path: str | os.PathLike) -> str:
    """``file://localhost/abs/path`` for a local file (the form StreamResource documents use)."""
    return "file://localhost" + Path(path).resolve().as_posix()


def path_from_uri(uri: str) -> Path:
    """The local path a ``file://`` URI (or a plain absolute path) names; not yet checked."""
    if not isinstance(uri, str) or not uri:
        raise DocumentError(f"file reference must be a non-empty string, got {uri!r}")
    if "\x00" in uri:
        raise DocumentError("file reference contains a NUL byte")
    if "://" not in uri:
        path = uri
    else:
        parts = urlsplit(uri)
        if parts.scheme != "file":
            raise DocumentError(f"only file:// references are read, got scheme {parts.scheme!r}")
        if parts.netloc not in ("", "localhost"):
            raise DocumentError(f"file reference {uri!r} names remote host {parts.netloc!r}")
        path = unquote(parts.path)
    if not path.startswith("/"):
        raise DocumentError(f"file reference {uri!r} is not an absolute path")
    return Path(path)


class DataRoots:
    """The folders documents may point into.

    Parameters
    ----------
    roots
        Existing directories. At least one is required: a listener with no roots cannot read any
        frames, which is a configuration mistake worth stating early.
    """

    def __init__(self, roots: Iterable[str | os.PathLike]):
        resolved = []
        for root in roots:
            path = Path(root).expanduser()
            if not path.is_dir():
                raise ConfigError(f"data root {str(root)!r} is not an existing directory")
            resolved.append(path.resolve())
        if not resolved:
            raise ConfigError("at least one data root is needed to read detector files")
        self.roots: tuple[Path, ...] = tuple(resolved)

    def __repr__(self) -> str:
        return f"DataRoots({[str(r) for r in self.roots]})"

    def resolve(self, uri_or_path: str) -> Path:
        """Resolve a document's file reference and check it lies under a root.

        Raises
        ------
        DocumentError
            If the reference is malformed or resolves outside every data root.
        """
        path = path_from_uri(uri_or_path)
        # resolve() follows symlinks and collapses "..", so the containment test sees the real file.
        real = path.resolve()
        for root in self.roots:
            if real == root or real.is_relative_to(root):
                return real
        raise DocumentError(
            f"refusing to read {str(path)!r}: it resolves to {str(real)!r}, outside the data roots "
            f"{[str(r) for r in self.roots]}"
        )

    def contains(self, uri_or_path: str) -> bool:
        """True when :meth:`resolve` would accept the reference."""
        try:
            self.resolve(uri_or_path)
        except DocumentError:
            return False
        return True
