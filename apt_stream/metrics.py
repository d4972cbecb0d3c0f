"""Reconstruction quality metrics of the APT paper: PCC, MS-SSIM, DSC and BER.

DSC and BER compare *binary* volumes (metal / not metal). The paper binarises the gold standard
with a threshold found by Expectation Maximisation (a two-Gaussian mixture), and every test
volume with Bayes' rule ``p(x|0) p(0) = p(x|1) p(1)`` using the gold standard's priors
``p(0), p(1)``. :func:`em_threshold` and :func:`bayes_threshold` implement those two steps and
:func:`evaluate` chains everything. See docs/metrics-and-baselines.md for the definitions and
the rule MS-SSIM follows on volumes that are too small for five scales.

Only numpy, torch and scikit-learn are used: this module is a library a notebook can import.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from apt_stream.errors import InputError

__all__ = [
    "MS_SSIM_WEIGHTS",
    "BinarizationPrior",
    "bayes_threshold",
    "fixed_prior_threshold",
    "prior_from_labels",
    "ber",
    "dsc",
    "em_threshold",
    "evaluate",
    "ms_ssim_3d",
    "pcc",
]

#: Scale weights of Wang, Simoncelli & Bovik (2003), finest scale first.
MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

_WIN_SIZE = 11
_WIN_SIGMA = 1.5
_K1, _K2 = 0.01, 0.03
# Mixture fits see at most this many voxels: a 128x128x280 volume has 4.6 M, and a random
# subsample of 200 k pins two Gaussian means and variances far below any threshold's noise.
_MAX_FIT_SAMPLES = 200_000


# --------------------------------------------------------------------------- input checks


def _as_float_array(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype == bool:
        a = a.astype(np.float64)
    if np.iscomplexobj(a) or not np.issubdtype(a.dtype, np.number):
        raise InputError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    if a.size == 0:
        raise InputError(f"{name} is empty")
    if not np.isfinite(a).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return a


def _as_binary(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype == bool:
        return a
    if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise InputError(f"{name} must be boolean or 0/1 values, got dtype {a.dtype}")
    if not np.isin(a, (0, 1)).all():
        raise InputError(f"{name} must hold only 0 and 1 (or booleans)")
    return a.astype(bool)


def _same_shape(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape != b.shape:
        raise InputError(f"{names} must have the same shape, got {a.shape} and {b.shape}")


# --------------------------------------------------------------------------- PCC


def pcc(a: Any, b: Any, *, mask: Any = None) -> float:
    """Pearson correlation coefficient between two arrays.

    Parameters
    ----------
    a, b : array_like or torch.Tensor
        Arrays of the same shape (any dimension).
    mask : array_like of bool, optional
        Voxels to include; same shape as ``a``.

    Returns
    -------
    float
        ``cov(a, b) / (std(a) std(b))`` in [-1, 1].

    Raises
    ------
    InputError
        Shapes differ, values are not finite, fewer than two voxels are selected, or either
        array is constant (the correlation is undefined).
    """
    x = _as_float_array(a, "a")
    y = _as_float_array(b, "b")
    _same_shape(x, y, "a and b")
    if mask is not None:
        m = _as_binary(mask, "mask")
        _same_shape(x, m, "a and mask")
        x, y = x[m], y[m]
    if x.size < 2:
        raise InputError(f"pcc needs at least 2 voxels, got {x.size}")
    x = x.ravel() - x.mean()
    y = y.ravel() - y.mean()
    denom = math.sqrt(float(np.dot(x, x)) * float(np.dot(y, y)))
    if denom == 0.0:
        raise InputError("pcc is undefined when an array is constant")
    return float(np.clip(np.dot(x, y) / denom, -1.0, 1.0))


# --------------------------------------------------------------------------- MS-SSIM


def _gauss_1d(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    u = torch.arange(length, dtype=dtype, device=device) - (length - 1) / 2
    g = torch.exp(-(u**2) / (2 * _WIN_SIGMA**2))
    return g / g.sum()


def _window_length(size: int) -> int:
    # An axis shorter than 11 gets the longest odd truncation of the same sigma-1.5 Gaussian
    # that fits, so a valid convolution still leaves at least one voxel.
    return min(_WIN_SIZE, size if size % 2 else size - 1)


def _blur(x: torch.Tensor, kernels: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Separable valid-mode Gaussian blur of (B, 1, D, H, W) along the axes that have a kernel."""
    for axis, k in enumerate(kernels):
        if k is None:
            continue
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        x = F.conv3d(x, k.view(shape))
    return x


