"""`apt-stream demo --adaptive` end to end on the tiny preset (29 planned angles over ±17°):
the beamline subprocess (`apt-stream replay --advice ADDR --order bisection`, a real RunEngine)
asks the listen flow's advice server between angles and ends the scan on stop advice; the
summary compares the angles it needed and the PCC with the fixed-N* scan."""

from __future__ import annotations

import math


def test_demo_adaptive_stops_early_and_compares_with_fixed_n_star(prefect_harness, tmp_path):
    from apt_stream.demo import live_demo

    said: list[str] = []
    summary = live_demo(tmp_path, preset="tiny", seed=1000, rate_hz=None, n_angles=29,
                        adaptive=True, say=said.append)
    loop = summary["closed_loop"]
    assert summary["status"] == "done"
    assert loop["n_star"] == 29 and loop["fired_early"] is True
    # The beamline acquired exactly the angles up to the advice, fewer than N*.
    assert 9 <= loop["angles_needed"] == loop["stop_advised_at_n"] == summary["angles"] < 29
    assert loop["angles_saved"] == 29 - loop["angles_needed"]
    assert summary["frames"] == 117 * loop["angles_needed"]  # tiny: 117 frames per angle
    assert math.isfinite(loop["pcc_adaptive"]) and math.isfinite(loop["pcc_fixed_n_star"])
    assert loop["pcc_adaptive"] == round(summary["metrics_vs_truth"]["apt"]["pcc"], 4)
    # The stop never cost much quality (docs/closed-loop.md: the advice's error criterion).
    assert loop["pcc_adaptive"] >= loop["pcc_fixed_n_star"] - 0.02
    assert [r["n_angles"] for r in loop["convergence"]][-1] == loop["angles_needed"]
    assert any("angles needed against the fixed N* = 29" in s for s in said)
    log = (tmp_path / "run-001" / "beamline.log").read_text()
    assert "published run" in log
