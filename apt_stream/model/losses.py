"""Training losses: negative Pearson correlation (NPCC, the paper's) and a value-distribution term.

NPCC is invariant to any positive affine map of the output, and it is also nearly blind to the
*shape* of the output's value distribution: a network trained on it alone ranks voxels well but
returns a smooth, one-humped histogram where a chip has two (metal and the rest). The paper's DSC
and BER binarise each volume by a two-Gaussian EM fit of its own histogram, so such an output is
thresholded in the wrong place even when a good threshold exists (docs/network.md, *Loss*).
:func:`marginal_w1` measures that shape, in the same affine-free terms as NPCC.

Matching the truth's histogram is not what the binarisation rewards, though: where the input
cannot tell metal from dielectric, the fewest voxels are wrong when the output puts them on the
dielectric side. :func:`threshold_bce` scores exactly that: each voxel's side of the output's own
EM/Bayes threshold (the one the metrics will draw) against the true metal labels.
"""

from __future__ import annotations

import warnings

import torch

from apt_stream.errors import InputError


def _check_batch_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise InputError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.ndim < 2:
        raise InputError(f"need a batch axis and at least one data axis, got shape {tuple(pred.shape)}")


def pearson_per_sample(pred: torch.Tensor, target: torch.Tensor, *, eps: float = 1e-12) -> torch.Tensor:
    """Pearson correlation of each sample of a batch, over all its other axes.

    Parameters
    ----------
    pred, target : Tensor (B, ...)
        Same shape; the first axis is the batch.
    eps : float
        Guards the division for constant samples (their correlation is then 0).

    Returns
    -------
    Tensor (B,)
    """
    _check_batch_pair(pred, target)
    p = pred.reshape(pred.shape[0], -1).float()
    t = target.reshape(target.shape[0], -1).float()
    p = p - p.mean(dim=1, keepdim=True)
    t = t - t.mean(dim=1, keepdim=True)
    num = (p * t).sum(dim=1)
    den = torch.sqrt((p * p).sum(dim=1) * (t * t).sum(dim=1) + eps)
    return num / den


def npcc_loss(pred: torch.Tensor, target: torch.Tensor, *, eps: float = 1e-12) -> torch.Tensor:
    """Negative Pearson correlation per sample, averaged over the batch (−1 is perfect).

    Invariant to a positive affine map of either argument, so the network's output scale is
    free; :func:`apt_stream.model.train.train` fits the map back to the truth's units.
    """
    return -pearson_per_sample(pred, target, eps=eps).mean()


def marginal_w1(pred: torch.Tensor, target: torch.Tensor, *, eps: float = 1e-12) -> torch.Tensor:
    """1-D Wasserstein-1 distance between the value distributions of each sample, after z-scoring.

    Each sample's values are standardised (so, like NPCC, any positive affine map of either
    argument changes nothing), sorted, and compared rank by rank: the mean absolute difference of
    the sorted values is the W1 distance of the two empirical distributions. It is 0 when the
    output's histogram has the truth's shape, whatever the voxels' positions; it does not look
    at positions at all, which is NPCC's job.

    Parameters
    ----------
    pred, target : Tensor (B, ...)
        Same shape; the first axis is the batch.

    Returns
    -------
    Tensor (B,)
    """
    _check_batch_pair(pred, target)

    def z_sorted(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1).float()
        x = (x - x.mean(dim=1, keepdim=True)) / torch.sqrt(x.var(dim=1, unbiased=False, keepdim=True) + eps)
        return torch.sort(x, dim=1).values

    return (z_sorted(pred) - z_sorted(target)).abs().mean(dim=1)


#: Voxels per sample that enter the (detached) threshold fit of :func:`threshold_bce`.
THRESHOLD_FIT_SAMPLES = 8192


def threshold_bce(
    pred: torch.Tensor,
    metal: torch.Tensor,
    *,
    temperature: float = 0.25,
    seed: int = 0,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Binary cross-entropy of each voxel's side of the output's EM/Bayes threshold vs the labels.

    Per sample: the output is z-scored (so, like NPCC, a positive affine map changes nothing),
    the threshold ``t`` the paper's binarisation would draw is fitted to it (EM with the mixing
    weights fixed at the sample's true metal fraction, apt_stream.metrics.fixed_prior_threshold;
    computed without gradient, on at most :data:`THRESHOLD_FIT_SAMPLES` voxels), and
    ``sigmoid((z − t) / temperature)`` is scored against the metal mask. Every voxel counts the
    same, as in BER. A sample with no metal (or nothing else) has no threshold and scores 0.

    Parameters
    ----------
    pred : Tensor (B, ...)
        Network output.
    metal : Tensor (B, ...)
        Same shape, 1 where the voxel is metal, else 0.
    temperature : float
        Width of the soft step, in units of the output's standard deviation.

    Returns
    -------
    Tensor (B,)
    """
    import numpy as np

    from apt_stream.metrics import fixed_prior_threshold

    _check_batch_pair(pred, metal)
    if not temperature > 0:
        raise InputError(f"temperature must be > 0, got {temperature}")
    p = pred.reshape(pred.shape[0], -1).float()
    m = metal.reshape(metal.shape[0], -1).to(p.dtype)
    z = (p - p.mean(dim=1, keepdim=True)) / torch.sqrt(p.var(dim=1, unbiased=False, keepdim=True) + eps)
    out = []
    zd = z.detach().cpu().numpy()
    for i, frac in enumerate(m.mean(dim=1).tolist()):
        if not 0.0 < frac < 1.0 or not np.isfinite(zd[i]).all() or zd[i].std() == 0:
            out.append(z[i].sum() * 0.0)  # keeps the graph; nothing to learn from this sample
            continue
        with warnings.catch_warnings():
            # an early, one-humped output has no crossing; the midpoint fallback is fine here,
            # and a warning per sample per step would bury the progress bar
            warnings.simplefilter("ignore", RuntimeWarning)
            t = fixed_prior_threshold(zd[i], frac, seed=seed, max_samples=THRESHOLD_FIT_SAMPLES, max_iter=60,
                                      tol=1e-5)
        out.append(torch.nn.functional.binary_cross_entropy_with_logits((z[i] - t) / temperature, m[i]))
    return torch.stack(out)


def apt_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    marginal_weight: float = 0.0,
    metal: torch.Tensor | None = None,
    metal_weight: float = 0.0,
    eps: float = 1e-12,
) -> torch.Tensor:
    """NPCC + ``marginal_weight`` × :func:`marginal_w1` + ``metal_weight`` × :func:`threshold_bce`.

    Averaged over the batch. With both weights 0 this is exactly :func:`npcc_loss` (the paper's
    loss). ``metal`` (the batch's metal masks) is needed when ``metal_weight > 0``.
    """
    if marginal_weight < 0:
        raise InputError(f"marginal_weight must be >= 0, got {marginal_weight}")
    if metal_weight < 0:
        raise InputError(f"metal_weight must be >= 0, got {metal_weight}")
    loss = -pearson_per_sample(pred, target, eps=eps)
    if marginal_weight:
        loss = loss + marginal_weight * marginal_w1(pred, target, eps=eps)
    if metal_weight:
        if metal is None:
            raise InputError("metal_weight > 0 needs the metal masks (a dataset with labels)")
        loss = loss + metal_weight * threshold_bce(pred, metal, eps=eps)
    return loss.mean()


class NPCCLoss(torch.nn.Module):
    """Module form of :func:`npcc_loss`."""

    def __init__(self, *, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return npcc_loss(pred, target, eps=self.eps)