def _ssim_and_cs(
    x: torch.Tensor, y: torch.Tensor, kernels: Sequence[torch.Tensor | None], data_range: float
) -> tuple[float, float]:
    c1 = (_K1 * data_range) ** 2
    c2 = (_K2 * data_range) ** 2
    # One conv pass over the five moment maps instead of five passes.
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=0)
    mu_x, mu_y, xx, yy, xy = _blur(stack, kernels)
    var_x = xx - mu_x**2
    var_y = yy - mu_y**2
    cov = xy - mu_x * mu_y
    cs_map = (2 * cov + c2) / (var_x + var_y + c2)
    lum_map = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return float((lum_map * cs_map).mean()), float(cs_map.mean())


def _as_volume_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        t = torch.from_numpy(_as_float_array(x, name))
    if t.is_complex():
        raise InputError(f"{name} must be real, got {t.dtype}")
    if t.ndim != 3:
        raise InputError(f"{name} must be a 3D volume (nz, ny, nx), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise InputError(f"{name} is empty")
    t = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{name} contains NaN or infinite values")
    return t


def ms_ssim_3d(
    a: Any,
    b: Any,
    *,
    data_range: float | None = None,
    weights: Sequence[float] = MS_SSIM_WEIGHTS,
) -> float:
    """Multi-scale structural similarity of two volumes (Wang, Simoncelli & Bovik 2003) in 3D.

    Each scale blurs with a separable Gaussian window (sigma 1.5, 11 voxels, valid mode) and
    compares contrast-structure (cs); the coarsest scale used also includes luminance. Between
    scales the volumes are average-pooled by 2. Negative cs / SSIM values are clamped to 0 before
    the weighted geometric mean (as pytorch-msssim does), so the result lies in [0, 1].

    Small-volume rule (e.g. depth 32 or a single slice): an axis is halved only while the halved
    length is still >= 11, otherwise it keeps its length at the next scale; an axis shorter than
    11 from the start uses the longest odd truncation of the window that fits (length 1 means
    no blur along it). When no axis can be halved any more, the pyramid stops there: that scale
    uses full SSIM and the weights of the scales used are renormalised to sum to 1. Odd lengths
    lose their last voxel when halved.

    Parameters
    ----------
    a, b : array_like or torch.Tensor
        Volumes (nz, ny, nx) of the same shape; ``b`` is the reference. Torch tensors stay on
        their device; float64 inputs are computed in float64, others in float32.
    data_range : float, optional
        Dynamic range ``L`` in the constants ``(0.01 L)^2, (0.03 L)^2``. Default: the range of
        ``b`` (or of both volumes if ``b`` is constant, or 1.0 if both are the same constant).
    weights : sequence of float
        Scale weights, finest first; the default is the paper's five.

    Returns
    -------
    float
        MS-SSIM in [0, 1]; 1 for identical volumes.
    """
    x = _as_volume_tensor(a, "a")
    y = _as_volume_tensor(b, "b")
    if x.shape != y.shape:
        raise InputError(f"a and b must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.device != y.device:
        y = y.to(x.device)
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    w = [float(v) for v in weights]
    if not w or any(not math.isfinite(v) or v < 0 for v in w) or sum(w) <= 0:
        raise InputError(f"weights must be non-negative, finite and not all zero, got {weights!r}")
    if data_range is None:
        data_range = float(y.max() - y.min())
        if data_range == 0.0:
            data_range = float(torch.maximum(x.max(), y.max()) - torch.minimum(x.min(), y.min()))
        if data_range == 0.0:
            data_range = 1.0
    elif not (math.isfinite(data_range) and data_range > 0):
        raise InputError(f"data_range must be finite and > 0, got {data_range!r}")

    sizes = list(x.shape)
    kernels = [
        None if _window_length(s) == 1 else _gauss_1d(_window_length(s), dtype, x.device)
        for s in sizes
    ]
    x, y = x[None, None], y[None, None]
    terms: list[float] = []
    for level in range(len(w)):
        halve = [s // 2 >= _WIN_SIZE for s in sizes]
        last = level == len(w) - 1 or not any(halve)
        ssim_val, cs_val = _ssim_and_cs(x, y, kernels, data_range)
        terms.append(max(ssim_val if last else cs_val, 0.0))
        if last:
            break
        k = tuple(2 if h else 1 for h in halve)
        x, y = F.avg_pool3d(x, k, stride=k), F.avg_pool3d(y, k, stride=k)
        sizes = [s // 2 if h else s for s, h in zip(sizes, halve, strict=True)]
    used = w[: len(terms)]
    if len(terms) < len(w):
        total = sum(used)
        if total == 0:
            raise InputError(
                f"the {len(terms)} scale(s) this volume allows all have zero weight: {weights!r}"
            )
        used = [v / total for v in used]
    return float(np.prod([t**v for t, v in zip(terms, used, strict=True)]))


# --------------------------------------------------------------------------- EM / Bayes


@dataclass(frozen=True)
class BinarizationPrior:
    """Two-Gaussian model of a volume's values: class 0 (not metal) and class 1 (metal).

    Class 1 is the component with the larger mean (metal has the larger δ).

    Attributes
    ----------
    means, variances : tuple of float
        ``(class 0, class 1)`` Gaussian parameters, in the volume's units.
    priors : tuple of float
        ``(p(0), p(1))``, summing to 1.
    threshold : float
        Bayes threshold ``x`` with ``p(x|0) p(0) = p(x|1) p(1)`` between the means; voxels
        ``> threshold`` are class 1.
    """

    means: tuple[float, float]
    variances: tuple[float, float]
    priors: tuple[float, float]
    threshold: float

    def __post_init__(self) -> None:
        p0, p1 = self.priors
        if not (0 < p0 < 1 and 0 < p1 < 1 and abs(p0 + p1 - 1) < 1e-6):
            raise InputError(f"priors must lie in (0, 1) and sum to 1, got {self.priors}")
        if not all(v > 0 and math.isfinite(v) for v in self.variances):
            raise InputError(f"variances must be finite and > 0, got {self.variances}")


def _bayes_root(
    means: Sequence[float], variances: Sequence[float], priors: Sequence[float]
) -> float:
    """x where p0 N(x; m0, v0) = p1 N(x; m1, v1); the root between the means when there is one."""
    (m0, m1), (v0, v1), (p0, p1) = means, variances, priors
    # log(p0 N0) - log(p1 N1) = a x^2 + b x + c
    a = 1 / (2 * v1) - 1 / (2 * v0)
    b = m0 / v0 - m1 / v1
    c = m1**2 / (2 * v1) - m0**2 / (2 * v0) + math.log(p0 / p1) + 0.5 * math.log(v1 / v0)
    mid = 0.5 * (m0 + m1)
    if abs(a) < 1e-12 * max(abs(b), 1e-300):
        roots = [-c / b] if b != 0 else []
    else:
        disc = b * b - 4 * a * c
        if disc < 0:
            roots = []
        else:
            sq = math.sqrt(disc)
            # Numerically stable pair of roots.
            q = -0.5 * (b + math.copysign(sq, b))
            roots = [q / a] + ([c / q] if q != 0 else [])
    if not roots:
        warnings.warn(
            "one weighted class density dominates everywhere; using the midpoint of the means",
            RuntimeWarning,
            stacklevel=3,
        )
        return mid
    lo, hi = min(m0, m1), max(m0, m1)
    between = [r for r in roots if lo <= r <= hi]
    return min(between or roots, key=lambda r: abs(r - mid))


def _fit_sample(values: Any, name: str, max_samples: int, seed: int) -> tuple[np.ndarray, float, float]:
    """Flattened finite values (subsampled), standardised; returns (z, mean, std)."""
    x = _as_float_array(values, name).ravel()
    if max_samples < 2:
        raise InputError(f"max_samples must be >= 2, got {max_samples}")
    if x.size > max_samples:
        x = np.random.default_rng(seed).choice(x, size=max_samples, replace=False)
    mean, std = float(x.mean()), float(x.std())
    if x.size < 2 or std == 0.0 or not math.isfinite(std):
        raise InputError(f"{name} is constant (or has < 2 values): there is nothing to binarise")
    # Mixture fits run in standardised units: sklearn's absolute reg_covar (1e-6) would swamp
    # raw δ values of order 1e-5.
    return (x - mean) / std, mean, std


def em_threshold(
    reference: Any, *, seed: int = 0, max_samples: int = _MAX_FIT_SAMPLES
) -> BinarizationPrior:
    """Fit a two-component Gaussian mixture (EM) to a reference volume and its Bayes threshold.

    Parameters
    ----------
    reference : array_like or torch.Tensor
        The gold-standard volume (any shape).
    seed : int
        Seeds the subsample and scikit-learn's initialisation.
    max_samples : int
        At most this many randomly chosen voxels enter the fit.

    Returns
    -------
    BinarizationPrior
        Means, variances, priors ``p(0), p(1)`` and the threshold, class 1 = larger mean.
    """
    from sklearn.mixture import GaussianMixture

    z, mean, std = _fit_sample(reference, "reference", max_samples, seed)
    gm = GaussianMixture(n_components=2, covariance_type="full", random_state=seed, n_init=1)
    gm.fit(z[:, None])
    order = np.argsort(gm.means_[:, 0])
    mu = gm.means_[order, 0]
    var = gm.covariances_[order, 0, 0]
    pri = gm.weights_[order] / gm.weights_.sum()
    t = _bayes_root(mu, var, pri)
    return BinarizationPrior(
        means=(float(mu[0] * std + mean), float(mu[1] * std + mean)),
        variances=(float(var[0] * std**2), float(var[1] * std**2)),
        priors=(float(pri[0]), float(1.0 - pri[0])),
        threshold=float(t * std + mean),
    )


def _em_fixed_priors(
    z: np.ndarray, priors: tuple[float, float], *, max_iter: int, tol: float
) -> tuple[np.ndarray, np.ndarray]:
    """EM for a 1D two-Gaussian mixture whose mixing weights stay fixed at ``priors``."""
    p0, _ = priors
    # Start from the split the priors imply: the lowest p(0) fraction is class 0.
    cut = np.quantile(z, p0)
    lo = z <= cut
    if lo.all() or not lo.any():
        lo = z <= np.median(z)
    var_floor = 1e-6  # standardised units
    mu = np.array([z[lo].mean(), z[~lo].mean()])
    var = np.array([z[lo].var(), z[~lo].var()]) + var_floor
    log_p = np.log(np.asarray(priors))[:, None]
    for _ in range(max_iter):
        ll = log_p - 0.5 * np.log(2 * np.pi * var)[:, None] - (z[None] - mu[:, None]) ** 2 / (
            2 * var[:, None]
        )
        resp = np.exp(ll - np.logaddexp(ll[0], ll[1])[None])
        nk = resp.sum(axis=1) + 1e-300
        new_mu = (resp * z[None]).sum(axis=1) / nk
        new_var = (resp * (z[None] - new_mu[:, None]) ** 2).sum(axis=1) / nk + var_floor
        done = max(np.abs(new_mu - mu).max(), np.abs(new_var - var).max()) < tol
        mu, var = new_mu, new_var
        if done:
            break
    return mu, var


def bayes_threshold(
    test_values: Any,
    prior: BinarizationPrior,
    *,
    seed: int = 0,
    max_samples: int = _MAX_FIT_SAMPLES,
    max_iter: int = 200,
    tol: float = 1e-7,
) -> float:
    """Bayes threshold of a test volume with the reference's class priors (paper, Methods).

    The class-conditional Gaussians ``p(x|0), p(x|1)`` of the test values are fitted by EM with
    the mixing weights held at the reference's ``p(0), p(1)`` (only means and variances move;
    the start splits the values at their ``p(0)`` quantile, so the test volume may be in other
    units than the reference). The threshold solves ``p(x|0) p(0) = p(x|1) p(1)``: the root of
    the quadratic that lies between the two means.

    Parameters
    ----------
    test_values : array_like or torch.Tensor
        Values of the test reconstruction (any shape).
    prior : BinarizationPrior
        From :func:`em_threshold` on the reference; only ``priors`` is used.
    seed, max_samples : int
        Random subsample used for the fit.
    max_iter : int
        EM iteration cap.
    tol : float
        Stop when means and variances (standardised units) move less than this.

    Returns
    -------
    float
        Threshold in the test volume's units; voxels ``> threshold`` are class 1 (metal).
    """
    if not isinstance(prior, BinarizationPrior):
        raise InputError(f"prior must be a BinarizationPrior, got {type(prior).__name__}")
    return fixed_prior_threshold(test_values, prior.priors[1], seed=seed, max_samples=max_samples,
                                 max_iter=max_iter, tol=tol)


def fixed_prior_threshold(
    values: Any,
    metal_fraction: float,
    *,
    seed: int = 0,
    max_samples: int = _MAX_FIT_SAMPLES,
    max_iter: int = 200,
    tol: float = 1e-7,
) -> float:
    """The threshold :func:`bayes_threshold` gives ``values`` when class 1 has prior ``metal_fraction``.

    The same EM with fixed mixing weights, for callers that know the class fraction but have no
    reference volume (training's validation BER, apt_stream.model.train, which knows the labels).
    """
    p1 = float(metal_fraction)
    if not 0.0 < p1 < 1.0:
        raise InputError(f"metal_fraction must lie in (0, 1), got {metal_fraction}")
    z, mean, std = _fit_sample(values, "test_values", max_samples, seed)
    mu, var = _em_fixed_priors(z, (1.0 - p1, p1), max_iter=max_iter, tol=tol)
    return float(_bayes_root(mu, var, (1.0 - p1, p1)) * std + mean)


# --------------------------------------------------------------------------- DSC / BER


def _confusion(test_bin: Any, ref_bin: Any) -> tuple[int, int, int, int]:
    t = _as_binary(test_bin, "test_bin")
    r = _as_binary(ref_bin, "ref_bin")
    _same_shape(t, r, "test_bin and ref_bin")
    if t.size == 0:
        raise InputError("test_bin is empty")
    tp = int(np.count_nonzero(t & r))
    fp = int(np.count_nonzero(t & ~r))
    fn = int(np.count_nonzero(~t & r))
    tn = t.size - tp - fp - fn
    return tp, tn, fp, fn


def dsc(test_bin: Any, ref_bin: Any) -> float:
    """Dice similarity coefficient (paper Eq. 10): ``2TP / (2TP + FN + FP)``.

    Two empty masks agree perfectly and give 1.0.
    """
    tp, _, fp, fn = _confusion(test_bin, ref_bin)
    denom = 2 * tp + fn + fp
    return 1.0 if denom == 0 else 2 * tp / denom


def ber(test_bin: Any, ref_bin: Any) -> float:
    """Bit-error rate (paper Eq. 11): ``(FP + FN) / (TP + TN + FP + FN)``."""
    tp, tn, fp, fn = _confusion(test_bin, ref_bin)
    return (fp + fn) / (tp + tn + fp + fn)


# --------------------------------------------------------------------------- evaluate


def _keep_z(nz: int, exclude_z: slice | Iterable[int] | None) -> np.ndarray:
    keep = np.ones(nz, dtype=bool)
    if exclude_z is None:
        return keep
    if isinstance(exclude_z, slice):
        keep[exclude_z] = False
    else:
        idx = np.asarray(list(exclude_z))
        if idx.size:
            if not np.issubdtype(idx.dtype, np.integer):
                raise InputError(f"exclude_z must hold integer layer indices, got {idx.dtype}")
            if idx.min() < -nz or idx.max() >= nz:
                raise InputError(f"exclude_z indices must lie in [-{nz}, {nz}), got {idx.tolist()}")
            keep[idx] = False
    if not keep.any():
        raise InputError("exclude_z removes every z layer")
    return keep


def prior_from_labels(reference: np.ndarray, labels: np.ndarray) -> BinarizationPrior:
    """Class means, variances, fractions and Bayes threshold of ``reference`` split by boolean ``labels``."""
    n1 = int(labels.sum())
    if n1 == 0 or n1 == labels.size:
        raise InputError("reference_binary must contain both classes (0 and 1)")
    v0, v1 = reference[~labels], reference[labels]
    scale = max(float(reference.var()), 1e-300)
    means = (float(v0.mean()), float(v1.mean()))
    variances = (float(v0.var()) + 1e-6 * scale, float(v1.var()) + 1e-6 * scale)
    priors = (1.0 - n1 / labels.size, n1 / labels.size)
    return BinarizationPrior(means, variances, priors, _bayes_root(means, variances, priors))


def evaluate(
    test: Any,
    reference: Any,
    *,
    exclude_z: slice | Iterable[int] | None = None,
    reference_binary: Any = None,
    seed: int = 0,
) -> dict[str, float]:
    """All four paper metrics of a test volume against a reference volume.

    PCC and MS-SSIM compare the continuous values (both volumes in the same units, e.g. δ).
    For DSC and BER the reference is binarised by :func:`em_threshold` (or taken from
    ``reference_binary``, e.g. the true metal labels, whose class fractions then give the
    priors) and the test volume by :func:`bayes_threshold` with the reference's priors.

    Parameters
    ----------
    test, reference : array_like or torch.Tensor
        Volumes (nz, ny, nx) of the same shape.
    exclude_z : slice or iterable of int, optional
        Ambiguous z layers to leave out of every metric (paper, Methods).
    reference_binary : array_like of bool or 0/1, optional
        Binary reference (class 1 = metal); skips the EM fit.
    seed : int
        Seed of the mixture fits.

    Returns
    -------
    dict
        ``{"pcc", "ms_ssim", "dsc", "ber"}`` as floats.
    """
    t = _as_float_array(test, "test")
    r = _as_float_array(reference, "reference")
    if t.ndim != 3:
        raise InputError(f"test must be a 3D volume (nz, ny, nx), got shape {t.shape}")
    _same_shape(t, r, "test and reference")
    rb = None
    if reference_binary is not None:
        rb = _as_binary(reference_binary, "reference_binary")
        _same_shape(t, rb, "test and reference_binary")
    keep = _keep_z(t.shape[0], exclude_z)
    t, r = t[keep], r[keep]
    if rb is None:
        prior = em_threshold(r, seed=seed)
        ref_bin = r > prior.threshold
    else:
        ref_bin = rb[keep]
        prior = prior_from_labels(r, ref_bin)
    test_bin = t > bayes_threshold(t, prior, seed=seed)
    return {
        "pcc": pcc(t, r),
        "ms_ssim": ms_ssim_3d(t, r),
        "dsc": dsc(test_bin, ref_bin),
        "ber": ber(test_bin, ref_bin),
    }
