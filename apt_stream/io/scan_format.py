"""The scan file's schema: HDF5 paths, NeXus classes, units, tolerances (docs/scan-format.md),
and the low-level helpers every reader needs (opening a file, reading a string attribute)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from apt_stream.errors import ScanFormatError

FORMAT_NAME = "apt-stream-scan"
#: 1.1 added the convention attributes (apt_stream.io.conventions); a reader takes any 1.x.
FORMAT_VERSION = "1.1"

ENERGY = "/entry/instrument/source/energy"
DISTANCE = "/entry/instrument/detector/distance"
X_PIXEL = "/entry/instrument/detector/x_pixel_size"
Y_PIXEL = "/entry/instrument/detector/y_pixel_size"
PROBE = "/entry/instrument/probe/modes"
ANGLES = "/entry/sample/rotation_angle"
VOLUME_SHAPE = "/entry/sample/volume_shape"
OBJECT_PIXEL = "/entry/object/pixel_size"
FIELD_SHAPE = "/entry/object/field_shape"
N_SLICES = "/entry/object/n_slices"
SLICE_SPACING = "/entry/object/slice_spacing"
FRAMES = "/entry/data/frames"
ANGLE_INDEX = "/entry/data/angle_index"
POSITIONS = "/entry/data/positions"
TRUTH = "/entry/sample/ground_truth"
PROVENANCE = "/entry/provenance"

#: Groups every scan file has, with their NeXus class (parents before children).
GROUPS: dict[str, str] = {
    "/entry": "NXentry",
    "/entry/instrument": "NXinstrument",
    "/entry/instrument/source": "NXsource",
    "/entry/instrument/detector": "NXdetector",
    "/entry/instrument/probe": "NXcollection",
    "/entry/sample": "NXsample",
    "/entry/object": "NXcollection",
    "/entry/data": "NXdata",
}
OPTIONAL_GROUPS: dict[str, str] = {TRUTH: "NXcollection", PROVENANCE: "NXcollection"}

#: Accepted spellings of each unit; the first one is what apt-stream writes.
UNITS: dict[str, tuple[str, ...]] = {
    "m": ("m", "metre", "meter", "metres", "meters"),
    "deg": ("deg", "degree", "degrees"),
    "keV": ("keV",),
    "counts": ("counts", "photons"),
}

#: Positions may overshoot the field by this much (pixels): float round trips through metres.
POSITION_TOLERANCE_PX = 0.01
#: Allowed relative mismatch of the object pixel against λ·distance / (h · detector pixel).
OBJECT_PIXEL_RTOL = 0.01
_PROVENANCE_KEYS = ("software_version", "preset", "seed", "created", "command_line")


@dataclass(frozen=True)
class _Spec:
    path: str
    kind: str  # "real" | "float" | "complex" | "int"
    ndim: int
    units: str | None


_SPECS = (
    _Spec(ENERGY, "real", 0, "keV"),
    _Spec(DISTANCE, "real", 0, "m"),
    _Spec(X_PIXEL, "real", 0, "m"),
    _Spec(Y_PIXEL, "real", 0, "m"),
    _Spec(PROBE, "complex", 3, None),
    _Spec(ANGLES, "real", 1, "deg"),
    _Spec(VOLUME_SHAPE, "int", 1, None),
    _Spec(OBJECT_PIXEL, "real", 0, "m"),
    _Spec(FIELD_SHAPE, "int", 1, None),
    _Spec(N_SLICES, "int", 0, None),
    _Spec(SLICE_SPACING, "real", 1, "m"),
    _Spec(FRAMES, "float", 3, "counts"),
    _Spec(ANGLE_INDEX, "int", 1, None),
    _Spec(POSITIONS, "real", 2, "m"),
)
_TRUTH_SPECS = (
    _Spec(TRUTH + "/delta", "float", 3, None),
    _Spec(TRUTH + "/beta", "float", 3, None),
    _Spec(TRUTH + "/labels", "int", 3, None),
    _Spec(TRUTH + "/voxel_size", "real", 0, "m"),
)



def open_hdf5(path: str | os.PathLike, *, swmr: bool = False) -> h5py.File:
    """Open an HDF5 file read-only; ScanFormatError naming the file when missing, not HDF5 or corrupt."""
    p = Path(path)
    if not p.is_file():
        raise ScanFormatError(f"{p}: no such file")
    if not h5py.is_hdf5(p):
        raise ScanFormatError(f"{p}: not an HDF5 file (no HDF5 signature)")
    try:
        return h5py.File(p, "r", swmr=swmr)
    except OSError as exc:
        hint = "" if swmr else "; if a writer still has it open, read with swmr=True"
        raise ScanFormatError(
            f"{p}: cannot open as HDF5 (truncated or corrupt?){hint}: {exc}"
        ) from exc


def _attr_str(obj, name: str) -> str | None:
    value = obj.attrs.get(name)
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
        return value.decode() if isinstance(value, bytes) else str(value)
    return str(value)
