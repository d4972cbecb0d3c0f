"""The ``apt-stream`` command line (typer + rich).

Heavy imports (torch, tiled, prefect, bluesky) happen inside the commands so ``--help`` is instant.
Every command exits non-zero with a one-line cause when an apt-stream error (or a missing file)
stops it; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="apt-stream",
    help="Streaming Attentional Ptycho-Tomography: simulate, reconstruct, serve a beamline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks (ratios against a baseline measured in the same run).",
                        no_args_is_help=True)
model_app = typer.Typer(help="Inspect the APT network presets and checkpoints.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(model_app, name="model")

console = Console(stderr=True)
out = Console()
_DEBUG = {"on": False}


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    _DEBUG["on"] = debug


@contextmanager
def _errors():
    """Turn expected failures into one red line and exit code 1."""
    from apt_stream.errors import AptStreamError

    try:
        yield
    except (AptStreamError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        if _DEBUG["on"]:
            raise
        from rich.text import Text

        # One unwrapped line, the message as plain text (a "[...]" in it is not rich markup).
        console.print(Text("error: ", style="bold red") + Text(f"{type(exc).__name__}: {exc}"),
                      soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None


def progress_bar(description: str):
    """A rich progress bar on stderr; returns (progress, callback(done, total))."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
        disable=not console.is_terminal and os.environ.get("APT_STREAM_PROGRESS") != "1",
    )
    task = progress.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return progress, update


def _print_json(data) -> None:
    out.print_json(json.dumps(data, default=float))


# ------------------------------------------------------------------------------------------------
# simulate / validate / approximant
# ------------------------------------------------------------------------------------------------


@app.command()
def simulate(
    out_path: Annotated[Path, typer.Argument(help="Scan file to write (.h5).")],
    preset: Annotated[str, typer.Option(help="tiny | demo | paper")] = "demo",
    angles: Annotated[int | None, typer.Option(help="Number of angles (default: preset).")] = None,
    range_deg: Annotated[
        float | None, typer.Option("--range", help="Angles span ±RANGE degrees.")
    ] = None,
    gold: Annotated[bool, typer.Option(help="Use the preset's many-angle gold scan.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of phantom, positions and noise.")] = 0,
    noise: Annotated[bool, typer.Option(help="Poisson noise on the frames.")] = True,
) -> None:
    """Simulate a ptycho-tomo scan of a seeded IC phantom and write it as a scan file."""
    with _errors():
        from apt_stream.config import get_preset
        from apt_stream.io import write_scan
        from apt_stream.sim.acquire import simulate_scan

        p = get_preset(preset)
        scan_opts = p.gold_scan if gold else p.scan
        progress, update = progress_bar(f"simulating {p.name} scan")
        with progress:
            scan = simulate_scan(
                p, seed=seed, scan=scan_opts, n_angles=angles, range_deg=range_deg, noise=noise,
                progress=update,
            )
        scan.provenance["command"] = " ".join(sys.argv)
        write_scan(out_path, scan)
        out.print(
            f"wrote {out_path}: {scan.n_angles} angles, {scan.n_frames} frames of "
            f"{scan.frames.shape[1]}x{scan.frames.shape[2]}, "
            f"{scan.provenance.get('simulation_seconds', 0):.1f} s"
        )


@app.command()
def validate(
    path: Annotated[Path, typer.Argument(help="Scan file to check.")],
    partial: Annotated[
        bool, typer.Option(help="A scan still being written (SWMR): angles may lack frames yet.")
    ] = False,
) -> None:
    """Check a scan file against docs/scan-format.md; names the first bad field."""
    with _errors():
        from apt_stream.io import validate_scan

        summary = validate_scan(path, swmr=partial, partial=partial)
        out.print(f"[green]ok[/] {path}")
        _print_json(summary)


@app.command("import")
def import_(
    fmt: Annotated[str, typer.Argument(metavar="FORMAT", help="ptychi | nexus")],
    source: Annotated[Path, typer.Argument(help="Input: .npz / .h5 (ptychi) or NeXus .h5.")],
    output: Annotated[Path, typer.Argument(help="Scan file to write (.h5).")],
    volume_shape: Annotated[str | None, typer.Option(help="Reconstruction grid NZ,NY,NX in object "
                                                     "pixels (unless the input has one).")] = None,
    slices: Annotated[int, typer.Option(help="L, the Approximant's slices.")] = 5,
    origin: Annotated[str, typer.Option(help="Y,X (input pixels) of the rotation axis / sample "
                                        "middle row in the positions' frame.")] = "0,0",
    positions_order: Annotated[str, typer.Option(help="yx | xy columns of (K, 2) positions.")] = "yx",
    phase_sign: Annotated[str | None, typer.Option(help="-1 (ours) | +1 (exp(+ikδt)); default: the format's.")] = None,
    fft_norm: Annotated[str | None, typer.Option(help="ortho | backward.")] = None,
    fft_centring: Annotated[str | None, typer.Option(help="centred | corner (DC at [0, 0]).")] = None,
    position_reference: Annotated[str | None, typer.Option(help="corner | centre | centre_pixel.")] = None,
    probe_plane: Annotated[str | None, typer.Option(help="entrance | axis.")] = None,
    even_width: Annotated[bool, typer.Option(help="Even column margin: voxel centres on field "
                                             "pixels (default: the simulators' field).")] = False,
) -> None:
    """Convert a scan from another code's layout and conventions (docs/importing.md)."""
    with _errors():
        from apt_stream.io.importers import import_from_cli

        _print_json(import_from_cli(
            fmt, source, output, volume_shape=volume_shape, slices=slices, origin=origin,
            positions_order=positions_order, phase_sign=phase_sign, fft_norm=fft_norm,
            fft_centring=fft_centring, position_reference=position_reference,
            probe_plane=probe_plane, even_width=even_width))


