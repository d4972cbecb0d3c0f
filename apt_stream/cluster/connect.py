"""Start or join the Dask cluster that per-angle work runs on.

``--workers N`` starts a :class:`distributed.LocalCluster` of N worker processes on 127.0.0.1
(one torch thread each: N workers for N cores); ``--dask tcp://HOST:PORT`` joins an existing
scheduler. Dask moves task arguments and results with pickle between the client, scheduler
and workers: run a cluster only on a network you trust (or with Dask's TLS ``security``), as
for any Dask deployment (docs/deployment.md).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from apt_stream.errors import ConfigError, ServiceError

log = logging.getLogger(__name__)


@dataclass
class Cluster:
    """A connected client and, for a local cluster, the cluster it started."""

    client: Any
    local: Any = None

    @property
    def address(self) -> str:
        return str(self.client.scheduler.address)

    @property
    def dashboard(self) -> str | None:
        """Dask's status page (per-worker tasks, memory), when the scheduler serves one."""
        return getattr(self.client, "dashboard_link", None)

    @property
    def workers(self) -> list[str]:
        return sorted(self.client.nthreads())

    def engine(self, geometry: Any, *, run_uid: str, **options: Any):
        """A :class:`~apt_stream.cluster.engine.DaskApproximant` for one run on this cluster."""
        from apt_stream.cluster.engine import DaskApproximant

        return DaskApproximant(geometry, self.client, run_uid=run_uid, **options)

    def engine_factory(self, *, options: Any = None, projection_iterations: int | None = None,
                       threads_per_task: int = 1, device: str = "cpu"):
        """``factory(header)`` -> a :class:`~apt_stream.cluster.engine.DaskApproximant` per run."""
        from apt_stream.physics.engine import ScanGeometry

        def make(header: Any):
            return self.engine(ScanGeometry.from_scan(header), run_uid=str(header.run_uid),
                               options=options, projection_iterations=projection_iterations,
                               threads_per_task=threads_per_task, device=device)

        return make


    def reconstruct_fn(self, checkpoint: str, *, device: str = "cpu", threads_per_task: int = 1):
        """``reconstruct_fn(volume, header, projections=None, input_projections=None)`` that
        runs the network on a worker, which loads ``checkpoint`` once and keeps it (the path
        must exist on the workers: the shipped model is inside the installed package)."""
        from apt_stream.cluster import on_worker

        client = self.client

        def reconstruct(volume: Any, header: Any, projections: Any = None,
                        input_projections: Any = None) -> dict:
            future = client.submit(on_worker.reconstruct, str(checkpoint), device,
                                   threads_per_task, volume, projections, input_projections,
                                   pure=False)
            return future.result()

        return reconstruct


@contextlib.contextmanager
def open_cluster(*, workers: int | None = None, address: str | None = None,
                 threads_per_worker: int = 1, timeout_s: float = 60.0) -> Iterator[Cluster]:
    """A Dask client: on a new local cluster of ``workers`` processes, or on ``address``."""
    if (workers is None) == (address is None):
        raise ConfigError("give either a number of local Dask workers or a scheduler address")
    if workers is not None and int(workers) < 1:
        raise ConfigError(f"the number of Dask workers must be >= 1, got {workers}")
    if address is not None and not str(address).startswith(("tcp://", "tls://", "inproc://")):
        raise ConfigError(f"a Dask scheduler address looks like tcp://HOST:PORT, got {address!r}")
    from distributed import Client, LocalCluster

    local = None
    try:
        if workers is not None:
            local = LocalCluster(n_workers=int(workers), threads_per_worker=threads_per_worker,
                                 processes=True, host="127.0.0.1",
                                 dashboard_address="127.0.0.1:0",  # Dask's status page
                                 silence_logs=logging.ERROR)
            client = Client(local, timeout=timeout_s)
        else:
            client = Client(address, timeout=timeout_s)
    except OSError as exc:
        if local is not None:
            local.close()
        raise ServiceError(f"could not reach the Dask scheduler at {address}: {exc}") from exc
    try:
        if workers is not None:
            client.wait_for_workers(int(workers), timeout=timeout_s)
        yield Cluster(client=client, local=local)
    finally:
        client.close()
        if local is not None:
            local.close()
