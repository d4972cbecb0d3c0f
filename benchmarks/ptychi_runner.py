"""Run pty-chi's LSQML, ePIE and Autodiff engines on one benchmark angle, in pty-chi's own Python.

pty-chi pins a torchvision that clashes with apt-stream's, so ``benchmark_approximant.run_ptychi``
starts this file with pty-chi's interpreter. It imports only numpy, torch, ptychi and the standard
library (never apt_stream) and talks to the benchmark through two ``.npz`` files::

    python ptychi_runner.py DATA.npz RESULT.npz [--engines lsqml,epie,autodiff] [--epochs 2]
    python ptychi_runner.py --selftest

DATA holds ``frames`` (J,h,w) float32 fftshift-ed, ``positions`` (J,2) float64 = (y, x) top-left
corner of the probe window in object pixels, ``probe`` (M,h,w) complex64 with Σ|P|² = photons per
frame, ``field`` (Ny,Nx), ``spacing`` (slice spacing, m), ``wavelength_m``, ``pixel_m``,
``n_slices``. RESULT gets ``<engine>_seconds`` (wall time of ``task.run()`` only) and
``<engine>_phases`` (L,Ny,Nx) float32 and ``<engine>_cpu_seconds`` (process CPU time of the same
run), or ``<engine>_error`` with the reason.

How apt-stream's conventions (docs/conventions.md) map onto pty-chi 2.2 (docs/ptychi-comparison.md
has the derivation):

* frames: pty-chi's far field is a bare ``fft2`` (zero frequency at index 0), so the frames are
  ``ifftshift``-ed here and handed over with ``fft_shift=False``;
* far-field scale: pty-chi's FFT is unnormalised (``norm="backward"``), ours is orthonormal, so the
  probe is divided by ``sqrt(h*w)``; the photon counts then match without any rescaling;
* positions: pty-chi wants probe *centres* relative to an origin pixel; with the origin set to
  ``((h-1)/2, (w-1)/2)`` the centre of a window whose top-left corner is at ``p`` is ``p + origin``,
  so our top-left positions are passed through unchanged;
* sign: pty-chi's angular-spectrum kernel is ``exp(+i2πΔz sqrt(1/λ² − f²))`` and its far field a
  forward FFT, the same ``exp(i(kz − ωt))`` convention as ours (apart from the constant ``kΔz``
  phase, a global phase of the wave), so the object phase needs no conversion.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ENGINES = ("lsqml", "epie", "autodiff")
# SGD step for the Autodiff engine's object: equals ePIE's default α = 0.1 (see build_options).
AUTODIFF_STEP = 0.05
_REQUIRED = ("frames", "positions", "probe", "field", "spacing", "wavelength_m", "pixel_m",
             "n_slices")


class RunnerInputError(ValueError):
    """The data file does not describe a valid benchmark case."""


# ----------------------------------------------------------------------------------- data in/out


def load_case(path: str | Path) -> dict:
    """Read and check a benchmark ``.npz`` (see the module docstring for its keys)."""
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise RunnerInputError(f"{path}: missing keys {missing}")
        case = {k: data[k] for k in _REQUIRED}
    frames, positions, probe = case["frames"], case["positions"], case["probe"]
    if frames.ndim != 3:
        raise RunnerInputError(f"frames must be (J, h, w), got shape {frames.shape}")
    if positions.shape != (frames.shape[0], 2):
        raise RunnerInputError(
            f"positions must be ({frames.shape[0]}, 2) to match frames, got {positions.shape}")
    if probe.ndim != 3 or probe.shape[-2:] != frames.shape[-2:]:
        raise RunnerInputError(
            f"probe must be (M, {frames.shape[1]}, {frames.shape[2]}), got {probe.shape}")
    field = tuple(int(v) for v in np.asarray(case["field"]).ravel())
    if len(field) != 2 or min(field) < 1:
        raise RunnerInputError(f"field must be (Ny, Nx) with positive sizes, got {field}")
    n_slices = int(case["n_slices"])
    if n_slices < 1:
        raise RunnerInputError(f"n_slices must be >= 1, got {n_slices}")
    for key in ("spacing", "wavelength_m", "pixel_m"):
        if not float(case[key]) > 0:
            raise RunnerInputError(f"{key} must be > 0, got {float(case[key])}")
    return {
        "frames": frames.astype(np.float32), "positions": positions.astype(np.float64),
        "probe": probe.astype(np.complex64), "field": field, "spacing": float(case["spacing"]),
        "wavelength_m": float(case["wavelength_m"]), "pixel_m": float(case["pixel_m"]),
        "n_slices": n_slices,
    }


def ptychi_arrays(case: dict) -> dict:
    """Our arrays in pty-chi's conventions (module docstring): unshifted data, scaled probe."""
    frames, probe = case["frames"], case["probe"]
    h, w = frames.shape[-2:]
    return {
        "diffraction_data": np.ascontiguousarray(np.fft.ifftshift(frames, axes=(-2, -1))),
        # (n_opr_modes=1, M, h, w); 1/sqrt(h*w) turns pty-chi's unnormalised FFT into ours.
        "probe_data": (probe / math.sqrt(h * w)).astype(np.complex64)[None],
        "probe_position_y_px": case["positions"][:, 0].copy(),
        "probe_position_x_px": case["positions"][:, 1].copy(),
    }


