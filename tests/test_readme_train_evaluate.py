"""README's everyday `apt-stream train` and `apt-stream evaluate`, run through the CLI at toy scale.

`train` builds its angle banks and trains, then resumes (the epoch count goes on, the banks are not
simulated again); `evaluate` runs its quick look (one out-of-family phantom, no sweeps, a 15-angle
gold scan, no vacuum / flipped-chip scans) and writes results.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from apt_stream.angle_bank import load_banks
from apt_stream.cli import app
from apt_stream.model.checkpoint import load_checkpoint, read_metadata
from apt_stream.training_run import bank_files

#: The toy recipe: one training and one validation phantom of 32³ voxels, 9 angles per bank.
TOY = ["--train-phantoms", "1", "--val-phantoms", "1", "--samples-per-epoch", "4", "--jobs", "1",
       "--phantom-shape", "32,32,32", "--bank-angles", "9,9"]


def _last_json(output: str) -> dict:
    """The JSON object the command printed last (progress lines come before it)."""
    start = output.rindex("\n{\n") + 1 if "\n{\n" in output else output.index("{")
    return json.loads(output[start:])


def _invoke(args: list[str]):
    """Run the CLI in this process; torch's thread count is put back afterwards (building banks
    in-process sets it to all cores, which a later test on a busy machine pays for)."""
    import torch

    threads = torch.get_num_threads()
    try:
        return CliRunner().invoke(app, args)
    finally:
        torch.set_num_threads(threads)


def _train(*args: str):
    result = _invoke(["train", *TOY, *args])
    assert result.exit_code == 0, result.output
    return _last_json(result.stdout)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """`apt-stream train` for one epoch into fresh --banks / --out folders."""
    root = tmp_path_factory.mktemp("train")
    banks, out = root / "banks", root / "run"
    summary = _train("--banks", str(banks), "--out", str(out), "--epochs", "1")
    files = bank_files(banks)
    return {"banks": banks, "out": out, "summary": summary, "files": files,
            "stamps": {p: p.stat().st_mtime_ns for p in files}}


def test_train_builds_banks_trains_and_prints_how_to_ship(first_run):
    summary, out = first_run["summary"], first_run["out"]
    assert {"best", "best_epoch", "best_val_loss", "ship_with"} <= set(summary)
    best = Path(summary["best"])
    assert best.parent == out and best.exists() and (out / "last.safetensors").exists()
    assert summary["best_epoch"] == 1
    assert summary["ship_with"] == f"apt-stream model ship {best}"
    assert math.isfinite(summary["best_val_loss"])

    model, meta = load_checkpoint(best)
    assert model.io_config["inputs"] == ["approximant", "sart"]
    assert meta["provenance"]["epoch"] == 1
    assert meta["provenance"]["bank_files"] == [str(p) for p in first_run["files"]]

    # The banks follow --phantom-shape and --bank-angles: one train and one val phantom.
    assert len(first_run["files"]) == 1
    banks = load_banks(first_run["files"])
    assert sorted(b.split for b in banks) == ["train", "val"]
    assert all(b.truth.shape == (32, 32, 32) and len(b.angles_deg) == 9 for b in banks)


def test_train_resume_continues_the_epochs_without_resimulating(first_run):
    banks, out = first_run["banks"], first_run["out"]
    summary = _train("--banks", str(banks), "--out", str(out), "--epochs", "2", "--resume")
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]  # epoch 1 kept, epoch 2 added
    assert read_metadata(out / "last.safetensors")["provenance"]["epoch"] == 2
    assert summary["best_epoch"] in (1, 2)
    # Both phantoms were present: no bank file written or added.
    assert bank_files(banks) == first_run["files"]
    assert {p: p.stat().st_mtime_ns for p in bank_files(banks)} == first_run["stamps"]


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--phantom-shape", "32,32", "--phantom-shape must be 3 comma-separated integers"),
    ("--bank-angles", "9,5", "--bank-angles must be MIN,MAX"),
])
def test_train_rejects_bad_bank_options(tmp_path, option, value, message):
    result = _invoke(["train", "--banks", str(tmp_path / "banks"), "--out", str(tmp_path / "run"),
                      option, value])
    assert result.exit_code == 1
    assert message in result.output
    assert not (tmp_path / "banks").exists()  # refused before anything was simulated


def test_evaluate_quick_look_writes_results_md(tmp_path):
    out = tmp_path / "eval"
    result = _invoke([
        "evaluate", "--out", str(out), "--phantoms", "1", "--family", "out-of-family",
        "--no-sweeps", "--jobs", "1", "--gold-angles", "15", "--no-response",
    ])
    assert result.exit_code == 0, result.output
    summary = _last_json(result.stdout)
    assert summary["results"] == str(out / "results.md")
    methods = ("apt", "apt-raw", "fbp", "sirt", "sart", "gold (SART, all angles)")
    main = summary["out-of-family"]
    for method in methods:
        assert 0.0 < main[method]["pcc"] <= 1.0, (method, main[method])
        assert all(math.isfinite(v) for v in main[method].values())

    # the shipped model's metal rule: its mask and the same cut of SART, scored as masks
    for mask in ("apt-metal", "sart-metal (same rule)"):
        assert set(main[mask]) == {"dsc", "ber"} and 0.0 <= main[mask]["ber"] < 0.5, main[mask]

    md = (out / "results.md").read_text()
    lines = md.splitlines()
    assert any(line.startswith("| apt-metal | — | — | ") for line in lines)
    assert "### out-of-family" in md and "### in-family" not in md
    assert "gold standard: SART on 15 angles over ±70.4°" in md
    for method in methods:
        assert any(line.startswith(f"| {method} |") for line in lines), method
    assert "Not measured in this run (`--no-response`)." in md
    assert "Sweep over N" not in md  # --no-sweeps
    saved = json.loads((out / "figures" / "results.json").read_text())
    assert saved["families"]["out-of-family"]["gold_setting"] == [15, 70.4]
    assert saved["families"]["out-of-family"]["response"] == {}
    for fig in ("fig6b-cross-sections.png", "fig6a-power-spectra.png", "fig7-attention.png"):
        assert (out / "figures" / fig).stat().st_size > 0


def test_calibrate_metal_records_the_rule_in_a_copy_and_leaves_the_shipped_model(tmp_path):
    from apt_stream.reconstruct import DEFAULT_CHECKPOINT

    shipped_before = DEFAULT_CHECKPOINT.read_bytes()
    out = tmp_path / "calibrated.safetensors"
    result = _invoke(["model", "calibrate-metal", "--seed", "50000", "--jobs", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = _last_json(result.stdout)
    rule = report["metal_mask"]
    # one seed: the rule is that seed's best cut, and the error curve is lowest there
    assert rule["z_threshold"] == report["per_seed_best_z"][0]
    assert min(report["errors_by_z"].values()) == rule["mean_error_rate"] < 0.5
    assert rule["min_spread"] > 0 and "50000" in rule["calibrated_on"]
    model, _ = load_checkpoint(out)
    assert model.io_config["metal_mask"]["z_threshold"] == rule["z_threshold"]
    assert DEFAULT_CHECKPOINT.read_bytes() == shipped_before
