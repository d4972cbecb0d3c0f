"""Training losses: negative Pearson correlation (NPCC, the paper's) and a value-distribution term.

NPCC is invariant to any positive affine map of the output, and it is also nearly blind to the
*shape* of the output's value distribution: a network trained on it alone ranks voxels well but
returns a smooth, one-humped histogram where a chip has two (metal and the rest). The paper's DSC
and BER binarise each volume by a two-Gaussian EM fit of its own histogram, so such an output is
thresholded in the wrong place even when a good threshold exists (docs/network.md, *Loss*).
:func:`marginal_w1` measures that shape, in the same affine-free terms as NPCC.

Matching the truth's histogram is not what the binarisation rewards, though: where the input
cannot tell metal from dielectric, the fewest voxels are wrong when the output puts them on the
dielectric side. :func:`threshold_bce` scores that: each voxel's side of the truth's metal
threshold (after both are z-scored) against the true metal labels.
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


def _truth_threshold(t: torch.Tensor, m: torch.Tensor) -> float | None:
    """Bayes threshold between the truth's metal and non-metal values (z units), or None."""
    from apt_stream.metrics import prior_from_labels

    labels = m.detach().cpu().numpy() > 0.5
    if labels.all() or not labels.any():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # midpoint fallback is fine here
        prior = prior_from_labels(t.detach().cpu().numpy(), labels)
    if not prior.means[1] > prior.means[0]:
        return None  # metal not above the rest in δ: no threshold to learn
    return prior.threshold


def threshold_bce(
    pred: torch.Tensor,
    target: torch.Tensor,
    metal: torch.Tensor,
    *,
    temperature: float = 0.25,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Binary cross-entropy of each voxel's side of the truth's metal threshold, vs the labels.

    Per sample, output and truth are z-scored (the evaluation maps every volume onto the
    truth's mean and spread the same way, and like NPCC this ignores the output's gain and
    offset); the threshold is the Bayes threshold between the truth's metal and non-metal values
    (class means, variances and fractions from the labels), and ``sigmoid((z − t) / temperature)``
    is scored against the metal mask. Every voxel counts the same, as in BER. The threshold
    depends on the truth only, so it cannot move with the output (one drawn from the output's
    own EM fit did, and fed back: docs/network.md, *Loss*). A sample with no metal, nothing else,
    or metal not above the rest in δ scores 0.

    Parameters
    ----------
    pred, target : Tensor (B, ...)
        Network output and truth.
    metal : Tensor (B, ...)
        Same shape, 1 where the voxel is metal, else 0.
    temperature : float
        Width of the soft step, in units of the standard deviation.

    Returns
    -------
    Tensor (B,)
    """
    _check_batch_pair(pred, target)
    _check_batch_pair(pred, metal)
    if not temperature > 0:
        raise InputError(f"temperature must be > 0, got {temperature}")

    def z(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        # clamped, not offset by eps: raw δ has variances ~1e-10, where +eps would bias the scale
        return (x - x.mean(dim=1, keepdim=True)) / x.std(dim=1, unbiased=False, keepdim=True).clamp_min(eps)

    # the truth's threshold in float64: raw δ (~1e-5) z-scored in float32 rounds visibly
    zp, zt = z(pred.float()), z(target.detach().double())
    m = metal.reshape(metal.shape[0], -1).to(zp.dtype)
    out = []
    for i in range(zp.shape[0]):
        t = _truth_threshold(zt[i], m[i])
        if t is None:
            out.append(zp[i].sum() * 0.0)  # keeps the graph; nothing to learn from this sample
        else:
            out.append(torch.nn.functional.binary_cross_entropy_with_logits((zp[i] - t) / temperature, m[i]))
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
        loss = loss + metal_weight * threshold_bce(pred, target, metal, eps=eps)
    return loss.mean()


class NPCCLoss(torch.nn.Module):
    """Module form of :func:`npcc_loss`."""

    def __init__(self, *, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return npcc_loss(pred, target, eps=self.eps)
