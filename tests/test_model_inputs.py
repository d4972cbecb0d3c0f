"""What a physics-in-the-loop model reads, and how it fails when it is not given it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apt_stream.errors import InputError, ModelError
from apt_stream.model import create_model, predict_volume
from apt_stream.model.inputs import model_inputs, network_input, sart_channel
from apt_stream.physics import tomo

torch.set_num_threads(1)

SHAPE = (8, 16, 16)


def two_channel_model():
    torch.manual_seed(0)
    model = create_model("cpu", in_channels=2, input_zyx=(8, 16, 16)).eval()
    model.io_config.update({"inputs": ["approximant", "sart"], "input_norm": "rms"})
    return model


def projections(seed: int = 0):
    rng = np.random.default_rng(seed)
    vol = np.zeros(SHAPE, np.float32)
    vol[2:4, 4:12, 4:12] = 1.0
    vol[5, 2:6, 8:14] = 2.0
    angles = np.linspace(-17, 17, 7)
    proj = np.asarray(tomo.project(vol, angles), np.float32)
    return angles, proj + rng.normal(0, 0.01, proj.shape).astype(np.float32), vol


def test_a_two_channel_model_without_projections_says_what_it_needs():
    model = two_channel_model()
    with pytest.raises(ModelError, match="projections"):
        network_input(model, np.zeros(SHAPE, np.float32), None)


def test_unknown_or_misordered_channels_are_refused():
    model = two_channel_model()
    model.io_config["inputs"] = ["sart", "approximant"]
    with pytest.raises(ModelError, match="Approximant first"):
        model_inputs(model)
    model.io_config["inputs"] = ["approximant", "fbp"]
    with pytest.raises(ModelError, match="fbp"):
        model_inputs(model)


def test_an_old_model_reads_the_approximant_alone():
    model = create_model("cpu")
    approximant = np.ones(SHAPE, np.float32)
    assert model_inputs(model) == ("approximant",)
    assert network_input(model, approximant, None) is approximant


def test_the_wrong_channel_count_is_an_input_error():
    model = two_channel_model()
    with pytest.raises(InputError, match="2 input channel"):
        predict_volume(model, np.ones(SHAPE, np.float32), patch_xy=16)


def test_sart_channel_refuses_mismatched_projections():
    with pytest.raises(InputError, match="projections"):
        sart_channel(np.zeros(3), np.zeros((2, 16, 16), np.float32), SHAPE)


def test_the_two_channel_output_follows_scale_and_vacuum():
    """SART is linear and every channel is RMS-normalised: f(c·data) = c·f(data)."""
    model = two_channel_model()
    angles, proj, vol = projections()
    approximant = vol * 0.5
    x1 = network_input(model, approximant, (angles, proj))
    x3 = network_input(model, 3.0 * approximant, (angles, 3.0 * proj))
    assert x1.shape == (2, *SHAPE)
    np.testing.assert_allclose(x3, 3.0 * x1, rtol=1e-4, atol=1e-6)
    y1 = predict_volume(model, x1, patch_xy=16)
    y3 = predict_volume(model, x3, patch_xy=16)
    np.testing.assert_allclose(y3, 3.0 * y1, rtol=1e-3, atol=1e-5 * float(np.abs(y3).max()))
    # Vacuum: noise-sized projections and Approximant give a noise-sized output.
    rng = np.random.default_rng(1)
    noise = 1e-4
    vac = network_input(model, rng.normal(0, noise, SHAPE).astype(np.float32),
                        (angles, rng.normal(0, noise, proj.shape).astype(np.float32)))
    y_vac = predict_volume(model, vac, patch_xy=16)
    assert float(np.sqrt(np.mean(y_vac**2))) < 0.01 * float(np.sqrt(np.mean(y1**2)))