def position_origin_px(h: int, w: int) -> list[float]:
    """pty-chi position origin (pixels) under which our top-left positions pass unchanged.

    pty-chi's window centre is ``position + origin`` and its first row ``centre − (h−1)/2``
    (``ptychi.image_proc``), so with ``origin = (h−1)/2`` the window starts at ``position``.
    """
    return [(h - 1) / 2.0, (w - 1) / 2.0]


# --------------------------------------------------------------------------------- pty-chi tasks


def build_options(engine: str, case: dict, *, epochs: int, batch_size: int, seed: int = 0):
    """pty-chi options for ``engine``: fixed probe and positions, multislice, CPU, float32.

    Everything that would rescale or re-orthogonalise the (fixed) probe is switched off, and
    LSQML's first-epoch probe-intensity fit is disabled so that both epochs update the object.
    LSQML and ePIE keep pty-chi's default steps (LSQML solves its own; ePIE α = 0.1). Autodiff's
    default (SGD, step 1) diverges with one full batch, and PyTorch's complex gradient of the
    amplitude loss is twice the ePIE direction, so step 0.05 makes it take ePIE's α = 0.1 step.
    """
    import ptychi.api as api

    option_classes = {
        "lsqml": api.LSQMLOptions, "epie": api.EPIEOptions,
        "autodiff": api.AutodiffPtychographyOptions,
    }
    if engine not in option_classes:
        raise RunnerInputError(f"unknown engine {engine!r}; choose from {ENGINES}")
    opts = option_classes[engine]()
    h, w = case["frames"].shape[-2:]

    opts.data_options.wavelength_m = case["wavelength_m"]
    opts.data_options.fft_shift = False  # ptychi_arrays already put DC at [0, 0]

    obj = opts.object_options
    obj.optimizable = True
    obj.pixel_size_m = case["pixel_m"]
    if case["n_slices"] > 1:
        obj.slice_spacings_m = [case["spacing"]] * (case["n_slices"] - 1)
    obj.determine_position_origin_coords_by = api.ObjectPosOriginCoordsMethods.SPECIFIED
    obj.position_origin_coords = position_origin_px(h, w)
    obj.remove_object_probe_ambiguity.enabled = False

    prb = opts.probe_options
    prb.optimizable = False
    prb.orthogonalize_incoherent_modes.enabled = False
    prb.orthogonalize_opr_modes.enabled = False

    opts.probe_position_options.optimizable = False
    opts.opr_mode_weight_options.optimizable = False

    rec = opts.reconstructor_options
    rec.num_epochs = epochs
    rec.batch_size = batch_size
    rec.default_device = api.Devices.CPU
    rec.default_dtype = api.Dtypes.FLOAT32
    rec.random_seed = seed
    if engine == "lsqml":
        rec.rescale_probe_intensity_in_first_epoch = False
    if engine == "autodiff":
        obj.step_size = AUTODIFF_STEP
    return opts


