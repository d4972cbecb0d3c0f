"""Turn the sink's arguments (run header, angle summary, volumes) into Tiled metadata and rows.

Pure functions with no Tiled import, so the JSON-lines backup and the writer share them.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import numpy as np

from apt_stream.errors import InputError

#: The statuses a scan container is known to hold (``status`` in its metadata). The publisher
#: stores any other status text as given, so a new one from the reconstructor needs no change here.
STATUSES: tuple[str, ...] = (
    "acquiring", "reconstructing", "done", "done_with_gaps", "abandoned", "failed",
    "stopped_before_trigger",
)
#: Statuses after which a run is over (the sink's ``run_stopped``): ``done_with_gaps`` (some
#: frames missing), ``abandoned`` (no stop document came; closed after an idle time).
FINAL_STATUSES: tuple[str, ...] = (
    "done", "done_with_gaps", "abandoned", "failed", "stopped_before_trigger",
)

#: Columns of the per-angle ``angles`` table, in order, with their Arrow types.
ANGLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("angle_id", "int64"),
    ("angle_deg", "float64"),
    ("frames", "int64"),
    ("seconds", "float64"),
    ("loss", "float64"),
    ("loss_pass1", "float64"),
)

# Header arrays longer than this (the probe modes) stay out of the metadata: metadata is for
# finding scans, and a (M, h, w) complex probe would bloat every search result.
_MAX_METADATA_ARRAY = 4096


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON types: numpy scalars/arrays to Python, NaN/inf to None.

    Tiled stores metadata as JSON and JSON has no NaN; a None keeps the key queryable.
    """
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, np.ndarray):
        if np.iscomplexobj(value):
            raise InputError("complex arrays cannot go into metadata")
        return json_safe(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    if isinstance(value, _dt.datetime | _dt.date):
        return value.isoformat()
    if isinstance(value, PurePath):
        return str(value)
    return repr(value)


def as_mapping(obj: Any, *, what: str) -> dict[str, Any]:
    """Fields of a dataclass, a pydantic model or a mapping, as a dict."""
    if isinstance(obj, Mapping):
        return dict(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        return dict(dump())
    raise InputError(f"{what} must be a mapping or a dataclass, got {type(obj).__name__}")


def check_run_uid(run_uid: Any) -> str:
    """A run uid usable as a Tiled key (non-empty text without '/')."""
    if not isinstance(run_uid, str) or not run_uid or "/" in run_uid or run_uid != run_uid.strip():
        raise InputError(f"run_uid must be non-empty text without '/' or spaces, got {run_uid!r}")
    return run_uid


def header_metadata(header: Any) -> dict[str, Any]:
    """Queryable metadata of a run from its header (a RunHeader or a mapping).

    Scalars and short arrays are kept under their own names (``run_uid``, ``scan_id``,
    ``sample``, ``angles_deg`` …); arrays beyond a few thousand values (the probe) are dropped.
    ``voxel_size_m`` is added when the header has it as a property.
    """
    fields = as_mapping(header, what="run header")
    if "run_uid" not in fields and "uid" in fields:
        fields["run_uid"] = fields.pop("uid")
    check_run_uid(fields.get("run_uid"))
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if isinstance(value, np.ndarray) and (value.size > _MAX_METADATA_ARRAY or np.iscomplexobj(value)):
            continue
        out[name] = json_safe(value)
    for name in ("voxel_size_m", "wavelength_m", "n_angles"):
        if name not in out:
            value = getattr(header, name, None)
            if isinstance(value, int | float | np.generic):
                out[name] = json_safe(value)
    if "n_angles" in out:
        out["n_angles_planned"] = out.pop("n_angles")
    return out


def angle_row(summary: Any, *, default_id: int) -> dict[str, Any]:
    """One row of the ``angles`` table from an engine's angle summary.

    Accepts the engine's ``AngleSummary`` (``n_frames``, ``loss_pass2``) or a mapping with
    ``frames`` / ``loss``. ``angle_deg`` is required; a missing loss or time is NaN.
    """
    s = as_mapping(summary, what="angle summary")
    if "angle_deg" not in s:
        raise InputError("angle summary has no 'angle_deg'")

    def number(*names: str, default: float = math.nan) -> float:
        for n in names:
            if s.get(n) is not None:
                try:
                    return float(s[n])
                except (TypeError, ValueError):
                    raise InputError(f"angle summary field {n!r} is not a number: {s[n]!r}") from None
        return default

    angle_deg = number("angle_deg")
    if not math.isfinite(angle_deg):
        raise InputError(f"angle summary has a non-finite angle_deg {s['angle_deg']!r}")
    return {
        "angle_id": int(number("angle_id", default=default_id)),
        "angle_deg": angle_deg,
        "frames": int(number("n_frames", "frames", default=0)),
        "seconds": number("seconds"),
        "loss": number("loss_pass2", "loss"),
        "loss_pass1": number("loss_pass1"),
    }


def same_angle(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether two rows of one angle hold the same data (a replay): same ``angle_deg`` and
    ``frames``. Times and losses may differ between two passes over the same frames."""
    return float(old["angle_deg"]) == float(new["angle_deg"]) and int(old["frames"]) == int(
        new["frames"]
    )


def volume_array(volume: Any, *, name: str) -> np.ndarray:
    """A (z, y, x) float32 C-contiguous copy-free-if-possible view of a volume, checked.

    Masks (bool or uint8, e.g. ``apt-metal``) stay uint8: 1 byte a voxel, and 0/1 stays exact.
    """
    if hasattr(volume, "volume") and callable(volume.volume):
        # The sink passes the run's engine as the Approximant: its volume() is the current mean.
        volume = volume.volume()
    if hasattr(volume, "detach"):
        volume = volume.detach().cpu().numpy()
    arr = np.asarray(volume)
    if arr.ndim != 3:
        raise InputError(f"volume {name!r} must be 3-D (z, y, x), got shape {arr.shape}")
    if np.iscomplexobj(arr) or not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"volume {name!r} must be real numbers, got dtype {arr.dtype}")
    if 0 in arr.shape:
        raise InputError(f"volume {name!r} is empty: shape {arr.shape}")
    mask = arr.dtype in (np.bool_, np.uint8)
    return np.ascontiguousarray(arr, dtype=np.uint8 if mask else np.float32)


def voxel_sizes_m(
    shape_zyx: tuple[int, ...], *, reference_shape_zyx: Any, reference_voxel_m: Any
) -> list[float] | None:
    """Voxel edge per axis of a volume covering the same extent as the reference grid.

    The network may upsample laterally (paper: 64 → 128), so its voxels are the Approximant's
    divided by the ratio of the shapes.
    """
    if reference_voxel_m is None or reference_shape_zyx is None:
        return None
    ref = [int(n) for n in reference_shape_zyx]
    if len(ref) != 3:
        return None
    # 12 significant digits: 14e-9 * 64 / 128 should read 7e-09, not 7.000000000000001e-09.
    return [float(f"{float(reference_voxel_m) * r / n:.12g}") for r, n in zip(ref, shape_zyx, strict=True)]


def check_status(status: Any) -> str:
    """A status text to store: any non-empty text without surrounding spaces."""
    if not isinstance(status, str) or not status or status != status.strip():
        raise InputError(f"status must be non-empty text (e.g. one of {STATUSES}), got {status!r}")
    return status


def resolve_status(status: Any, *, has_final: bool) -> str:
    """The scan status for ``run_stopped``: ours as given, or bluesky's exit status mapped.

    Bluesky's ``success`` and ``abort`` both mean the beam stopped on purpose: the scan is
    ``done`` if its final reconstruction exists, else ``stopped_before_trigger``; ``fail`` is
    ``failed``. Any other text (``done_with_gaps``, ``abandoned``, a status added later) is
    stored as given.
    """
    check_status(status)
    if status in ("success", "abort"):
        return "done" if has_final else "stopped_before_trigger"
    if status == "fail":
        return "failed"
    return status
