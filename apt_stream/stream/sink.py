"""Where a live reconstruction's results go (Tiled, a log, a test): the sink protocol.

:class:`~apt_stream.stream.live.LiveReconstructor` calls a sink from its worker thread, in this
order per run: ``run_started`` once; ``angle_finished`` after each finished angle (its
``approximant`` argument is the run's engine, so ``approximant.volume()`` is the Approximant so
far — the last call holds the final one); ``reconstruction_ready`` for previews and the triggered
reconstruction (``final=False``) and once more at the stop when the trigger fired
(``final=True``); ``run_stopped`` last, with the run's status. A sink method that raises is
logged and counted; it never stops the reconstruction.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from apt_stream.stream.messages import RunHeader

RunStatus = Literal["done", "done_with_gaps", "stopped_before_trigger", "abandoned", "failed"]
RUN_STATUSES: tuple[str, ...] = (
    "done", "done_with_gaps", "stopped_before_trigger", "abandoned", "failed",
)


@runtime_checkable
class ReconstructionSink(Protocol):
    """What a live reconstruction reports to (implemented by the Tiled publisher)."""

    def run_started(self, header: RunHeader) -> None:
        """A run began; ``header`` holds its geometry and probe."""

    def angle_finished(self, run_uid: str, summary: Any, approximant: Any) -> None:
        """One angle is done; ``summary`` is the engine's angle summary, ``approximant`` the
        run's engine (``.volume()``, ``.finished_angles_deg()``)."""

    def reconstruction_ready(
        self, run_uid: str, volumes: dict[str, np.ndarray], *, final: bool
    ) -> None:
        """Reconstructed volumes (z, y, x) by name; ``final`` only for the end-of-run one."""

    def run_stopped(self, run_uid: str, status: RunStatus) -> None:
        """The run is over: ``done``, ``done_with_gaps`` (some frames or angles missing),
        ``stopped_before_trigger``, ``abandoned`` (no stop came) or ``failed``.

        A sink whose ``run_stopped`` also takes ``metadata=`` gets the gaps:
        ``{"frames_missing": int, "angles_with_gaps": [angle ids]}``."""


class LoggingSink:
    """A sink that only logs (for ``apt-stream listen`` without Tiled, and for debugging)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger("apt_stream.live")

    def run_started(self, header: RunHeader) -> None:
        self.log.info("run %s started: %d angles planned, frames %s", header.run_uid,
                      header.n_angles, header.frame_shape)

    def angle_finished(self, run_uid: str, summary: Any, approximant: Any) -> None:
        self.log.info("run %s: angle %s finished", run_uid, getattr(summary, "angle_id", summary))

    def reconstruction_ready(self, run_uid, volumes, *, final: bool) -> None:
        shapes = {k: tuple(np.shape(v)) for k, v in volumes.items()}
        self.log.info("run %s: %s reconstruction %s", run_uid, "final" if final else "live",
                      shapes)

    def run_stopped(self, run_uid: str, status: RunStatus) -> None:
        self.log.info("run %s stopped: %s", run_uid, status)
