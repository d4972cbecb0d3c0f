"""The live flow's previews show the state at their angle count, not the final volume: each
interim preview has its own file, labelled with its angle count, and draws the Approximant and
APT of that moment (reconstruct_scan on the Prefect test harness, the flow tests' stand-in
engine, an offline publisher)."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from apt_stream import figures


def test_live_previews_show_their_angle_count_not_the_final_volume(prefect_harness, tmp_path,
                                                                    monkeypatch):
    """Interim previews (every 2 angles) render the Approximant and APT of that moment, each in
    its own file labelled with its angle count; the final one shows all 5 angles."""
    from test_flows_reconstruct import (  # the flow tests' stand-in engine and run
        ANGLES,
        PATTERN,
        MeanEngine,
        double,
        header_for,
        submit_run,
    )

    from apt_stream.flows.artifacts import artifact_key
    from apt_stream.flows.reconstruct import reconstruct_scan
    from apt_stream.flows.relay import LiveBridge
    from apt_stream.flows.tasks import LIVE_TASKS
    from apt_stream.publish import TiledPublisher
    from apt_stream.stream import LiveReconstructor, TriggerPolicy

    seen: list[tuple[Path, dict, str]] = []
    original = figures.preview_png

    def recording(volumes, path, **options):
        seen.append((Path(path), {k: np.array(v) for k, v in volumes.items()}, options["title"]))
        return original(volumes, path, **options)

    monkeypatch.setattr(figures, "preview_png", recording)
    run_uid = f"figs-{uuid.uuid4()}"
    publisher = TiledPublisher(None, backup_dir=tmp_path / "backup")
    bridge = LiveBridge(publisher, engine_factory=MeanEngine, reconstruct_fn=double, tasks=LIVE_TASKS)
    live = LiveReconstructor(bridge, engine_factory=bridge.engine_factory,
                             reconstruct_fn=bridge.reconstruct_fn,
                             policy=TriggerPolicy(n_star=3, theta_star_deg=10.0, preview_every=2))
    assert header_for(run_uid).voxel_size_m == pytest.approx(header_for(run_uid).object_pixel_m)
    submit_run(live, run_uid)
    channel = bridge.next_run(timeout_s=20)
    state = reconstruct_scan(channel, run_uid, n_star=3, theta_star_deg=10.0,
                             preview_dir=str(tmp_path / "previews"),
                             truth_fn=lambda header: PATTERN, return_state=True)
    live.close()
    assert state.is_completed(), state.message
    key = artifact_key(run_uid)
    by_name = {path.name: (volumes, title) for path, volumes, title in seen}
    # Previews at 2 and 4 angles and the trigger at 5 (coverage of ±10°). The final at the stop
    # holds the same volumes as the trigger's, so it is that PNG again, not a second render.
    assert set(by_name) == {f"{key}-live-002angles-0.png", f"{key}-live-004angles-0.png",
                            f"{key}-live-005angles-0.png"}
    for path, _, _ in seen:
        assert path.stat().st_size > 0
    previews = tmp_path / "previews"
    assert (previews / f"{key}-final-0.png").read_bytes() == (
        previews / f"{key}-live-005angles-0.png").read_bytes()
    mean = {n: np.mean(1.0 + np.arange(n)) for n in (2, 4, 5)}  # MeanEngine's volume scale
    live2, title2 = by_name[f"{key}-live-002angles-0.png"]
    final, title_final = by_name[f"{key}-live-005angles-0.png"]
    np.testing.assert_allclose(live2["approximant"], PATTERN * mean[2], rtol=1e-6)
    np.testing.assert_allclose(live2["apt"], 2 * PATTERN * mean[2], rtol=1e-6)
    np.testing.assert_allclose(final["approximant"], PATTERN * mean[len(ANGLES)], rtol=1e-6)
    assert not np.allclose(live2["apt"], final["apt"])
    assert "2 of N* = 3 angles" in title2 and "live" in title2
    assert "5 of N* = 3 angles" in title_final
    # The pictures differ too (not only their titles): compare the xy sections' pixels.
    import matplotlib.image as mpimg

    a = mpimg.imread(tmp_path / "previews" / f"{key}-live-002angles-0.png")
    b = mpimg.imread(tmp_path / "previews" / f"{key}-final-0.png")
    assert a.shape == b.shape
    h, w = a.shape[:2]
    assert not np.array_equal(a[h // 4: 3 * h // 4, : w // 3], b[h // 4: 3 * h // 4, : w // 3])
