"""The shipped model's recipe at toy scale: banks (resumable), random-angle training, fine-tuning."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from apt_stream.cli import app
from apt_stream.config import PRESETS, ScanOptions
from apt_stream.io import write_scan
from apt_stream.model.checkpoint import load_checkpoint, read_metadata
from apt_stream.sim.acquire import simulate_scan
from apt_stream.training_run import bank_files, build_training_banks, train_general_model


def test_banks_resume_and_train_from_them(tmp_path):
    from apt_stream.sim.acquisition import AcquisitionRanges

    small = {"shape_zyx": (32, 32, 32), "ranges": AcquisitionRanges(
        n_angles=(9, 9), frame_px=(32,), n_modes=(1,), n_modes_weights=(1.0,), step_fraction=(0.6, 0.6))}
    calls = []
    files = build_training_banks(tmp_path, n_train=1, n_val=1, jobs=1, **small,
                                 progress=lambda d, n: calls.append(d))
    assert calls[-1] == 2 and len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = []
    build_training_banks(tmp_path, n_train=1, n_val=1, jobs=1, **small, progress=lambda d, n: again.append(d))
    assert again == [2] and files[0].stat().st_mtime_ns == stamp  # nothing re-simulated
    model, result = train_general_model(bank_files(tmp_path), out_dir=tmp_path / "run", epochs=1,
                                        samples_per_epoch=8, val_samples=4, progress=False)
    loaded, meta = load_checkpoint(result.best_path)
    assert loaded.io_config["input_norm"] == "rms"
    assert meta["config"]["augmentations"] == ["flip_x", "flip_y", "flip_z"]
    assert meta["provenance"]["train_bank_seeds"] and meta["provenance"]["val_bank_seeds"]

    # Continue the shipped model with the value-distribution term: its weights are the start.
    from apt_stream.errors import ModelError
    from apt_stream.reconstruct import DEFAULT_CHECKPOINT

    shipped, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    _, cont = train_general_model(bank_files(tmp_path), out_dir=tmp_path / "cont", epochs=1,
                                  samples_per_epoch=8, val_samples=4, progress=False,
                                  init=DEFAULT_CHECKPOINT, marginal_weight=0.5, lr=1e-4)
    meta = read_metadata(cont.last_path)
    assert meta["config"]["loss"] == "npcc+marginal_w1" and meta["config"]["lr0"] == 1e-4
    assert meta["provenance"]["init"] == str(DEFAULT_CHECKPOINT)
    assert "val_marginal_w1" in cont.history[0]
    # validation always scores the binarisation (the banks carry the labels), and the threshold
    # term trains from them
    assert 0.0 <= cont.history[0]["val_ber"] <= 1.0
    _, thr = train_general_model(bank_files(tmp_path), out_dir=tmp_path / "thr", epochs=1,
                                 samples_per_epoch=8, val_samples=4, progress=False,
                                 init=DEFAULT_CHECKPOINT, metal_weight=0.5, lr=1e-4)
    meta = read_metadata(thr.last_path)
    assert meta["config"]["loss"] == "npcc+threshold_bce" and meta["config"]["metal_weight"] == 0.5
    assert meta["provenance"]["metrics"]["val_ber"] == thr.history[0]["val_ber"]
    # One small step from the shipped weights, not a fresh network: the weights barely moved.
    tuned, _ = load_checkpoint(cont.last_path)
    w0, w1 = shipped.state_dict(), tuned.state_dict()
    moved = max(float((w1[k].float() - w0[k].float()).abs().max()) for k in w0 if w0[k].is_floating_point())
    fresh = max(float(v.float().abs().max()) for v in w0.values() if v.is_floating_point())
    assert moved < 0.1 * fresh
    with pytest.raises(ModelError, match="network config differs"):
        train_general_model(bank_files(tmp_path), out_dir=tmp_path / "bad", preset="cpu", epochs=1,
                            samples_per_epoch=8, val_samples=4, progress=False, init=DEFAULT_CHECKPOINT)


@pytest.fixture(scope="module")
def small_chip(tmp_path_factory):
    """A gold scan and a few-angle scan of one small region (32³ voxels, one probe mode)."""
    d = tmp_path_factory.mktemp("chip")
    demo = PRESETS["demo"]
    preset = demo.model_copy(update={
        "phantom": demo.phantom.model_copy(update={"shape_zyx": (32, 32, 32)}),
        "probe": demo.probe.model_copy(update={"frame_px": 32, "n_modes": 1, "beam_fwhm_px": 9.0}),
    })
    gold = ScanOptions(n_angles=25, angle_range_deg=70.4, step_px=5.0, jitter_px=0.3)
    write_scan(d / "gold.h5", simulate_scan(preset, seed=2, scan=gold))
    write_scan(d / "reduced.h5", simulate_scan(preset, seed=2, n_angles=9, range_deg=17.0,
                                               scan=gold.model_copy(update={"n_angles": 9})))
    return d


def test_finetune_from_the_cli_uses_gold_labels(small_chip, tmp_path):
    from apt_stream.reconstruct import DEFAULT_CHECKPOINT

    out = tmp_path / "ft"
    result = CliRunner().invoke(app, [
        "train", "--finetune", str(DEFAULT_CHECKPOINT), "--gold", str(small_chip / "gold.h5"),
        "--scan", str(small_chip / "reduced.h5"), "--epochs", "2", "--samples-per-epoch", "8",
        "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert {"best", "gold_region_pcc_before", "gold_region_pcc_after"} <= set(summary)
    prov = read_metadata(summary["best"])["provenance"]
    assert prov["labels"].startswith("SART over every angle")
    assert prov["gold_scan"].endswith("gold.h5")
    assert np.isfinite(summary["gold_region_pcc_after"])


def test_finetune_needs_both_checkpoint_and_gold(small_chip):
    result = CliRunner().invoke(app, ["train", "--gold", str(small_chip / "gold.h5")])
    assert result.exit_code == 1
    assert "needs both --finetune" in result.output
