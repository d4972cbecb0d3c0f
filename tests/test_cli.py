"""The apt-stream command line, run in-process through typer's runner on the tiny preset."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from apt_stream.cli import app
from apt_stream.io import read_volumes, validate_scan

runner = CliRunner()


def _json_tail(output: str) -> dict:
    """The JSON object a command prints last (progress bars go to stderr)."""
    start = output.index("{")
    return json.loads(output[start:])


@pytest.fixture(scope="module")
def tiny_scan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny.h5"
    result = runner.invoke(app, ["simulate", str(path), "--preset", "tiny", "--seed", "2"])
    assert result.exit_code == 0, result.output
    return path


def test_simulate_writes_a_valid_scan(tiny_scan_file):
    summary = validate_scan(tiny_scan_file)
    assert summary["n_angles"] == 7
    with h5py.File(tiny_scan_file) as f:
        assert "ground_truth" in f["/entry/sample"]


def test_simulate_angle_overrides(tmp_path):
    path = tmp_path / "five.h5"
    result = runner.invoke(
        app, ["simulate", str(path), "--preset", "tiny", "--angles", "5", "--range", "30"]
    )
    assert result.exit_code == 0, result.output
    assert validate_scan(path)["n_angles"] == 5


def test_validate_ok_and_bad(tiny_scan_file, tmp_path):
    ok = runner.invoke(app, ["validate", str(tiny_scan_file)])
    assert ok.exit_code == 0 and "ok" in ok.output
    bad = tmp_path / "bad.h5"
    bad.write_text("not an hdf5 file")
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 1
    assert "error" in result.output and "ScanFormatError" in result.output
    assert "Traceback" not in result.output


def test_approximant_subset_and_png(tiny_scan_file, tmp_path):
    out = tmp_path / "apx.h5"
    png = tmp_path / "apx.png"
    result = runner.invoke(
        app,
        ["approximant", str(tiny_scan_file), "-o", str(out), "--angles", "5", "--range", "17",
         "--png", str(png), "--batch-size", "4"],
    )
    assert result.exit_code == 0, result.output
    summary = _json_tail(result.output)
    assert summary["angles"] == 5
    assert summary["pcc_vs_truth"] > 0.2
    volumes, attrs = read_volumes(out)
    assert volumes["approximant"].shape == (12, 24, 32)
    assert np.isfinite(volumes["approximant"]).all()
    assert len(attrs["angles_deg"]) == 5
    assert png.stat().st_size > 10_000


def test_approximant_too_many_angles_is_a_clear_error(tiny_scan_file, tmp_path):
    result = runner.invoke(
        app, ["approximant", str(tiny_scan_file), "-o", str(tmp_path / "x.h5"), "--angles", "50"]
    )
    assert result.exit_code == 1
    assert "asked for 50 angles" in result.output


def test_offline_demo_writes_scan_volume_and_png_without_services(tmp_path):
    """``apt-stream demo --offline`` (docs/demo.md): no Tiled, Prefect or 0MQ, all files kept."""
    work = tmp_path / "offline"
    result = runner.invoke(app, ["demo", "--offline", "--preset", "tiny", "--workdir", str(work)])
    assert result.exit_code == 0, result.output
    summary = _json_tail(result.output)
    assert summary["angles"] == validate_scan(work / "scan.h5")["n_angles"] == 7
    assert summary["frames"] > 0 and summary["frames_per_second"] > 0
    volumes, attrs = read_volumes(work / "approximant.h5")
    assert np.isfinite(volumes["approximant"]).all()
    # the Approximant follows the phantom (the tiny preset's gives ~0.4)
    assert summary["approximant_pcc_vs_truth"] > 0.2
    assert (work / "approximant.png").stat().st_size > 10_000
    assert not (work / "tiled").exists() and not (work / "prefect").exists()


def test_unknown_preset_lists_valid_names(tmp_path):
    result = runner.invoke(app, ["simulate", str(tmp_path / "x.h5"), "--preset", "huge"])
    assert result.exit_code == 1
    assert "tiny" in result.output and "demo" in result.output


def test_missing_scan_file_is_one_line(tmp_path):
    result = runner.invoke(app, ["approximant", str(tmp_path / "nope.h5"), "-o", str(tmp_path / "o.h5")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output


def test_model_info_paper_preset_counts_59m():
    result = runner.invoke(app, ["model", "info", "--preset", "paper"])
    assert result.exit_code == 0, result.output
    assert "59,494,257" in result.output


def test_bench_approximant_quick_reports_ratios():
    result = runner.invoke(app, ["bench", "approximant", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    data = _json_tail(result.output)
    row = data["rows"][0]
    for key in ("engine_frames_per_s", "fft_floor_frames_per_s", "engine_over_floor",
                "engine_over_own_floor", "engine_fidelity_pcc", "autograd_fidelity_pcc"):
        assert row[key] > 0
    # the flat-start pass 1 does fewer FFTs than two generic iterations
    assert row["fft_per_frame"]["engine"] < row["fft_per_frame"]["generic"]
    assert row["rounds"] >= 1 and isinstance(row["measurement_fault"], bool)
    assert row["engine_over_floor_spread"]["round_min"] <= row["engine_over_floor_spread"]["round_max"]
    # The hand adjoint and autograd compute the same two iterations.
    assert abs(row["engine_fidelity_pcc"] - row["autograd_fidelity_pcc"]) < 0.02


@pytest.mark.parametrize("command", [[], ["simulate"], ["bench"], ["model"], ["replay"]])
def test_help_everywhere(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_reconstruct_with_shipped_model_and_baselines(tiny_scan_file, tmp_path):
    out = tmp_path / "rec.h5"
    result = runner.invoke(
        app,
        ["reconstruct", str(tiny_scan_file), "-o", str(out), "--angles", "7", "--range", "17",
         "--baselines"],
    )
    assert result.exit_code == 0, result.output
    volumes, attrs = read_volumes(out)
    assert set(volumes) >= {"approximant", "apt", "fbp", "sirt", "sart"}
    for vol in volumes.values():
        assert vol.shape == (12, 24, 32) and np.isfinite(vol).all()
    from apt_stream.model.checkpoint import read_metadata
    from apt_stream.reconstruct import DEFAULT_CHECKPOINT

    shipped = read_metadata(DEFAULT_CHECKPOINT)
    assert attrs["model"] == shipped["preset"] and attrs["model_sha256"] == shipped["sha256"]
    assert set(attrs["metrics"]["apt"]) == {"pcc", "ms_ssim", "dsc", "ber"}


def test_reconstruct_missing_checkpoint_is_clear(tiny_scan_file, tmp_path):
    result = runner.invoke(
        app, ["reconstruct", str(tiny_scan_file), "-o", str(tmp_path / "r.h5"), "--angles", "7",
              "--checkpoint", str(tmp_path / "nope.safetensors")],
    )
    assert result.exit_code == 1
    assert "does not exist" in result.output


def test_reconstruct_defaults_to_the_scans_own_angles(tiny_scan_file, tmp_path):
    out = tmp_path / "rec.h5"
    result = runner.invoke(app, ["reconstruct", str(tiny_scan_file), "-o", str(out)])
    assert result.exit_code == 0, result.output
    _, attrs = read_volumes(out)
    from apt_stream.io import read_scan

    assert len(attrs["angles_deg"]) == read_scan(tiny_scan_file).n_angles


def test_help_pages_read_cleanly():
    """No `<bool>` on flags, no `{arg}` in usage lines (typer >= 0.27 prints both)."""
    result = runner.invoke(app, ["reconstruct", "--help"], terminal_width=120)
    assert result.exit_code == 0
    assert "<bool>" not in result.output and "{scan_path}" not in result.output
    assert "SCAN_PATH" in result.output


def test_error_line_names_the_file_on_one_line(tmp_path):
    missing = tmp_path / "nope.h5"
    result = runner.invoke(app, ["reconstruct", str(missing), "-o", str(tmp_path / "r.h5")],
                           terminal_width=40)
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert lines == [f"error: ScanFormatError: {missing}: no such file"]
    result = runner.invoke(app, ["demo", "--preset", "bogus"], terminal_width=40)
    assert result.exit_code == 1
    assert len([ln for ln in result.output.splitlines() if ln.strip()]) == 1
    assert "['demo', 'paper', 'tiny']" in result.output


def test_simulate_gold_writes_the_many_angle_scan(tmp_path):
    from apt_stream.config import get_preset

    path = tmp_path / "gold.h5"
    result = runner.invoke(app, ["simulate", str(path), "--preset", "tiny", "--gold"])
    assert result.exit_code == 0, result.output
    gold = get_preset("tiny").gold_scan
    assert validate_scan(path)["n_angles"] == gold.n_angles


def test_bench_inference_quick_reports_the_shipped_end_to_end_ratio():
    result = runner.invoke(app, ["bench", "inference", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    data = _json_tail(result.output)
    e2e = data["shipped_end_to_end"]
    assert e2e["inputs"] == ["approximant", "sart"]
    assert e2e["apt_over_sart"]["median"] > 0 and isinstance(e2e["within_2_s"], bool)


def test_bench_live_quick_reports_keep_up_latency_and_prefect_overhead():
    result = runner.invoke(app, ["bench", "live", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    data = _json_tail(result.output)
    assert data["preset"] == "tiny" and data["keep_up_factor"] > 0
    paced = data["at_demo_rate"]
    assert paced["latency_s"] > 0 and paced["prefect_overhead_pct_of_compute"] >= 0


def test_interleaved_timing_alternates_sides_and_takes_ratios_of_medians():
    from apt_stream.benchmarks.timing import interleaved, ratio

    calls: list[str] = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3)
    assert calls == ["a", "b"] * 3 and all(len(v) == 3 for v in times.values())
    r = ratio([2.0, 4.0, 6.0], [1.0, 1.0, 2.0])
    assert r["value"] == 4.0 and r["round_min"] == 2.0 and r["round_max"] == 4.0
