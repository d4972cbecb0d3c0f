"""The closed loop through the ``listen`` flow (opt-in): a real RunEngine runs the plan with an
advisor that asks the listen flow's advice server (0MQ, loopback) between angles; the listener
runs the convergence estimate, stop advice (act) and next-angle suggestions; the convergence
goes to Tiled (a table) and to Prefect (a markdown artifact, via the LiveBridge)."""

from __future__ import annotations

import threading

import numpy as np
import pytest


@pytest.fixture(scope="module")
def tiny29():
    from apt_stream.config import get_preset
    from apt_stream.sim.acquire import simulate_scan

    return simulate_scan(get_preset("tiny"), seed=11, n_angles=29, range_deg=17.0)


def test_listen_closed_loop_stops_early_and_publishes_convergence(
        prefect_harness, tiled_server, tiled_root, tmp_path, tiny29, monkeypatch):
    from tiled.queries import Key

    from apt_stream.flows.artifacts import artifact_key
    from apt_stream.flows.listen import ListenConfig, LiveResources, listen
    from apt_stream.physics.next_angle import bisection_order
    from apt_stream.plugins.bluesky import replay_scan, start_proxy

    monkeypatch.setenv("APT_STREAM_TILED_URI", tiled_server.uri)
    monkeypatch.setenv("APT_STREAM_TILED_API_KEY", tiled_server.api_key)
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    published: list[str] = []
    stops: list[dict] = []
    addresses: list[str] = []

    with start_proxy() as proxy:
        def publish_scan(listener) -> None:
            def run() -> None:
                published.append(replay_scan(
                    tiny29, zmq_address=proxy.in_address, data_root=runs_dir,
                    angle_order=bisection_order(29), advisor=addresses[0],
                    subscribers=[lambda name, doc: stops.append(doc) if name == "stop" else None]))
            threading.Thread(target=run, daemon=True).start()

        config = ListenConfig(
            proxy_address=proxy.out_address, data_roots=[str(runs_dir)],
            spool_dir=str(tmp_path / "spool"), backup_dir=str(tmp_path / "backup"),
            preview_dir=str(tmp_path / "previews"), n_star=29, theta_star_deg=17.0,
            max_runs=1, max_duration_s=240, live_every=1,
            convergence=True, stop_advice=True, stop_act=True, suggest=3,
            advice_address="tcp://127.0.0.1:0",
        )
        result = listen(config, LiveResources(on_ready=publish_scan,
                                              on_advice_server=addresses.append))

    assert result["advice_address"] == addresses[0]
    (run_uid,) = published
    (summary,) = result["scans"]
    stats = result["runs"][run_uid]
    n_stop = stats["stop_advised_at_n"]
    # The plan ended on the advice (exit status success) before the planned 29 angles, and the
    # final reconstruction came from the angles that were in.
    assert 9 <= n_stop < 29 and stats["fired_early"] is True
    assert stops[-1]["exit_status"] == "success"
    assert summary["status"] == "done", summary
    assert summary["angles"] == stats["angles_finished"] < 29
    assert summary["stop_advised_at_n"] == n_stop
    assert summary["convergence_estimates"] == len(stats["convergence"]) >= 3

    node = tiled_root.search(Key("run_uid") == run_uid).values().first()
    table = node["convergence"].read()
    assert list(table["n_angles"]) == [r["n_angles"] for r in stats["convergence"]]
    assert np.all(np.isfinite(table["frc_half"]))
    assert node.metadata["stop_advice"]["n_angles"] == n_stop
    assert node.metadata["angles_used"] == stats["angles_finished"]

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    key = f"{artifact_key(run_uid)}-convergence"
    with get_client(sync_client=True) as client:
        (art,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            sort=ArtifactSort.CREATED_DESC, limit=1)
    assert art.type == "markdown"
    assert f"Stop advised at {n_stop} angles" in art.data
    # one table row per estimate, by angle count
    rows = [line for line in art.data.splitlines() if line.startswith("| ") and "---" not in line]
    assert [int(r.split("|")[1]) for r in rows[1:]] == [r["n_angles"] for r in stats["convergence"]]
    # ... and as a plot beside it (an image artifact: a PNG data URL)
    with get_client(sync_client=True) as client:
        (plot,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"{key}-plot"])),
            sort=ArtifactSort.CREATED_DESC, limit=1)
    assert plot.type == "image" and plot.data.startswith("data:image/png;base64,")


def test_the_stop_rule_is_tunable_from_the_config_and_the_command_line(tmp_path):
    import contextlib

    from typer.testing import CliRunner

    from apt_stream.cli import app
    from apt_stream.flows.listen import ListenConfig, _closed_loop
    from apt_stream.stream.trigger import StopPolicy

    base = {"proxy_address": "tcp://127.0.0.1:1", "data_roots": [str(tmp_path)]}
    with contextlib.ExitStack() as stack:
        keywords, _ = _closed_loop(ListenConfig(**base, stop_advice=True, stop_patience=3,
                                                stop_change_tol=0.015), stack)
        policy = keywords["stop_policy"]
        assert (policy.patience, policy.change_tol, policy.act) == (3, 0.015, False)
        defaults, _ = _closed_loop(ListenConfig(**base, stop_act=True), stack)
        assert defaults["stop_policy"] == StopPolicy(act=True)
    runner = CliRunner()
    lone = runner.invoke(app, ["listen", "--zmq", "tcp://127.0.0.1:1", "--data-root",
                               str(tmp_path), "--stop-patience", "3"])
    assert lone.exit_code == 2 and "--stop-advice" in lone.output
    demo = runner.invoke(app, ["demo", "--stop-patience", "3", "--workdir", str(tmp_path)])
    assert demo.exit_code == 2 and "--adaptive" in demo.output
