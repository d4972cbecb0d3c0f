"""The README's main command, `apt-stream demo`, end to end on the tiny preset.

Real components on loopback: an embedded Tiled server, the session's Prefect server, a 0MQ proxy,
the beamline (`apt-stream replay`, a bluesky RunEngine) in its own process, the shipped network.
"""

from __future__ import annotations

import numpy as np
import pytest


def test_live_demo_end_to_end_on_tiny(prefect_harness, tmp_path):
    from apt_stream.demo import live_demo

    messages: list[str] = []
    summary = live_demo(tmp_path, preset="tiny", seed=1000, rate_hz=None, say=messages.append)

    assert summary["status"] == "done"
    assert summary["angles"] == 7 and summary["frames"] == 819
    assert [m[:3] for m in messages if m[:1].isdigit()] == ["1/5", "2/5", "3/5", "4/5", "5/5"]
    # The latency is measured, from the trigger's last frame to the APT volume in Tiled.
    assert summary["latency_s"] is not None and 0 <= summary["latency_s"] < 60
    metrics = summary["metrics_vs_truth"]
    assert set(metrics) == {"approximant", "apt", "fbp", "sirt", "sart"}
    for method in metrics.values():
        assert all(np.isfinite(v) for v in method.values())
    assert summary["tiled_uri"].startswith("http://127.0.0.1:")
    assert any(p.endswith("demo.png") for p in summary["previews"])
    # The preview (and the summary) say so when a baseline beats APT on PCC, and only then.
    beaten = [m for m in ("approximant", "fbp", "sirt", "sart")
              if metrics[m]["pcc"] > metrics["apt"]["pcc"]]
    assert (summary["preview_note"] is not None) == bool(beaten)
    for m in beaten:
        assert m.upper() in summary["preview_note"].upper()
    # One folder per demo run: this run's files and previews only; Tiled's store is shared.
    run_dir = tmp_path / "run-001"
    assert summary["run_dir"] == str(run_dir)
    assert (run_dir / "scan.h5").exists() and (run_dir / "beamline.log").exists()
    assert all(p.startswith(str(run_dir / "previews")) for p in summary["previews"])
    assert summary["tiled_data"] == str(tmp_path / "tiled")
    # Metadata as docs/querying.md defines it, after the demo added its baselines.
    from apt_stream.publish.server import connect, local_tiled_server

    with local_tiled_server(summary["tiled_data"]) as endpoint:
        md = dict(connect(endpoint)[summary["run_uid"]].metadata)
    assert {"apt", "baselines/sart"} <= set(md["volumes"])
    # Timings are seconds since the run started (not durations, and not since the demo's
    # publisher reopened the scan for its baselines): the last angle finished after every
    # angle's compute, which one worker ran in turn.
    timings = md["timings"]
    assert timings["final_reconstruction_s"] >= timings["last_angle_s"]
    with local_tiled_server(summary["tiled_data"]) as endpoint:
        angle_seconds = connect(endpoint)[summary["run_uid"]]["angles"].read()["seconds"].sum()
    assert timings["last_angle_s"] >= 0.9 * angle_seconds > 0

    # Prefect: the overhead figure and what it is made of.
    assert summary["prefect_overhead_s"] == pytest.approx(
        sum(summary["prefect_overhead_breakdown_s"].values()), abs=2e-3)
    assert summary["prefect_overhead_pct"] == pytest.approx(
        100 * summary["prefect_overhead_s"] / summary["prefect_compute_s"], rel=0.02)
    assert any(m.startswith("   Prefect overhead:") for m in messages)
    # Nothing secret in what the demo prints.
    assert "api_key=os.environ" in summary["client_snippet"]


def test_demo_refuses_the_paper_preset_without_a_gpu(tmp_path):
    import torch

    from apt_stream.demo import live_demo
    from apt_stream.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the paper preset runs")
    messages: list[str] = []
    with pytest.raises(ConfigError, match="needs a GPU.*--preset demo"):
        live_demo(tmp_path, preset="paper", say=messages.append)
    assert messages == [] and not list(tmp_path.iterdir())  # refused before any work


def test_each_demo_run_gets_its_own_folder(tmp_path):
    from apt_stream.demo import next_run_dir

    first = next_run_dir(tmp_path)
    (first / "previews").mkdir()
    second = next_run_dir(tmp_path)
    assert (first.name, second.name) == ("run-001", "run-002")
    assert not (second / "previews").exists()
    (tmp_path / "run-007").mkdir()
    assert next_run_dir(tmp_path).name == "run-008"
