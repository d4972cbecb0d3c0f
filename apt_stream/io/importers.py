"""Importers: scans from other codes' layouts into an apt-stream scan file (docs/importing.md).

``apt-stream import FORMAT IN OUT.h5`` (or :func:`import_scan`) reads

* ``ptychi``: a pty-chi-style NumPy ``.npz`` or flat HDF5 file holding the arrays one hands to
  pty-chi (frames, positions, probe, angles, energy or wavelength, object pixel size);
* ``nexus``: a NeXus / ptychodus-style HDF5 file (frames as the default ``NXdata`` signal,
  energy and detector geometry under ``/entry/instrument`` with ``units``, probe positions as
  ptychodus's ``probe_position_x_m`` / ``probe_position_y_m``, the probe as ptychodus's
  ``probe``),

converts every convention (:mod:`apt_stream.io.conventions`) to ours, sizes the object field for
the scan's extent (:func:`apt_stream.physics.geometry.field_shape_for_positions`) and writes a
checked scan file in apt-stream's own conventions. Each format's defaults are the conventions of
the code it comes from; every one can be overridden (:class:`ImportOptions`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from apt_stream.config import wavelength_m as _wavelength_m
from apt_stream.errors import ScanFormatError
from apt_stream.io.conventions import (
    Conventions,
    frames_to_ours,
    positions_to_ours,
    probe_to_ours,
)
from apt_stream.io.scan_data import GroundTruth, ScanData

FORMATS = ("ptychi", "nexus")
_HC_M_KEV = 1.239841984e-9


@dataclass(frozen=True)
class ImportOptions:
    """What the input file does not say (or says in another convention). None: the format's own.

    volume_shape_zyx : the reconstruction grid (nz, ny, nx) in object pixels; required unless
        the input holds ``volume_shape``.
    n_slices : L, the Approximant's slices.
    origin_yx_px : where, in the input's position frame (pixels, after ``positions_order``),
        the field centre lies: x of the rotation axis and y of the sample's middle row.
    positions_order : "yx" or "xy", the column order of a (K, 2) positions array.
    phase_sign, fft_norm, fft_centring, position_reference, probe_plane : the conventions of
        :class:`apt_stream.io.conventions.Conventions`.
    even_width : make the field's column margin even (voxel centres on pixel centres) instead of
        the simulators' field (what the shipped network was trained on).
    """

    volume_shape_zyx: tuple[int, int, int] | None = None
    n_slices: int = 5
    origin_yx_px: tuple[float, float] = (0.0, 0.0)
    positions_order: str = "yx"
    phase_sign: int | None = None
    fft_norm: str | None = None
    fft_centring: str | None = None
    position_reference: str | None = None
    probe_plane: str | None = None
    even_width: bool = False


#: Each format's own conventions (docs/importing.md says where each comes from).
FORMAT_CONVENTIONS = {
    # pty-chi: probe centres with arbitrary offsets (window from centre − (h−1)/2), an
    # unnormalised far-field FFT, data "as collected" (direct beam in the middle) and, for
    # data converted from the exp(+ik∫δ) convention, conjugate fields (issue 10).
    "ptychi": Conventions(phase_sign=1, fft_norm="backward", fft_centring="centred",
                          position_reference="centre", positions_relative_to="centre"),
    # ptychodus / NeXus: probe centres in metres about the object centre, detector images.
    "nexus": Conventions(phase_sign=-1, fft_norm="ortho", fft_centring="centred",
                         position_reference="centre", positions_relative_to="centre"),
}


def _conventions(fmt: str, opts: ImportOptions) -> Conventions:
    base = FORMAT_CONVENTIONS[fmt]
    changes = {k: getattr(opts, k) for k in
               ("phase_sign", "fft_norm", "fft_centring", "position_reference", "probe_plane")
               if getattr(opts, k) is not None}
    return replace(base, **changes)


# --------------------------------------------------------------------------------------------
# Reading the inputs
# --------------------------------------------------------------------------------------------


class _Arrays:
    """Named arrays of an .npz or a flat HDF5 file; a missing one is a ScanFormatError naming it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_file():
            raise ScanFormatError(f"{path}: no such file")
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                self.data = {k: z[k] for k in z.files}
        else:
            import h5py

            if not h5py.is_hdf5(path):
                raise ScanFormatError(f"{path}: neither .npz nor HDF5")
            self.data = {}
            with h5py.File(path, "r") as f:
                f.visititems(lambda name, obj: self.data.setdefault(name.split("/")[-1], obj[()])
                             if isinstance(obj, h5py.Dataset) else None)

    def get(self, *names):
        for name in names:
            if name in self.data:
                return np.asarray(self.data[name])
        return None

    def need(self, *names) -> np.ndarray:
        value = self.get(*names)
        if value is None:
            raise ScanFormatError(f"{self.path}: needs an array named {' or '.join(map(repr, names))}")
        return value