def make_task(engine: str, case: dict, *, epochs: int, object_data=None, batch_size=None):
    """Build (not run) a pty-chi task on ``case``; ``object_data`` defaults to ones (L, Ny, Nx)."""
    from ptychi.api.task import PtychographyTask

    arrays = ptychi_arrays(case)
    n_frames = case["frames"].shape[0]
    opts = build_options(engine, case, epochs=epochs, batch_size=batch_size or n_frames)
    if object_data is None:
        object_data = np.ones((case["n_slices"], *case["field"]), dtype=np.complex64)
    return PtychographyTask(
        opts,
        diffraction_data=arrays["diffraction_data"],
        object_data=torch.as_tensor(np.asarray(object_data, dtype=np.complex64)),
        probe_data=torch.as_tensor(arrays["probe_data"]),
        probe_position_x_px=arrays["probe_position_x_px"],
        probe_position_y_px=arrays["probe_position_y_px"],
    )


def run_engine(engine: str, case: dict, *, epochs: int = 2, repeats: int = 2):
    """Best wall and process-CPU time of ``task.run()`` over fresh tasks, and the slice phases.

    Best of two by default, like the benchmark's own engine timing: the first run in a process
    also pays one-time costs (allocator warm-up, FFT plans) that a streaming service pays once.
    The CPU time (all threads) is reported too because wall times on a shared machine swing
    several-fold with the other workers' load.

    Returns
    -------
    seconds, phases, cpu_seconds
        Best wall time, the (L, Ny, Nx) float32 phases of the last run, best CPU time.
    """
    times, cpu_times, phases = [], [], None
    for _ in range(repeats):
        task = make_task(engine, case, epochs=epochs)
        t0, c0 = time.perf_counter(), time.process_time()
        task.run()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        obj = task.get_data_to_cpu("object", as_numpy=True)
        phases = np.angle(obj).astype(np.float32)
    print(f"[ptychi_runner] {engine}: wall {[round(t, 3) for t in times]} s, "
          f"cpu {[round(t, 3) for t in cpu_times]} s", file=sys.stderr)
    return min(times), phases, min(cpu_times)


def predicted_frames(case: dict, object_data: np.ndarray) -> np.ndarray:
    """pty-chi's forward model on ``object_data``, returned in our layout (fftshift-ed)."""
    task = make_task("lsqml", case, epochs=1, object_data=object_data)
    fwd = task.reconstructor.forward_model
    with torch.no_grad():
        y = fwd.forward(torch.arange(case["frames"].shape[0]))
    return np.fft.fftshift(y.cpu().numpy(), axes=(-2, -1))


# ------------------------------------------------------------------------------- the benchmark


def run_benchmark(data_path: str, result_path: str, *, engines=ENGINES, epochs: int = 2,
                  repeats: int = 2) -> dict:
    case = load_case(data_path)
    import ptychi

    out: dict = {"ptychi_version": getattr(ptychi, "__version__", "unknown"),
                 "torch_threads": torch.get_num_threads()}
    for engine in engines:
        try:
            seconds, phases, cpu_seconds = run_engine(engine, case, epochs=epochs,
                                                      repeats=repeats)
        except Exception as exc:  # noqa: BLE001 - one engine failing must not hide the others
            out[f"{engine}_error"] = f"{type(exc).__name__}: {exc}"
            print(f"[ptychi_runner] {engine} failed: {out[f'{engine}_error']}", file=sys.stderr)
            continue
        out[f"{engine}_seconds"] = float(seconds)
        out[f"{engine}_phases"] = phases
        out[f"{engine}_cpu_seconds"] = float(cpu_seconds)
    np.savez(result_path, **out)
    return out


# ----------------------------------------------------------------------------------- self-test


