"""One error family for apt-stream.

Every error inherits from :class:`AptStreamError` *and* the matching builtin, so callers can
catch either (``except ValueError`` keeps working for library users who do not know us).
"""

from __future__ import annotations


class AptStreamError(Exception):
    """Base class of every error apt-stream raises on purpose."""


class InputError(AptStreamError, ValueError):
    """An argument or array given to a library function is unusable (shape, dtype, NaN, ...)."""


class ScanFormatError(AptStreamError, ValueError):
    """A scan file does not follow docs/scan-format.md. The message names the first bad field."""


class DocumentError(AptStreamError, ValueError):
    """A Bluesky document (or ZMQ message) could not be decoded or failed validation."""


class ConfigError(AptStreamError, ValueError):
    """A setting, preset name or configuration file is invalid."""


class ModelError(AptStreamError, RuntimeError):
    """A checkpoint is missing, corrupt, unsafe to load or does not match the network preset."""


class ServiceError(AptStreamError, RuntimeError):
    """An outside service (Tiled, Prefect, ZMQ proxy) could not be reached or refused a request."""
