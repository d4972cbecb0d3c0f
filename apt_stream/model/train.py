"""Training the APT network: paired sub-volumes, NPCC loss, Adam, polynomial LR, checkpoints.

Follows the paper's Methods: sub-volumes of the full depth cut laterally with 50 % overlap, NPCC
loss, Adam (lr 2e-4, betas 0.9/0.999, no weight decay), ``lr = lr0 (1 − epoch/T)^p`` with
T = 200 and p = 0.9 updated per epoch, batch size 4. Augmentation: random flips along x and y
(never 45° rotations, which would mix the grid with interpolation).

Pairs come in memory (a list of ``(approximant, truth)`` arrays in the sample frame, ``(Z, Y, X)``
and ``(Z, u*Y, u*X)``) or from an HDF5 pair cache (:func:`load_pairs`)::

    pairs/<i>/approximant   float32 (Z, Y, X)
    pairs/<i>/truth         float32 (Z, u*Y, u*X)
    pairs/<i>.attrs         seed (int), split ("train" | "val" | "test")

Files in ``out_dir`` after each epoch: ``last.safetensors`` + ``last.json`` (weights, config,
provenance, checksum), ``last.optim.safetensors`` (Adam state and the loop state: epoch, history,
best), ``best.safetensors`` + ``best.json`` (lowest validation loss so far), ``history.json``.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apt_stream.errors import ConfigError, InputError, ModelError
from apt_stream.model.checkpoint import (
    load_checkpoint,
    load_optimizer_state,
    save_checkpoint,
    save_optimizer_state,
)
from apt_stream.model.losses import apt_loss, marginal_w1, pearson_per_sample, threshold_bce
from apt_stream.model.network import APTNet

Pair = tuple[np.ndarray, np.ndarray]
PairsLike = Sequence[Pair] | str | os.PathLike
ProgressLike = bool | Callable[[dict[str, Any]], None] | None

#: Paper defaults (Methods, "Training and testing environments").
LR0 = 2e-4
BETAS = (0.9, 0.999)
POLY_T_EPOCHS = 200
POLY_POWER = 0.9
BATCH_SIZE = 4


def poly_lr(epoch: int, *, lr0: float = LR0, total_epochs: int = POLY_T_EPOCHS, power: float = POLY_POWER) -> float:
    """Learning rate of the polynomial rule (paper Eq. 9): ``lr0 (1 − epoch/T)^p``, 0 past T."""
    if epoch < 0:
        raise InputError(f"epoch must be >= 0, got {epoch}")
    return lr0 * max(0.0, 1.0 - epoch / total_epochs) ** power


def lateral_starts(size: int, patch: int, stride: int) -> list[int]:
    """Starts of patches of ``patch`` voxels every ``stride`` voxels, the last flush with the end."""
    if patch > size:
        raise InputError(f"patch {patch} is larger than the volume's {size} voxels")
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] + patch < size:
        starts.append(size - patch)
    return starts


def _standardize(arr: np.ndarray) -> np.ndarray:
    std = float(arr.std())
    return ((arr - float(arr.mean())) / (std if std > 0 else 1.0)).astype(np.float32)


class PairDataset:
    """Lateral sub-volumes (full depth) of paired (approximant, truth) volumes.

    Parameters
    ----------
    pairs : sequence of (approximant (Z, Y, X), truth (Z, u*Y, u*X))
        Sample-frame volumes; the truth may be laterally ``upsample_xy`` times finer.
    patch_xy : int or (py, px)
        Lateral size of an input sub-volume (the truth's is ``u`` times larger).
    overlap : float in [0, 1)
        Lateral overlap of neighbouring sub-volumes (paper: 0.5).
    upsample_xy : int
        Lateral factor between truth and approximant.
    normalize : bool
        Standardise each approximant over its whole volume (what :func:`predict_volume` does at
        inference). Truths are kept in their units (NPCC ignores scale; the output calibration
        needs the units).

    Notes
    -----
    Item ``i`` is a pair of tensors ``(1, Z, py, px)`` and ``(1, Z, u*py, u*px)``;
    :meth:`batches` shuffles and applies the random x/y flips.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        *,
        patch_xy: int | Sequence[int],
        overlap: float = 0.5,
        upsample_xy: int = 1,
        normalize: bool = True,
    ) -> None:
        if not 0.0 <= overlap < 1.0:
            raise InputError(f"overlap must be in [0, 1), got {overlap}")
        if upsample_xy < 1:
            raise InputError(f"upsample_xy must be >= 1, got {upsample_xy}")
        py, px = (patch_xy, patch_xy) if isinstance(patch_xy, int | np.integer) else tuple(patch_xy)
        py, px = int(py), int(px)
        if py < 1 or px < 1:
            raise InputError(f"patch_xy must be positive, got {patch_xy}")
        self.patch = (py, px)
        self.up = int(upsample_xy)
        self.volumes: list[tuple[np.ndarray, np.ndarray]] = []
        self.index: list[tuple[int, int, int]] = []
        sy, sx = max(1, round(py * (1 - overlap))), max(1, round(px * (1 - overlap)))
        for k, pair in enumerate(pairs):
            if len(pair) != 2:
                raise InputError(f"pair {k} must be (approximant, truth), got {len(pair)} items")
            a = np.asarray(pair[0], dtype=np.float32)
            t = np.asarray(pair[1], dtype=np.float32)
            if a.ndim != 3:
                raise InputError(f"pair {k}: approximant must be (Z, Y, X), got shape {a.shape}")
            expect = (a.shape[0], a.shape[1] * self.up, a.shape[2] * self.up)
            if t.shape != expect:
                raise InputError(
                    f"pair {k}: truth shape {t.shape} must be {expect} "
                    f"(approximant {a.shape} with lateral upsampling {self.up})"
                )
            if not (np.isfinite(a).all() and np.isfinite(t).all()):
                raise InputError(f"pair {k} contains NaN or infinite values")
            self.volumes.append((_standardize(a) if normalize else a, t))
            for y in lateral_starts(a.shape[1], py, sy):
                for x in lateral_starts(a.shape[2], px, sx):
                    self.index.append((k, y, x))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, y, x = self.index[i]
        a, t = self.volumes[k]
        py, px = self.patch
        u = self.up
        xa = a[None, :, y : y + py, x : x + px]
        xt = t[None, :, y * u : (y + py) * u, x * u : (x + px) * u]
        return torch.from_numpy(np.ascontiguousarray(xa)), torch.from_numpy(np.ascontiguousarray(xt))

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        rng: np.random.Generator | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches ``(B, 1, Z, py, px)`` / ``(B, 1, Z, u*py, u*px)``.

        With ``augment``, each sample is flipped along y and along x with probability ½ each,
        the same flips for input and truth.
        """
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        rng = rng if rng is not None else np.random.default_rng()
        order = rng.permutation(len(self)) if shuffle else np.arange(len(self))
        for b0 in range(0, len(order), batch_size):
            xs, ys = [], []
            for i in order[b0 : b0 + batch_size]:
                xa, xt = self[int(i)]
                if augment:
                    dims = [d for d, flip in zip((-2, -1), rng.random(2) < 0.5, strict=True) if flip]
                    if dims:
                        xa, xt = xa.flip(dims), xt.flip(dims)
                xs.append(xa)
                ys.append(xt)
            yield torch.stack(xs), torch.stack(ys)


def save_pairs(
    path: str | os.PathLike,
    pairs: Sequence[Pair],
    *,
    seeds: Sequence[int] | None = None,
    splits: Sequence[str] | None = None,
) -> Path:
    """Write an HDF5 pair cache in the layout :func:`load_pairs` reads."""
    import h5py

    if seeds is not None and len(seeds) != len(pairs):
        raise InputError(f"got {len(seeds)} seeds for {len(pairs)} pairs")
    if splits is not None and len(splits) != len(pairs):
        raise InputError(f"got {len(splits)} splits for {len(pairs)} pairs")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as fh:
        root = fh.create_group("pairs")
        for i, (a, t) in enumerate(pairs):
            g = root.create_group(str(i))
            g.create_dataset("approximant", data=np.asarray(a, dtype=np.float32))
            g.create_dataset("truth", data=np.asarray(t, dtype=np.float32))
            if seeds is not None:
                g.attrs["seed"] = int(seeds[i])
            if splits is not None:
                g.attrs["split"] = str(splits[i])
    return path


def load_pairs(
    path: str | os.PathLike, *, split: str | None = None, with_attrs: bool = False
) -> list[Pair] | tuple[list[Pair], list[dict[str, Any]]]:
    """Read an HDF5 pair cache (``pairs/<i>/approximant``, ``pairs/<i>/truth``, attrs seed/split).

    Parameters
    ----------
    path : path
    split : str, optional
        Keep only pairs whose ``split`` attribute equals this.
    with_attrs : bool
        Also return each kept pair's attributes (``index``, ``seed``, ``split``).
    """
    import h5py

    path = Path(path)
    if not path.exists():
        raise InputError(f"pair cache {path} does not exist")
    pairs: list[Pair] = []
    attrs: list[dict[str, Any]] = []
    with h5py.File(path, "r") as fh:
        if "pairs" not in fh:
            raise InputError(f"{path} has no 'pairs' group")
        for name in sorted(fh["pairs"], key=lambda s: int(s) if s.isdigit() else s):
            g = fh["pairs"][name]
            for key in ("approximant", "truth"):
                if key not in g:
                    raise InputError(f"{path}: pairs/{name} lacks '{key}'")
            a_split = g.attrs.get("split")
            a_split = a_split.decode() if isinstance(a_split, bytes) else a_split
            if split is not None and a_split != split:
                continue
            pairs.append((g["approximant"][()].astype(np.float32), g["truth"][()].astype(np.float32)))
            seed = g.attrs.get("seed")
            attrs.append({"index": name, "seed": None if seed is None else int(seed), "split": a_split})
    if split is not None and not pairs:
        raise InputError(f"{path} has no pairs with split {split!r}")
    return (pairs, attrs) if with_attrs else pairs


def _dataset(source, split: str, ds_kwargs: dict) -> tuple[Any, dict[str, Any]]:
    """A dataset from pairs / a pair cache, or ``source`` itself when it already is one.

    Anything with ``batches(batch_size, shuffle=, augment=, rng=)`` and ``__len__`` (e.g.
    :class:`apt_stream.random_angles.RandomAngleDataset`) is used as given.
    """
    if source is not None and hasattr(source, "batches"):
        return source, dict(getattr(source, "provenance", {}) or {})
    pairs, prov = _resolve_pairs(source, split)
    return (PairDataset(pairs, **ds_kwargs) if pairs else None), prov


def _resolve_pairs(pairs: PairsLike | None, split: str) -> tuple[list[Pair], dict[str, Any]]:
    if pairs is None:
        return [], {}
    if isinstance(pairs, str | os.PathLike):
        loaded, attrs = load_pairs(pairs, split=split, with_attrs=True)
        return loaded, {"pair_cache": os.fspath(pairs), "data_seeds": [a["seed"] for a in attrs]}
    return list(pairs), {}


@dataclass
class TrainResult:
    """What :func:`train` returns: per-epoch history and where the checkpoints are."""

    out_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_loss: float | None = None

    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.safetensors"

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.safetensors"


class _Progress:
    """A rich progress bar showing the running loss, or a callback, or nothing."""

    def __init__(self, progress: ProgressLike) -> None:
        self.callback = progress if callable(progress) and progress is not True else None
        self.bar = None
        if progress is True:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
            )
            self.bar.start()
        self.task = None

    def epoch_start(self, epoch: int, epochs: int, n_batches: int) -> None:
        if self.bar is not None:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(f"epoch {epoch}/{epochs}", total=n_batches, loss="-")

    def batch(self, info: dict[str, Any]) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, advance=1, loss=f"{info['running_loss']:.4f}")
        if self.callback is not None:
            self.callback({"event": "batch", **info})

    def epoch_end(self, info: dict[str, Any]) -> None:
        if self.bar is not None:
            val = info.get("val_loss")
            self.bar.console.log(
                f"epoch {info['epoch']}: train {info['train_loss']:.4f}"
                + (f", val {val:.4f}" if val is not None else "")
                + (f" (PCC {info['val_pcc']:.3f}, BER {info['val_ber']:.3f})" if "val_ber" in info else "")
                + f", lr {info['lr']:.2e}, {info['seconds']:.1f} s"
            )
        if self.callback is not None:
            self.callback({"event": "epoch", **info})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@torch.no_grad()
def evaluate(
    model: APTNet, dataset: PairDataset, *, batch_size: int = BATCH_SIZE, device: str | torch.device = "cpu",
    marginal_weight: float = 0.0,
    metal_weight: float = 0.0,
) -> dict[str, Any]:
    """Mean loss (the training loss), PCC and value-distribution distance over a dataset, plus the
    least-squares map truth ≈ a·output + b; with metal masks in the batches also the threshold
    term and ``ber``, the error rate of the output binarised at its own EM/Bayes threshold."""
    was_training = model.training
    model.eval()
    n = 0
    pcc_sum = 0.0
    w1_sum = 0.0
    bce_sum, ber_sum, n_masked = 0.0, 0.0, 0
    # Sums for the affine fit, in float64: voxel counts reach 1e8 for paper-size sets.
    s = np.zeros(5)
    try:
        for batch in dataset.batches(batch_size):
            x, y = batch[0].to(device), batch[1].to(device)
            out = model(x)
            pcc_sum += float(pearson_per_sample(out, y).sum())
            w1_sum += float(marginal_w1(out, y).sum())
            if len(batch) > 2:
                metal = batch[2].to(device)
                bce_sum += float(threshold_bce(out, y, metal).sum())
                ber_sum += _threshold_errors(out, metal)
                n_masked += x.shape[0]
            n += x.shape[0]
            p, t = out.double().flatten(), y.double().flatten()
            s += np.array(
                [p.numel(), float(p.sum()), float(t.sum()), float((p * p).sum()), float((p * t).sum())]
            )
    finally:
        model.train(was_training)
    if n == 0:
        raise InputError("evaluation dataset is empty")
    count, sp, st, spp, spt = s
    var = spp - sp * sp / count
    a = (spt - sp * st / count) / var if var > 0 else 0.0
    b = (st - a * sp) / count
    if metal_weight and not n_masked:
        raise InputError("metal_weight > 0 needs a dataset that gives metal masks")
    res = {"loss": (-pcc_sum + marginal_weight * w1_sum + metal_weight * bce_sum) / n, "pcc": pcc_sum / n,
           "marginal_w1": w1_sum / n, "output_affine": [float(a), float(b)], "samples": n}
    if n_masked:
        res.update(threshold_bce=bce_sum / n_masked, ber=ber_sum / n_masked)
    return res


def _threshold_errors(out: torch.Tensor, metal: torch.Tensor) -> float:
    """Sum over the batch of each sample's BER at its own fixed-prior EM/Bayes threshold."""
    from apt_stream.metrics import fixed_prior_threshold

    total = 0.0
    for o, m in zip(out.detach().cpu().numpy(), metal.cpu().numpy().astype(bool), strict=True):
        frac = float(m.mean())
        if 0.0 < frac < 1.0 and o.std() > 0:
            with warnings.catch_warnings():  # the midpoint fallback is the answer for a one-humped patch
                warnings.simplefilter("ignore", RuntimeWarning)
                t = fixed_prior_threshold(o, frac)
            total += float(((o > t) != m).mean())
        else:
            total += float(m.mean())  # no threshold: every voxel called not metal
    return total