def _reference_frames(obj: np.ndarray, probe: np.ndarray, positions: np.ndarray, *,
                      spacing_m: float, wavelength_m: float, pixel_m: float) -> np.ndarray:
    """Noise-free frames written straight from docs/conventions.md (numpy, float64).

    Window at floor(position), probe moved by the sub-pixel remainder with a Fourier ramp,
    ψ₁ = P·O₁, ψ_{l+1} = O_{l+1}·prop_Δz(ψ_l), I = Σ_m |FFT2_ortho(ψ_L)|², stored fftshift-ed.
    """
    n_slices = obj.shape[0]
    _, h, w = probe.shape
    fy = np.fft.fftfreq(h, d=pixel_m)[:, None]
    fx = np.fft.fftfreq(w, d=pixel_m)[None, :]
    f2 = fy**2 + fx**2
    inv_l2 = 1.0 / wavelength_m**2
    root = np.sqrt(np.clip(inv_l2 - f2, 0.0, None))
    kernel = np.where(f2 < inv_l2, np.exp(2j * np.pi * spacing_m * (root - 1 / wavelength_m)), 0)
    ufy = np.fft.fftfreq(h)[:, None]
    ufx = np.fft.fftfreq(w)[None, :]
    frames = np.empty((len(positions), h, w))
    for j, (py, px) in enumerate(positions):
        by, bx = int(np.floor(py)), int(np.floor(px))
        ramp = np.exp(-2j * np.pi * (ufy * (py - by) + ufx * (px - bx)))
        psi = np.fft.ifft2(np.fft.fft2(probe) * ramp)
        for sl in range(n_slices):
            if sl > 0:
                psi = np.fft.ifft2(np.fft.fft2(psi) * kernel)
            psi = psi * obj[sl, by:by + h, bx:bx + w]
        far = np.fft.fft2(psi, norm="ortho")
        frames[j] = (np.abs(far) ** 2).sum(axis=0)
    return np.fft.fftshift(frames, axes=(-2, -1)).astype(np.float32)


def _selftest_case(*, n_modes: int, subpixel: bool, seed: int = 1) -> tuple[dict, np.ndarray]:
    """A small 3-slice phantom whose propagation between slices matters (Fresnel no. ~1/px)."""
    rng = np.random.default_rng(seed)
    h = w = 32
    ny, nx = 80, 80
    n_slices = 3
    pixel_m, wavelength_m = 1.0e-8, 1.0e-10
    spacing_m = 1.0e-6  # pixel²/(λΔz) = 1: a wrong propagation sign shows up clearly
    yy, xx = np.mgrid[0:ny, 0:nx]
    obj = np.empty((n_slices, ny, nx), dtype=np.complex128)
    for sl in range(n_slices):
        phase = np.zeros((ny, nx))
        for _ in range(12):
            cy, cx = rng.uniform(10, ny - 10), rng.uniform(10, nx - 10)
            r = rng.uniform(3, 8)
            phase -= rng.uniform(0.1, 0.4) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)
        obj[sl] = np.exp(1j * phase + 0.1 * phase)  # matter: negative phase, some absorption
    # Probe modes: a defocused Gaussian and, if asked, a weaker Hermite-Gauss mode.
    py, px = np.mgrid[0:h, 0:w] - (h - 1) / 2
    g = np.exp(-(py**2 + px**2) / (2 * 5.0**2)) * np.exp(1j * 0.02 * (py**2 + px**2))
    modes = [g, px / 5.0 * g, py / 5.0 * g][:n_modes]
    probe = np.stack(modes).astype(np.complex128)
    weights = np.array([1.0, 0.3, 0.1][:n_modes]) / (np.abs(probe) ** 2).sum(axis=(1, 2))
    probe *= np.sqrt(weights)[:, None, None]
    probe *= np.sqrt(1e6)  # 10⁶ photons per frame
    grid = np.arange(2, ny - h - 2, 4.0)
    pos = np.array([(y, x) for y in grid for x in grid])
    if subpixel:
        pos = pos + rng.uniform(-1, 1, size=pos.shape) * 0.45
    frames = _reference_frames(obj, probe, pos, spacing_m=spacing_m, wavelength_m=wavelength_m,
                               pixel_m=pixel_m)
    case = {"frames": frames, "positions": pos, "probe": probe.astype(np.complex64),
            "field": (ny, nx), "spacing": spacing_m, "wavelength_m": wavelength_m,
            "pixel_m": pixel_m, "n_slices": n_slices}
    return case, obj.astype(np.complex64)


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _pcc(a: np.ndarray, b: np.ndarray) -> float:
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    return float(a @ b / math.sqrt((a @ a) * (b @ b) + 1e-30))


