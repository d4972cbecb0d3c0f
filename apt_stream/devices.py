"""Which torch device a command computes on: ``--device cpu | cuda | cuda:N | auto``.

Every command that runs the engine, the network or the baselines takes ``--device`` and checks
it here first, so a wrong name or a GPU that is not there is one clear line before any work
starts (not a CUDA traceback an hour into a scan). ``auto`` picks the first GPU when torch sees
one, else the CPU. On a machine with several GPUs, Dask workers given plain ``cuda`` spread
over them, one model per GPU (:func:`worker_device`).
"""

from __future__ import annotations

import numpy as np
import torch

from apt_stream.errors import InputError

#: What ``--device`` accepts (the CLI's help says the same without importing torch).
CHOICES = "cpu, cuda, cuda:N or auto"


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch device ``name`` stands for, or an :class:`InputError` that says why not."""
    text = "auto" if name is None else str(name).strip().lower()
    if text == "auto":
        # plain "cuda", not "cuda:0": Dask workers then spread over the GPUs (worker_device)
        return torch.device("cuda" if _cuda_count() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {name!r} is not a device: use {CHOICES}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise InputError(f"--device {name!r}: apt-stream computes on {CHOICES}")
    count = _cuda_count()
    if count == 0:
        why = (f"torch {torch.__version__} with CUDA {torch.version.cuda} sees no GPU"
               if torch.version.cuda else f"torch {torch.__version__} is a CPU-only build")
        raise InputError(f"--device {name!r}: no usable CUDA GPU here ({why}); use --device "
                         "cpu or auto")
    if device.index is not None and device.index >= count:
        raise InputError(f"--device {name!r}: this machine has {count} CUDA GPU"
                         f"{'s' if count > 1 else ''} (cuda:0 to cuda:{count - 1})")
    return device


def worker_device(device: str | torch.device, worker_index: int, *,
                  gpu_count: int | None = None) -> torch.device:
    """The device of Dask worker ``worker_index`` for a run on ``device``.

    Plain ``cuda`` puts worker k on GPU k mod the number of GPUs, so N workers on an N-GPU node
    hold one engine and one model per GPU; ``cuda:N`` and ``cpu`` are kept as given.
    """
    dev = torch.device(device)
    if dev.type != "cuda" or dev.index is not None:
        return dev
    count = _cuda_count() if gpu_count is None else int(gpu_count)
    return torch.device(f"cuda:{int(worker_index) % count}") if count else dev


def host_to_device(array, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A numpy frame batch as a tensor on ``device``; through pinned memory for a GPU.

    A pinned (page-locked) host copy lets the transfer run by DMA without a staging copy and
    without blocking the host; later work on the same stream is ordered after it.
    """
    t = torch.as_tensor(np.asarray(array)).to(dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)
