"""Classical parallel-beam tomography in torch: projector, its exact adjoint, FBP, SIRT, SART.

Geometry (docs/conventions.md): the sample rotates about +y by θ; a sample point ``(z, x)`` sits
at lab ``x' = x cosθ + z sinθ``, ``z' = −x sinθ + z cosθ`` and the beam runs along +z'. Voxel
``i`` of an axis of length ``n`` is at ``i − (n−1)/2`` (voxel units); detector column ``c`` of a
width-``W`` projection is at ``x' = c − (W−1)/2``. A volume is ``(nz, ny, nx)``, a stack of
projections ``(N, ny, W)``.

Every y row is an independent 2D ``(z, x)`` problem, so all operators run on every y at once by
making y the channel axis of :func:`torch.nn.functional.grid_sample`:

* :func:`project` is ray-driven: along each ray it samples the slice bilinearly every 1 voxel of
  z' and sums (a line integral in voxel units).
* :func:`backproject` is the exact adjoint of :func:`project` (autograd through the sampling),
  which SIRT and SART need for a matched projector pair.
* :func:`fbp` filters the projections and back-projects them pixel-driven (linear interpolation
  of each filtered projection at every voxel's ``x'``), the textbook FBP that scikit-image's
  ``iradon`` also uses.

Functions accept numpy arrays or torch tensors and return the same kind. Tensors are processed
on their own device (CPU or CUDA); numpy inputs on ``device`` (default CPU). float64 stays
float64, everything else runs in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from apt_stream.errors import InputError

__all__ = ["backproject", "detector_width_px", "fbp", "project", "sart", "sirt"]

FILTERS = ("ramp", "shepp-logan", "cosine", "hamming", "hann", None)

# Bilinear samples per grid_sample call: bounds the temporary memory (~64 MiB in float32).
_CHUNK_SAMPLES = 1 << 24
_GOLDEN = (math.sqrt(5) - 1) / 2


# --------------------------------------------------------------------------- inputs


def _angles(angles_deg: Any) -> np.ndarray:
    if isinstance(angles_deg, torch.Tensor):
        angles_deg = angles_deg.detach().cpu().numpy()
    a = np.asarray(angles_deg, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise InputError("angles_deg is empty")
    if not np.isfinite(a).all():
        raise InputError("angles_deg contains NaN or infinite values")
    return a


def _volume_shape(volume_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in volume_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"volume_shape must be (nz, ny, nx) with sizes >= 1, got {volume_shape}")
    return shape  # type: ignore[return-value]


def _tensor(
    x: Any, name: str, ndim: int, device: str | torch.device | None
) -> tuple[torch.Tensor, bool]:
    """(tensor on the working device and dtype, whether the caller gave numpy)."""
    from_numpy = not isinstance(x, torch.Tensor)
    if from_numpy:
        arr = np.asarray(x)
        if arr.dtype == bool:
            arr = arr.astype(np.float32)
        if np.iscomplexobj(arr) or not np.issubdtype(arr.dtype, np.number):
            raise InputError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    else:
        t = x.detach()
        if t.is_complex():
            raise InputError(f"{name} must be real, got {t.dtype}")
    if t.ndim != ndim:
        raise InputError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise InputError(f"{name} is empty")
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    t = t.to(device=device if device is not None else t.device, dtype=dtype)
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{name} contains NaN or infinite values")
    return t, from_numpy


def _out(t: torch.Tensor, as_numpy: bool) -> Any:
    return t.cpu().numpy() if as_numpy else t


def detector_width_px(volume_shape: Sequence[int], angles_deg: Any) -> int:
    """Default detector width: the widest lateral extent ``nx|cosθ| + nz|sinθ|`` over the angles.

    Rounded up, then up once more if needed so ``W`` has the parity of ``nx``: at θ = 0 the
    detector columns then coincide with voxel centres (no half-pixel blur).
    """
    nz, _, nx = _volume_shape(volume_shape)
    t = np.deg2rad(_angles(angles_deg))
    width = int(math.ceil(float(np.max(nx * np.abs(np.cos(t)) + nz * np.abs(np.sin(t)))) - 1e-9))
    width = max(width, 1)
    return width + 1 if (width - nx) % 2 else width


# --------------------------------------------------------------------------- ray operator


class _RayOperator:
    """Ray-driven projector A (bilinear samples 1 voxel apart along z') and its adjoint A^T.

    Internal volume layout is (1, ny, nz, nx): y is grid_sample's channel axis.
    """

    def __init__(
        self,
        shape_zyx: tuple[int, int, int],
        angles_deg: np.ndarray,
        det_width_px: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.nz, self.ny, self.nx = shape_zyx
        self.angles_rad = np.deg2rad(angles_deg)
        self.width = det_width_px
        self.dtype, self.device = dtype, device
        t = self.angles_rad
        depth = float(np.max(self.nx * np.abs(np.sin(t)) + self.nz * np.abs(np.cos(t))))
        # Enough samples to cross the whole slice along any ray; parity of nz puts the samples
        # on voxel centres at θ = 0.
        n_s = int(math.ceil(depth)) + 1
        self.n_samples = n_s + 1 if (n_s - self.nz) % 2 else n_s
        per_angle = self.n_samples * self.width * max(self.ny, 1)
        self.chunk = max(1, _CHUNK_SAMPLES // per_angle)

    def _grid(self, idx: np.ndarray) -> torch.Tensor:
        """Sampling points of the rays of angles ``idx``, as grid_sample's (1, n*S, W, 2) grid."""
        kw = {"dtype": self.dtype, "device": self.device}
        th = torch.as_tensor(self.angles_rad[idx], **kw)[:, None, None]
        xp = torch.arange(self.width, **kw) - (self.width - 1) / 2  # x' per detector column
        zp = torch.arange(self.n_samples, **kw)[:, None] - (self.n_samples - 1) / 2  # z'
        x = xp * torch.cos(th) - zp * torch.sin(th)
        z = xp * torch.sin(th) + zp * torch.cos(th)
        # align_corners=False: voxel i of n at coordinate u = i - (n-1)/2 is at 2u/n.
        grid = torch.stack((2 * x / self.nx, 2 * z / self.nz), dim=-1)
        return grid.reshape(1, -1, self.width, 2)

    def _chunks(self, idx: np.ndarray | None):
        idx = np.arange(self.angles_rad.size) if idx is None else np.asarray(idx)
        for start in range(0, idx.size, self.chunk):
            yield idx[start : start + self.chunk]

    def _sample(self, vol: torch.Tensor, sel: np.ndarray) -> torch.Tensor:
        out = F.grid_sample(
            vol, self._grid(sel), mode="bilinear", padding_mode="zeros", align_corners=False
        )
        ny = vol.shape[1]
        return out.view(ny, sel.size, self.n_samples, self.width).sum(dim=2).transpose(0, 1)

    def forward(self, vol: torch.Tensor, idx: np.ndarray | None = None) -> torch.Tensor:
        """(1, ny, nz, nx) -> (n_angles, ny, W)."""
        return torch.cat([self._sample(vol, sel) for sel in self._chunks(idx)], dim=0)

    def adjoint(self, proj: torch.Tensor, idx: np.ndarray | None = None) -> torch.Tensor:
        """(n_angles, ny, W) -> (1, ny, nz, nx), the exact transpose of :meth:`forward`."""
        ny = proj.shape[1]
        start = 0
        # inference_mode(False): callers may run under inference mode, which forbids autograd.
        with torch.inference_mode(False), torch.enable_grad():
            acc = torch.zeros(1, ny, self.nz, self.nx, dtype=self.dtype, device=self.device)
            for sel in self._chunks(idx):
                leaf = torch.zeros(
                    1, ny, self.nz, self.nx, dtype=self.dtype, device=self.device,
                    requires_grad=True,
                )
                cot = proj[start : start + sel.size].clone()
                start += sel.size
                (g,) = torch.autograd.grad(self._sample(leaf, sel), leaf, grad_outputs=cot)
                acc += g
        return acc


def _to_internal(vol: torch.Tensor) -> torch.Tensor:
    return vol.permute(1, 0, 2).unsqueeze(0).contiguous()  # (nz, ny, nx) -> (1, ny, nz, nx)


def _to_public(vol: torch.Tensor) -> torch.Tensor:
    return vol[0].permute(1, 0, 2).contiguous()  # (1, ny, nz, nx) -> (nz, ny, nx)


def _setup(
    projections: Any, angles_deg: Any, volume_shape: Sequence[int], device: Any
) -> tuple[torch.Tensor, bool, _RayOperator]:
    shape = _volume_shape(volume_shape)
    angles = _angles(angles_deg)
    p, as_numpy = _tensor(projections, "projections", 3, device)
    if p.shape[0] != angles.size:
        raise InputError(
            f"projections hold {p.shape[0]} angles but angles_deg has {angles.size}"
        )
    if p.shape[1] != shape[1]:
        raise InputError(
            f"projections have ny={p.shape[1]} but volume_shape has ny={shape[1]}"
        )
    op = _RayOperator(shape, angles, int(p.shape[2]), p.dtype, p.device)
    return p, as_numpy, op


# --------------------------------------------------------------------------- public API


def project(
    volume: Any,
    angles_deg: Any,
    *,
    det_width_px: int | None = None,
    device: str | torch.device | None = None,
) -> Any:
    """Parallel-beam projections (line integrals along z', voxel units) of a volume.

    Parameters
    ----------
    volume : array_like or torch.Tensor
        ``(nz, ny, nx)``.
    angles_deg : array_like
        Rotation angles θ about +y, degrees.
    det_width_px : int, optional
        Detector columns ``W``; default :func:`detector_width_px`.
    device : str or torch.device, optional
        Where to compute (default: the tensor's device, CPU for numpy).

    Returns
    -------
    ndarray or torch.Tensor
        ``(N, ny, W)``; same kind as ``volume``.
    """
    vol, as_numpy = _tensor(volume, "volume", 3, device)
    angles = _angles(angles_deg)
    shape = tuple(vol.shape)
    if det_width_px is None:
        det_width_px = detector_width_px(shape, angles)
    elif int(det_width_px) < 1:
        raise InputError(f"det_width_px must be >= 1, got {det_width_px}")
    op = _RayOperator(shape, angles, int(det_width_px), vol.dtype, vol.device)
    return _out(op.forward(_to_internal(vol)), as_numpy)


def backproject(
    projections: Any,
    angles_deg: Any,
    volume_shape: Sequence[int],
    *,
    device: str | torch.device | None = None,
) -> Any:
    """Exact adjoint of :func:`project`: ``<A x, y> = <x, A^T y>``.

    Parameters
    ----------
    projections : array_like or torch.Tensor
        ``(N, ny, W)``.
    angles_deg : array_like
        The N angles, degrees.
    volume_shape : (nz, ny, nx)
        Shape of the volume to back-project into.

    Returns
    -------
    ndarray or torch.Tensor
        ``(nz, ny, nx)``; same kind as ``projections``.
    """
    p, as_numpy, op = _setup(projections, angles_deg, volume_shape, device)
    return _out(_to_public(op.adjoint(p)), as_numpy)


def _filter_response(size: int, name: str | None, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """Real frequency response (rfft layout) of the FBP filter for a padded length ``size``."""
    if name is None:
        return torch.ones(size // 2 + 1, dtype=dtype, device=device)
    # Ram-Lak from its band-limited spatial samples (Kak & Slaney eq. 3.61): no DC offset, unlike
    # sampling |f| directly.
    m = np.minimum(np.arange(size), size - np.arange(size))
    h = np.zeros(size)
    h[0] = 0.25
    odd = m % 2 == 1
    h[odd] = -1.0 / (np.pi * m[odd]) ** 2
    resp = np.fft.rfft(h).real
    f = np.fft.rfftfreq(size)  # cycles per pixel, 0 .. 0.5
    if name == "shepp-logan":
        resp = resp * np.sinc(f)
    elif name == "cosine":
        resp = resp * np.cos(np.pi * f)
    elif name == "hamming":
        resp = resp * (0.54 + 0.46 * np.cos(2 * np.pi * f))
    elif name == "hann":
        resp = resp * (0.5 + 0.5 * np.cos(2 * np.pi * f))
    return torch.as_tensor(resp, dtype=dtype, device=device)


def _angle_weights_rad(angles_deg: np.ndarray) -> np.ndarray:
    """Angular width each projection stands for (the FBP quadrature weight), radians.

    Angles are taken modulo 180° (θ and θ+180° see the same lines) and put on a circle. Each
    weight is the mean of the gaps to its two neighbours. If the largest gap is more than 1.5x
    the median gap the scan is limited-angle: the circle is cut there and each of the two end
    angles counts its one inner gap twice. Uniform full coverage gives π/N, as scikit-image's
    iradon; N uniform angles over a range R give R/(N−1).
    """
    n = angles_deg.size
    if n == 1:
        return np.array([np.pi])
    mod = np.mod(angles_deg, 180.0)
    order = np.argsort(mod, kind="stable")
    s = mod[order]
    after = np.append(np.diff(s), s[0] + 180.0 - s[-1])  # gap to the next angle on the circle
    before = np.roll(after, 1)
    k = int(np.argmax(after))
    if after[k] > 1.5 * float(np.median(after)):
        nxt = (k + 1) % n
        after[k] = before[k]
        before[nxt] = after[nxt]
    w = np.empty(n)
    w[order] = 0.5 * (before + after)
    return np.deg2rad(w)


def fbp(
    projections: Any,
    angles_deg: Any,
    volume_shape: Sequence[int],
    *,
    filter: str | None = "ramp",  # noqa: A002 - the conventional name (skimage: filter_name)
    device: str | torch.device | None = None,
) -> Any:
    """Filtered back-projection, batched over every y slice.

    Each projection row is zero-padded to ``max(64, 2^ceil(log2(2W)))``, filtered in Fourier
    space, and back-projected pixel-driven: every voxel takes the linearly interpolated filtered
    value at its ``x'``, weighted by the angular width its projection stands for
    (π/N for N uniform angles over 180°).

    Parameters
    ----------
    projections : array_like or torch.Tensor
        ``(N, ny, W)`` line integrals as :func:`project` makes them.
    angles_deg : array_like
        The N angles, degrees.
    volume_shape : (nz, ny, nx)
        Output shape.
    filter : {"ramp", "shepp-logan", "cosine", "hamming", "hann", None}
        Ram-Lak filter, optionally apodised; ``None`` gives an unfiltered back-projection.

    Returns
    -------
    ndarray or torch.Tensor
        ``(nz, ny, nx)``; same kind as ``projections``.
    """
    if filter not in FILTERS:
        raise InputError(f"filter must be one of {FILTERS}, got {filter!r}")
    p, as_numpy, op = _setup(projections, angles_deg, volume_shape, device)
    n_ang, ny, width = p.shape
    nz, nx = op.nz, op.nx
    size = max(64, int(2 ** math.ceil(math.log2(2 * width))))
    resp = _filter_response(size, filter, p.dtype, p.device)
    q = torch.fft.irfft(torch.fft.rfft(p, n=size, dim=-1) * resp, n=size, dim=-1)[..., :width]
    weights = torch.as_tensor(_angle_weights_rad(op.angles_rad * 180 / np.pi), dtype=p.dtype,
                              device=p.device)
    q = q * weights[:, None, None]

    kw = {"dtype": p.dtype, "device": p.device}
    z = torch.arange(nz, **kw)[:, None] - (nz - 1) / 2
    x = torch.arange(nx, **kw) - (nx - 1) / 2
    out = torch.zeros(ny, nz, nx, **kw)
    chunk = max(1, _CHUNK_SAMPLES // (ny * nz * nx))
    for start in range(0, n_ang, chunk):
        th = torch.as_tensor(op.angles_rad[start : start + chunk], **kw)[:, None, None]
        xp = x * torch.cos(th) + z * torch.sin(th)  # (n, nz, nx): each voxel's detector x'
        grid = torch.stack((2 * xp / width, torch.zeros_like(xp)), dim=-1)
        rows = q[start : start + chunk].unsqueeze(2)  # (n, ny, 1, W)
        out += F.grid_sample(
            rows, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        ).sum(dim=0)
    return _out(out.permute(1, 0, 2).contiguous(), as_numpy)


def _safe_inverse(t: torch.Tensor) -> torch.Tensor:
    # Rays that miss the volume (row sum 0) and voxels no ray touches (column sum 0) get no
    # update instead of a division by zero.
    eps = 1e-6 * float(t.max()) if t.numel() else 0.0
    return torch.where(t > eps, 1.0 / t.clamp_min(eps if eps > 0 else 1.0), torch.zeros_like(t))


def _check_iterative(n_iter: int, relaxation: float) -> None:
    if int(n_iter) != n_iter or n_iter < 0:
        raise InputError(f"n_iter must be a non-negative integer, got {n_iter!r}")
    if not (math.isfinite(relaxation) and 0 < relaxation < 2):
        raise InputError(f"relaxation must lie in (0, 2), got {relaxation!r}")


def sirt(
    projections: Any,
    angles_deg: Any,
    volume_shape: Sequence[int],
    *,
    n_iter: int = 50,
    relaxation: float = 1.0,
    nonneg: bool = False,
    initial: Any = None,
    device: str | torch.device | None = None,
) -> Any:
    """SIRT: ``x += λ C A^T R (p − A x)`` with R, C the inverse row and column sums of A.

    All angles update together; every y slice is solved in the same batched operations.

    Parameters
    ----------
    projections : array_like or torch.Tensor
        ``(N, ny, W)``.
    angles_deg : array_like
        The N angles, degrees.
    volume_shape : (nz, ny, nx)
        Output shape.
    n_iter : int
        Iterations (each one projection and one back-projection of all angles).
    relaxation : float
        λ in (0, 2).
    nonneg : bool
        Clip negative voxels to 0 after each update.
    initial : array_like, optional
        ``(nz, ny, nx)`` start volume (default zeros), e.g. a network's output.

    Returns
    -------
    ndarray or torch.Tensor
        ``(nz, ny, nx)``; same kind as ``projections``.
    """
    _check_iterative(n_iter, relaxation)
    p, as_numpy, op = _setup(projections, angles_deg, volume_shape, device)
    kw = {"dtype": p.dtype, "device": p.device}
    # Row and column sums do not depend on y: compute them on one y slice and broadcast.
    inv_row = _safe_inverse(op.forward(torch.ones(1, 1, op.nz, op.nx, **kw)))
    inv_col = _safe_inverse(op.adjoint(torch.ones(p.shape[0], 1, op.width, **kw)))
    x = _start(initial, op, kw)
    for _ in range(int(n_iter)):
        x = x + relaxation * inv_col * op.adjoint(inv_row * (p - op.forward(x)))
        if nonneg:
            x.clamp_(min=0)
    return _out(_to_public(x), as_numpy)


def _start(initial: Any, op: _RayOperator, kw: dict) -> torch.Tensor:
    if initial is None:
        return torch.zeros(1, op.ny, op.nz, op.nx, **kw)
    x0, _ = _tensor(initial, "initial", 3, kw["device"])
    if tuple(x0.shape) != (op.nz, op.ny, op.nx):
        raise InputError(f"initial volume has shape {tuple(x0.shape)}, expected {(op.nz, op.ny, op.nx)}")
    return _to_internal(x0.to(kw["dtype"])).clone()


def _access_order(angles_rad: np.ndarray, order: str) -> np.ndarray:
    by_angle = np.argsort(np.mod(angles_rad, np.pi), kind="stable")
    if order == "sequential":
        return by_angle
    # Golden-ratio access (Kohler 2004): consecutive updates use nearly independent angles.
    n = angles_rad.size
    rank = np.argsort(np.argsort(np.mod(np.arange(n) * _GOLDEN, 1.0), kind="stable"))
    return by_angle[rank]


def sart(
    projections: Any,
    angles_deg: Any,
    volume_shape: Sequence[int],
    *,
    n_iter: int = 10,
    relaxation: float = 0.25,
    nonneg: bool = False,
    order: str = "golden",
    initial: Any = None,
    device: str | torch.device | None = None,
) -> Any:
    """SART (Andersen & Kak 1984): update angle by angle, normalised by row and column sums.

    For each angle θ in turn:
    ``x += λ (A_θ^T [(p_θ − A_θ x) / A_θ 1]) / (A_θ^T 1)``, every y slice at once.

    Parameters
    ----------
    projections : array_like or torch.Tensor
        ``(N, ny, W)``.
    angles_deg : array_like
        The N angles, degrees.
    volume_shape : (nz, ny, nx)
        Output shape.
    n_iter : int
        Sweeps over all angles.
    relaxation : float
        λ in (0, 2).
    nonneg : bool
        Clip negative voxels to 0 after each angle's update.
    order : {"golden", "sequential"}
        Angle access order within a sweep: golden-ratio spread or increasing angle.
    initial : array_like, optional
        ``(nz, ny, nx)`` start volume (default zeros); e.g. a network's output, which the sweeps
        then pull towards agreement with the projections (data consistency).

    Returns
    -------
    ndarray or torch.Tensor
        ``(nz, ny, nx)``; same kind as ``projections``.
    """
    _check_iterative(n_iter, relaxation)
    if order not in ("golden", "sequential"):
        raise InputError(f"order must be 'golden' or 'sequential', got {order!r}")
    p, as_numpy, op = _setup(projections, angles_deg, volume_shape, device)
    kw = {"dtype": p.dtype, "device": p.device}
    n_ang = p.shape[0]
    inv_row = _safe_inverse(op.forward(torch.ones(1, 1, op.nz, op.nx, **kw)))  # (N, 1, W)
    ones = torch.ones(1, 1, op.width, **kw)
    inv_col = [_safe_inverse(op.adjoint(ones, np.array([a]))) for a in range(n_ang)]
    seq = _access_order(op.angles_rad, order)
    x = _start(initial, op, kw)
    for _ in range(int(n_iter)):
        for a in seq:
            sel = np.array([a])
            resid = (p[a : a + 1] - op.forward(x, sel)) * inv_row[a : a + 1]
            x += relaxation * inv_col[a] * op.adjoint(resid, sel)
            if nonneg:
                x.clamp_(min=0)
    return _out(_to_public(x), as_numpy)
