"""Shared session fixtures: one real Tiled server and one Prefect test harness per test session.

Nothing here runs at import: Tiled and Prefect are imported (and their servers started) only when
a test first asks for ``tiled_server`` or ``prefect_harness``, so test files that need neither
stay fast and free of services.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiled_server(tmp_path_factory):
    """An embedded Tiled server on 127.0.0.1 (random port, temporary data folder).

    Yields a :class:`~apt_stream.publish.server.TiledEndpoint` (``uri``, ``api_key``,
    ``data_dir``). Tests share it: give each scan a fresh uid.
    """
    from apt_stream.publish.server import local_tiled_server

    # It may read files anywhere under this session's temporary folders: the detector files
    # raw runs stored by TiledWriter reference (tests/test_tiled_source.py).
    with local_tiled_server(tmp_path_factory.mktemp("tiled"),
                            readable_storage=[tmp_path_factory.getbasetemp()]) as endpoint:
        yield endpoint


@pytest.fixture
def tiled_root(tiled_server):
    """A client on the shared server's root container."""
    from apt_stream.publish.server import connect

    return connect(tiled_server)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """Flows in this session run against a throwaway Prefect server (SQLite, loopback).

    Telemetry is off (``apt_stream.flows.settings.OFFLINE_ENV``) and ``PREFECT_HOME`` is a
    temporary folder, so the user's Prefect profile and database are never touched.
    """
    from apt_stream.flows.settings import OFFLINE_ENV

    patch = pytest.MonkeyPatch()
    for name, value in OFFLINE_ENV.items():
        patch.setenv(name, value)
    home = tmp_path_factory.mktemp("prefect-home")
    patch.setenv("PREFECT_HOME", str(home))
    try:
        import prefect.settings as ps
        from prefect.testing.utilities import prefect_test_harness

        # Prefect may already be imported (and its settings read) by a test module, so the
        # settings go in through the settings context too; the harness passes them to its
        # server subprocess.
        updates = {
            ps.PREFECT_HOME: str(home),
            ps.PREFECT_SERVER_ANALYTICS_ENABLED: False,
            ps.PREFECT_SERVER_UI_ENABLED: False,
            ps.PREFECT_CLIENT_METRICS_ENABLED: False,
        }
        with ps.temporary_settings(updates=updates), prefect_test_harness(
            server_startup_timeout=120
        ):
            yield
    finally:
        patch.undo()


@pytest.fixture(scope="session")
def tiny_demo(prefect_harness, tmp_path_factory):
    """One real ``apt-stream demo --preset tiny`` result (live path end to end, about 30 s).

    Returns ``(workdir, summary)``; the Tiled data folder is ``summary["tiled_data"]``. Tests
    that change the folder work on a copy.
    """
    from apt_stream.demo import live_demo

    work = tmp_path_factory.mktemp("tiny-demo")
    summary = live_demo(work, preset="tiny", seed=1000, rate_hz=None, say=lambda _msg: None)
    return work, summary