@app.command()
def check(
    scan_path: Annotated[Path, typer.Argument(help="Scan file (.h5).")],
    angles: Annotated[int, typer.Option(help="Angles to reconstruct.")] = 3,
    iterations: Annotated[int, typer.Option(help="Multislice iterations per angle.")] = 30,
) -> None:
    """Fit a few angles hard: R-factor per angle, and loud warnings on convention errors (exit 2)."""
    with _errors():
        from rich.text import Text

        from apt_stream.check import check_file

        progress, update = progress_bar("checking angles")
        with progress:
            report = check_file(scan_path, n_angles=angles, iterations=iterations, progress=update)
        _print_json(report)
        for line in report["warnings"]:
            console.print(Text("WARNING: ", style="bold red") + Text(line), soft_wrap=True)
        if report["warnings"]:
            raise typer.Exit(2)


#: Every command that computes: checked by :func:`_device` before any work.
_DEVICE = Annotated[str, typer.Option(help="Where to compute: cpu, cuda, cuda:N or auto (auto: "
                                      "CUDA when torch sees a GPU, else cpu).")]


def _device(name: str) -> str:
    """``--device`` resolved (apt_stream.devices), or the InputError that ``_errors`` prints."""
    from apt_stream.devices import resolve_device

    return str(resolve_device(name))


@app.command()
def approximant(
    scan_path: Annotated[Path, typer.Argument(help="Scan file (.h5).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Volume file to write.")],
    angles: Annotated[int | None, typer.Option(help="Use N angles spread over ±RANGE.")] = None,
    range_deg: Annotated[float | None, typer.Option("--range", help="Angular range ±deg.")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Stream frames in batches of this size (default: whole angle).")
    ] = None,
    png: Annotated[Path | None, typer.Option(help="Also write cross-sections to this PNG.")] = None,
    device: _DEVICE = "auto",
) -> None:
    """Compute the multislice Approximant of a scan (optionally of an angle subset)."""
    with _errors():
        from apt_stream.offline_approximant import approximant_of_file

        result = approximant_of_file(
            scan_path, output, n_angles=angles, range_deg=range_deg, batch_size=batch_size,
            png=png, progress_factory=progress_bar, device=_device(device),
        )
        _print_json(result)


#: ``demo`` and ``listen``: the per-angle work on a local Dask cluster (docs/deployment.md).
_WORKERS = Annotated[
    int | None, typer.Option(min=1, help="Per-angle work on a local Dask cluster of N worker "
                             "processes (default: the listener's one worker thread).")
]
_STOP_CHANGE_TOL = Annotated[
    float | None, typer.Option(min=1e-6, help="Closed loop: the stop rule's change tolerance "
                               "(relative; default 0.03). docs/closed-loop.md tunes it.")
]
_STOP_PATIENCE = Annotated[
    int | None, typer.Option(min=1, help="Closed loop: estimates in a row below the tolerance "
                             "before the stop advice (default 2; 3 for small volumes).")
]


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its files.")] = Path(
        "apt-stream-demo"
    ),
    preset: Annotated[str, typer.Option(help="tiny | demo | paper (paper: GPU only)")] = "demo",
    seed: Annotated[int, typer.Option(help="Phantom seed (held out from training).")] = 1000,
    rate: Annotated[float, typer.Option(help="Simulated beamline frame rate (frames/s); 0: full speed.")] = 40.0,
    checkpoint: Annotated[Path | None, typer.Option(help="Network checkpoint (default: shipped).")] = None,
    baselines: Annotated[bool, typer.Option(help="Compare with FBP/SIRT/SART afterwards.")] = True,
    offline: Annotated[
        bool, typer.Option(help="No services: simulate, Approximant and PNG only.")
    ] = False,
    ephemeral: Annotated[
        bool, typer.Option(help="Prefect's temporary server, no UI (default: a Prefect server "
                           "with its UI on 127.0.0.1, state in WORKDIR/prefect).")
    ] = False,
    keep_serving: Annotated[
        bool, typer.Option(help="Afterwards keep the Prefect UI and Tiled (apt-stream serve "
                           "WORKDIR) up until Ctrl-C.")
    ] = False,
    workers: _WORKERS = None,
    adaptive: Annotated[
        bool, typer.Option(help="Closed loop: the beamline acquires coarse to fine, asks "
                           "apt-stream for its next angle and stops on its advice; the summary "
                           "compares the angles needed and PCC with the fixed-N* scan.")
    ] = False,
    angles: Annotated[
        int | None, typer.Option(min=2, help="Plan this many angles (and N*) instead of the "
                                 "preset's.")
    ] = None,
    stop_change_tol: _STOP_CHANGE_TOL = None,
    stop_patience: _STOP_PATIENCE = None,
    device: _DEVICE = "auto",
) -> None:
    """The live demo on loopback: Tiled, Prefect, 0MQ, a simulated beamline, APT, summary."""
    if not adaptive and (stop_change_tol is not None or stop_patience is not None):
        raise typer.BadParameter("--stop-change-tol and --stop-patience tune the closed loop's "
                                 "stop rule: add --adaptive")
    held: dict = {}

    def show(summary: dict) -> None:
        snippet = summary.pop("client_snippet", None)
        _print_json(summary)
        if snippet:
            print(f"\nFind this scan in Tiled: run `apt-stream serve {workdir}`, then:\n")
            print(snippet)

    def hold(summary: dict) -> None:  # --keep-serving: Prefect's server is still up here
        from apt_stream.publish.serve import serve as serve_folder

        show(summary)
        held["shown"] = True
        if summary.get("prefect_ui"):
            print(f"\nPrefect UI stays up: {summary.get('prefect_flow_run_url') or summary['prefect_ui']}",
                  flush=True)
        serve_folder(workdir, say=lambda text: print(text, flush=True))

    with _errors():
        if offline:
            from apt_stream.offline_demo import offline_demo

            summary = offline_demo(workdir, preset=preset, seed=seed, progress_factory=progress_bar,
                                   device=_device(device))
        else:
            from apt_stream.demo import live_demo

            summary = live_demo(
                workdir, preset=preset, seed=seed, rate_hz=rate or None, checkpoint=checkpoint,
                baselines=baselines, say=lambda msg: console.print(f"[bold cyan]{msg}[/]"),
                progress_factory=progress_bar, ephemeral=ephemeral,
                keep_serving=hold if keep_serving else None, workers=workers,
                adaptive=adaptive, n_angles=angles, device=device,
                stop_rule={k: v for k, v in (("stop_change_tol", stop_change_tol),
                                             ("stop_patience", stop_patience)) if v is not None},
            )
        if not held:
            show(summary)


