"""The closed loop through a real RunEngine: the plan asks apt-stream (0MQ, loopback) between
angles for its next angle and stops on advice."""

from __future__ import annotations

import pytest

from apt_stream.physics.convergence import ConvergenceOptions
from apt_stream.physics.next_angle import bisection_order
from apt_stream.plugins.bluesky import (
    SimPtychoDetector,
    make_run_engine,
    make_stages,
    ptycho_tomo_plan,
)
from apt_stream.stream import LiveReconstructor, TriggerPolicy
from apt_stream.stream.advice import AdviceBoard, AdviceClient, AdviceServer
from apt_stream.stream.assembler import RunAssembler
from apt_stream.stream.trigger import StopPolicy


@pytest.fixture(scope="module")
def tiny29():
    from apt_stream.config import get_preset
    from apt_stream.sim.acquire import simulate_scan

    return simulate_scan(get_preset("tiny"), seed=11, n_angles=29, range_deg=17.0)


def _engine(header):
    from apt_stream.physics.engine import ScanGeometry, StreamingApproximant

    return StreamingApproximant(ScanGeometry.from_scan(header))


def test_plan_takes_suggested_angles_and_stops_on_advice(tiny29, tmp_path):
    board = AdviceBoard()
    finals = []

    class Sink:
        def run_started(self, header): ...
        def angle_finished(self, run_uid, summary, approximant): ...
        def reconstruction_ready(self, run_uid, volumes, *, final): finals.append(final)
        def run_stopped(self, run_uid, status): ...

    live = LiveReconstructor(
        Sink(), engine_factory=_engine, reconstruct_fn=lambda v, h: {"apt": v},
        policy=TriggerPolicy(n_star=29, theta_star_deg=17.0),
        convergence=ConvergenceOptions(budget_share=None),
        stop_policy=StopPolicy(change_tol=0.05, min_angles=9, act=True),
        on_advice=board.post, suggest=3,
    )
    RE = make_run_engine()
    root = tmp_path / "runs"
    root.mkdir()
    RE.subscribe(RunAssembler(live.submit, data_roots=[root]))
    stops = []
    RE.subscribe(lambda name, doc: stops.append(doc) if name == "stop" else None)
    with AdviceServer(board) as server, live:
        client = AdviceClient(server.address)
        assert client.request({"op": "ping"}) == {"ok": True}
        assert client.request({"op": "nope"})["ok"] is False
        asked = []
        advise = client.advisor(tiny29.angles_deg, wait_s=60)

        def advisor(done, pending):
            answer = advise(done, pending)
            asked.append((list(done), answer))
            return answer

        rot, sx, sy = make_stages()
        det = SimPtychoDetector(root=root)
        RE(ptycho_tomo_plan(det, rot, sx, sy, scan_source=tiny29, advisor=advisor,
                            angle_order=bisection_order(29)))
        assert live.wait_idle(60)
    (stats,) = live.run_stats.values()
    n_stop = stats["stop_advised_at_n"]
    assert 9 <= n_stop < 29 and stats["status"] == "done" and finals[-1] is True
    acquired = asked[-1][0]
    # The plan ended on the advice: no angle acquired after it.
    assert asked[-1][1]["stop"] and len(acquired) == n_stop == stats["angles_finished"]
    assert stops[-1]["exit_status"] == "success"
    # From the first estimate on, each angle acquired was apt-stream's top suggestion.
    followed = [a["next"] for d, a in asked if a["next"] is not None]
    assert len(followed) >= n_stop - 7
    order = [d for d, _ in asked]
    for (_done, answer), nxt in zip(asked[:-1], order[1:], strict=True):
        if answer["next"] is not None:
            assert nxt[-1] == answer["next"]
    planned = bisection_order(29)
    assert acquired[:6] == planned[:6] and acquired != planned[: len(acquired)]


def test_advisor_without_a_server_times_out_and_lets_the_plan_go_on():
    client = AdviceClient("tcp://127.0.0.1:9", timeout_s=0.2)
    advise = client.advisor([0.0, 1.0, 2.0], min_angles=1, wait_s=0.3)
    assert advise([0], [1, 2]) == {"stop": False, "next": None}
    assert AdviceBoard().get() is None