def _scalar(value, what: str, path: Path) -> float:
    try:
        v = float(np.asarray(value).reshape(()))
    except (TypeError, ValueError):
        raise ScanFormatError(f"{path}: {what} must be one number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ScanFormatError(f"{path}: {what} must be finite and > 0, got {v!r}")
    return v


def _probe_modes(probe: np.ndarray, path: Path, where: str) -> np.ndarray:
    probe = np.asarray(probe)
    if probe.ndim == 4:  # pty-chi / ptychodus: (n_opr, M, h, w); the first OPR mode is the mean
        probe = probe[0]
    if probe.ndim == 2:
        probe = probe[None]
    if probe.ndim != 3 or probe.dtype.kind != "c":
        raise ScanFormatError(f"{path}: {where} must be complex (M, h, w), got {probe.dtype} {probe.shape}")
    return probe


def _angles_per_frame(angles: np.ndarray, index, n_frames: int, path: Path):
    """(N,) sorted unique angles and the (K,) index of each frame's angle."""
    angles = np.asarray(angles, dtype=np.float64).reshape(-1)
    if index is not None:
        return angles, np.asarray(index, dtype=np.int64).reshape(-1)
    if angles.size == n_frames:
        unique, inverse = np.unique(angles, return_inverse=True)
        return unique, inverse
    if angles.size == 1:
        return angles, np.zeros(n_frames, dtype=np.int64)
    raise ScanFormatError(
        f"{path}: {angles.size} angles for {n_frames} frames: give one angle per frame, or the "
        f"angles with an angle_index per frame"
    )


def _read_ptychi(path: Path, opts: ImportOptions) -> dict:
    a = _Arrays(path)
    frames = a.need("frames", "patterns", "data", "diffraction")
    probe = _probe_modes(a.need("probe"), path, "probe")
    if a.get("wavelength_m") is not None:
        lam = _scalar(a.get("wavelength_m"), "wavelength_m", path)
        energy = _HC_M_KEV / lam
    else:
        energy = _scalar(a.need("energy_kev"), "energy_kev", path)
    pixel = _scalar(a.need("pixel_size_m", "object_pixel_size_m"), "pixel_size_m", path)
    pos = a.get("positions_px")
    if pos is None and a.get("position_y_px") is not None:
        pos = np.stack([a.need("position_y_px"), a.need("position_x_px")], axis=-1)
        order = "yx"
    else:
        order = opts.positions_order
        if pos is None:
            pos = a.need("positions_px", "positions_m") / pixel
    angles, index = _angles_per_frame(a.need("angles_deg", "theta_deg", "rotation_angle_deg"),
                                      a.get("angle_index"), len(frames), path)
    truth = None
    if a.get("truth_delta") is not None:
        truth = GroundTruth(delta=a.need("truth_delta"), beta=a.need("truth_beta"),
                            labels=a.need("truth_labels"),
                            voxel_size_m=_scalar(pixel if a.get("voxel_size_m") is None
                                                 else a.get("voxel_size_m"), "voxel_size_m", path))
    return dict(frames=frames, probe=probe, energy_kev=energy, object_pixel_m=pixel,
                positions_px=np.asarray(pos, dtype=np.float64), order=order, angles=angles,
                angle_index=index, truth=truth, volume_shape=a.get("volume_shape"),
                distance=a.get("detector_distance_m"),
                det_pixel=a.get("detector_pixel_m", "detector_pixel_size_m"))


_UNIT_SCALE = {
    "m": 1.0, "metre": 1.0, "meter": 1.0, "mm": 1e-3, "um": 1e-6, "µm": 1e-6, "micron": 1e-6,
    "nm": 1e-9, "keV": 1.0, "eV": 1e-3, "deg": 1.0, "degree": 1.0, "degrees": 1.0,
    "rad": 180 / math.pi, "radian": 180 / math.pi,
}


def _with_units(ds, path: Path, kind: str, default: str) -> np.ndarray:
    units = ds.attrs.get("units", default)
    units = units.decode() if isinstance(units, bytes) else str(units)
    if units not in _UNIT_SCALE:
        raise ScanFormatError(f"{path}:{ds.name}: units {units!r} not understood for {kind}")
    return np.asarray(ds[()], dtype=np.float64) * _UNIT_SCALE[units]


def _read_nexus(path: Path, opts: ImportOptions) -> dict:
    import h5py

    if not path.is_file() or not h5py.is_hdf5(path):
        raise ScanFormatError(f"{path}: not an HDF5 (NeXus) file")
    with h5py.File(path, "r") as f:
        def find(*names):
            for name in names:
                if name in f:
                    return f[name]
            datasets: list = []
            f.visititems(lambda n, o: datasets.append((n.split("/")[-1], o))
                         if isinstance(o, h5py.Dataset) else None)
            for name in names:  # a bare name anywhere (ptychodus products keep them at the root)
                for base, obj in datasets:
                    if base == name:
                        return obj
            return None

        def need(*names):
            ds = find(*names)
            if ds is None:
                raise ScanFormatError(f"{path}: needs a dataset {' or '.join(map(repr, names))}")
            return ds

        entry = f.attrs.get("default", "entry")
        entry = entry.decode() if isinstance(entry, bytes) else str(entry)
        data_group = f[entry].attrs.get("default", "data") if entry in f else "data"
        data_group = data_group.decode() if isinstance(data_group, bytes) else str(data_group)
        signal = "data"
        if f"{entry}/{data_group}" in f:
            signal = f[f"{entry}/{data_group}"].attrs.get("signal", "data")
            signal = signal.decode() if isinstance(signal, bytes) else str(signal)
        frames = need(f"{entry}/{data_group}/{signal}", f"{entry}/data/data")[()]
        energy_ds = find(f"{entry}/instrument/source/energy",
                         f"{entry}/instrument/monochromator/energy")
        if energy_ds is not None:
            energy = float(_with_units(energy_ds, path, "energy", "keV"))
        elif "probe_energy_eV" in f.attrs:
            energy = float(f.attrs["probe_energy_eV"]) * 1e-3
        else:
            raise ScanFormatError(f"{path}: needs {entry}/instrument/source/energy")
        dist = find(f"{entry}/instrument/detector/distance")
        distance = (float(_with_units(dist, path, "distance", "m")) if dist is not None
                    else float(f.attrs.get("detector_object_distance_m", 0)) or None)
        det_ds = find(f"{entry}/instrument/detector/x_pixel_size")
        det_pixel = float(_with_units(det_ds, path, "pixel size", "m")) if det_ds is not None else None
        probe_ds = need("probe")
        probe = _probe_modes(probe_ds[()], path, probe_ds.name)
        pixel = probe_ds.attrs.get("pixel_width_m")
        if pixel is None and det_pixel and distance:
            pixel = _wavelength_m(energy) * distance / (probe.shape[-1] * det_pixel)
        if pixel is None:
            raise ScanFormatError(f"{path}: {probe_ds.name} needs a pixel_width_m attribute "
                                  "(or give the detector distance and pixel size)")
        pixel = float(pixel)
        px = need("probe_position_x_m")[()]
        py = need("probe_position_y_m")[()]
        pos = np.stack([py, px], axis=-1) / pixel
        idx = find("probe_position_indexes")
        if idx is not None:
            frames = frames[np.asarray(idx[()], dtype=np.int64)]
        ang_ds = find(f"{entry}/sample/rotation_angle", "tomography_angle_deg")
        if ang_ds is not None:
            angles_raw = _with_units(ang_ds, path, "angle", "deg")
        elif "tomography_angle_deg" in f.attrs:
            angles_raw = np.asarray([float(f.attrs["tomography_angle_deg"])])
        else:
            raise ScanFormatError(f"{path}: needs {entry}/sample/rotation_angle (one per frame)")
        index = find("angle_index")
        angles, index = _angles_per_frame(angles_raw, None if index is None else index[()],
                                          len(frames), path)
        vol = find("volume_shape")
        vol = None if vol is None else vol[()]
    return dict(frames=frames, probe=probe, energy_kev=energy, object_pixel_m=pixel,
                positions_px=pos, order="yx", angles=angles, angle_index=index, truth=None,
                volume_shape=vol, distance=distance, det_pixel=det_pixel)


# --------------------------------------------------------------------------------------------
# Converting
# --------------------------------------------------------------------------------------------


def scan_from_arrays(raw: dict, conv: Conventions, opts: ImportOptions, *, source: str = "",
                     fmt: str = "") -> ScanData:
    """Build a ScanData in our conventions from an importer's arrays (``raw``) in ``conv``'s."""
    from apt_stream.physics import geometry

    frames = np.asarray(raw["frames"])
    if frames.ndim != 3:
        raise ScanFormatError(f"{source}: frames must be (K, h, w), got shape {frames.shape}")
    if frames.dtype.kind in "iu":
        frames = frames.astype(np.float32)
    probe = np.asarray(raw["probe"])
    hw = tuple(int(v) for v in probe.shape[-2:])
    if tuple(frames.shape[1:]) != hw:
        raise ScanFormatError(f"{source}: frames are {frames.shape[1:]} but the probe is {hw}")
    pos = np.asarray(raw["positions_px"], dtype=np.float64).reshape(-1, 2)
    if len(pos) != len(frames):
        raise ScanFormatError(f"{source}: {len(pos)} positions for {len(frames)} frames")
    if raw.get("order", opts.positions_order) == "xy":
        pos = pos[:, ::-1]
    pos = pos - np.asarray(opts.origin_yx_px, dtype=np.float64)
    shape = opts.volume_shape_zyx or raw.get("volume_shape")
    if shape is None:
        raise ScanFormatError(f"{source}: the reconstruction grid is not in the file: give "
                              "--volume-shape NZ,NY,NX (object pixels)")
    shape = tuple(int(v) for v in np.asarray(shape).reshape(-1))
    angles, index = raw["angles"], raw["angle_index"]
    # Window corners measured from the field centre, then the field that holds them all.
    corners_rel = positions_to_ours(pos, conv, (1, 1), hw)
    field = geometry.field_shape_for_positions(shape, hw, angles, corners_rel,
                                               even_width=opts.even_width)
    corners = corners_rel + [(field[0] - 1) / 2, (field[1] - 1) / 2]
    energy, pixel = float(raw["energy_kev"]), float(raw["object_pixel_m"])
    lam = _wavelength_m(energy)
    distance, det_pixel = raw.get("distance"), raw.get("det_pixel")
    distance = None if distance is None else float(np.asarray(distance).reshape(()))
    det_pixel = None if det_pixel is None else float(np.asarray(det_pixel).reshape(()))
    if distance is None and det_pixel is None:
        distance = 1.0  # far field: only λ·distance/(h·detector pixel) = object pixel matters
    if det_pixel is None:
        det_pixel = lam * distance / (hw[0] * pixel)
    if distance is None:
        distance = pixel * hw[0] * det_pixel / lam
    spacing = np.array([geometry.slice_spacing_m(shape, pixel, a, opts.n_slices) for a in angles])
    truth = raw.get("truth")
    return ScanData(
        frames=np.ascontiguousarray(frames_to_ours(frames, conv), dtype=np.float32),
        angle_index=np.asarray(index, dtype=np.int32),
        positions_px=corners,
        angles_deg=np.asarray(angles, dtype=np.float64),
        probe=np.asarray(probe_to_ours(probe, conv), dtype=np.complex64),
        energy_kev=energy, detector_distance_m=distance, detector_pixel_m=det_pixel,
        object_pixel_m=pixel, field_shape=field, slice_spacing_m=spacing,
        n_slices=int(opts.n_slices), volume_shape_zyx=shape, truth=truth,
        provenance={"imported_from": source, "import_format": fmt,
                    "import_conventions": {**conv.__dict__}, "origin_yx_px": list(opts.origin_yx_px)},
        probe_plane=conv.probe_plane,
    )


def import_scan(fmt: str, source: str | os.PathLike, output: str | os.PathLike,
                options: ImportOptions | None = None) -> dict:
    """Read ``source`` in format ``fmt`` ("ptychi" | "nexus"), write ``output``; a summary."""
    from apt_stream.errors import ConfigError
    from apt_stream.io.scan_write import write_scan

    if fmt not in FORMATS:
        raise ConfigError(f"unknown import format {fmt!r}; choose one of {', '.join(FORMATS)}")
    opts = options or ImportOptions()
    if opts.positions_order not in ("yx", "xy"):
        raise ConfigError(f"positions order must be 'yx' or 'xy', got {opts.positions_order!r}")
    path = Path(source)
    raw = (_read_ptychi if fmt == "ptychi" else _read_nexus)(path, opts)
    conv = _conventions(fmt, opts)
    scan = scan_from_arrays(raw, conv, opts, source=str(path), fmt=fmt)
    write_scan(output, scan)
    return {
        "output": str(output), "format": fmt, "angles": scan.n_angles, "frames": scan.n_frames,
        "frame_shape": list(scan.frame_shape), "field_shape": list(scan.field_shape),
        "volume_shape_zyx": list(scan.volume_shape_zyx), "converted": conv.differences(),
        "probe_plane": scan.probe_plane,
        "next": f"apt-stream check {output}",
    }


def export_ptychi_npz(scan: ScanData, path: str | os.PathLike,
                      conventions: Conventions | None = None) -> Path:
    """Write ``scan`` as a pty-chi-style ``.npz`` (the ``ptychi`` importer's input), in
    ``conventions`` (default: the ptychi format's), positions as probe centres in pixels about
    the field centre. ``apt-stream import ptychi`` of the result gives ``scan`` back."""
    from apt_stream.io.conventions import frames_from_ours, positions_from_ours, probe_from_ours

    conv = conventions or FORMAT_CONVENTIONS["ptychi"]
    conv = replace(conv, positions_relative_to="centre")
    hw = scan.frame_shape
    arrays = dict(
        frames=np.asarray(frames_from_ours(np.asarray(scan.frames), conv), dtype=np.float32),
        positions_px=positions_from_ours(scan.positions_px, conv, scan.field_shape, hw),
        probe=np.asarray(probe_from_ours(scan.probe, conv), dtype=np.complex64),
        angles_deg=np.asarray(scan.angles_deg)[np.asarray(scan.angle_index)],
        energy_kev=np.float64(scan.energy_kev), pixel_size_m=np.float64(scan.object_pixel_m),
        detector_distance_m=np.float64(scan.detector_distance_m),
        detector_pixel_m=np.float64(scan.detector_pixel_m),
        volume_shape=np.asarray(scan.volume_shape_zyx, dtype=np.int64),
    )
    if scan.truth is not None:
        arrays.update(truth_delta=scan.truth.delta, truth_beta=scan.truth.beta,
                      truth_labels=scan.truth.labels, voxel_size_m=np.float64(scan.truth.voxel_size_m))
    path = Path(path)
    np.savez(path, **arrays)
    return path


def _numbers(text: str | None, n: int, what: str, kind=float):
    from apt_stream.errors import ConfigError

    if text is None:
        return None
    parts = [p for p in str(text).replace(" ", "").split(",") if p]
    try:
        values = tuple(kind(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != n:
        raise ConfigError(f"{what} must be {n} comma-separated numbers, got {text!r}")
    return values


def import_from_cli(fmt: str, source, output, *, volume_shape: str | None = None,
                    slices: int = 5, origin: str = "0,0", positions_order: str = "yx",
                    phase_sign: str | None = None, fft_norm: str | None = None,
                    fft_centring: str | None = None, position_reference: str | None = None,
                    probe_plane: str | None = None, even_width: bool = False) -> dict:
    """:func:`import_scan` with the command line's text options parsed (ConfigError if bad)."""
    from apt_stream.errors import ConfigError
    from apt_stream.io.conventions import parse_phase_sign

    try:
        sign = None if phase_sign is None else parse_phase_sign(phase_sign, where="--phase-sign")
        opts = ImportOptions(
            volume_shape_zyx=_numbers(volume_shape, 3, "--volume-shape", int),
            n_slices=int(slices), origin_yx_px=_numbers(origin, 2, "--origin"),
            positions_order=positions_order, phase_sign=sign, fft_norm=fft_norm,
            fft_centring=fft_centring, position_reference=position_reference,
            probe_plane=probe_plane, even_width=bool(even_width),
        )
        _conventions(fmt if fmt in FORMATS else "ptychi", opts)  # bad values fail here
    except ScanFormatError as exc:  # a bad convention value is the user's option, not a file
        raise ConfigError(str(exc).split(": ", 1)[-1]) from None
    return import_scan(fmt, source, output, opts)
