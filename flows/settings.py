"""Prefect settings for a beamline machine: no telemetry, nothing leaves loopback.

:data:`OFFLINE_ENV` is what the demo, the tests and the deployments set *before* Prefect is
imported (Prefect reads most settings once, at import). Applying it is explicit: importing this
module changes nothing.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

#: Environment that keeps Prefect (client and ephemeral server) from phoning home.
OFFLINE_ENV: dict[str, str] = {
    # Client-side SDK analytics (checked by Prefect's analytics service).
    "DO_NOT_TRACK": "1",
    # The server's anonymous usage heartbeat.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Prometheus endpoints and per-run resource metrics: local, but nobody reads them here.
    "PREFECT_CLIENT_METRICS_ENABLED": "false",
    "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS": "false",
    # Only matters with Prefect Cloud; off so a stray PREFECT_API_URL cannot enable it.
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
}


def apply_offline_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set :data:`OFFLINE_ENV` in ``environ`` (default ``os.environ``) where not already set.

    Returns the variables it set, so a caller can undo them.
    """
    env = os.environ if environ is None else environ
    changed = {k: v for k, v in OFFLINE_ENV.items() if k not in env}
    env.update(changed)
    return changed
