"""Stop advice live: LiveReconstructor + the real physics engine + TiledPublisher on 127.0.0.1."""

from __future__ import annotations

import numpy as np
import pytest
from test_stream_live import messages_for

from apt_stream.errors import ConfigError
from apt_stream.physics.convergence import ConvergenceOptions
from apt_stream.physics.next_angle import bisection_order
from apt_stream.stream import LiveReconstructor, TriggerPolicy
from apt_stream.stream.trigger import StopPolicy


@pytest.fixture(scope="module")
def tiny29():
    from apt_stream.config import get_preset
    from apt_stream.sim.acquire import simulate_scan

    return simulate_scan(get_preset("tiny"), seed=11, n_angles=29, range_deg=17.0)


def _engine(header):
    from apt_stream.physics.engine import ScanGeometry, StreamingApproximant

    return StreamingApproximant(ScanGeometry.from_scan(header))


def _mean_reconstruct(volume, header):
    return {"apt": np.asarray(volume, np.float32)}


def test_stop_advice_fires_the_final_reconstruction_early_and_lands_in_tiled(tiny29, tiled_root,
                                                                           tmp_path):
    from apt_stream.publish import TiledPublisher

    publisher = TiledPublisher(tiled_root, backup_dir=tmp_path, approximant_every_s=0.0)
    advice = []
    live = LiveReconstructor(
        publisher, engine_factory=_engine, reconstruct_fn=_mean_reconstruct,
        policy=TriggerPolicy(n_star=29, theta_star_deg=17.0),
        convergence=ConvergenceOptions(budget_share=None),
        stop_policy=StopPolicy(change_tol=0.05, patience=2, min_angles=9, act=True),
        on_advice=lambda uid, a: advice.append(a), suggest=2,
    )
    uid = "closed-loop-live-1"
    order = bisection_order(29)
    with live:
        for m in messages_for(tiny29, uid, order, batch=64):
            live.submit(m)
        assert live.wait_idle(120)
    stats = live.run_stats[uid]
    assert stats["status"] == "done"
    n_stop = stats["stop_advised_at_n"]
    assert 9 <= n_stop < 29 and stats["fired_early"] and stats["fired_at_n"] == n_stop
    # One estimate per finished angle from min_angles (6) on; each offered 2 next angles.
    assert [a["n_angles"] for a in advice] == list(range(6, 30))
    assert all(len(a["next_angles"]) == min(2, 29 - a["n_angles"]) for a in advice)
    first_stop = next(a for a in advice if a["stop"])
    assert first_stop["n_angles"] == n_stop and "moved <" in first_stop["reason"]
    node = tiled_root[uid]
    table = node["convergence"].read()
    assert list(table["n_angles"]) == list(range(6, 30))
    assert np.isfinite(table["frc_half"]).all() and table["frc_half"].iloc[-1] > 0.5
    md = node.metadata
    assert md["stop_advice"]["n_angles"] == n_stop and md["convergence"]["n_angles"] == 29
    assert md["status"] == "done" and md["final"] is True
    assert stats["convergence_s"] > 0 and len(stats["convergence"]) == 24


def test_without_the_options_nothing_changes(tiny29):
    calls = []

    class Sink:
        def run_started(self, header): ...
        def angle_finished(self, run_uid, summary, approximant): ...
        def reconstruction_ready(self, run_uid, volumes, *, final): calls.append(final)
        def run_stopped(self, run_uid, status): ...
        def convergence_ready(self, run_uid, row, advice=None): calls.append("convergence")

    with LiveReconstructor(Sink(), engine_factory=_engine, reconstruct_fn=_mean_reconstruct,
                           policy=TriggerPolicy(n_star=29, theta_star_deg=17.0)) as live:
        for m in messages_for(tiny29, "plain", list(range(29)), batch=64):
            live.submit(m)
        assert live.wait_idle(120)
    assert calls == [False, True] and "stop_advised_at_n" not in live.run_stats["plain"]


def test_stop_rule_needs_coverage_calm_and_agreement():
    trig = TriggerPolicy(n_star=29, theta_star_deg=17.0, tol_deg=0.5)
    state = StopPolicy(change_tol=0.05, patience=2, min_angles=3).new_run(trig)
    calm = {"change": 0.01, "frc_half": 0.9}
    assert state.update(calm, [-17, 0, 5]) is None  # no coverage yet (and patience 1 of 2)
    assert state.update(calm, [-17, 0, 5]) is None  # calm twice, still no coverage
    assert state.update({"change": 0.2, "frc_half": 0.9}, [-17, 0, 17]) is None  # moved
    assert state.update(calm, [-17, 0, 17]) is None  # calm once
    assert state.update({"change": 0.01, "frc_half": 0.1}, [-17, 0, 17]) is None  # disagree
    got = state.update(calm, [-17, 0, 17, 3])
    assert got["stop"] and got["n_angles"] == 4 and state.advised_at_n == 4
    assert state.update(calm, [-17, 0, 17, 3, 4]) is None  # once per run
    for bad in ({"change_tol": 0}, {"patience": 0}, {"min_angles": 1}, {"min_frc": 2}):
        with pytest.raises(ConfigError):
            StopPolicy(**bad)