@app.command()
def reconstruct(
    scan_path: Annotated[str, typer.Argument(
        help="Scan file (.h5), or a run stored in Tiled: tiled://HOST[:PORT]/PATH/<uid>.")],
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Volume file to write (scan files; tiled:// results go to Tiled).")] = None,
    angles: Annotated[
        int | None, typer.Option(help="Use N angles spread over ±RANGE (default: all the scan's "
                                      "angles); tiled://: the trigger's N* (default 29).")
    ] = None,
    range_deg: Annotated[
        float | None, typer.Option("--range", help="Angular range ±deg (default: the scan's own); "
                                                   "tiled://: the trigger's θ* (default 17).")
    ] = None,
    baselines: Annotated[bool, typer.Option(help="Also FBP, SIRT and SART on the same angles.")] = False,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Network checkpoint (default: the shipped cpu model).")
    ] = None,
    png: Annotated[Path | None, typer.Option(help="Also write cross-sections to this PNG.")] = None,
    data_root: Annotated[list[Path] | None, typer.Option(
        help="tiled://: folder the run's probe and frames files may be read from (repeatable).")] = None,
    api_key: Annotated[str | None, typer.Option(
        help="tiled://: Tiled API key (default $APT_STREAM_TILED_API_KEY; the variable keeps it "
             "out of the process list).")] = None,
    device: _DEVICE = "auto",
) -> None:
    """Approximant → APT network (→ baselines) on the scan's angles (or N within ±RANGE); writes volumes.

    With tiled://HOST/PATH/<uid> the stored Bluesky run is reconstructed like a live one (same
    engine, trigger and Tiled publishing) and its result links back to the raw run.
    """
    with _errors():
        device = _device(device)
        if "://" in scan_path:
            from apt_stream.cli_tiled import reconstruct_tiled

            summary = reconstruct_tiled(
                scan_path, data_roots=data_root, api_key=api_key, n_star=angles,
                theta_star_deg=range_deg, checkpoint=checkpoint, output=output,
                baselines=baselines, png=png, device=device)
            _print_json(summary)
            if summary["status"] not in ("done", "done_with_gaps"):
                from apt_stream.errors import InputError

                raise InputError(f"run {summary['run_uid']} ended {summary['status']!r}: no APT "
                                 "volume (N*/θ* are --angles/--range; see 'run' above)")
            return
        if output is None:
            from apt_stream.errors import InputError

            raise InputError("a scan file needs -o/--output (the volume file to write)")
        from apt_stream.reconstruct import reconstruct_file

        summary = reconstruct_file(
            Path(scan_path), output, n_angles=angles, range_deg=range_deg, checkpoint=checkpoint,
            with_baselines=baselines, png=png, progress_factory=progress_bar, device=device,
        )
        _print_json(summary)


@model_app.command("info")
def model_info(
    preset: Annotated[str, typer.Option(help="Network preset: cpu | paper.")] = "cpu",
) -> None:
    """Layer output shapes and parameter counts of a network preset."""
    with _errors():
        from apt_stream.model.presets import model_info_table

        out.print(model_info_table(preset))


