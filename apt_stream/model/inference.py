"""Stitched inference over volumes of any lateral size, and an inference benchmark.

The network sees the whole depth ``Z`` at once and lateral patches of ``patch_xy`` voxels. Patches
overlap by ``overlap`` (a fraction of the patch); each output patch is multiplied by a separable
Hann-like window ``w(i) = sin²(π (i + ½) / P)`` (never zero) and the sum is divided by the summed
windows. So overlapping predictions blend without seams, and a network whose output equals its
input (or is constant) is reproduced exactly. The volume is reflect-padded laterally by half the
overlap so that border voxels are predicted from patch interiors too, and padded in depth to the
network's size multiple; both paddings are cropped from the output.

Units: with ``io_config["input_norm"] == "rms"`` (the default model's) the volume is divided by its
RMS on the way in and the (calibrated) output multiplied by it on the way out, so the output is δ
in the input's units whatever the energy, voxel size or thickness. Older models: the volume is standardised (``(v − mean) / std`` over the whole volume) before it
enters the network, as in training. The network's output is then in arbitrary units (NPCC training
fixes correlation, not scale); when the model's ``io_config["output_affine"] = (a, b)`` is set
(training fits it on the validation set), the output is mapped to ``a * out + b``, the truth's units.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from apt_stream.errors import InputError

ProgressFn = Callable[[int, int], None]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _as_volume(volume: Any) -> np.ndarray:
    if isinstance(volume, torch.Tensor):
        volume = volume.detach().to("cpu").numpy()
    arr = np.asarray(volume)
    if arr.ndim not in (3, 4):
        raise InputError(f"volume must be 3-D (Z, Y, X) or 4-D (C, Z, Y, X) channels, got shape {arr.shape}")
    if min(arr.shape) < 1:
        raise InputError(f"volume has an empty axis: shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise InputError(f"volume must be real-valued, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise InputError("volume contains NaN or infinite values")
    return arr


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int | np.integer):
        value = (int(value), int(value))
    vals = tuple(int(v) for v in value)
    if len(vals) != 2 or min(vals) < 1:
        raise InputError(f"{name} must be a positive int or (Y, X) pair, got {value!r}")
    return vals  # type: ignore[return-value]


def hann_window(length: int) -> np.ndarray:
    """Blending weights ``sin²(π (i + ½) / length)``: symmetric, peak 1, strictly positive."""
    i = np.arange(length, dtype=np.float64)
    return np.sin(np.pi * (i + 0.5) / length) ** 2


def tile_starts(size: int, patch: int, stride: int, margin: int) -> tuple[list[int], int, int]:
    """Patch starts over an axis padded by ``margin`` in front, plus (pad_before, pad_after).

    Enough patches are placed to cover ``size + 2 * margin`` voxels; the end padding makes the
    last patch fit exactly.
    """
    need = size + 2 * margin
    n = 1 if need <= patch else math.ceil((need - patch) / stride) + 1
    padded = (n - 1) * stride + patch
    return [i * stride for i in range(n)], margin, padded - size - margin


def _pad(arr: np.ndarray, widths: list[tuple[int, int]]) -> np.ndarray:
    if all(a == 0 and b == 0 for a, b in widths):
        return arr
    # Reflection keeps edge statistics; a length-1 axis can only be repeated.
    modes = ["reflect" if arr.shape[i] > 1 else "edge" for i in range(arr.ndim)]
    if len(set(modes)) == 1:
        return np.pad(arr, widths, mode=modes[0])
    for axis, (w, mode) in enumerate(zip(widths, modes, strict=True)):
        if w != (0, 0):
            pw = [(0, 0)] * arr.ndim
            pw[axis] = w
            arr = np.pad(arr, pw, mode=mode)
    return arr


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every eval-mode BatchNorm3d folded into the Conv3d before it.

    In inference a BatchNorm is a fixed per-channel affine map, so ``bn(conv(x))`` equals one
    convolution with rescaled weights and a bias: the same output (to float rounding) for one
    memory pass less per layer. Only ``conv -> BatchNorm3d`` pairs inside an ``nn.Sequential``
    are folded (every ``ConvNormAct`` of the network); other norms are left alone.
    """
    import copy

    folded = copy.deepcopy(model).eval()
    with torch.no_grad():
        for seq in folded.modules():
            if not isinstance(seq, nn.Sequential):
                continue
            for i in range(len(seq) - 1):
                conv, bn = seq[i], seq[i + 1]
                if not (isinstance(conv, nn.Conv3d) and isinstance(bn, nn.BatchNorm3d)):
                    continue
                if bn.running_mean is None or not bn.affine:
                    continue
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                conv.weight.mul_(scale.reshape(-1, 1, 1, 1, 1).to(conv.weight.dtype))
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                new_bias = (bias - bn.running_mean) * scale + bn.bias
                conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
                seq[i + 1] = nn.Identity()
    return folded


