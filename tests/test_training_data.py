"""Training pairs from the simulator, the shipped model, and the evaluation path (tiny scale)."""

from __future__ import annotations

import numpy as np
import pytest

from apt_stream.model.train import load_pairs
from apt_stream.training_data import build_pair_cache, split_seeds


def test_split_seeds_never_overlap():
    seen = [set(split_seeds(s, 500)) for s in ("train", "val", "test")]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    with pytest.raises(ValueError, match="split"):
        split_seeds("holdout", 2)


def test_pair_cache_builds_resumes_and_loads(tmp_path):
    path = tmp_path / "pairs.h5"
    calls = []
    build_pair_cache(path, preset="tiny", counts={"train": 1, "val": 1}, progress=lambda d, n: calls.append(d))
    assert calls == [1, 2]
    train, attrs = load_pairs(path, split="train", with_attrs=True)
    (apx, truth), = train
    assert apx.shape == truth.shape == (12, 24, 32)
    assert attrs[0]["seed"] == split_seeds("train", 1)[0]
    # A second call with a larger count only simulates what is missing.
    build_pair_cache(path, preset="tiny", counts={"train": 2, "val": 1})
    assert len(load_pairs(path, split="train")) == 2


def test_shipped_model_loads_verified_and_predicts():
    from apt_stream.model.checkpoint import read_metadata
    from apt_stream.reconstruct import DEFAULT_CHECKPOINT, apt_volume, load_model

    model, meta = load_model()
    assert meta["preset"] == "cpu-wide" and model.config.input_skip
    assert read_metadata(DEFAULT_CHECKPOINT)["sha256"] == meta["sha256"]
    assert DEFAULT_CHECKPOINT.stat().st_size < 25 * 2**20
    # The shipped model reads the Approximant and a SART channel: (2, Z, Y, X).
    assert model.config.in_channels == 2
    out = apt_volume(model, np.random.default_rng(0).normal(size=(2, 32, 40, 48)).astype(np.float32))
    assert out.shape == (32, 40, 48) and np.isfinite(out).all()


def test_evaluation_path_on_tiny():
    from apt_stream.evaluation import evaluate_phantom
    from apt_stream.reconstruct import load_model

    model, _ = load_model()
    result = evaluate_phantom(30000, model, preset="tiny", n_star=7, sweeps=False)
    from apt_stream.reconstruct import dc_sweeps

    # apt-raw (the network alone) is scored beside apt when the model asks for data consistency.
    raw = {"apt-raw"} if dc_sweeps(model) > 0 else set()
    # the model's calibrated metal mask, and the same cut of SART, scored as masks
    masks = {"apt-metal", "sart-metal (same rule)"} if "metal_mask" in model.io_config else set()
    assert set(result.main) == ({"approximant", "apt", "fbp", "sirt", "sart", "gold (SART, all angles)"}
                                | raw | masks)
    for name in masks:
        assert set(result.main[name]) == {"dsc", "ber"}
    gold, sart = result.main["gold (SART, all angles)"], result.main["sart"]
    # More angles over a wider range must beat the limited-angle scan: the missing wedge.
    assert gold["pcc"] > sart["pcc"] and gold["dsc"] > sart["dsc"]


def test_score_can_leave_out_ambiguous_layers():
    from apt_stream.io import GroundTruth
    from apt_stream.reconstruct import score

    rng = np.random.default_rng(0)
    labels = np.where(rng.random((8, 16, 16)) > 0.7, 3, 1).astype(np.uint8)
    delta = np.where(labels == 3, 2e-5, 6e-6).astype(np.float32)
    truth = GroundTruth(delta=delta, beta=delta / 50, labels=labels, voxel_size_m=1e-8)
    test = delta.copy()
    test[:2] = rng.normal(1e-5, 5e-6, size=test[:2].shape)  # two garbled "ambiguous" layers
    whole = score({"t": test}, truth)["t"]
    kept = score({"t": test}, truth, exclude_z=[0, 1])["t"]
    assert kept["pcc"] > whole["pcc"] and kept["pcc"] > 0.99
