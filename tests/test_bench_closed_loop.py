"""`apt-stream bench closed-loop --quick`: the closed-loop validation's figures exist and hang
together (two held-out tiny phantoms, the shipped network)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from apt_stream.cli import app


def test_bench_closed_loop_quick(tmp_path):
    out = tmp_path / "cl.jsonl"
    result = CliRunner().invoke(app, ["bench", "closed-loop", "--quick", "--json",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    assert got["phantoms"] == 2 and got["preset"] == "tiny" and got["planned_angles"] == 29
    assert 9 <= got["angles_at_stop_mean"] < 29
    assert got["angles_saved_mean"] == 29 - got["angles_at_stop_mean"]
    assert 0 <= got["advice_wrong"] <= 2 and got["estimate_s_per_angle"] > 0
    assert "| angles at stop |" in got["tables_markdown"]
    assert "| 9 |" in got["tables_markdown"] and "| 13 |" not in got["tables_markdown"]
    # resumable: the phantoms are in the file, one a line
    assert [json.loads(line)["seed"] for line in out.read_text().splitlines()] == [9100, 9101]


def test_stop_signals_finds_the_safe_stop_and_ranks_the_committed_tuning_file():
    from pathlib import Path

    from apt_stream.benchmarks.stop_signals import main, safe_stop

    # loss against the full scan: 0.05, 0.01, 0.03 (a relapse), 0.0, 0.0 → safe from N = 9
    quality = {str(n): {"pcc": 0.5 - loss, "dsc": 0.5} for n, loss in
               ((6, 0.05), (7, 0.01), (8, 0.03), (9, 0.0), (10, 0.0))}
    assert safe_stop({"quality": quality}, 0.02) == 9
    tuning = Path(__file__).resolve().parents[1] / "benchmarks/results/stop-rule-tuning-tiny.jsonl"
    result = main([str(tuning)])
    assert result["phantoms"] == len(result["safe_stop"]) >= 10
    assert all(-1 <= s["rho"] <= 1 for s in result["spearman"].values())