def selftest() -> bool:
    """Check the conversion: pty-chi's forward model must reproduce our frames at the truth.

    Negative controls (conjugated object, swapped x/y) must not, and LSQML started from ones on
    the noise-free data must correlate positively with the true slice phases.
    """
    checks = []

    def check(name: str, ok: bool, value: float) -> None:
        checks.append(ok)
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {value:.3g}")

    case, truth = _selftest_case(n_modes=2, subpixel=False)
    err = _rel_err(predicted_frames(case, truth), case["frames"])
    check("forward model at truth, M=2, integer positions (rel. error < 1e-4)", err < 1e-4, err)
    err_conj = _rel_err(predicted_frames(case, truth.conj()), case["frames"])
    check("control: conjugated object (rel. error > 10x larger)", err_conj > 10 * err + 1e-3,
          err_conj)
    swapped = dict(case, positions=case["positions"][:, ::-1].copy())
    err_swap = _rel_err(predicted_frames(swapped, truth), case["frames"])
    check("control: x/y swapped (rel. error > 10x larger)", err_swap > 10 * err + 1e-3, err_swap)
    # What an origin of h/2 instead of (h-1)/2 would do: every window half a pixel off.
    half = dict(case, positions=case["positions"] + 0.5)
    err_half = _rel_err(predicted_frames(half, truth), case["frames"])
    check("control: positions +0.5 px (rel. error > 10x larger)", err_half > 10 * err + 1e-3,
          err_half)

    case1, truth1 = _selftest_case(n_modes=1, subpixel=True)
    err1 = _rel_err(predicted_frames(case1, truth1), case1["frames"])
    check("forward model at truth, M=1, sub-pixel positions (rel. error < 2e-3)", err1 < 2e-3,
          err1)
    case2, truth2 = _selftest_case(n_modes=2, subpixel=True)
    err2 = _rel_err(predicted_frames(case2, truth2), case2["frames"])
    # pty-chi sub-pixel-shifts only probe mode 0; report how much that costs, no threshold.
    print(f"INFO  forward model at truth, M=2, sub-pixel positions: {err2:.3g} "
          "(pty-chi shifts only mode 0 by the sub-pixel remainder)")

    rows = slice(6, case["field"][0] - 6)
    for engine in ENGINES:
        _, phases, _ = run_engine(engine, case, epochs=10, repeats=1)
        score = float(np.mean([_pcc(phases[s][rows, rows], np.angle(truth[s])[rows, rows])
                               for s in range(truth.shape[0])]))
        check(f"{engine} 10 epochs from ones, mean slice-phase PCC vs truth (> 0.3)",
              score > 0.3, score)
    return all(checks)


# ------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", help="benchmark case .npz")
    parser.add_argument("result", nargs="?", help="where to write the result .npz")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2,
                        help="fresh runs per engine; the best time is kept")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (the benchmark machine has 2 shared cores)")
    parser.add_argument("--selftest", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("ptychi").setLevel(logging.ERROR)

    if args.selftest:
        return 0 if selftest() else 1
    if not args.data or not args.result:
        parser.error("DATA and RESULT are required unless --selftest is given")
    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {ENGINES}")
    if args.epochs < 1 or args.repeats < 1:
        parser.error("--epochs and --repeats must be >= 1")
    try:
        run_benchmark(args.data, args.result, engines=engines, epochs=args.epochs,
                      repeats=args.repeats)
    except RunnerInputError as exc:
        print(f"ptychi_runner: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
