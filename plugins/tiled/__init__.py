"""Tiled server side for a beamline: the service configuration and a way to run it.

``deploy/tiled-config.yml`` is :func:`server_config` written out with the data folder left to
``APT_STREAM_TILED_DATA``; :func:`serve_config` runs such a file with ``tiled serve config``.
"""

from .config import check_server_config, server_config, write_server_config
from .serve import serve_config

__all__ = ["check_server_config", "serve_config", "server_config", "write_server_config"]
