"""Beamline side: simulated devices, the ptycho-tomography plan, 0MQ publishing and scan replay.

Importing this package imports bluesky and ophyd; nothing else in apt-stream needs them.
See docs/streaming.md.
"""

from .devices import (
    AngleMarker,
    SimPtychoDetector,
    make_stages,
    readback_key,
    write_probe,
)
from .frames import FrameSource, synthetic_scan
from .plan import RunJournal, ptycho_tomo_plan
from .replay import make_run_engine, replay_scan
from .zmq_link import ZmqProxy, make_publisher, start_proxy, wait_for_link

__all__ = [
    "AngleMarker",
    "FrameSource",
    "RunJournal",
    "SimPtychoDetector",
    "ZmqProxy",
    "make_publisher",
    "make_run_engine",
    "make_stages",
    "ptycho_tomo_plan",
    "readback_key",
    "replay_scan",
    "start_proxy",
    "synthetic_scan",
    "wait_for_link",
    "write_probe",
]
