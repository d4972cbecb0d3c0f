"""``apt-stream bench soak``: a short soak over the real live path, and the rate search's logic."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from apt_stream.benchmarks.benchmark_soak import parse_rate, search_rate, slope_per_min
from apt_stream.cli import app
from apt_stream.errors import ConfigError


def test_a_short_soak_loses_no_frames_and_reports_every_field():
    # A few seconds and at least 2 runs (each ~8 s of RunEngine time): about 25 s in all.
    result = CliRunner().invoke(app, ["bench", "soak", "--minutes", "0.05", "--min-runs", "2",
                                      "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["benchmark"] == "soak" and report["model"]["reconstruct"] == "shipped APT network"
    assert report["runs_completed"] >= 2 and report["run_statuses"] == {"done": report["runs_completed"]}
    assert report["drained"] and report["frames_sent"] == report["runs_completed"] * 819
    assert report["frames_lost"] == 0 and report["frames_used"] == report["frames_sent"]
    assert report["throughput_fps"] > 0 and report["max_backlog_frames"] >= 1
    rss = report["rss_mb"]
    assert rss["start"] > 0 and rss["end"] > 0 and len(rss["over_time_s_mb"]) >= 3
    assert rss["slope_after_warmup_mb_per_min"] is not None
    errors = report["errors"]
    assert errors["listener_dropped"] == 0 and errors["worker_errors"] == 0
    assert errors["sink_errors"] == 0 and errors["assembler_frames_dropped"] == 0
    assert report["run_folders_left"] == 0  # finished runs' frames are cleaned up


def test_rate_search_bisects_below_the_pipelines_capacity():
    capacity, ceiling = 60.0, 100.0  # a fake pipeline slower than its beamline

    def soak(seconds, rate_hz):
        offered = ceiling if rate_hz is None else rate_hz
        growth = max(0.0, offered - capacity) * 60  # frames/min the backlog grows
        return {"drained": True, "frames_lost": 0, "offered_fps": offered,
                "pipeline_capacity_fps": capacity, "backlog_slope_frames_per_min": growth}

    found = search_rate(soak, 1.0, steps=4)
    assert found["limited_by"] == "pipeline" and len(found["trials"]) == 5
    assert 55 <= found["highest_sustainable_fps"] <= capacity * 1.05 < found["unsustainable_at_fps"]

    fast = search_rate(lambda s, r: {**soak(s, r), "pipeline_capacity_fps": 500.0,
                                     "backlog_slope_frames_per_min": 0.0}, 1.0, steps=4)
    assert fast["limited_by"].startswith("beamline") and fast["highest_sustainable_fps"] == ceiling


@pytest.mark.parametrize("text, expected", [("max", None), ("0", None), (0, None), ("40", 40.0),
                                            (12.5, 12.5)])
def test_rate_parsing(text, expected):
    assert parse_rate(text) == expected


@pytest.mark.parametrize("bad", ["fast", "-3", "nan"])
def test_bad_rates_are_refused(bad):
    with pytest.raises(ConfigError):
        parse_rate(bad)


def test_slope_is_per_minute():
    assert slope_per_min([0, 30, 60], [100, 101, 102]) == pytest.approx(2.0)
    assert slope_per_min([0, 1], [1, 2]) is None
