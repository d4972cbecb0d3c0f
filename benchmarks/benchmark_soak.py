"""Soak: the live path, back-to-back runs for minutes — lost frames, throughput, memory, backlog.

One process holds the whole live path on loopback, as ``apt-stream listen`` does minus Prefect and
Tiled: a bluesky RunEngine runs the ptycho-tomo plan over the simulated devices (the same
:func:`~apt_stream.plugins.bluesky.replay_scan` the beamline's ``apt-stream replay`` uses) and
publishes through bluesky's zmq ``Publisher`` into a :class:`ZmqProxy`; an
:class:`~apt_stream.stream.Listener` (source, recovery, spool, assembler) feeds a
:class:`~apt_stream.stream.LiveReconstructor` with the physics engine's streaming Approximant and
the shipped network (``model="cheap"``: an identity instead of the network). Runs of one small
seeded scan (``tiny`` preset: 7 angles, 819 frames) start one after the other until the time is
up (the last one is finished, then the backlog drains), at ``rate_hz`` frames/s or as fast as the
RunEngine goes. Each finished run's frame folder and spool file are deleted, so disk use stays flat.

Reported: runs completed (and their statuses), frames the beamline sent vs frames the engine used
(``frames_lost`` must be 0), throughput, the process's RSS sampled every ``sample_every_s`` and its
least-squares slope after the warm-up (the first ``warmup_fraction`` of the soak), the backlog
(``max_backlog_frames`` and its slope: a sustainable rate keeps it flat), and the listener's and
reconstructor's error counters.

``find_rate=True`` looks for the highest sustainable rate instead: a short trial at full speed
(if the backlog stays flat there, the beamline itself is the limit), else a bisection between
half the pipeline's capacity and the full-speed rate, each trial judged by its backlog slope.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from apt_stream.errors import ConfigError, ServiceError

#: Default soak length: about a minute and a half on 2 shared cores, setup and drain included.
DEFAULT_MINUTES = 1.0
#: A trial is sustainable when its backlog grows by less than this share of the offered rate.
BACKLOG_GROWTH_TOLERANCE = 0.05


def parse_rate(rate: str | float | None) -> float | None:
    """``"max"``, ``0`` or None: as fast as possible (None); else frames/s > 0."""
    if rate is None or (isinstance(rate, str) and rate.strip().lower() in ("max", "")):
        return None
    try:
        value = float(rate)
    except ValueError:
        raise ConfigError(f"rate must be frames/s, 0 or 'max', got {rate!r}") from None
    if value < 0 or not np.isfinite(value):
        raise ConfigError(f"rate must be >= 0 frames/s, got {rate!r}")
    return value or None


def rss_mb() -> float:
    """Resident set size of this process now, in MB (``/proc/self/statm``; else the peak)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # kB on Linux


def open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def slope_per_min(t_s: np.ndarray, y: np.ndarray) -> float | None:
    """Least-squares slope of ``y`` against time, per minute (None with fewer than 3 points)."""
    if len(t_s) < 3 or np.ptp(t_s) <= 0:
        return None
    return float(np.polyfit(np.asarray(t_s) / 60.0, np.asarray(y, dtype=float), 1)[0])


class _SoakSink:
    """A reconstruction sink that counts and cleans up: a finished run's frame folder and spool
    file are deleted, so the soak's disk use does not grow."""

    def __init__(self, spool_dir: Path) -> None:
        self.spool_dir = spool_dir
        self.statuses: Counter = Counter()
        self.reconstructions = 0
        self.cleanup_errors = 0
        self._run_dirs: dict[str, str] = {}
        self._stopped: set[str] = set()
        self._cond = threading.Condition()

    def run_started(self, header) -> None:
        self._run_dirs[header.run_uid] = header.run_dir

    def angle_finished(self, run_uid, summary, approximant) -> None:
        pass

    def reconstruction_ready(self, run_uid, volumes, *, final) -> None:
        self.reconstructions += 1

    def run_stopped(self, run_uid, status) -> None:
        from apt_stream.stream.spool import spool_path

        run_dir = self._run_dirs.pop(run_uid, "")
        try:
            if run_dir:
                shutil.rmtree(run_dir)
            spool_path(self.spool_dir, run_uid).unlink(missing_ok=True)
        except OSError:
            self.cleanup_errors += 1
        with self._cond:
            self.statuses[status] += 1
            self._stopped.add(run_uid)
            self._cond.notify_all()

    def wait_stopped(self, uids: list[str], timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._stopped.issuperset(uids), timeout_s)


