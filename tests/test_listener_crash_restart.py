"""kill -9 of a listener process mid-scan, or with the scan over before it comes back: the restarted
listener gives the uninterrupted run's Approximant and APT volume, with every frame used once and
one Tiled row per angle. Real RunEngine, real 0MQ proxy, real Tiled, real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

HELPER = Path(__file__).parent / "helpers" / "listener_process.py"
SCAN_KW = {"n_angles": 5, "frames_per_angle": 6, "range_deg": 10.0, "seed": 44}
N_FRAMES = 30


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from apt_stream.model import create_model, save_checkpoint

    return save_checkpoint(tmp_path_factory.mktemp("model") / "apt-cpu.safetensors",
                           create_model("cpu"))


class ListenerProcess:
    def __init__(self, tiled, proxy, root, spool, backup, checkpoint):
        env = {**os.environ, "APT_STREAM_TILED_URI": tiled.uri,
               "APT_STREAM_TILED_API_KEY": tiled.api_key, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(HELPER), "--proxy", proxy.out_address, "--data-root", str(root),
             "--spool", str(spool), "--backup", str(backup), "--checkpoint", str(checkpoint)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        line = self.proc.stdout.readline()
        assert line.strip() == "READY", (line, self.proc.stderr.read() if self.proc.poll() else "")

    def finish(self, timeout=120):
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err[-3000:]
        assert "FINISHED" in out, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        return out, err

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def spooled_angles(spool: Path) -> int:
    return sum(p.read_text().count('"angle_done_index"') for p in spool.glob("*.jsonl"))


def tiled_result(tiled_root, run_uid):
    from tiled.queries import Key

    node = tiled_root.search(Key("run_uid") == run_uid).values().first()
    angles = node["angles"].read()
    return node, np.asarray(node["approximant"].read()), np.asarray(node["apt"].read()), angles


def test_kill_9_mid_scan_and_after_the_scan_then_restart_gives_the_same_result(
    tiled_server, tiled_root, tmp_path, checkpoint
):
    from apt_stream.plugins.bluesky import (
        make_publisher,
        make_run_engine,
        replay_scan,
        start_proxy,
        synthetic_scan,
    )

    scan = synthetic_scan(**SCAN_KW)
    RE = make_run_engine()
    root = tmp_path / "data"
    root.mkdir()
    with start_proxy() as proxy:
        publisher = make_publisher(proxy.in_address)

        def publish(rate_hz):
            uid = []
            thread = threading.Thread(target=lambda: uid.append(replay_scan(
                scan, data_root=root, publisher=publisher, run_engine=RE, rate_hz=rate_hz)))
            thread.start()
            return thread, uid

        def listener(name):
            return ListenerProcess(tiled_server, proxy, root, tmp_path / name / "spool",
                                   tmp_path / name / "backup", checkpoint)

        # Uninterrupted reference.
        ref = listener("ref")
        thread, _ = publish(None)
        thread.join(60)
        ref.finish()
        runs = {}
        ref_uid = next(iter(sorted((tmp_path / "ref" / "spool").glob("*.jsonl")))).stem
        runs["reference"] = ref_uid

        # kill -9 after two angles, restart while the scan goes on.
        spool = tmp_path / "mid" / "spool"
        first = listener("mid")
        thread, uid = publish(12.0)
        deadline = time.monotonic() + 60
        while spooled_angles(spool) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        first.kill9()
        assert thread.is_alive(), "the scan ended before the kill: make it slower"
        second = listener("mid")
        thread.join(60)
        second.finish()
        runs["mid-scan"] = uid[0]

        # kill -9 after two angles, restart only after the scan has ended.
        spool = tmp_path / "after" / "spool"
        first = listener("after")
        thread, uid = publish(12.0)
        while spooled_angles(spool) < 2 and time.monotonic() < deadline + 60:
            time.sleep(0.02)
        first.kill9()
        thread.join(60)
        second = listener("after")
        second.finish()
        runs["after-scan"] = uid[0]
        publisher.close()

    _, ref_approx, ref_apt, _ = tiled_result(tiled_root, runs["reference"])
    for case in ("mid-scan", "after-scan"):
        node, approx, apt, angles = tiled_result(tiled_root, runs[case])
        assert node.metadata["status"] == "done", (case, node.metadata["status"])
        assert len(angles) == SCAN_KW["n_angles"], (case, len(angles))
        assert int(np.sum(angles["frames"])) == N_FRAMES, case
        for name, got, want in (("approximant", approx, ref_approx), ("apt", apt, ref_apt)):
            rel = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
            print(f"{case} {name}: max |Δ| / max |ref| = {rel:.2e}")
            assert rel <= 1e-6, (case, name, rel)