def train(
    model: APTNet,
    train_pairs: PairsLike,
    val_pairs: PairsLike | None = None,
    *,
    epochs: int,
    out_dir: str | os.PathLike,
    resume: bool | str | os.PathLike | None = None,
    seed: int = 0,
    progress: ProgressLike = True,
    batch_size: int = BATCH_SIZE,
    lr: float = LR0,
    betas: tuple[float, float] = BETAS,
    lr_decay_epochs: int = POLY_T_EPOCHS,
    lr_power: float = POLY_POWER,
    patch_xy: int | Sequence[int] | None = None,
    overlap: float = 0.5,
    augment: bool = True,
    device: str | torch.device = "cpu",
    max_batches_per_epoch: int | None = None,
    provenance: Mapping[str, Any] | None = None,
    marginal_weight: float = 0.0,
    metal_weight: float = 0.0,
) -> TrainResult:
    """Train ``model`` on paired volumes; checkpoint every epoch, keep the best on validation.

    Parameters
    ----------
    model : APTNet
        Network to train (in place). On resume its config must match the checkpoint's.
    train_pairs, val_pairs : list of (approximant, truth) or path to an HDF5 pair cache
        From a path, the pairs with ``split == "train"`` (resp. ``"val"``) are used. Without
        validation pairs the best checkpoint is chosen on the training loss.
    epochs : int
        Total epochs (counting those already done when resuming).
    out_dir : path
        Where checkpoints and ``history.json`` go.
    resume : bool or path, optional
        ``True``: continue from ``out_dir/last.safetensors``; a path: from that checkpoint (its
        ``<name>.optim.safetensors`` must sit beside it). The epoch count, LR schedule, history
        and best score carry on.
    seed : int
        Seeds torch (global) and the per-epoch shuffling/flips (``seed + epoch``), so a resumed
        run sees the same batches as an uninterrupted one.
    progress : bool or callable
        ``True``: rich progress bar with the running loss; a callable gets event dicts.
    batch_size, lr, betas, lr_decay_epochs, lr_power
        Paper values by default: 4, 2e-4, (0.9, 0.999), T = 200, p = 0.9.
    patch_xy : int or (py, px), optional
        Lateral sub-volume size; default the model's nominal ``input_zyx[1:]``.
    overlap : float
        Lateral overlap of the training sub-volumes (paper: 0.5).
    augment : bool
        Random x/y flips of training samples.
    device : str or torch.device
    max_batches_per_epoch : int, optional
        Cap batches per epoch (smoke runs).
    provenance : mapping, optional
        Extra provenance for the checkpoints (e.g. data seeds, simulator preset).
    metal_weight : float
        Weight of the threshold term (:func:`apt_stream.model.losses.threshold_bce`); needs a
        dataset that gives metal masks (``RandomAngleDataset(metal_masks=True)``).
    marginal_weight : float
        Weight of the value-distribution term (:func:`apt_stream.model.losses.marginal_w1`) added
        to NPCC; 0 is the paper's loss. Validation and the best checkpoint use the same loss.

    Returns
    -------
    TrainResult
        History and checkpoint paths. ``model`` holds the last epoch's weights afterwards; load
        ``result.best_path`` for the best ones.
    """
    if not isinstance(model, APTNet):
        raise ModelError(f"train() needs an APTNet, got {type(model).__name__}")
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    if not (marginal_weight >= 0 and np.isfinite(marginal_weight)):
        raise ConfigError(f"marginal_weight must be a finite number >= 0, got {marginal_weight}")
    if not (metal_weight >= 0 and np.isfinite(metal_weight)):
        raise ConfigError(f"metal_weight must be a finite number >= 0, got {metal_weight}")
    if batch_size < 1 or lr <= 0 or lr_decay_epochs < 1:
        raise ConfigError(
            f"need batch_size >= 1, lr > 0, lr_decay_epochs >= 1 (got {batch_size}, {lr}, {lr_decay_epochs})"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    torch.manual_seed(seed)

    patch = patch_xy if patch_xy is not None else tuple(model.config.input_zyx[1:])
    ds_kwargs = {"patch_xy": patch, "overlap": overlap, "upsample_xy": model.upsample_xy}
    train_ds, tr_prov = _dataset(train_pairs, "train", ds_kwargs)
    val_ds, va_prov = _dataset(val_pairs, "val", ds_kwargs)
    if train_ds is None or not len(train_ds):
        raise InputError("no training pairs")
    if metal_weight and not getattr(train_ds, "metal_masks", False):
        raise ConfigError("metal_weight > 0 needs a training dataset with metal masks "
                          "(RandomAngleDataset(..., metal_masks=True))")
    input_norm = getattr(train_ds, "input_norm", "standardize")
    model.io_config["input_norm"] = input_norm
    inputs = list(getattr(train_ds, "inputs", ("approximant",)))
    if len(inputs) != model.config.in_channels:
        raise ConfigError(f"the dataset gives {len(inputs)} input channel(s) {inputs}, "
                          f"the network reads {model.config.in_channels}")
    model.io_config["inputs"] = inputs
    if "sart" in inputs:
        from apt_stream.model.inputs import SART_RELAXATION, SART_SWEEPS

        model.io_config["sart"] = {"n_iter": SART_SWEEPS, "relaxation": SART_RELAXATION}

    model.to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=tuple(betas), weight_decay=0.0)
    run_config = {
        "epochs": epochs, "batch_size": batch_size, "lr0": lr, "betas": list(betas),
        "weight_decay": 0.0, "lr_schedule": {"rule": "poly", "T": lr_decay_epochs, "power": lr_power},
        "patch_xy": [int(v) for v in np.broadcast_to(train_ds.patch, 2)], "overlap": overlap, "augment": augment,
        "augmentations": getattr(train_ds, "augmentations", ["flip_x", "flip_y"]) if augment else [],
        "seed": seed, "loss": "+".join(["npcc"] + ["marginal_w1"] * bool(marginal_weight)
                                       + ["threshold_bce"] * bool(metal_weight)),
        "marginal_weight": float(marginal_weight), "metal_weight": float(metal_weight), "input_norm": input_norm,
    }
    base_prov = {
        **{f"train_{k}": v for k, v in tr_prov.items()},
        **{f"val_{k}": v for k, v in va_prov.items()},
        "train_samples": len(train_ds), "val_samples": len(val_ds) if val_ds else 0,
        **dict(provenance or {}),
    }

    result = TrainResult(out_dir=out)
    start_epoch = 0
    if resume:
        ckpt = out / "last.safetensors" if resume is True else Path(resume)
        start_epoch, result = _resume(model, optimizer, ckpt, out, dev)

    bar = _Progress(progress)
    try:
        for epoch in range(start_epoch, epochs):
            info = _run_epoch(
                model, optimizer, train_ds, val_ds, epoch=epoch, epochs=epochs, bar=bar,
                lr=poly_lr(epoch, lr0=lr, total_epochs=lr_decay_epochs, power=lr_power),
                batch_size=batch_size, augment=augment, seed=seed, device=dev,
                max_batches=max_batches_per_epoch, marginal_weight=marginal_weight,
                metal_weight=metal_weight,
            )
            result.history.append(info)
            score = info["val_loss"] if info["val_loss"] is not None else info["train_loss"]
            improved = result.best_val_loss is None or score < result.best_val_loss
            if improved:
                result.best_val_loss, result.best_epoch = score, info["epoch"]
            if info.get("output_affine") is not None:
                model.io_config["output_affine"] = info["output_affine"]
            prov = {**base_prov, "metrics": _metrics(info), "epoch": info["epoch"]}
            save_checkpoint(out / "last.safetensors", model, config=run_config, provenance=prov)
            if improved:
                save_checkpoint(out / "best.safetensors", model, config=run_config, provenance=prov)
            save_optimizer_state(
                out / "last.optim.safetensors", optimizer,
                extra={"epoch": info["epoch"], "history": result.history,
                       "best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss},
            )
            (out / "history.json").write_text(json.dumps(result.history, indent=2))
            bar.epoch_end(info)
    finally:
        bar.close()
    return result


def _metrics(info: Mapping[str, Any]) -> dict[str, Any]:
    return {k: info[k] for k in ("train_loss", "val_loss", "val_pcc", "val_marginal_w1", "val_ber") if k in info}


def _resume(
    model: APTNet, optimizer: torch.optim.Optimizer, ckpt: Path, out: Path, device: torch.device
) -> tuple[int, TrainResult]:
    loaded, meta = load_checkpoint(ckpt, map_location=device)
    if loaded.config != model.config:
        raise ModelError(f"cannot resume from {ckpt}: its network config differs from the model's")
    model.load_state_dict(loaded.state_dict())
    model.io_config.update(loaded.io_config)
    optim_path = ckpt.with_name(ckpt.name.removesuffix(".safetensors") + ".optim.safetensors")
    extra = load_optimizer_state(optim_path, optimizer, map_location=device)
    result = TrainResult(
        out_dir=out, history=list(extra.get("history", [])), best_epoch=extra.get("best_epoch"),
        best_val_loss=extra.get("best_val_loss"),
    )
    return int(extra.get("epoch", meta.get("provenance", {}).get("epoch", 0))), result


def _run_epoch(
    model: APTNet,
    optimizer: torch.optim.Optimizer,
    train_ds: PairDataset,
    val_ds: PairDataset | None,
    *,
    epoch: int,
    epochs: int,
    bar: _Progress,
    lr: float,
    batch_size: int,
    augment: bool,
    seed: int,
    device: torch.device,
    max_batches: int | None,
    marginal_weight: float = 0.0,
    metal_weight: float = 0.0,
) -> dict[str, Any]:
    for group in optimizer.param_groups:
        group["lr"] = lr
    t0 = time.perf_counter()
    model.train()
    rng = np.random.default_rng([seed, epoch])
    n_batches = -(-len(train_ds) // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    bar.epoch_start(epoch + 1, epochs, n_batches)
    total, count = 0.0, 0
    for i, batch in enumerate(train_ds.batches(batch_size, shuffle=True, augment=augment, rng=rng)):
        if i >= n_batches:
            break
        x, y = batch[0].to(device), batch[1].to(device)
        metal = batch[2].to(device) if len(batch) > 2 else None
        optimizer.zero_grad(set_to_none=True)
        loss = apt_loss(model(x), y, marginal_weight=marginal_weight, metal=metal, metal_weight=metal_weight)
        if not torch.isfinite(loss):
            raise ModelError(f"training loss became {float(loss)} at epoch {epoch + 1}, batch {i + 1}")
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * x.shape[0]
        count += x.shape[0]
        bar.batch({"epoch": epoch + 1, "batch": i + 1, "batches": n_batches, "loss": float(loss.detach()),
                   "running_loss": total / count})
    info: dict[str, Any] = {
        "epoch": epoch + 1, "lr": lr, "train_loss": total / max(count, 1),
        "val_loss": None, "val_pcc": None, "output_affine": None,
    }
    if val_ds is not None and len(val_ds):
        ev = evaluate(model, val_ds, batch_size=batch_size, device=device, marginal_weight=marginal_weight,
                      metal_weight=metal_weight)
        info.update(val_loss=ev["loss"], val_pcc=ev["pcc"], val_marginal_w1=ev["marginal_w1"],
                    output_affine=ev["output_affine"])
        if "ber" in ev:
            info["val_ber"] = ev["ber"]
    info["seconds"] = time.perf_counter() - t0
    return info
