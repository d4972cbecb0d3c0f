"""Reconstructed volumes (Approximant, APT, baselines) in one small HDF5 file.

Layout (``docs/scan-format.md``, "Volume files")::

    /                     NX_class=NXroot, format="apt-stream-volumes", format_version,
                          voxel_size_m, dims=["z","y","x"], provenance (JSON of ``attrs``)
    /entry                NXentry
    /entry/volumes        NXcollection
    /entry/volumes/<name> (nz, ny, nx), attrs dims=["z","y","x"], voxel_size (units "m")

Every volume is on the sample-frame grid of docs/conventions.md (axis order z, y, x).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np

from apt_stream.errors import InputError, ScanFormatError
from apt_stream.io.scan import _compression_kwargs, dumps_json, open_hdf5

VOLUME_FORMAT_NAME = "apt-stream-volumes"
VOLUME_FORMAT_VERSION = "1.0"
DIMS = ("z", "y", "x")
VOLUMES = "/entry/volumes"
_RESERVED = ("voxel_size_m", "dims")


def _check_volume(name: str, volume) -> np.ndarray:
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise InputError(f"volume name must be a non-empty string without '/', got {name!r}")
    arr = np.asarray(volume)
    if arr.ndim != 3:
        raise InputError(f"volume {name!r} must be 3D (z, y, x), got shape {arr.shape}")
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "iuf":
        raise InputError(f"volume {name!r} must be real numbers, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise InputError(
            f"volume {name!r} contains {int(np.count_nonzero(~np.isfinite(arr)))} NaN/Inf values"
        )
    return arr


def write_volumes(
    path: str | os.PathLike,
    volumes: Mapping[str, np.ndarray],
    *,
    voxel_size_m: float,
    attrs: Mapping | None = None,
    compression: str | None = "gzip",
) -> Path:
    """Write named (z, y, x) volumes with their voxel size and provenance.

    Parameters
    ----------
    path : path-like
        Destination ``.h5`` file (replaced if it exists; parent folders are created).
    volumes : mapping of str to (nz, ny, nx) array
        E.g. ``{"approximant": ..., "apt": ..., "sirt": ...}``; dtypes are kept (bool → uint8).
    voxel_size_m : float, keyword-only
        Isotropic voxel edge.
    attrs : mapping, keyword-only
        Provenance (JSON-serialisable; numpy scalars and arrays allowed), stored as the root
        attribute ``provenance``. The keys ``voxel_size_m`` and ``dims`` are reserved and may only
        repeat the stored values (so ``attrs`` from :func:`read_volumes` can be passed back).
    compression : {"gzip", "lzf", None}, keyword-only

    Returns
    -------
    Path
    """
    if not isinstance(volumes, Mapping) or not volumes:
        raise InputError("volumes must be a non-empty mapping of name -> (z, y, x) array")
    if not (
        isinstance(voxel_size_m, int | float | np.floating)
        and math.isfinite(voxel_size_m)
        and voxel_size_m > 0
    ):
        raise InputError(f"voxel_size_m must be a finite number > 0, got {voxel_size_m!r}")
    arrays = {name: _check_volume(name, vol) for name, vol in volumes.items()}
    meta = dict(attrs or {})
    reserved = {"voxel_size_m": float(voxel_size_m), "dims": list(DIMS)}
    for key, value in reserved.items():
        if key in meta and meta.pop(key) != value:
            raise InputError(
                f"attrs[{key!r}] is reserved and differs from the stored value {value!r}"
            )
    provenance = dumps_json(meta, what="volume attrs")
    comp = _compression_kwargs(compression)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(target, "w") as f:
        f.attrs.update(
            NX_class="NXroot",
            default="entry",
            format=VOLUME_FORMAT_NAME,
            format_version=VOLUME_FORMAT_VERSION,
            voxel_size_m=float(voxel_size_m),
            dims=list(DIMS),
            provenance=provenance,
        )
        f.create_group("entry").attrs["NX_class"] = "NXentry"
        group = f.create_group(VOLUMES)
        group.attrs["NX_class"] = "NXcollection"
        for name, arr in arrays.items():
            ds = group.create_dataset(name, data=arr, **(comp if arr.size > 1 else {}))
            ds.attrs.update(dims=list(DIMS), voxel_size=float(voxel_size_m), voxel_size_units="m")
    return target


def _str_list(value) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.atleast_1d(value)]


def read_volumes(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read a file written by :func:`write_volumes`.

    Returns
    -------
    volumes : dict of str to ndarray
        In file order of names (alphabetical).
    attrs : dict
        The stored provenance plus ``voxel_size_m`` (float) and ``dims`` (``["z", "y", "x"]``).

    Raises
    ------
    ScanFormatError
        Naming the HDF5 path of the first bad field (``/`` for the file itself).
    """
    with open_hdf5(path) as f:
        fmt = f.attrs.get("format")
        fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
        if fmt != VOLUME_FORMAT_NAME:
            raise ScanFormatError(
                f"/: attribute 'format' is {fmt!r}, expected {VOLUME_FORMAT_NAME!r}"
            )
        if _str_list(f.attrs.get("dims", [])) != list(DIMS):
            raise ScanFormatError(f"/: attribute 'dims' must be {list(DIMS)}")
        voxel = float(np.asarray(f.attrs.get("voxel_size_m", np.nan)))
        if not (math.isfinite(voxel) and voxel > 0):
            raise ScanFormatError(f"/: attribute 'voxel_size_m' must be > 0, got {voxel!r}")
        try:
            meta = json.loads(f.attrs.get("provenance", "{}"))
        except (TypeError, json.JSONDecodeError) as exc:
            raise ScanFormatError(f"/: attribute 'provenance' is not valid JSON: {exc}") from exc
        group = f.get(VOLUMES)
        if not isinstance(group, h5py.Group):
            raise ScanFormatError(f"{VOLUMES}: required group is missing")
        volumes: dict[str, np.ndarray] = {}
        for name, ds in group.items():
            where = f"{VOLUMES}/{name}"
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 3:
                raise ScanFormatError(f"{where}: expected a 3D (z, y, x) dataset")
            if _str_list(ds.attrs.get("dims", [])) != list(DIMS):
                raise ScanFormatError(f"{where}: attribute 'dims' must be {list(DIMS)}")
            try:
                volumes[name] = ds[()]
            except OSError as exc:
                raise ScanFormatError(
                    f"{where}: cannot be read (truncated or corrupt file?): {exc}"
                ) from exc
    meta.update(voxel_size_m=voxel, dims=list(DIMS))
    return volumes, meta