@model_app.command("ship")
def model_ship(
    checkpoint: Annotated[Path, typer.Argument(help="Trained checkpoint (e.g. runs/apt-general/best.safetensors).")],
    dc_iterations: Annotated[int | None, typer.Option(help="Data-consistency iterations (SIRT) or sweeps (SART) to record; 0: off.")] = None,
    dc_relaxation: Annotated[float | None, typer.Option(help="Data-consistency relaxation to record.")] = None,
    dc_method: Annotated[
        str | None, typer.Option(help="Data-consistency solver to record: sirt | sart.")
    ] = None,
) -> None:
    """Make CHECKPOINT the shipped default model (apt_stream/model/weights/apt-cpu.*)."""
    with _errors():
        from apt_stream.model.checkpoint import load_checkpoint, save_checkpoint
        from apt_stream.reconstruct import DEFAULT_CHECKPOINT

        model, meta = load_checkpoint(checkpoint)
        if dc_method is not None and dc_method not in ("sirt", "sart"):
            from apt_stream.errors import ConfigError

            raise ConfigError(f"--dc-method must be sirt or sart, got {dc_method!r}")
        if dc_iterations is not None or dc_relaxation is not None or dc_method is not None:
            dc = dict(model.io_config.get("data_consistency") or {})
            if dc_method is not None:
                dc["method"] = dc_method
            if dc_iterations is not None:
                dc["iterations"] = dc_iterations
            if dc_relaxation is not None:
                dc["relaxation"] = dc_relaxation
            model.io_config["data_consistency"] = dc
        prov = {**meta.get("provenance", {}), "shipped_from": str(checkpoint),
                "shipped_from_sha256": meta.get("sha256")}
        path = save_checkpoint(DEFAULT_CHECKPOINT, model, config=meta.get("config"), provenance=prov)
        _print_json({"shipped": str(path), "io": model.io_config})


@model_app.command("calibrate-metal")
def model_calibrate_metal(
    checkpoint: Annotated[Path | None, typer.Argument(help="Checkpoint to calibrate (default: the shipped model).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the calibrated checkpoint here (default: in place).")] = None,
    seed: Annotated[list[int] | None, typer.Option(
        help="In-family design seed to calibrate on (repeat; default: training's validation seeds 50000-50005).")] = None,
    jobs: Annotated[int, typer.Option(help="Seeds simulated in parallel processes.")] = 2,
) -> None:
    """Record the model's metal rule (the apt-metal mask): the δ standard score with the fewest errors.

    Simulates in-family held-out scans at 29 angles over ±17°, reconstructs them with the model
    and picks the threshold with the fewest wrong voxels (apt_stream.metal_mask). About 2 min per
    seed on one core.
    """
    with _errors():
        from apt_stream.evaluation import CALIBRATION_SEEDS, calibrate_metal_rule
        from apt_stream.model.checkpoint import load_checkpoint, save_checkpoint
        from apt_stream.reconstruct import DEFAULT_CHECKPOINT

        path = checkpoint or DEFAULT_CHECKPOINT
        model, meta = load_checkpoint(path)
        seeds = tuple(seed) if seed else CALIBRATION_SEEDS
        cal = calibrate_metal_rule(model, seeds=seeds, jobs=jobs,
                                   progress=lambda msg: console.print(f"[dim]{msg}[/]"))
        model.io_config["metal_mask"] = cal.to_io_config(
            calibrated_on=f"in-family seeds {', '.join(map(str, seeds))}, 29 angles over ±17°")
        target = out or path
        saved = save_checkpoint(target, model, config=meta.get("config"), provenance=meta.get("provenance", {}))
        _print_json({"saved": str(saved), "metal_mask": model.io_config["metal_mask"],
                     "per_seed_best_z": cal.per_volume_best_z,
                     "errors_by_z": {f"{z:.2f}": round(float(e), 4)
                                     for z, e in zip(cal.z_grid, cal.mean_errors, strict=True)}})


@app.command()
def train(
    preset: Annotated[str, typer.Option(help="Network preset to train.")] = "cpu-wide",
    banks: Annotated[Path, typer.Option(help="Folder of angle banks (built or completed first).")] = Path(
        "runs/banks"
    ),
    out_dir: Annotated[Path, typer.Option("--out", help="Checkpoint folder.")] = Path("runs/apt-general"),
    epochs: Annotated[int, typer.Option(help="Epochs in total (resumes count).")] = 40,
    samples_per_epoch: Annotated[
        int, typer.Option(help="Random-angle samples per epoch (fine-tuning: at most 128).")
    ] = 512,
    train_phantoms: Annotated[int, typer.Option(help="Simulated phantoms for training.")] = 144,
    val_phantoms: Annotated[int, typer.Option(help="Simulated phantoms for validation.")] = 6,
    jobs: Annotated[int, typer.Option(help="Processes simulating banks.")] = 2,
    phantom_shape: Annotated[str, typer.Option(
        help="NZ,NY,NX voxels of each simulated phantom (the paper preset: 280,128,128); NY and NX "
             "must be at least the network's patch. Smaller: faster banks, less context per sample.")
    ] = "32,64,64",
    bank_angles: Annotated[str, typer.Option(
        help="MIN,MAX angles scanned per bank phantom (drawn per phantom). Fewer: faster banks, but "
             "training can only draw angle sets up to that many (the shipped model: 25,61).")
    ] = "25,61",
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.safetensors.")] = False,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    finetune: Annotated[
        Path | None, typer.Option(help="Fine-tune this checkpoint on your chip (needs --gold).")
    ] = None,
    gold: Annotated[
        Path | None, typer.Option(help="Many-angle gold scan of one region: its SART volume labels the data.")
    ] = None,
    scan: Annotated[
        list[Path] | None, typer.Option(help="Few-angle scan(s) of the gold region (repeat).")
    ] = None,
    marginal_weight: Annotated[float, typer.Option(
        help="Weight of the value-distribution term added to NPCC (docs/network.md, Loss: "
             "measured and not shipped). 0: the paper's NPCC alone.")] = 0.0,
    metal_weight: Annotated[float, typer.Option(
        help="Weight of the threshold term added to NPCC: each voxel's side of the truth's metal "
             "threshold scored against the true metal labels (docs/network.md, Loss: measured and "
             "not shipped). 0: off.")] = 0.0,
    init: Annotated[Path | None, typer.Option(
        help="Start from this checkpoint's weights (same preset), fresh optimiser and schedule.")] = None,
    lr: Annotated[float, typer.Option(help="Initial learning rate (the paper: 2e-4).")] = 2e-4,
    device: _DEVICE = "auto",
) -> None:
    """Train the APT network on the wide design space with random angle sets (resumable).

    With --finetune CHECKPOINT --gold GOLD.h5 [--scan REDUCED.h5]: fine-tune on your own chip,
    labels from the gold-standard reconstruction of GOLD (no ground truth needed).
    """
    with _errors():
        device = _device(device)
        if finetune is not None or gold is not None:
            _finetune(finetune, gold, scan or [], out_dir, epochs, seed, min(samples_per_epoch, 128),
                      device=device)
            return
        from apt_stream.errors import ConfigError
        from apt_stream.sim.acquisition import AcquisitionRanges
        from apt_stream.training_run import build_training_banks, train_general_model

        shape = _ints(phantom_shape, 3, "--phantom-shape")
        lo, hi = _ints(bank_angles, 2, "--bank-angles")
        if min(shape) < 1:
            raise ConfigError(f"--phantom-shape must be positive, got {phantom_shape!r}")
        if not 1 <= lo <= hi:
            raise ConfigError(f"--bank-angles must be MIN,MAX with 1 <= MIN <= MAX, got {bank_angles!r}")
        progress, update = progress_bar("simulating angle banks")
        with progress:
            files = build_training_banks(
                banks, n_train=train_phantoms, n_val=val_phantoms, jobs=jobs, progress=update,
                shape_zyx=shape, ranges=AcquisitionRanges(n_angles=(lo, hi)),
            )
        _, result = train_general_model(
            files, out_dir=out_dir, preset=preset, epochs=epochs,
            samples_per_epoch=samples_per_epoch, resume=resume, seed=seed, jobs=jobs,
            marginal_weight=marginal_weight, metal_weight=metal_weight, init=init, lr=lr,
            device=device,
        )
        _print_json({
            "best": str(result.best_path), "best_epoch": result.best_epoch,
            "best_val_loss": result.best_val_loss,
            "ship_with": f"apt-stream model ship {result.best_path}",
        })


