"""The shipped model's recipe: angle banks over the wide design space, then random-angle training.

``apt-stream train`` calls :func:`build_training_banks` (resumable: finished phantoms are kept and
skipped) and :func:`train_general_model` (resumable from ``OUT/last.safetensors``). Banks are built
by ``jobs`` worker processes, each appending to its own file (HDF5 files take one writer), and the
training reads them all.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apt_stream.angle_bank import bank_seeds, build_banks, load_banks

#: What the shipped model reads: the Approximant and a SART volume of the same angles.
DEFAULT_INPUTS = ("approximant", "sart")


def _sets_progress(progress: Any) -> Callable[[str], Callable[[int, int], None] | None]:
    """A per-split printer for the SART-set precomputation (None when progress is off)."""
    if not progress:
        return lambda split: None

    def make(split: str):
        def report(done: int, total: int) -> None:
            if done == total or done % 8 == 0:
                print(f"SART input volumes ({split}): {done}/{total} banks", flush=True)
        return report
    return make


def bank_files(folder: str | Path) -> list[Path]:
    """The bank files of a training folder (one per worker process that wrote there)."""
    return sorted(Path(folder).glob("banks-*.h5"))


def _present(folder: Path) -> set[int]:
    import h5py

    seeds: set[int] = set()
    for path in bank_files(folder):
        try:
            with h5py.File(path, "r") as fh:
                seeds |= {int(k) for k in fh.get("banks", {}) if k.isdigit()}
        except OSError:  # a file a killed worker left half-written: its phantoms are redone
            continue
    return seeds


def _worker(args: tuple) -> int:
    folder, split, seed, threads, shape, ranges = args
    import torch

    torch.set_num_threads(threads)
    # One file per worker process: HDF5 files take a single writer.
    build_banks(Path(folder) / f"banks-{os.getpid()}.h5", [(split, seed)], shape_zyx=shape, ranges=ranges)
    return seed


def build_training_banks(
    folder: str | Path,
    *,
    n_train: int,
    n_val: int,
    jobs: int = 1,
    shape_zyx: tuple[int, int, int] = (32, 64, 64),
    ranges=None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Simulate ``n_train`` + ``n_val`` phantoms into bank files under ``folder`` (resumable).

    ``ranges`` (:class:`apt_stream.sim.acquisition.AcquisitionRanges`) narrows the random
    acquisitions (tests use small ones); by default banks hold 25-61 angles.

    Phantoms already in any bank file of the folder are skipped, so an interrupted build resumes.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seeds = bank_seeds("train", n_train) + bank_seeds("val", n_val)
    present = _present(folder)
    todo = [(split, s) for split, s in seeds if s not in present]
    done = len(seeds) - len(todo)
    if progress is not None:
        progress(done, len(seeds))
    jobs = max(1, int(jobs))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    tasks = [(str(folder), split, s, threads, tuple(shape_zyx), ranges) for split, s in todo]
    if jobs == 1:
        import torch

        # _worker sets the thread count for a pool process; in this process, put it back after.
        threads_before = torch.get_num_threads()
        try:
            for _ in map(_worker, tasks):
                done += 1
                if progress is not None:
                    progress(done, len(seeds))
        finally:
            torch.set_num_threads(threads_before)
    else:
        with mp.get_context("spawn").Pool(jobs, maxtasksperchild=None) as pool:
            for _ in pool.imap_unordered(_worker, tasks):
                done += 1
                if progress is not None:
                    progress(done, len(seeds))
    return bank_files(folder)


def train_general_model(
    bank_paths: list[Path],
    *,
    out_dir: str | Path,
    preset: str = "cpu-wide",
    epochs: int = 60,
    samples_per_epoch: int = 512,
    val_samples: int = 96,
    resume: bool = False,
    seed: int = 0,
    progress: Any = True,
    inputs: tuple[str, ...] = DEFAULT_INPUTS,
    sets_per_bank: int = 8,
    jobs: int = 2,
    marginal_weight: float = 0.0,
    metal_weight: float = 0.0,
    init: str | Path | None = None,
    lr: float | None = None,
    device: str = "cpu",
):
    """Train the network on random angle sets from the banks (NPCC, Adam, poly LR, batch 4).

    ``marginal_weight`` adds the value-distribution term to NPCC and ``metal_weight`` the
    threshold term, which reads the banks' metal labels (apt_stream.model.losses;
    validation always reports ``val_ber``);
    ``init`` starts from a checkpoint's weights (same preset and inputs) with a fresh optimiser
    and schedule, e.g. to continue the shipped model with another loss; ``lr`` overrides the
    paper's 2e-4.

    ``inputs`` are the channels the network reads (apt_stream.model.inputs); with a SART channel
    each bank's ``sets_per_bank`` SART volumes are computed first by ``jobs`` processes and cached
    in ``<first bank folder>/input-sets``.
    """
    from apt_stream.model.presets import create_model
    from apt_stream.model.train import train
    from apt_stream.random_angles import RandomAngleDataset

    model = create_model(preset, in_channels=len(inputs))
    if init is not None:
        _load_weights(model, init, inputs)
    patch = int(model.config.input_zyx[1])
    cache = Path(bank_paths[0]).parent / "input-sets" if bank_paths else None
    say = _sets_progress(progress)
    common = {"patch_xy": patch, "inputs": inputs, "sets_per_bank": sets_per_bank, "jobs": jobs,
              "cache_dir": cache}
    train_ds = RandomAngleDataset(load_banks(bank_paths, split="train"), samples_per_epoch=samples_per_epoch,
                                  progress=say("train"), metal_masks=metal_weight > 0, **common)
    val_ds = RandomAngleDataset(load_banks(bank_paths, split="val"), samples_per_epoch=val_samples,
                                fixed_seed=12_345, progress=say("validation"), metal_masks=True, **common)
    return model, train(
        model, train_ds, val_ds, epochs=epochs, out_dir=out_dir, resume=resume or None, seed=seed,
        progress=progress, lr_decay_epochs=max(epochs, 1) * 5 // 4, marginal_weight=marginal_weight,
        metal_weight=metal_weight, device=device,
        **({"lr": lr} if lr is not None else {}),
        provenance={"recipe": "apt_stream.training_run", "design_space": "apt_stream.sim.design",
                    "acquisition": "apt_stream.sim.acquisition", "bank_files": [str(p) for p in bank_paths],
                    **({"init": str(init)} if init is not None else {})},
    )


def _load_weights(model, checkpoint: str | Path, inputs: tuple[str, ...]) -> None:
    """Copy a checkpoint's weights into ``model``; a clear error when it is another network."""
    from apt_stream.errors import ModelError
    from apt_stream.model.checkpoint import load_checkpoint

    loaded, _ = load_checkpoint(checkpoint)
    if loaded.config != model.config:
        raise ModelError(f"--init {checkpoint}: its network config differs from the preset's")
    read = tuple(loaded.io_config.get("inputs", ("approximant",)))
    if read != tuple(inputs):
        raise ModelError(f"--init {checkpoint}: it reads {list(read)}, this training feeds {list(inputs)}")
    model.load_state_dict(loaded.state_dict())
