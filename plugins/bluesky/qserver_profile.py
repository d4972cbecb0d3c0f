"""Startup code of a bluesky-queueserver RE Manager that measures apt-stream's suggested angles.

Start a queue server with it (Redis must be running; loopback addresses; the permissions file
from ``apt_stream.plugins.bluesky.queue.write_permissions``)::

    python -c "from apt_stream.plugins.bluesky.queue import write_permissions as w; w('/tmp/apt-qs-perm.yaml')"
    start-re-manager --startup-module apt_stream.plugins.bluesky.qserver_profile \\
        --redis-addr 127.0.0.1:6379 --zmq-control-addr tcp://127.0.0.1:60615 \\
        --zmq-info-addr tcp://127.0.0.1:60625 \\
        --existing-plans-devices /tmp/apt-qs/existing_plans_and_devices.yaml \\
        --update-existing-plans-devices ENVIRONMENT_OPEN \\
        --user-group-permissions /tmp/apt-qs-perm.yaml

``RE``: the RunEngine the RE Worker uses. Devices: the simulated stages ``rot`` (deg), ``sample_x``, ``sample_y`` (px). Plan:
:func:`measure_angle`, which :mod:`apt_stream.plugins.bluesky.queue` queues.
"""

from __future__ import annotations

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np

from apt_stream.plugins.bluesky.devices import SimPtychoDetector, make_stages
from apt_stream.plugins.bluesky.frames import FrameSource
from apt_stream.plugins.bluesky.plan import ptycho_tomo_plan
from apt_stream.plugins.bluesky.replay import make_run_engine

#: The RE Worker runs the queue's plans on this RunEngine.
RE = make_run_engine()
rot, sample_x, sample_y = make_stages()


def measure_angle(angle_deg: float, scan_path: str = "", data_root: str = "", md: dict = None):  # noqa: RUF013
    """Measure one tomographic angle: apt-stream's suggestion (``angle_deg``).

    With ``scan_path`` (a scan file: the simulated beamline's frames), the ptycho-tomo plan
    acquires that scan's angle nearest ``angle_deg`` (its frames under ``data_root``, default
    ``<scan folder>/runs``) as a one-angle run a listener reconstructs like any other. Without
    it, the rotation stage moves to ``angle_deg`` and is read in a one-event run.
    """
    extra = {"apt_stream_suggested_deg": float(angle_deg), **(md or {})}
    if scan_path:
        from pathlib import Path

        source = FrameSource.coerce(scan_path)
        n = int(np.argmin(np.abs(source.angles_deg - float(angle_deg))))
        detector = SimPtychoDetector(root=data_root or Path(scan_path).resolve().parent / "runs")
        return (yield from ptycho_tomo_plan(detector, rot, sample_x, sample_y,
                                            scan_source=source, angle_order=[n], max_angles=1,
                                            md=extra))

    @bpp.run_decorator(md={"plan_name": "measure_angle", **extra})
    def inner():
        yield from bps.mv(rot, float(angle_deg))
        yield from bps.trigger_and_read([rot])

    return (yield from inner())
