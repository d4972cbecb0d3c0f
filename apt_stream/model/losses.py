"""Training loss: negative Pearson correlation coefficient (NPCC), as in the paper."""

from __future__ import annotations

import torch

from apt_stream.errors import InputError


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
    if pred.shape != target.shape:
        raise InputError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.ndim < 2:
        raise InputError(f"need a batch axis and at least one data axis, got shape {tuple(pred.shape)}")
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


class NPCCLoss(torch.nn.Module):
    """Module form of :func:`npcc_loss`."""

    def __init__(self, *, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return npcc_loss(pred, target, eps=self.eps)
