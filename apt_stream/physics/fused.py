"""The engine's fused CPU loops (``fused.c``), compiled on first use, with a torch fallback.

At few probe modes the Approximant engine spent about a third of its time outside the FFTs, in
element-wise torch ops that each stream a frame batch through memory once (a product, then a
sum over modes, then another product...). ``fused.c`` does each such group in one pass and reads
object windows straight from the slices instead of copying them out first (docs/approximant.md
has the measurements). It is plain C with OpenMP, about half a second to compile, so it is built
here on first use rather than at install time, and cached by a hash of the source, the compiler
and the CPU's instruction set (``-march=native``: a cache shared between different machines keeps
one build per kind of CPU).

Everything works without it: when there is no C compiler, the build fails, the tensors are not
on the CPU, or ``APT_STREAM_FUSED=0`` is set, :func:`library` returns None and callers use the
torch expressions, which ``tests/test_fused.py`` checks these loops against.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused.c")
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared", "-fopenmp"]
_STATE: dict[str, object] = {}

_P = ctypes.c_void_p
_I = ctypes.c_int64
_SIGNATURES: dict[str, tuple[list, object]] = {
    "apt_forward_exit": ([_P, _P, _P, _I, _I, _I, _I, _I, _P, ctypes.c_int], None),
    "apt_residual_conj": ([_P, _P, _I, _I, _I, _I, ctypes.c_float, ctypes.c_int],
                          ctypes.c_double),
    "apt_adjoint_slab": ([_P, _P, _P, _P, _I, _I, _I, _I, _I, _P, ctypes.c_int], None),
    "apt_scatter_add": ([_P, _P, _P, _I, _I, _I, _I, _I, _I, ctypes.c_int], None),
    "apt_scatter_illumination": ([_P, _P, _P, _I, _I, _I, _I, _I, _I, ctypes.c_int], None),
    "apt_mode_sum_conj": ([_P, _P, _I, _I, _I, _I, _P, ctypes.c_int], None),
    "apt_ramp_product": ([_P, _P, _P, _P, _I, _I, _I, _I, _P, ctypes.c_int], None),
}


def enabled() -> bool:
    """False when ``APT_STREAM_FUSED`` is 0/false/no."""
    return os.environ.get("APT_STREAM_FUSED", "1").strip().lower() not in ("0", "false", "no")


def cache_dir() -> Path:
    """Where builds are kept: ``$APT_STREAM_CACHE`` or ``$XDG_CACHE_HOME``/``~/.cache``/apt-stream."""
    root = os.environ.get("APT_STREAM_CACHE")
    if root:
        return Path(root) / "fused"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "apt-stream" / "fused"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(
        b"\0".join(s.encode() for s in (SOURCE.read_text(), version, _cpu_flags(),
                                        platform.machine(), " ".join(_FLAGS)))
    ).hexdigest()[:16]
    target = cache_dir() / f"apt_fused-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: processes that build at once (Dask workers) never
    # load a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *_FLAGS, "-o", tmp, str(SOURCE)], capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library() -> ctypes.CDLL | None:
    """The compiled loops, built on first call; None (once logged) where they cannot be had."""
    if "lib" in _STATE:
        return _STATE["lib"]  # type: ignore[return-value]
    lib, why = None, ""
    if not enabled():
        why = "APT_STREAM_FUSED=0"
    elif (cc := _compiler()) is None:
        why = "no C compiler (cc, gcc or clang) on PATH"
    else:
        try:
            # torch's OpenMP runtime is loaded first, so the library's libgomp.so.1 resolves to
            # it: one thread pool for torch's ops and these loops.
            lib = ctypes.CDLL(str(_build(cc)))
            for name, (args, result) in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = args, result
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
            lib, why = None, str(exc)
    if lib is None:
        log.info("fused engine loops unavailable (%s); using torch ops", why)
    _STATE["lib"], _STATE["why"] = lib, why
    return lib


@contextlib.contextmanager
def torch_ops_only():
    """Within this block callers take the torch ops (benchmarks time both paths)."""
    library()
    saved = dict(_STATE)
    _STATE.update(lib=None, why="turned off for this block")
    try:
        yield
    finally:
        _STATE.clear()
        _STATE.update(saved)


def status() -> str:
    """One line for `apt-stream check` and logs: which element-wise path the engine uses."""
    lib = library()
    return "fused C loops" if lib is not None else f"torch ops ({_STATE['why']})"


_LAYOUTS = (torch.complex64, torch.float32, torch.int64)


def usable(*tensors: torch.Tensor) -> bool:
    """True when the loops are available and every tensor is a contiguous CPU tensor of a type
    they read (complex64, float32 or int64): anything else (a GPU, complex128) takes torch ops.

    The loops trust their callers for shapes and window origins (every window inside its plane):
    :class:`~apt_stream.physics.multislice.PatchIndex` checks positions when frames arrive.
    """
    return library() is not None and all(
        t.device.type == "cpu" and t.is_contiguous() and t.dtype in _LAYOUTS for t in tensors
    )


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _threads() -> int:
    return torch.get_num_threads()


def forward_exit(psi, slice_plane, origins, out) -> torch.Tensor:
    """``out[b, m] = psi[b, m] · slice_plane[window b]``; psi and out (B, M, h, w) complex64."""
    b, m, h, w = psi.shape
    library().apt_forward_exit(_ptr(psi), _ptr(slice_plane), _ptr(origins), b, m, h, w,
                               slice_plane.shape[-1], _ptr(out), _threads())
    return out


def residual_conj(far, sqrt_intensity, eps: float) -> float:
    """Loss Σ(A − √I)², and ``far ← conj(far · (A − √I)/(A + eps))`` in place."""
    b, m, h, w = far.shape
    return float(library().apt_residual_conj(_ptr(far), _ptr(sqrt_intensity), b, m, h, w,
                                             float(eps), _threads()))


def adjoint_slab(wave, eta, slice_plane, origins, grad_out) -> None:
    """``grad_out = conj(Σ_m wave·eta)``; then ``eta ← eta · slice_plane[window]`` if a plane is
    given (None at the first slab)."""
    b, m, h, w = wave.shape
    nx = 0 if slice_plane is None else slice_plane.shape[-1]
    library().apt_adjoint_slab(_ptr(wave), _ptr(eta), _ptr(slice_plane), _ptr(origins), b, m, h,
                               w, nx, _ptr(grad_out), _threads())


def scatter_add(planes, patches, origins) -> None:
    """``planes[l, window b] += patches[l, b]``: (L, B, h, w) into (L, Ny, Nx), complex64."""
    nl, b, h, w = patches.shape
    library().apt_scatter_add(_ptr(planes), _ptr(patches), _ptr(origins), nl, b, h, w,
                              planes.shape[-2], planes.shape[-1], _threads())


def scatter_illumination(plane, probes, origins) -> None:
    """``plane[window b] += Σ_m |probes[b, m]|²``: real (Ny, Nx) float32, probes complex64."""
    b, m, h, w = probes.shape
    library().apt_scatter_illumination(_ptr(plane), _ptr(probes), _ptr(origins), b, m, h, w,
                                       plane.shape[-2], plane.shape[-1], _threads())


def mode_sum_conj(a, c, out) -> torch.Tensor:
    """``out = conj(Σ_m a · c)`` for (B, M, h, w) complex64 a and c; out (B, h, w)."""
    b, m, h, w = a.shape
    library().apt_mode_sum_conj(_ptr(a), _ptr(c), b, m, h, w, _ptr(out), _threads())
    return out


def ramp_product(table, rows, cols, scale, out) -> torch.Tensor:
    """Pass 1's FFT inputs from factored ramps ``R[b] = rows[b] ⊗ cols[b]``: ``out[b, m] =
    table[m] · R[b]``, or ``table[m] · conj(R[b]) · scale[b]`` when a real ``scale`` is given."""
    m, h, w = table.shape
    b = rows.shape[0]
    library().apt_ramp_product(_ptr(table), _ptr(rows), _ptr(cols), _ptr(scale), b, m, h, w,
                               _ptr(out), _threads())
    return out