class _Runner:
    """A model prepared for repeated patch batches (device, memory format, dtype, compile)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        device: torch.device,
        dtype: torch.dtype,
        channels_last: bool,
        compile: bool,
        inference_mode: bool,
    ) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.channels_last = channels_last
        self.inference_mode = inference_mode
        # Inference mode also folds BatchNorms into their convolutions (exact in eval mode).
        fast = fold_batchnorm(model) if inference_mode else model
        self.fn: Callable[[torch.Tensor], torch.Tensor] = fast
        if compile:
            self.fn = torch.compile(fast, dynamic=False)

    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        grad_ctx = torch.inference_mode() if self.inference_mode else torch.no_grad()
        amp = (
            torch.autocast(device_type=self.device.type, dtype=self.dtype)
            if self.dtype != torch.float32
            else contextlib.nullcontext()
        )
        with grad_ctx, amp:
            out = self.fn(x)
        if isinstance(out, tuple):
            out = out[0]
        return out.float()


@contextlib.contextmanager
def _prepared(model: nn.Module, *, device: torch.device, channels_last: bool):
    """Eval mode, device and memory format for the duration of a prediction, then restored."""
    was_training = model.training
    model.eval()
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
    try:
        yield
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
        model.train(was_training)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def predict_volume(
    model: nn.Module,
    volume: np.ndarray | torch.Tensor,
    *,
    patch_xy: int | Sequence[int] | None = None,
    overlap: float = 0.5,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
    channels_last: bool = False,
    compile: bool = False,
    normalize: bool | None = None,
    calibrate: bool = True,
    progress: ProgressFn | bool | None = None,
) -> np.ndarray:
    """Reconstruct a whole volume by blending overlapping lateral patches through ``model``.

    Parameters
    ----------
    model : nn.Module
        Maps ``(B, 1, Z, py, px)`` to ``(B, 1, Z, u*py, u*px)``; an :class:`APTNet` or any module
        with that contract (``u`` from ``model.upsample_xy`` or inferred from the output).
    volume : array (Z, Y, X)
        Any lateral size; ``Z`` goes in whole (padded to the network's depth multiple).
    patch_xy : int or (py, px), optional
        Lateral patch; default the model's nominal ``input_zyx[1:]``. Must be a multiple of the
        model's lateral size multiple.
    overlap : float in [0, 1)
        Fraction of a patch shared with its neighbour (0.5: stride = half a patch).
    batch_size : int
        Patches per forward pass.
    device : str or torch.device, optional
        Where to run; default the model's device. The model is moved there.
    dtype : {"float32", "bfloat16"}
        ``bfloat16`` runs under autocast; accumulation is always float32.
    channels_last : bool
        Use the channels-last-3d memory layout (model and inputs) during the call.
    compile : bool
        Wrap the model in ``torch.compile`` (slow first call; see :func:`benchmark_inference`).
    normalize : bool, optional
        Standardise the volume first; default from ``model.io_config["input_norm"]``
        (``"standardize"`` unless the model says ``"none"``).
    calibrate : bool
        Apply ``model.io_config["output_affine"]`` when present.
    progress : callable(done, total) or bool, optional
        Called after every batch with patch counts; ``True`` shows a rich progress bar.

    Returns
    -------
    ndarray (Z, u*Y, u*X) float32
    """
    vol = _as_volume(volume)
    if not 0.0 <= float(overlap) < 1.0:
        raise InputError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise InputError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    elif dtype not in _DTYPES.values():
        raise InputError(f"dtype must be float32 or bfloat16, got {dtype}")
    cfg = getattr(model, "config", None)
    if patch_xy is None:
        if cfg is None or not hasattr(cfg, "input_zyx"):
            raise InputError("patch_xy is required for a model without a nominal input_zyx")
        patch_xy = tuple(cfg.input_zyx[1:])
    py, px = _pair(patch_xy, "patch_xy")
    mz, my, mx = tuple(getattr(model, "input_multiple_zyx", (1, 1, 1)))
    if py % my or px % mx:
        raise InputError(f"patch_xy ({py}, {px}) must be a multiple of the model's ({my}, {mx})")
    dev = torch.device(device) if device is not None else _model_device(model)
    runner_kwargs = {"channels_last": channels_last, "compile": compile, "inference_mode": True}
    with _prepared(model, device=dev, channels_last=channels_last):
        runner = _Runner(model, device=dev, dtype=dtype, **runner_kwargs)
        return _stitch(
            runner, vol, patch=(py, px), overlap=float(overlap), batch_size=batch_size,
            depth_multiple=mz, normalize=normalize, calibrate=calibrate, progress=progress,
        )


def _stitch(
    runner: _Runner,
    vol: np.ndarray,
    *,
    patch: tuple[int, int],
    overlap: float,
    batch_size: int,
    depth_multiple: int,
    normalize: bool | None,
    calibrate: bool,
    progress: ProgressFn | bool | None,
) -> np.ndarray:
    model = runner.model
    io = dict(getattr(model, "io_config", None) or {})
    mode = io.get("input_norm", "standardize")
    if normalize is None:
        normalize = mode in ("standardize", "rms")
    # "rms": divide by the volume's RMS and multiply the output back (scale-free in, physical
    # units out: f(c·x) = c·f(x), so a vacuum input, whose RMS is noise, stays near zero).
    # Channels: (C, Z, Y, X); a plain (Z, Y, X) volume is one channel.
    vol = vol[None] if vol.ndim == 3 else vol
    n_in = int(getattr(getattr(model, "config", None), "in_channels", vol.shape[0]))
    if vol.shape[0] != n_in:
        raise InputError(f"the model reads {n_in} input channel(s), got {vol.shape[0]}")
    out_scale = 1.0
    if normalize and mode == "rms":
        # Each channel by its own RMS; channel 0 (the Approximant) sets the output's scale.
        rms = [_rms(c) for c in vol]
        out_scale = rms[0]
        vol = (vol / np.asarray(rms, np.float32)[:, None, None, None]).astype(np.float32, copy=False)
    elif normalize:
        # A constant volume carries no structure; centring alone avoids dividing by zero.
        std = np.array([float(c.std()) or 1.0 for c in vol], np.float32)[:, None, None, None]
        vol = ((vol - vol.mean(axis=(1, 2, 3), keepdims=True)) / std).astype(np.float32, copy=False)

    _, nz, ny, nx = vol.shape
    py, px = patch
    sy, sx = max(1, round(py * (1 - overlap))), max(1, round(px * (1 - overlap)))
    starts_y, y0, y1 = tile_starts(ny, py, sy, (py - sy) // 2)
    starts_x, x0, x1 = tile_starts(nx, px, sx, (px - sx) // 2)
    z1 = (-nz) % depth_multiple
    padded = np.stack([_pad(c, [(0, z1), (y0, y1), (x0, x1)]) for c in vol])
    tiles = [(ty, tx) for ty in starts_y for tx in starts_x]

    up = getattr(model, "upsample_xy", None)
    acc: np.ndarray | None = None
    wsum: np.ndarray | None = None
    window: np.ndarray | None = None
    report = _progress_callback(progress, len(tiles))
    try:
        for b0 in range(0, len(tiles), batch_size):
            chunk = tiles[b0 : b0 + batch_size]
            batch = np.stack([padded[:, :, ty : ty + py, tx : tx + px] for ty, tx in chunk])
            out = runner(batch)
            if out.ndim != 5 or out.shape[1] != 1:
                raise InputError(f"model output must be (B, 1, Z, Y, X), got {tuple(out.shape)}")
            if up is None:
                up = out.shape[-1] // px
            if up < 1 or out.shape[2:] != (padded.shape[1], py * up, px * up):
                raise InputError(
                    f"model output {tuple(out.shape)} does not match input patch "
                    f"{(padded.shape[1], py, px)} times the lateral upsampling {up}"
                )
            if acc is None:
                acc = np.zeros((padded.shape[1], padded.shape[2] * up, padded.shape[3] * up), np.float32)
                wsum = np.zeros(acc.shape[1:], np.float64)
                window = np.outer(hann_window(py * up), hann_window(px * up))
                window_t = torch.from_numpy(window.astype(np.float32))
            pred = (out[:, 0].cpu() * window_t).numpy()
            for (ty, tx), p in zip(chunk, pred, strict=True):
                sl = (slice(ty * up, (ty + py) * up), slice(tx * up, (tx + px) * up))
                acc[(slice(None), *sl)] += p
                wsum[sl] += window
            report(min(b0 + batch_size, len(tiles)))
    finally:
        report(None)
    assert acc is not None and wsum is not None
    acc /= wsum.astype(np.float32)[None]
    result = acc[:nz, y0 * up : (y0 + ny) * up, x0 * up : (x0 + nx) * up]
    affine = io.get("output_affine")
    if calibrate and affine is not None:
        a, b = (float(v) for v in affine)
        result = result * np.float32(a) + np.float32(b)
    if out_scale != 1.0:
        result = result * np.float32(out_scale)
    return np.ascontiguousarray(result, dtype=np.float32)


def _rms(v: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(v, dtype=np.float64))))
    return rms if rms > 0 else 1.0


def _progress_callback(progress: ProgressFn | bool | None, total: int) -> Callable[[int | None], None]:
    """Adapt ``progress`` to ``f(done)``; ``f(None)`` closes a rich bar if one was opened."""
    if progress is None or progress is False:
        return lambda done: None
    if callable(progress) and progress is not True:
        fn = progress
        return lambda done: None if done is None else fn(done, total)
    from rich.progress import Progress

    bar = Progress(transient=True)
    task = bar.add_task("APT inference (patches)", total=total)
    bar.start()

    def update(done: int | None) -> None:
        if done is None:
            bar.stop()
        else:
            bar.update(task, completed=done)

    return update


def benchmark_inference(
    preset: str = "cpu",
    volume_shape: Sequence[int] = (32, 64, 64),
    *,
    repeats: int = 3,
    patch_xy: int | Sequence[int] | None = None,
    overlap: float = 0.5,
    batch_size: int = 4,
    dtype: str = "bfloat16",
    channels_last: bool = True,
    compile: bool = False,
    device: str = "cpu",
    seed: int = 0,
    **overrides: Any,
) -> dict[str, Any]:
    """Time stitched inference: eager fp32 against the optimised path, in one run.

    Baseline: ``torch.no_grad``, contiguous layout, float32, no compile. Optimised:
    ``torch.inference_mode`` plus the chosen ``dtype`` (autocast), ``channels_last`` and
    ``compile``. Both get one untimed warm-up call (which holds the compile time), then
    ``repeats`` rounds time each once, in turn; medians are used, and the spread of the rounds'
    own ratios is reported (``speedup_per_round``). The model has random weights (speed does not depend
    on the values); the input is smoothed noise.

    Measured on 2 shared CPU cores (docs/network.md): bfloat16 + channels-last is the fastest
    CPU path (about 1.8x at one thread); ``torch.compile`` adds 40-60 s of compile time and no
    reliable gain, so it stays off by default.

    Returns
    -------
    dict
        ``eager`` and ``optimized`` with ``seconds`` (median), ``best_seconds`` (minimum, the
        robust figure on a busy machine) and ``voxels_per_s`` (input voxels over the median),
        ``speedup`` (median eager / median optimised) and ``speedup_best``, ``pcc`` between the
        two outputs and ``max_abs_diff``, plus the settings and thread count.
    """
    from apt_stream.model.presets import create_model

    if repeats < 1:
        raise InputError(f"repeats must be >= 1, got {repeats}")
    if len(volume_shape) != 3:
        raise InputError(f"volume_shape must be (Z, Y, X), got {volume_shape}")
    torch.manual_seed(seed)
    model = create_model(preset, **overrides)
    rng = np.random.default_rng(seed)
    vol = rng.standard_normal(tuple(int(v) for v in volume_shape)).astype(np.float32)
    # Neighbour averaging gives the volume some spatial structure, like an Approximant.
    vol = (vol + np.roll(vol, 1, 0) + np.roll(vol, 1, 1) + np.roll(vol, 1, 2)) / 4
    if patch_xy is None:
        patch_xy = tuple(model.config.input_zyx[1:])
    py, px = _pair(patch_xy, "patch_xy")
    dev = torch.device(device)
    n_vox = int(np.prod(vol.shape))

    runners: dict[bool, _Runner] = {}

    def once(optimized: bool) -> tuple[float, np.ndarray]:
        use_dtype = _DTYPES[dtype] if optimized else torch.float32
        cl = channels_last and optimized
        with _prepared(model, device=dev, channels_last=cl):
            runner = runners.get(optimized)
            if runner is None:  # kept: a compiled runner compiles once
                runner = runners[optimized] = _Runner(
                    model, device=dev, dtype=use_dtype, channels_last=cl,
                    compile=compile and optimized, inference_mode=optimized,
                )
            t0 = time.perf_counter()
            out = _stitch(
                runner, vol, patch=(py, px), overlap=overlap, batch_size=batch_size,
                depth_multiple=model.input_multiple_zyx[0], normalize=True, calibrate=False,
                progress=None,
            )
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return time.perf_counter() - t0, out

    # One untimed warm-up each (it holds any compile time), then eager and optimised in turn
    # (E, O, E, O, ...): a burst of load on this shared machine lands on both sides alike.
    warm_eager, out_eager = once(False)
    warm_opt, out_opt = once(True)
    times_eager, times_opt = [], []
    for _ in range(repeats):
        seconds, out_eager = once(False)
        times_eager.append(seconds)
        seconds, out_opt = once(True)
        times_opt.append(seconds)
    round_ratios = [e / o for e, o in zip(times_eager, times_opt, strict=True)]
    t_eager, t_opt = float(np.median(times_eager)), float(np.median(times_opt))
    best_eager, best_opt = min(times_eager), min(times_opt)
    pcc = float(np.corrcoef(out_eager.ravel(), out_opt.ravel())[0, 1])
    return {
        "preset": preset,
        "volume_shape": [int(v) for v in vol.shape],
        "patch_xy": [py, px],
        "overlap": overlap,
        "batch_size": batch_size,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "repeats": repeats,
        "eager": {
            "seconds": t_eager,
            "best_seconds": best_eager,
            "warmup_seconds": warm_eager,
            "voxels_per_s": n_vox / t_eager,
        },
        "optimized": {
            "seconds": t_opt,
            "best_seconds": best_opt,
            "warmup_seconds": warm_opt,
            "voxels_per_s": n_vox / t_opt,
            "dtype": dtype,
            "channels_last": channels_last,
            "compile": compile,
            "inference_mode": True,
        },
        "speedup": t_eager / t_opt,
        "speedup_best": best_eager / best_opt,
        "speedup_per_round": {"median": float(np.median(round_ratios)),
                              "min": min(round_ratios), "max": max(round_ratios)},
        "pcc": pcc,
        "max_abs_diff": float(np.max(np.abs(out_eager - out_opt))),
    }