class _FrameCounter:
    """A RunEngine callback: frames (``primary`` events) the beamline published."""

    def __init__(self) -> None:
        self.sent = 0
        self._primary: set[str] = set()

    def __call__(self, name: str, doc: dict) -> None:
        if name == "descriptor" and doc.get("name") == "primary":
            self._primary.add(doc["uid"])
        elif name == "event" and doc.get("descriptor") in self._primary:
            self.sent += 1
        elif name == "stop":
            self._primary.clear()


class _Rig:
    """Proxy, publisher, RunEngine, listener and live reconstructor, up until :meth:`close`."""

    def __init__(self, work: Path, *, preset: str, seed: int, model: str,
                 sample_every_s: float) -> None:
        from apt_stream.config import get_preset
        from apt_stream.flows.wiring import engine_factory, model_reconstructor
        from apt_stream.plugins.bluesky import (
            make_publisher,
            make_run_engine,
            start_proxy,
            wait_for_link,
        )
        from apt_stream.sim.acquire import simulate_scan
        from apt_stream.stream import Listener, LiveReconstructor, TriggerPolicy

        if model not in ("shipped", "cheap"):
            raise ConfigError(f"model must be 'shipped' or 'cheap', got {model!r}")
        self.preset = get_preset(preset)
        self.scan = simulate_scan(self.preset, seed=seed)
        self.data_root, spool = work / "runs", work / "spool"
        self.data_root.mkdir(parents=True, exist_ok=True)
        if model == "shipped":
            reconstruct_fn, info = model_reconstructor(None)
            self.model = {"reconstruct": "shipped APT network", **info}
        else:
            reconstruct_fn = _identity
            self.model = {"reconstruct": "cheap (identity on the Approximant; no network)"}
        dc = self.model.get("data_consistency_sweeps", 0) > 0
        self._stack = ExitStack()
        try:
            proxy = start_proxy()
            self._stack.callback(proxy.stop)
            self.publisher = make_publisher(proxy.in_address)
            self._stack.callback(self.publisher.close)
            self.sink = _SoakSink(spool)
            self.live = LiveReconstructor(
                self.sink, engine_factory=engine_factory(data_consistency=dc),
                reconstruct_fn=reconstruct_fn,
                policy=TriggerPolicy(n_star=self.preset.scan.n_angles,
                                     theta_star_deg=self.preset.scan.angle_range_deg),
            )
            self._stack.callback(self.live.close)
            self.listener = Listener(proxy.out_address, emit=self.live.submit,
                                     data_roots=[self.data_root], spool_dir=spool).start()
            self._stack.callback(self.listener.stop)
            wait_for_link(self.publisher, self.listener.source.probe_seen)
            self.run_engine = make_run_engine()
            self.counter = _FrameCounter()
            self.samples: list[tuple[float, float, int, int, int]] = []
            self.t0 = time.perf_counter()
            self._stop_sampling = threading.Event()
            sampler = threading.Thread(target=self._sample, args=(sample_every_s,),
                                       name="apt-soak-sampler", daemon=True)
            sampler.start()
            self._stack.callback(sampler.join, 5)
            self._stack.callback(self._stop_sampling.set)
        except BaseException:
            self._stack.close()
            raise

    def close(self) -> None:
        self._stack.close()

    def _sample(self, every_s: float) -> None:
        while True:
            m = self.live.metrics()
            self.samples.append((time.perf_counter() - self.t0, rss_mb(), m["queued_frames"],
                                 self.counter.sent, m["frames_processed"]))
            if self._stop_sampling.wait(every_s):
                return

    def soak(self, seconds: float, rate_hz: float | None, *, min_runs: int = 1,
             drain_timeout_s: float = 60) -> dict:
        """Start runs back to back for ``seconds`` and at least ``min_runs`` runs (the last one
        finishes), drain, report.

        A run whose stop never reaches the reconstructor (a broken stream) is waited for at most
        ``drain_timeout_s`` after the acquisitions end; ``drained`` is then False.
        """
        from apt_stream.plugins.bluesky import replay_scan

        m0, sent0, stats0 = self.live.metrics(), self.counter.sent, self.listener.stats()
        statuses0 = Counter(self.sink.statuses)
        t_start = time.perf_counter()
        uids: list[str] = []
        while len(uids) < min_runs or time.perf_counter() - t_start < seconds:
            uids.append(replay_scan(self.scan, data_root=self.data_root, publisher=self.publisher,
                                    run_engine=self.run_engine, rate_hz=rate_hz,
                                    subscribers=[self.counter]))
        acquisition_s = time.perf_counter() - t_start
        backlog_at_end = self.live.metrics()["queued_frames"]
        drained = self.sink.wait_stopped(uids, drain_timeout_s) and self.live.wait_idle(
            drain_timeout_s)
        wall_s = time.perf_counter() - t_start
        m, stats = self.live.metrics(), self.listener.stats()
        sent, used = self.counter.sent - sent0, m["frames_processed"] - m0["frames_processed"]
        busy_s = m["worker_busy_s"] - m0["worker_busy_s"]
        t_lo, t_hi = t_start - self.t0, t_start - self.t0 + acquisition_s
        during = [s for s in self.samples if t_lo <= s[0] <= t_hi]
        backlog_slope = slope_per_min(np.array([s[0] for s in during]),
                                      np.array([s[2] for s in during]))
        return {
            "rate_hz": rate_hz,
            "runs_completed": sum((self.sink.statuses - statuses0).values()),
            "runs_started": len(uids),
            "run_statuses": dict(self.sink.statuses - statuses0),
            "drained": bool(drained),
            "frames_sent": sent,
            "frames_used": used,
            "frames_lost": sent - used,
            "acquisition_s": round(acquisition_s, 2),
            "wall_s": round(wall_s, 2),
            "offered_fps": round(sent / acquisition_s, 1) if acquisition_s else None,
            "throughput_fps": round(used / wall_s, 1) if wall_s else None,
            "pipeline_capacity_fps": round(used / busy_s, 1) if busy_s else None,
            "backlog_at_acquisition_end_frames": backlog_at_end,
            "backlog_slope_frames_per_min": None if backlog_slope is None else round(backlog_slope, 1),
            "listener_dropped": stats["dropped"] - stats0["dropped"],
            "frames_dropped_by_assembler": (stats["assembler"]["frames_dropped"]
                                            - stats0["assembler"]["frames_dropped"]),
        }


