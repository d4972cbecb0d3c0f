"""Results in Tiled: an embedded or remote server, and the live scan publisher.

``import apt_stream.publish`` does not import tiled; the server and client load on first use.
"""

from apt_stream.publish._metadata import STATUSES, angle_row
from apt_stream.publish.backup import BackupLog, read_backup, replay_backup
from apt_stream.publish.server import (
    TiledEndpoint,
    check_writable,
    connect,
    endpoint_from_env,
    local_tiled_server,
)
from apt_stream.publish.writer import TiledPublisher

__all__ = [
    "STATUSES",
    "BackupLog",
    "TiledEndpoint",
    "TiledPublisher",
    "angle_row",
    "check_writable",
    "connect",
    "endpoint_from_env",
    "local_tiled_server",
    "read_backup",
    "replay_backup",
]