def _ints(text: str, n: int, option: str) -> tuple[int, ...]:
    """``n`` comma-separated integers of a command-line option (ConfigError naming it if not)."""
    from apt_stream.errors import ConfigError

    try:
        values = tuple(int(p) for p in text.replace(" ", "").split(",") if p)
    except ValueError:
        values = ()
    if len(values) != n:
        raise ConfigError(f"{option} must be {n} comma-separated integers, got {text!r}")
    return values


def _finetune(checkpoint, gold, scans, out_dir, epochs, seed, samples, *, device: str) -> None:
    from apt_stream.errors import ConfigError
    from apt_stream.finetune import finetune_on_gold

    if checkpoint is None or gold is None:
        raise ConfigError("fine-tuning needs both --finetune CHECKPOINT and --gold GOLD.h5")
    result = finetune_on_gold(checkpoint, gold, scans, out_dir=out_dir, epochs=min(epochs, 40), seed=seed,
                              samples_per_epoch=samples, device=device)
    _print_json(result)


@app.command()
def proxy(
    in_port: Annotated[int, typer.Option(help="Where publishers connect (the RunEngine's Publisher).")] = 5577,
    out_port: Annotated[int, typer.Option(help="Where listeners subscribe.")] = 5578,
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 unless told otherwise.")] = "127.0.0.1",
) -> None:
    """Run the 0MQ forwarding proxy between the beamline's Publisher and listeners (Ctrl-C stops).

    Binds loopback by default (``bluesky-0MQ-proxy`` binds every interface); give ``--host`` an
    interface address to serve other machines, behind a firewall.
    """
    with _errors():
        import signal
        import threading

        from apt_stream.plugins.bluesky import start_proxy

        running = start_proxy(host=host, in_port=in_port, out_port=out_port)
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        console.print(f"proxy: publishers -> {running.in_address}, listeners <- "
                      f"{running.out_address}; Ctrl-C stops")
        try:
            while not done.wait(0.5):
                pass
        finally:
            running.stop()
        console.print("proxy stopped")


#: Seconds after Ctrl-C / SIGTERM by which ``apt-stream serve`` has ended, whatever hangs.
_SERVE_EXIT_DEADLINE_S = 15.0