def _identity(volume: np.ndarray, header: Any) -> dict[str, np.ndarray]:
    return {"apt": volume}


def _sustainable(trial: dict) -> bool:
    """The backlog stayed flat: it grew by less than a small share of the offered rate."""
    if not trial["drained"] or trial["frames_lost"]:
        return False
    slope, offered = trial["backlog_slope_frames_per_min"], trial["offered_fps"] or 0.0
    return slope is None or slope / 60.0 < BACKLOG_GROWTH_TOLERANCE * offered


def search_rate(soak, trial_s: float, steps: int) -> dict:
    """Highest sustainable rate, with ``soak(seconds, rate_hz) -> trial`` (:meth:`_Rig.soak`).

    A trial at full speed first: if its backlog stays flat, the beamline (the RunEngine) is the
    limit and its rate is the answer. Else ``steps`` bisections between half the smaller of the
    pipeline's capacity and the full-speed rate, and the full-speed rate.
    """
    full = soak(trial_s, None)
    trials = [{**full, "sustainable": _sustainable(full)}]
    if trials[0]["sustainable"]:
        return {"highest_sustainable_fps": full["offered_fps"], "limited_by": "beamline (RunEngine)",
                "unsustainable_at_fps": None, "trials": trials}
    hi = full["offered_fps"]
    lo = 0.5 * min(full["pipeline_capacity_fps"] or hi, hi)
    best = None
    for _ in range(steps):
        rate = round(0.5 * (lo + hi), 1)
        trial = soak(trial_s, rate)
        trial["sustainable"] = _sustainable(trial)
        trials.append(trial)
        if trial["sustainable"]:
            lo = best = rate
        else:
            hi = rate
    return {"highest_sustainable_fps": best, "limited_by": "pipeline", "unsustainable_at_fps": hi,
            "trials": trials}


