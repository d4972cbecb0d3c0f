"""Scans whose ground truth has one class (an empty field) reconstruct, and metrics are skipped
with a one-line note instead of failing (issue 10, item 6)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from apt_stream.cli import app
from apt_stream.config import get_preset
from apt_stream.evaluation import PhantomResult, _mean_table
from apt_stream.io import GroundTruth, read_volumes, write_scan
from apt_stream.reconstruct import metrics_skipped
from apt_stream.sim.acquire import simulate_scan
from apt_stream.sim.phantom import Phantom

runner = CliRunner()


@pytest.fixture(scope="module")
def empty_scan_file(tmp_path_factory):
    p = get_preset("tiny")
    labels = np.zeros(p.phantom.shape_zyx, dtype=np.uint8)
    scan = simulate_scan(p, seed=1, n_angles=5, phantom=Phantom(labels, p.phantom.voxel_size_m, 1, ()))
    return write_scan(tmp_path_factory.mktemp("empty") / "empty.h5", scan)


def test_metrics_skipped_names_the_single_class():
    labels = np.zeros((2, 3, 4), np.uint8)
    truth = GroundTruth(labels.astype(np.float32), labels.astype(np.float32), labels, 1e-8)
    assert metrics_skipped(truth) == ("metrics skipped: the ground truth has a single class "
                                      "(no metal (an empty field))")
    labels[0, 0, 0] = 3  # Cu
    assert metrics_skipped(GroundTruth(truth.delta, truth.beta, labels, 1e-8)) is None
    assert "all metal" in metrics_skipped(GroundTruth(truth.delta, truth.beta, labels * 0 + 4, 1e-8))


def test_reconstruct_and_approximant_skip_metrics_on_an_empty_field(empty_scan_file, tmp_path):
    out = tmp_path / "rec.h5"
    result = runner.invoke(app, ["reconstruct", str(empty_scan_file), "-o", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["note"].startswith("metrics skipped: the ground truth has a single class")
    assert "metrics" not in summary
    _, attrs = read_volumes(out)
    assert attrs["note"] == summary["note"]
    result = runner.invoke(app, ["approximant", str(empty_scan_file), "-o", str(tmp_path / "a.h5")])
    assert result.exit_code == 0, result.output
    assert "metrics skipped" in result.output and "pcc_vs_truth" not in result.output


def test_evaluation_tables_leave_skipped_phantoms_out():
    scored = PhantomResult(seed=1, main={"apt": {"pcc": 0.5}}, vs_gold={})
    skipped = PhantomResult(seed=2, main={}, vs_gold={}, note="metrics skipped: ...")
    assert _mean_table([skipped, scored], "main") == {"apt": {"pcc": 0.5}}
    assert _mean_table([skipped], "vs_gold") == {}
