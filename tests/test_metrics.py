"""Tests of apt_stream.metrics: PCC, MS-SSIM (against 2D references), EM/Bayes, DSC, BER."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from apt_stream.errors import InputError
from apt_stream.metrics import (
    MS_SSIM_WEIGHTS,
    BinarizationPrior,
    bayes_threshold,
    ber,
    dsc,
    em_threshold,
    evaluate,
    ms_ssim_3d,
    pcc,
)


def _smooth_pair(shape, noise, seed=0):
    rng = np.random.default_rng(seed)
    a = gaussian_filter(rng.random(shape), 2)
    b = gaussian_filter(a + noise * rng.standard_normal(shape), 1)
    return a, b


def _two_class_volume(shape=(12, 20, 20), p1=0.3, means=(0.0, 1.0), sigma=0.1, seed=0):
    """Labels with metal fraction ~p1 and Gaussian values per class."""
    rng = np.random.default_rng(seed)
    labels = rng.random(shape) < p1
    values = np.where(labels, means[1], means[0]) + sigma * rng.standard_normal(shape)
    return labels, values


def _brute_threshold(means, variances, priors):
    """Sign change of p0 N0 - p1 N1 between the means, on a fine grid."""
    x = np.linspace(means[0], means[1], 200_001)

    def w(m, v, p):
        return p * np.exp(-((x - m) ** 2) / (2 * v)) / np.sqrt(2 * np.pi * v)

    d = w(means[0], variances[0], priors[0]) - w(means[1], variances[1], priors[1])
    return float(x[np.argmax(d < 0)])


# --------------------------------------------------------------------------- PCC


def test_pcc_matches_numpy_and_is_affine_invariant():
    rng = np.random.default_rng(1)
    a = rng.random((4, 5, 6))
    b = a + 0.5 * rng.random(a.shape)
    expected = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert pcc(a, b) == pytest.approx(expected, abs=1e-12)
    assert pcc(a, 3 * b - 7) == pytest.approx(expected, abs=1e-12)
    assert pcc(a, -b) == pytest.approx(-expected, abs=1e-12)
    assert pcc(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(1.0)


def test_pcc_mask_selects_voxels():
    rng = np.random.default_rng(2)
    a = rng.random((3, 4, 5))
    b = a.copy()
    b[0] = rng.random((4, 5))  # layer 0 disagrees
    mask = np.ones(a.shape, bool)
    mask[0] = False
    assert pcc(a, b, mask=mask) == pytest.approx(1.0)
    assert pcc(a, b) < 0.95


@pytest.mark.parametrize(
    "a, b, kwargs, match",
    [
        (np.ones((3, 3)), np.ones((3, 4)), {}, "same shape"),
        (np.ones((3, 3)), np.arange(9.0).reshape(3, 3), {}, "constant"),
        (np.array([1.0, np.nan]), np.array([1.0, 2.0]), {}, "NaN"),
        (np.arange(4.0), np.arange(4.0), {"mask": np.array([1, 0, 0, 0])}, "at least 2"),
        (np.arange(4.0), np.arange(4.0), {"mask": np.ones(3, bool)}, "same shape"),
        (np.array(["a", "b"]), np.arange(2.0), {}, "numeric"),
    ],
)
def test_pcc_rejects_bad_input(a, b, kwargs, match):
    with pytest.raises(InputError, match=match):
        pcc(a, b, **kwargs)


# --------------------------------------------------------------------------- MS-SSIM


def test_ms_ssim_depth_one_agrees_with_pytorch_msssim():
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    # 192 = 12 * 2^4: five scales with even sizes, where both implementations pool alike.
    a, b = _smooth_pair((192, 192), 0.3)
    dr = float(b.max() - b.min())
    ref = pytorch_msssim.ms_ssim(
        torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None], data_range=dr
    )
    assert ms_ssim_3d(a[None], b[None]) == pytest.approx(float(ref), abs=1e-5)


def test_ms_ssim_single_scale_equals_skimage_ssim():
    from skimage.metrics import structural_similarity

    # 20 x 21: no axis can be halved to >= 11, so MS-SSIM is plain Gaussian SSIM.
    a, b = _smooth_pair((20, 21), 0.3, seed=3)
    ref = structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        data_range=float(b.max() - b.min()),
    )
    assert ms_ssim_3d(a[None], b[None]) == pytest.approx(ref, abs=1e-10)
    # The weights of unused scales drop out: any weights give the same single-scale value.
    assert ms_ssim_3d(a[None], b[None], weights=(1.0, 5.0)) == pytest.approx(ref, abs=1e-10)


def test_ms_ssim_identical_volumes_is_one_and_noise_lowers_it():
    a, _ = _smooth_pair((32, 48, 48), 0.0)
    assert ms_ssim_3d(a, a) == pytest.approx(1.0, abs=1e-9)
    rng = np.random.default_rng(4)
    scores = [ms_ssim_3d(a + s * rng.standard_normal(a.shape), a) for s in (0.01, 0.05, 0.2)]
    assert scores[0] > scores[1] > scores[2] > 0


def test_ms_ssim_small_depth_uses_fewer_scales_not_an_error():
    # depth 32: halved once (16), then kept; lateral 64 -> 32 -> 16 -> stop. Three scales.
    a, b = _smooth_pair((32, 64, 64), 0.2, seed=5)
    value = ms_ssim_3d(a, b)
    assert 0 < value < 1
    # Changing the weights of scales 4 and 5 cannot matter: they are never reached.
    w = list(MS_SSIM_WEIGHTS[:3]) + [9.0, 9.0]
    assert ms_ssim_3d(a, b, weights=w) == pytest.approx(value, rel=1e-12)


def test_ms_ssim_accepts_torch_and_float32():
    a, b = _smooth_pair((12, 30, 30), 0.2, seed=6)
    ref = ms_ssim_3d(a, b)
    assert ms_ssim_3d(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(ref, rel=1e-12)
    assert ms_ssim_3d(a.astype(np.float32), b.astype(np.float32)) == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize(
    "a, b, kwargs, match",
    [
        (np.ones((4, 4)), np.ones((4, 4)), {}, "3D"),
        (np.ones((4, 4, 4)), np.ones((4, 4, 5)), {}, "same shape"),
        (np.full((4, 4, 4), np.inf), np.ones((4, 4, 4)), {}, "infinite"),
        (np.ones((4, 4, 4)), np.ones((4, 4, 4)), {"data_range": 0.0}, "data_range"),
        (np.ones((4, 4, 4)), np.ones((4, 4, 4)), {"weights": (-1.0, 1.0)}, "weights"),
        (np.ones((4, 4, 4)), np.ones((4, 4, 4)), {"weights": ()}, "weights"),
    ],
)
def test_ms_ssim_rejects_bad_input(a, b, kwargs, match):
    with pytest.raises(InputError, match=match):
        ms_ssim_3d(a, b, **kwargs)


# --------------------------------------------------------------------------- EM / Bayes


@pytest.mark.parametrize("scale", [1.0, 1e-5])
def test_em_threshold_recovers_mixture(scale):
    # scale 1e-5: δ-like magnitudes must not be swamped by the mixture's covariance floor.
    _, values = _two_class_volume(p1=0.3, means=(0.0, 1.0), sigma=0.1)
    prior = em_threshold(values * scale, seed=0)
    assert prior.priors[1] == pytest.approx(0.3, abs=0.02)
    assert prior.means[0] == pytest.approx(0.0, abs=0.02 * scale)
    assert prior.means[1] == pytest.approx(1.0 * scale, rel=0.02)
    assert math.sqrt(prior.variances[1]) == pytest.approx(0.1 * scale, rel=0.1)
    brute = _brute_threshold(prior.means, prior.variances, prior.priors)
    assert prior.threshold == pytest.approx(brute, abs=1e-4 * scale)
    assert prior.means[0] < prior.threshold < prior.means[1]


def test_bayes_threshold_uses_the_reference_priors_in_the_test_units():
    _, ref = _two_class_volume(p1=0.3, means=(0.0, 1.0), sigma=0.15, seed=1)
    prior = em_threshold(ref)
    # Same structure, other units and noise: the test threshold follows the test's own Gaussians.
    _, test = _two_class_volume(p1=0.3, means=(5.0, 8.0), sigma=0.6, seed=2)
    t = bayes_threshold(test, prior)
    brute = _brute_threshold((5.0, 8.0), (0.36, 0.36), prior.priors)
    assert t == pytest.approx(brute, abs=0.1)
    # Rarer metal in the prior pushes the threshold up.
    rare = BinarizationPrior(prior.means, prior.variances, (0.9, 0.1), prior.threshold)
    assert bayes_threshold(test, rare) > t + 0.2


def test_bayes_threshold_unequal_variances_picks_root_between_means():
    _, test = _two_class_volume(p1=0.5, means=(0.0, 1.0), sigma=0.05, seed=3)
    rng = np.random.default_rng(3)
    test = test.ravel()
    test[test > 0.5] = 1.0 + 0.3 * rng.standard_normal(int((test > 0.5).sum()))
    prior = BinarizationPrior((0.0, 1.0), (0.01, 0.01), (0.5, 0.5), 0.5)
    t = bayes_threshold(test, prior)
    assert 0.0 < t < 1.0
    assert t == pytest.approx(_brute_threshold((0.0, 1.0), (0.0025, 0.09), (0.5, 0.5)), abs=0.03)


def test_binarization_prior_and_bayes_inputs_validated():
    with pytest.raises(InputError, match="priors"):
        BinarizationPrior((0.0, 1.0), (1.0, 1.0), (0.0, 1.0), 0.5)
    with pytest.raises(InputError, match="variances"):
        BinarizationPrior((0.0, 1.0), (0.0, 1.0), (0.5, 0.5), 0.5)
    prior = BinarizationPrior((0.0, 1.0), (1.0, 1.0), (0.5, 0.5), 0.5)
    with pytest.raises(InputError, match="constant"):
        bayes_threshold(np.ones(10), prior)
    with pytest.raises(InputError, match="BinarizationPrior"):
        bayes_threshold(np.arange(10.0), (0.5, 0.5))
    with pytest.raises(InputError, match="constant"):
        em_threshold(np.zeros((3, 3, 3)))


# --------------------------------------------------------------------------- DSC / BER


def test_dsc_and_ber_follow_equations_10_and_11():
    ref = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    test = np.array([1, 1, 1, 0, 1, 1, 0, 0, 0, 0], bool)  # TP 3, FN 1, FP 2, TN 4
    assert dsc(test, ref) == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))
    assert ber(test, ref) == pytest.approx((2 + 1) / 10)
    assert dsc(test.astype(int), torch.from_numpy(ref)) == pytest.approx(6 / 9)
    assert dsc(np.zeros(5, bool), np.zeros(5, bool)) == 1.0
    assert ber(ref, ref) == 0.0 and ber(~ref, ref) == 1.0


@pytest.mark.parametrize(
    "test, ref, match",
    [
        (np.array([0, 2]), np.array([0, 1]), "0 and 1"),
        (np.array([0, 1]), np.array([0, 1, 1]), "same shape"),
        (np.array([0.0, 0.5]), np.array([0, 1]), "0 and 1"),
    ],
)
def test_dsc_ber_reject_bad_input(test, ref, match):
    with pytest.raises(InputError, match=match):
        dsc(test, ref)
    with pytest.raises(InputError, match=match):
        ber(test, ref)


# --------------------------------------------------------------------------- evaluate


def _ic_like(shape=(16, 24, 24), seed=0):
    """Smooth-edged metal lines in a dielectric: a reference with two value populations."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, bool)
    for z0 in (2, 7, 12):
        for _ in range(3):
            y0 = rng.integers(0, shape[1] - 4)
            labels[z0 : z0 + 2, y0 : y0 + 3, :] = True
    values = np.where(labels, 1.0, 0.1) + 0.02 * rng.standard_normal(shape)
    return labels, values