@app.command()
def serve(
    folder: Annotated[Path, typer.Argument(help="Results folder: a Tiled catalog, or one with "
                                           "tiled/ in it.")] = Path("apt-stream-demo"),
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: any free one).")] = 8000,
) -> None:
    """Serve a results folder (the demo's by default) with Tiled and its web UI on 127.0.0.1;
    prints the links, where the API key comes from and client code (Ctrl-C stops)."""
    with _errors():
        from apt_stream.publish.serve import serve as serve_folder

        serve_folder(folder, port=port, say=lambda text: print(text, flush=True),
                     exit_deadline_s=_SERVE_EXIT_DEADLINE_S)
    # The server is closed. A request handler stuck in a worker thread would make the interpreter
    # wait for it at exit (concurrent.futures joins its threads), so Ctrl-C would not stop the
    # command (seen in CI: > 30 s after SIGINT); leave now, after flushing what was written.
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@app.command()
def replay(
    scan_path: Annotated[Path, typer.Argument(help="Scan file to publish.")],
    zmq: Annotated[str, typer.Option("--zmq", help="0MQ proxy input, e.g. tcp://127.0.0.1:5577.")],
    rate: Annotated[float | None, typer.Option("--rate", help="Frames per second (default: as fast as possible).")] = None,
    data_root: Annotated[
        Path | None, typer.Option(help="Where the simulated detector writes (default: SCAN's folder/runs).")
    ] = None,
    serializer: Annotated[str, typer.Option(help="msgpack | json")] = "msgpack",
    advice: Annotated[
        str | None, typer.Option(help="Closed loop: ask apt-stream's advice server at this 0MQ "
                                 "address between angles (next angle, stop).")
    ] = None,
    order: Annotated[
        str, typer.Option(help="Angle order: planned | bisection (coarse to fine: the range "
                          "first, then the gaps).")
    ] = "planned",
) -> None:
    """Publish a scan file as a live Bluesky document stream (RunEngine + zmq Publisher)."""
    with _errors():
        from apt_stream.errors import InputError
        from apt_stream.plugins.bluesky.replay import replay_scan

        angle_order = None
        if order == "bisection":
            from apt_stream.io import read_scan
            from apt_stream.physics.next_angle import bisection_order

            angle_order = bisection_order(read_scan(scan_path, load_frames=False).n_angles)
        elif order != "planned":
            raise InputError(f"--order must be planned or bisection, got {order!r}")
        uid = replay_scan(
            scan_path, zmq_address=zmq, rate_hz=rate, data_root=data_root, serializer=serializer,
            advisor=advice, angle_order=angle_order,
        )
        out.print(f"published run {uid}")