def _downsample(samples: list, n: int = 60) -> list[list[float]]:
    step = max(1, len(samples) // n)
    picked = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
    return [[round(s[0], 1), round(s[1], 1)] for s in picked]


def run_all(
    *,
    minutes: float = DEFAULT_MINUTES,
    rate: str | float | None = None,
    seconds: float | None = None,
    preset: str = "tiny",
    seed: int = 1000,
    model: str = "shipped",
    sample_every_s: float = 2.0,
    warmup_fraction: float = 0.25,
    min_runs: int = 2,
    find_rate: bool = False,
    trial_s: float | None = None,
    find_steps: int = 3,
) -> dict:
    """Soak the live path for ``minutes`` (or ``seconds``; at least ``min_runs`` runs) at
    ``rate`` frames/s (None, 0 or ``"max"``: full speed); with ``find_rate`` search the highest
    sustainable rate instead (trials of ``trial_s`` seconds, default a share of the duration and
    at least 15 s; the top-level run figures are then the full-speed trial's).

    Returns one JSON-ready dict (see the module docstring for the fields).
    """
    duration_s = float(seconds) if seconds is not None else 60.0 * float(minutes)
    if not duration_s > 0:
        raise ConfigError(f"the soak needs a positive duration, got {duration_s!r} s")
    if not 0 <= warmup_fraction < 1:
        raise ConfigError(f"warmup_fraction must be in [0, 1), got {warmup_fraction!r}")
    rate_hz = parse_rate(rate)
    t_setup = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="apt-bench-soak-") as tmp:
        rig = _Rig(Path(tmp), preset=preset, seed=seed, model=model,
                   sample_every_s=sample_every_s)
        try:
            setup_s = time.perf_counter() - t_setup
            rss_start, fds_start = rss_mb(), open_fds()
            if find_rate:
                trial = trial_s or max(15.0, duration_s / (1 + find_steps))
                found = search_rate(lambda s, r: rig.soak(s, r, min_runs=min_runs), trial,
                                    find_steps)
                result = found["trials"][0]
            else:
                found = None
                result = rig.soak(duration_s, rate_hz, min_runs=min_runs)
            rss_end, fds_end = rss_mb(), open_fds()
            listener_stats = rig.listener.stats()
            live_metrics = rig.live.metrics()
        finally:
            rig.close()
        leftovers = sum(1 for _ in (Path(tmp) / "runs").iterdir())
    if rig.listener.error is not None:
        raise ServiceError(f"the listener stopped during the soak: {rig.listener.error!r}")
    samples = list(rig.samples)
    # Sample times count from the end of the setup (the first run's start).
    t_end = samples[-1][0] if samples else 0.0
    warm = [s for s in samples if s[0] >= warmup_fraction * t_end]
    slope = slope_per_min(np.array([s[0] for s in warm]), np.array([s[1] for s in warm]))
    rss_values = [s[1] for s in samples] + [rss_start, rss_end]
    out = {
        "benchmark": "soak",
        "mode": "find-rate" if find_rate else "soak",
        "preset": preset,
        "frames_per_run": int(rig.scan.n_frames),
        "angles_per_run": int(rig.scan.n_angles),
        "model": rig.model,
        "engine": "physics StreamingApproximant (real)",
        "path": "RunEngine -> bluesky zmq Publisher -> ZmqProxy -> Listener -> LiveReconstructor "
                "(one process, loopback)",
        "requested_s": duration_s,
        "setup_s": round(setup_s, 2),
        **{k: v for k, v in result.items() if k != "sustainable"},
        "rss_mb": {
            "start": round(rss_start, 1),
            "end": round(rss_end, 1),
            "peak": round(max(rss_values), 1),
            "slope_after_warmup_mb_per_min": None if slope is None else round(slope, 2),
            "warmup_fraction": warmup_fraction,
            "samples_after_warmup": len(warm),
            "sample_every_s": sample_every_s,
            "over_time_s_mb": _downsample(samples),
        },
        "open_fds": {"start": fds_start, "end": fds_end},
        "max_backlog_frames": live_metrics["max_backlog_frames"],
        "max_queued_frames_bound": rig.live.max_queued_frames,
        "listener_wait_s": round(live_metrics["listener_wait_s"], 2),
        "errors": {
            "listener_received": listener_stats["received"],
            "listener_dropped": listener_stats["dropped"],
            "listener_last_error": listener_stats["last_error"],
            "pipeline": {k: v for k, v in listener_stats["pipeline"].items() if k != "delivered"},
            "assembler_frames_dropped": listener_stats["assembler"]["frames_dropped"],
            "orphans": listener_stats["orphans"],
            "sink_errors": live_metrics["sink_errors"],
            "worker_errors": live_metrics["worker_errors"],
            "cleanup_errors": rig.sink.cleanup_errors,
        },
        "run_folders_left": leftovers,
    }
    if found is not None:
        out["find_rate"] = found
    return out


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_all(), indent=2))
