"""Per-angle work on a Dask cluster (``--workers N`` locally, ``--dask ADDRESS`` to join one)."""

from apt_stream.cluster.connect import Cluster, open_cluster
from apt_stream.cluster.engine import DaskApproximant

__all__ = ["Cluster", "DaskApproximant", "open_cluster"]