@app.command()
def listen(
    zmq: Annotated[str, typer.Option("--zmq", help="The 0MQ proxy's output, e.g. tcp://beamline:5578.")],
    data_root: Annotated[list[Path], typer.Option(help="Folder frames may be read from (repeat).")],
    tiled_uri: Annotated[
        str | None, typer.Option(help="Tiled API address (default: $APT_STREAM_TILED_URI).")
    ] = None,
    spool: Annotated[Path | None, typer.Option(help="Per-run document spool folder.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Network checkpoint (default: shipped).")] = None,
    n_star: Annotated[int, typer.Option(help="N*: finished angles that trigger APT.")] = 29,
    theta_star: Annotated[float, typer.Option(help="θ*: half-range (deg) they must cover.")] = 17.0,
    preview_every: Annotated[
        int | None, typer.Option(help="Interim APT previews every K finished angles.")
    ] = None,
    max_runs: Annotated[int | None, typer.Option(help="Stop after this many scans.")] = None,
    device: _DEVICE = "auto",
    stop_grace: Annotated[
        float, typer.Option(min=0.0, help="Seconds a graceful stop (SIGINT/SIGTERM) may take; then it exits.")
    ] = 3.0,
    health_file: Annotated[
        Path | None, typer.Option(help="Liveness JSON rewritten every 5 s (for a supervisor).")
    ] = None,
    run_idle_timeout: Annotated[
        float, typer.Option(min=1.0, help="Close a run with no document for this long (s) as abandoned.")
    ] = 600.0,
    workers: _WORKERS = None,
    dask: Annotated[
        str | None, typer.Option(help="Per-angle work on the Dask scheduler at this address "
                                 "(tcp://HOST:PORT).")
    ] = None,
    convergence: Annotated[
        bool, typer.Option(help="Closed loop: live convergence estimate per finished angle "
                           "(Tiled table, Prefect artifact).")
    ] = False,
    stop_advice: Annotated[
        bool, typer.Option(help="Closed loop: stop advice when more angles stop helping "
                           "(implies --convergence).")
    ] = False,
    stop_act: Annotated[
        bool, typer.Option(help="Closed loop: on stop advice fire the final reconstruction at once.")
    ] = False,
    stop_change_tol: _STOP_CHANGE_TOL = None,
    stop_patience: _STOP_PATIENCE = None,
    suggest: Annotated[
        int, typer.Option(min=0, help="Closed loop: suggest K next angles with each estimate.")
    ] = 0,
    advice_address: Annotated[
        str | None, typer.Option(help="Closed loop: serve the advice on this 0MQ REP address "
                                 "(e.g. tcp://127.0.0.1:5580) for the plan's advisor.")
    ] = None,
    queue_address: Annotated[
        str | None, typer.Option(help="Closed loop: queue each suggested angle on the "
                                 "bluesky-queueserver at this 0MQ control address "
                                 "(e.g. tcp://127.0.0.1:60615).")
    ] = None,
    queue_start: Annotated[
        bool, typer.Option(help="Closed loop: start the queue server's queue when idle.")
    ] = False,
) -> None:
    """Serve a beamline: follow its proxy, reconstruct every scan live, publish to Tiled.

    The Tiled API key comes from $APT_STREAM_TILED_API_KEY (never a flag, never logged). Runs as
    the Prefect `listen` flow: on PREFECT_API_URL's server if set, else on a temporary local
    Prefect server that lives and dies with this process.

    SIGINT (Ctrl-C) or SIGTERM stops it gracefully: the listener stops, runs in flight are
    flushed, the summary is printed, exit code 0. A second signal exits at once (130 after
    SIGINT, 143 after SIGTERM); a graceful stop longer than --stop-grace exits with code 1.
    """
    if not (stop_advice or stop_act) and (stop_change_tol is not None or stop_patience is not None):
        raise typer.BadParameter("--stop-change-tol and --stop-patience tune the stop rule: add "
                                 "--stop-advice or --stop-act")
    import threading
    import time

    from apt_stream.flows.prefect_server import (
        ForcedExit,
        SignalStop,
        StartAborted,
        prefect_api,
        run_until_signalled,
    )

    def say(message: str) -> None:
        console.print(message, soft_wrap=True, highlight=False)

    def say_now(message: str) -> None:  # safe inside a signal handler
        os.write(2, f"{message}\n".encode())

    def exit_now(code: int, message: str | None = None) -> None:
        """Exit without the interpreter's teardown: Prefect's exit hooks would wait on a server
        already gone, and freeing torch & co. takes seconds on a busy machine."""
        if message:
            say_now(message)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)

    def warm_imports() -> None:  # while the Prefect server boots
        import torch  # noqa: F401

        import apt_stream.flows.listen  # noqa: F401
        from apt_stream.physics import fused

        fused.library()  # the engine's CPU loops, compiled here on a node's first run

    stop = threading.Event()
    try:
        with SignalStop(stop, say=say_now) as signals, _errors():
            from apt_stream.flows.settings import apply_offline_env

            apply_offline_env()
            device = _device(device)  # a wrong --device: one line, before Prefect
            say(f"starting: {zmq} (N* = {n_star}, θ* = ±{theta_star}°, on {device})")
            with prefect_api(should_abort=stop.is_set, while_starting=warm_imports,
                             say=say) as api:
                from apt_stream.flows.listen import ListenConfig, LiveResources
                from apt_stream.flows.listen import listen as listen_flow

                config = ListenConfig(
                    proxy_address=zmq, data_roots=[str(p) for p in data_root],
                    spool_dir=str(spool) if spool else None, tiled_uri=tiled_uri,
                    checkpoint=str(checkpoint) if checkpoint else None, n_star=n_star,
                    theta_star_deg=theta_star, preview_every=preview_every,
                    max_runs=max_runs, device=device,
                    health_file=str(health_file) if health_file else None,
                    run_idle_timeout_s=run_idle_timeout, workers=workers, dask_address=dask,
                    convergence=convergence, stop_advice=stop_advice, stop_act=stop_act,
                    stop_change_tol=stop_change_tol, stop_patience=stop_patience,
                    suggest=suggest, advice_address=advice_address,
                    queue_address=queue_address, queue_start=queue_start,
                )
                def work_done(result: dict) -> None:
                    # The flow's work is over; if Prefect cannot record its end (its server
                    # went away), do not hang on it: print the result and leave.
                    def leave_if_stuck() -> None:
                        time.sleep(max(stop_grace, 3.0) + 5.0)
                        if sys.stdout is sys.__stdout__ and sys.stderr is sys.__stderr__:
                            _print_json(result)
                            api.kill()
                            exit_now(1, "error: Prefect did not record the end of the listen "
                                        "flow (its server is unreachable); the results above "
                                        "are complete")

                    threading.Thread(target=leave_if_stuck, daemon=True).start()

                resources = LiveResources(stop=stop, on_ready=lambda _listener: say(
                    f"ready: listening on {zmq}; Ctrl-C or SIGTERM stops"), on_done=work_done)
                outcome = run_until_signalled(lambda: listen_flow(config, resources), signals,
                                              grace_s=stop_grace)
                if outcome.how == "forced":
                    api.kill()
                    exit_now(128 + outcome.signal, f"{outcome.signal_name} again: exiting now")
                if outcome.how == "timeout":
                    api.kill()
                    exit_now(1, f"error: the graceful stop took over {stop_grace:g} s; "
                                "exiting now (runs in flight may be unfinished)")
                if outcome.how == "raised":
                    from apt_stream.errors import AptStreamError

                    if isinstance(outcome.error, AptStreamError) or not (
                            sys.stdout is sys.__stdout__ and sys.stderr is sys.__stderr__):
                        raise outcome.error
                    # An orchestrator that went away (say): the runs are in Tiled or the backup
                    # already; Prefect's exit hooks would wait on the dead server for minutes.
                    api.kill()
                    exit_now(1, f"error: {type(outcome.error).__name__}: {outcome.error}")
            if outcome.signal is not None:
                say(f"stopped on {outcome.signal_name}")
            _print_json(outcome.result)
    except StartAborted:
        say("stopped before the listener started")
    except ForcedExit as forced:
        exit_now(forced.exit_code, f"{forced.signal_name} again: exiting now")
    # Stopped cleanly: runs flushed, Prefect's queues drained, its server stopped. In a real
    # process (not under CliRunner or pytest's capture) skip the slow interpreter teardown.
    if sys.stdout is sys.__stdout__ and sys.stderr is sys.__stderr__:
        import atexit

        atexit._run_exitfuncs()
        exit_now(0)