def test_evaluate_perfect_and_degrading():
    labels, ref = _ic_like()
    perfect = evaluate(ref, ref)
    assert set(perfect) == {"pcc", "ms_ssim", "dsc", "ber"}
    assert perfect["pcc"] == pytest.approx(1.0)
    assert perfect["ms_ssim"] == pytest.approx(1.0, abs=1e-9)
    assert perfect["dsc"] == 1.0 and perfect["ber"] == 0.0
    rng = np.random.default_rng(1)
    noisy = [evaluate(ref + s * rng.standard_normal(ref.shape), ref) for s in (0.1, 0.4)]
    assert noisy[0]["pcc"] > noisy[1]["pcc"]
    assert noisy[0]["ms_ssim"] > noisy[1]["ms_ssim"]
    assert noisy[0]["dsc"] > noisy[1]["dsc"]
    assert noisy[0]["ber"] < noisy[1]["ber"]


def test_evaluate_excludes_ambiguous_layers_and_takes_binary_reference():
    labels, ref = _ic_like(seed=2)
    test = ref.copy()
    rng = np.random.default_rng(3)
    test[0] = rng.random(test.shape[1:])  # garbage in one ambiguous layer
    hurt = evaluate(test, ref)
    assert hurt["pcc"] < 0.999
    for excl in ([0], slice(0, 1), (-16,)):
        fixed = evaluate(test, ref, exclude_z=excl)
        assert fixed["pcc"] == pytest.approx(1.0) and fixed["dsc"] == 1.0
    with_labels = evaluate(ref, ref, reference_binary=labels)
    assert with_labels["dsc"] == 1.0 and with_labels["ber"] == 0.0
    # Labels that disagree with the values show up in DSC/BER but not in PCC.
    shifted = evaluate(ref, ref, reference_binary=np.roll(labels, 3, axis=1))
    assert shifted["dsc"] < 0.9 and shifted["pcc"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"test": np.zeros((2, 3, 4)), "reference": np.zeros((2, 3, 5))}, "same shape"),
        ({"test": np.zeros((3, 4)), "reference": np.zeros((3, 4))}, "3D"),
        ({"test": np.full((2, 3, 4), np.nan), "reference": np.zeros((2, 3, 4))}, "NaN"),
        ({"exclude_z": slice(None)}, "every z layer"),
        ({"exclude_z": [99]}, "exclude_z"),
        ({"exclude_z": [0.5]}, "integer"),
        ({"reference_binary": np.zeros((16, 24, 24))}, "both classes"),
        ({"reference_binary": np.zeros((2, 2, 2))}, "same shape"),
    ],
)
def test_evaluate_rejects_bad_input(kwargs, match):
    _, ref = _ic_like()
    args = {"test": ref, "reference": ref} | kwargs
    with pytest.raises(InputError, match=match):
        evaluate(args.pop("test"), args.pop("reference"), **args)


def test_metrics_import_no_services():
    code = (
        "import sys, apt_stream.metrics\n"
        "bad = [m for m in ('prefect', 'tiled', 'zmq', 'bluesky') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
