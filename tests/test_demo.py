"""The README's main command, `apt-stream demo`, end to end on the tiny preset.

Real components on loopback: an embedded Tiled server, the session's Prefect server, a 0MQ proxy,
the beamline (`apt-stream replay`, a bluesky RunEngine) in its own process, the shipped network.
"""

from __future__ import annotations

import numpy as np


def test_live_demo_end_to_end_on_tiny(prefect_harness, tmp_path):
    from apt_stream.demo import live_demo

    messages: list[str] = []
    summary = live_demo(tmp_path, preset="tiny", seed=1000, rate_hz=None, say=messages.append)

    assert summary["status"] == "done"
    assert summary["angles"] == 7 and summary["frames"] == 819
    assert [m[:3] for m in messages] == ["1/5", "2/5", "3/5", "4/5", "5/5"]
    # The latency is measured, from the trigger's last frame to the APT volume in Tiled.
    assert summary["latency_s"] is not None and 0 <= summary["latency_s"] < 60
    metrics = summary["metrics_vs_truth"]
    assert set(metrics) == {"approximant", "apt", "fbp", "sirt", "sart"}
    for method in metrics.values():
        assert all(np.isfinite(v) for v in method.values())
    assert summary["tiled_uri"].startswith("http://127.0.0.1:")
    assert any(p.endswith("demo.png") for p in summary["previews"])
    assert (tmp_path / "scan.h5").exists() and (tmp_path / "beamline.log").exists()
    # Nothing secret in what the demo prints.
    assert "api_key=os.environ" in summary["client_snippet"]