@app.command()
def evaluate(
    out_dir: Annotated[Path, typer.Option("--out", help="Where results.md and figures go.")] = Path("docs"),
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint (default: shipped model).")] = None,
    phantoms: Annotated[int | None, typer.Option(help="Phantoms per family (default: all of its seeds).")] = None,
    family: Annotated[
        list[str] | None, typer.Option(help="out-of-family | in-family (repeat; default both).")
    ] = None,
    sweeps: Annotated[bool, typer.Option(help="Also sweep N and θ (paper Figs. 3 and 5).")] = True,
    jobs: Annotated[int, typer.Option(help="Families evaluated in parallel processes.")] = 2,
    exclude_z: Annotated[
        list[int] | None,
        typer.Option(help="z layer to leave out of the metrics (ambiguous layers; repeat)."),
    ] = None,
    gold_angles: Annotated[int | None, typer.Option(
        help="Angles of the gold scan over ±70.4° (default: the family's, 141 / 61). Fewer: much "
             "faster, but a coarser gold standard (its row and the vs-gold table).")] = None,
    response: Annotated[bool, typer.Option(
        help="Also scan vacuum and the z-flipped chip (does the output follow the input?); "
             "--no-response skips those three extra scans.")] = True,
    device: _DEVICE = "auto",
) -> None:
    """APT (+ raw) vs FBP/SIRT/SART and the gold standard, out of family and in family.

    A quick look (minutes, not the full study): --phantoms 1 --no-sweeps --gold-angles 15 --no-response.
    """
    with _errors():
        from apt_stream.errors import ConfigError
        from apt_stream.evaluation import FAMILIES, run_evaluation, write_results_md

        device = _device(device)
        families = family or list(FAMILIES)
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            raise ConfigError(f"unknown family {unknown[0]!r}; choose from {sorted(FAMILIES)}")
        if gold_angles is not None and gold_angles < 1:
            raise ConfigError(f"--gold-angles must be >= 1, got {gold_angles}")
        figures_dir = out_dir / "figures"
        summary = run_evaluation(
            figures_dir, checkpoint=checkpoint, n_phantoms=phantoms, families=families,
            sweeps=sweeps, exclude_z=exclude_z, jobs=jobs,
            progress=lambda msg: console.print(f"[dim]{msg}[/]"),
            gold_angles=gold_angles, response=response, device=device,
        )
        md = write_results_md(summary, out_dir / "results.md", command=" ".join(["apt-stream", *sys.argv[1:]]))
        _print_json({"results": str(md),
                     **{name: fam["main"] for name, fam in summary["families"].items()}})


# ------------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------------


def _run_bench(module: str, as_json: bool, **kwargs) -> None:
    """Import ``apt_stream.benchmarks.<module>`` lazily, run it, print its JSON."""
    import importlib

    with _errors():
        result = importlib.import_module(f"apt_stream.benchmarks.{module}").run_all(**kwargs)
        if as_json:
            print(json.dumps(result, indent=2, default=float))
        else:
            _print_json(result)


_JSON = Annotated[bool, typer.Option("--json", help="Print JSON only.")]
_QUICK = Annotated[bool, typer.Option(help="Smallest case only (smoke test).")]


@bench_app.command("approximant")
def bench_approximant(
    as_json: _JSON = False,
    quick: _QUICK = False,
    ptychi: Annotated[
        Path | None,
        typer.Option(help="Python of a separate venv with ptychi installed, to compare against."),
    ] = None,
) -> None:
    """Frames/s of the two Approximant iterations vs the bare-FFT floor (and pty-chi)."""
    _run_bench("benchmark_approximant", as_json, quick=quick, ptychi_python=ptychi)


@bench_app.command("inference")
def bench_inference(as_json: _JSON = False, quick: _QUICK = False) -> None:
    """Voxels/s of stitched inference, eager fp32 vs the optimised path, with the PCC difference."""
    _run_bench("benchmark_inference", as_json, quick=quick)


@bench_app.command("scale")
def bench_scale(as_json: _JSON = False, quick: _QUICK = False) -> None:
    """The demo scan on 1 and 2 Dask workers (speed-up, efficiency) and paper-scale sizing."""
    _run_bench("benchmark_scale", as_json, quick=quick)


@bench_app.command("live")
def bench_live(as_json: _JSON = False, quick: _QUICK = False) -> None:
    """Keep-up factor, trigger-to-Tiled latency and Prefect/Tiled shares of the live pipeline."""
    _run_bench("benchmark_live", as_json, quick=quick)


@bench_app.command("soak")
def bench_soak(
    as_json: _JSON = False,
    minutes: Annotated[float, typer.Option(help="Keep starting runs for this long.")] = 1.0,
    rate: Annotated[
        str, typer.Option(help="Beamline frames/s; 0 or max: as fast as the RunEngine goes.")
    ] = "max",
    find_rate: Annotated[
        bool, typer.Option(help="Search the highest rate whose backlog stays flat instead.")
    ] = False,
    model: Annotated[str, typer.Option(help="shipped (the APT network) | cheap (identity).")] = "shipped",
    preset: Annotated[str, typer.Option(help="Scan preset of every run: tiny | demo.")] = "tiny",
    min_runs: Annotated[int, typer.Option(help="Run at least this many scans.")] = 2,
) -> None:
    """Back-to-back live runs over loopback: lost frames, throughput, RSS slope, backlog, errors."""
    _run_bench("benchmark_soak", as_json, minutes=minutes, rate=rate, find_rate=find_rate,
               model=model, preset=preset, min_runs=min_runs)


@bench_app.command("closed-loop")
def bench_closed_loop(
    as_json: _JSON = False,
    quick: _QUICK = False,
    phantoms: Annotated[
        int | None, typer.Option(help="Held-out phantoms (default 12; --quick: 2).")] = None,
    preset: Annotated[str, typer.Option(help="Scan preset: tiny | demo.")] = "tiny",
    out: Annotated[
        Path | None, typer.Option(help="Resumable JSON-lines results file (default: none).")
    ] = None,
) -> None:
    """Stop advice (angles saved, quality lost, advice error rate) and adaptive vs uniform
    angles on simulated phantoms with truth (docs/closed-loop.md)."""
    _run_bench("closed_loop", as_json, quick=quick, phantoms=phantoms, preset=preset,
               out=str(out) if out else None)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
