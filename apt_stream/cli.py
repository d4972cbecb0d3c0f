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
from typing import Annotated, Optional

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
        console.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}")
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
    angles: Annotated[Optional[int], typer.Option(help="Number of angles (default: preset).")] = None,
    range_deg: Annotated[
        Optional[float], typer.Option("--range", help="Angles span ±RANGE degrees.")
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
) -> None:
    """Check a scan file against docs/scan-format.md; names the first bad field."""
    with _errors():
        from apt_stream.io import validate_scan

        summary = validate_scan(path)
        out.print(f"[green]ok[/] {path}")
        _print_json(summary)


@app.command()
def approximant(
    scan_path: Annotated[Path, typer.Argument(help="Scan file (.h5).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Volume file to write.")],
    angles: Annotated[Optional[int], typer.Option(help="Use N angles spread over ±RANGE.")] = None,
    range_deg: Annotated[Optional[float], typer.Option("--range", help="Angular range ±deg.")] = None,
    batch_size: Annotated[
        Optional[int], typer.Option(help="Stream frames in batches of this size (default: whole angle).")
    ] = None,
    png: Annotated[Optional[Path], typer.Option(help="Also write cross-sections to this PNG.")] = None,
) -> None:
    """Compute the multislice Approximant of a scan (optionally of an angle subset)."""
    with _errors():
        from apt_stream.pipeline import approximant_of_file

        result = approximant_of_file(
            scan_path, output, n_angles=angles, range_deg=range_deg, batch_size=batch_size,
            png=png, progress_factory=progress_bar,
        )
        _print_json(result)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its files.")] = Path(
        "apt-stream-demo"
    ),
    preset: Annotated[str, typer.Option(help="tiny | demo")] = "demo",
    seed: Annotated[int, typer.Option(help="Phantom seed.")] = 1000,
) -> None:
    """Run the demo end to end on this machine (simulated beamline) and write PNG previews."""
    with _errors():
        from apt_stream.pipeline import offline_demo

        summary = offline_demo(workdir, preset=preset, seed=seed, progress_factory=progress_bar)
        _print_json(summary)


# ------------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------------


@bench_app.command("approximant")
def bench_approximant(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
    quick: Annotated[bool, typer.Option(help="Small sizes and one repeat (smoke test).")] = False,
    ptychi: Annotated[
        Optional[Path],
        typer.Option(help="Python of a separate venv with ptychi installed, to compare against."),
    ] = None,
) -> None:
    """Frames/s of the two Approximant iterations vs the bare-FFT floor (and pty-chi)."""
    with _errors():
        from apt_stream.benchmarks.benchmark_approximant import run_all

        result = run_all(quick=quick, ptychi_python=ptychi)
        if as_json:
            print(json.dumps(result, indent=2, default=float))
        else:
            _print_json(result)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
