"""The document contract between the beamline plan and the listener (docs/streaming.md).

The start document carries, under the ``"apt_stream"`` key, everything a reconstruction needs as
plain JSON (numbers, lists, strings); the probe modes are referenced by file, never inlined.
Frames come in the ``primary`` stream (one event per frame, frames in an HDF5 file referenced by
StreamResource/StreamDatum); the ``angles`` stream holds one event per finished angle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from apt_stream.errors import DocumentError

APT_KEY = "apt_stream"
SCHEMA_VERSION = 1
FRAMES_STREAM = "primary"
ANGLES_STREAM = "angles"
HDF5_MIMETYPE = "application/x-hdf5"
FRAMES_DATASET = "/entry/data/frames"
PROBE_DATASET = "/probe/modes"
FRAMES_FILE = "frames.h5"
PROBE_FILE = "probe.h5"
#: The run journal: every document of the run as JSON lines, next to the frames file.
JOURNAL_FILE = "documents.jsonl"


@dataclass(frozen=True)
class DataKeyMap:
    """Which event data keys hold what. Stored in the start document, so names may change freely.

    ``position_*_px`` are the probe window's top-left corner in object-field pixels (y, x),
    ``angle_deg`` the rotation stage readback, ``angle_index`` the planned angle's index n.
    """

    frames: str = "ptycho_det_frames"
    angle_deg: str = "rot"
    angle_index: str = "ptycho_det_angle_index"
    position_y_px: str = "sample_y"
    position_x_px: str = "sample_x"
    done_angle_index: str = "angle_done_index"
    done_angle_deg: str = "angle_done_deg"
    done_n_frames: str = "angle_done_n_frames"

    @classmethod
    def from_dict(cls, value: Mapping) -> DataKeyMap:
        known = set(cls.__dataclass_fields__)
        unknown = set(value) - known
        if unknown:
            raise DocumentError(f"apt_stream.data_keys has unknown entries {sorted(unknown)}")
        for key, name in value.items():
            if not isinstance(name, str) or not name:
                raise DocumentError(f"apt_stream.data_keys.{key} must be a non-empty string")
        return cls(**value)


def frames_data_keys(keys: DataKeyMap, frame_shape: Sequence[int]) -> dict:
    """The ``data_keys`` of the frames stream's descriptor (frames external, by StreamDatum)."""
    h, w = (int(v) for v in frame_shape)
    return {
        keys.frames: {"source": "file", "dtype": "array", "shape": [h, w],
                      "dtype_numpy": "<f4", "external": "STREAM:"},
        keys.angle_index: {"source": "file", "dtype": "integer", "shape": []},
        keys.angle_deg: {"source": "file", "dtype": "number", "shape": [], "units": "deg"},
        keys.position_y_px: {"source": "file", "dtype": "number", "shape": []},
        keys.position_x_px: {"source": "file", "dtype": "number", "shape": []},
    }


def angles_data_keys(keys: DataKeyMap) -> dict:
    """The ``data_keys`` of the angles stream's descriptor (one event per finished angle)."""
    return {
        keys.done_angle_index: {"source": "file", "dtype": "integer", "shape": []},
        keys.done_angle_deg: {"source": "file", "dtype": "number", "shape": []},
        keys.done_n_frames: {"source": "file", "dtype": "integer", "shape": []},
    }


@dataclass(frozen=True)
class StartInfo:
    """The parsed ``apt_stream`` section of a start document (probe still on disk)."""

    energy_kev: float
    detector_distance_m: float
    detector_pixel_m: float
    object_pixel_m: float
    field_shape: tuple[int, int]
    frame_shape: tuple[int, int]
    n_slices: int
    slice_spacing_m: tuple[float, ...]
    angles_deg: tuple[float, ...]
    frames_per_angle: tuple[int, ...]
    volume_shape_zyx: tuple[int, int, int]
    probe_uri: str
    probe_dataset: str
    probe_shape: tuple[int, int, int]
    run_dir: str
    preset: str | None = None
    sample: str = ""
    data_keys: DataKeyMap = field(default_factory=DataKeyMap)
    streams: dict[str, str] = field(
        default_factory=lambda: {"frames": FRAMES_STREAM, "angles": ANGLES_STREAM}
    )


#: Physically plausible ranges, checked at run start (a typo of 1e3 or a unit mix-up is refused
#: with its value, instead of a run that "succeeds" with nonsense). Sizes bound memory too.
GEOMETRY_BOUNDS: dict[str, tuple[float, float]] = {
    "energy_kev": (0.1, 200.0),
    "detector_distance_m": (1e-3, 100.0),
    "detector_pixel_m": (1e-7, 1e-2),
    "object_pixel_m": (1e-11, 1e-5),
    "slice_spacing_m": (1e-11, 1e-3),
    "angles_deg": (-360.0, 360.0),
}
#: Largest frame side, object-field side, volume side, slices, probe modes, frames per angle.
SIZE_BOUNDS = {"frame": 4096, "field": 32768, "volume": 4096, "slices": 1024, "modes": 64,
               "frames_per_angle": 1_000_000, "angles": 100_000}


def _bounded(key: str, value: float) -> float:
    lo, hi = GEOMETRY_BOUNDS[key]
    if not lo <= value <= hi:
        raise DocumentError(
            f"start document apt_stream.{key} = {value!r} is outside the plausible range "
            f"[{lo:g}, {hi:g}] (units: {key.rsplit('_', 1)[-1]})"
        )
    return value


def _sizes(key: str, values: tuple, bound: int) -> tuple:
    if any(v > bound for v in values):
        raise DocumentError(f"start document apt_stream.{key} = {list(values)} exceeds {bound}")
    return values


def _number(section: Mapping, key: str, *, positive: bool = True) -> float:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DocumentError(f"start document apt_stream.{key} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise DocumentError(f"start document apt_stream.{key} must be > 0, got {value!r}")
    return float(value)


def _ints(section: Mapping, key: str, length: int | None = None, *, minimum: int = 1) -> tuple:
    value = section.get(key)
    if not isinstance(value, list | tuple) or (length is not None and len(value) != length):
        want = f"a list of {length}" if length else "a list of"
        raise DocumentError(f"start document apt_stream.{key} must be {want} integers, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise DocumentError(
                f"start document apt_stream.{key} must hold integers >= {minimum}, got {value!r}"
            )
        out.append(int(v))
    return tuple(out)


def _int(section: Mapping, key: str, *, minimum: int = 1) -> int:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DocumentError(
            f"start document apt_stream.{key} must be an integer >= {minimum}, got {value!r}"
        )
    return int(value)


def _floats(section: Mapping, key: str, length: int) -> tuple[float, ...]:
    value = section.get(key)
    if not isinstance(value, list | tuple) or len(value) != length:
        raise DocumentError(
            f"start document apt_stream.{key} must be a list of {length} numbers, got {value!r}"
        )
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise DocumentError(f"start document apt_stream.{key} holds a non-number {v!r}")
        out.append(float(v))
    return tuple(out)


def _string(section: Mapping, key: str) -> str:
    value = section.get(key)
    if not isinstance(value, str) or not value:
        raise DocumentError(f"start document apt_stream.{key} must be a non-empty string")
    return value


def build_start_metadata(
    *,
    energy_kev: float,
    detector_distance_m: float,
    detector_pixel_m: float,
    object_pixel_m: float,
    field_shape: Sequence[int],
    frame_shape: Sequence[int],
    n_slices: int,
    slice_spacing_m: Sequence[float],
    angles_deg: Sequence[float],
    frames_per_angle: Sequence[int],
    volume_shape_zyx: Sequence[int],
    probe_uri: str,
    probe_shape: Sequence[int],
    run_dir: str,
    probe_dataset: str = PROBE_DATASET,
    preset: str | None = None,
    sample: str = "",
    data_keys: DataKeyMap | None = None,
    extra: Mapping | None = None,
) -> dict:
    """The JSON-safe ``apt_stream`` section of a start document; round-trips through
    :func:`parse_start_metadata` (which is also the check that it is complete)."""
    section = {
        "schema_version": SCHEMA_VERSION,
        "energy_kev": float(energy_kev),
        "detector_distance_m": float(detector_distance_m),
        "detector_pixel_m": float(detector_pixel_m),
        "object_pixel_m": float(object_pixel_m),
        "field_shape": [int(v) for v in field_shape],
        "frame_shape": [int(v) for v in frame_shape],
        "n_slices": int(n_slices),
        "slice_spacing_m": [float(v) for v in slice_spacing_m],
        "angles_deg": [float(v) for v in angles_deg],
        "frames_per_angle": [int(v) for v in frames_per_angle],
        "volume_shape_zyx": [int(v) for v in volume_shape_zyx],
        "probe": {
            "uri": str(probe_uri),
            "dataset": str(probe_dataset),
            "shape": [int(v) for v in probe_shape],
            "dtype": "complex64",
        },
        "run_dir": str(run_dir),
        "preset": preset,
        "sample": str(sample),
        "data_keys": asdict(data_keys or DataKeyMap()),
        "streams": {"frames": FRAMES_STREAM, "angles": ANGLES_STREAM},
    }
    if extra:
        section.update(dict(extra))
    parse_start_metadata({APT_KEY: section})
    return section


def parse_start_metadata(start: Mapping) -> StartInfo:
    """Read and check the ``apt_stream`` section of a start document.

    Raises
    ------
    DocumentError
        Naming the first missing or malformed key.
    """
    section = start.get(APT_KEY)
    if not isinstance(section, Mapping):
        raise DocumentError(f"start document has no {APT_KEY!r} section (not an apt-stream scan)")
    version = section.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DocumentError(
            f"start document apt_stream.schema_version is {version!r}; this listener reads "
            f"version {SCHEMA_VERSION}"
        )
    angles = section.get("angles_deg")
    if not isinstance(angles, list | tuple) or not angles:
        raise DocumentError("start document apt_stream.angles_deg must be a non-empty list")
    n_angles = len(angles)
    probe = section.get("probe")
    if not isinstance(probe, Mapping):
        raise DocumentError("start document apt_stream.probe must be a mapping with uri/dataset/shape")
    probe_shape = _ints(probe, "shape", 3)
    frame_shape = _ints(section, "frame_shape", 2)
    if probe_shape[1:] != frame_shape:
        raise DocumentError(
            f"start document apt_stream.probe.shape {probe_shape} does not match frame_shape "
            f"{frame_shape}"
        )
    streams = section.get("streams", {"frames": FRAMES_STREAM, "angles": ANGLES_STREAM})
    if not isinstance(streams, Mapping) or not {"frames", "angles"} <= set(streams):
        raise DocumentError("start document apt_stream.streams must name 'frames' and 'angles'")
    preset = section.get("preset")
    if preset is not None and not isinstance(preset, str):
        raise DocumentError("start document apt_stream.preset must be a string or null")
    if n_angles > SIZE_BOUNDS["angles"]:
        raise DocumentError(f"start document plans {n_angles} angles (at most "
                            f"{SIZE_BOUNDS['angles']})")
    field_shape = _sizes("field_shape", _ints(section, "field_shape", 2), SIZE_BOUNDS["field"])
    _sizes("frame_shape", frame_shape, SIZE_BOUNDS["frame"])
    if probe_shape[0] > SIZE_BOUNDS["modes"]:
        raise DocumentError(f"start document apt_stream.probe.shape has {probe_shape[0]} modes "
                            f"(at most {SIZE_BOUNDS['modes']})")
    if field_shape[0] < frame_shape[0] or field_shape[1] < frame_shape[1]:
        raise DocumentError(f"start document apt_stream.field_shape {field_shape} is smaller than "
                            f"the frames {frame_shape}")
    slice_spacing = _floats(section, "slice_spacing_m", n_angles)
    angles = _floats(section, "angles_deg", n_angles)
    for v in slice_spacing:
        _bounded("slice_spacing_m", v)
    for v in angles:
        _bounded("angles_deg", v)
    return StartInfo(
        energy_kev=_bounded("energy_kev", _number(section, "energy_kev")),
        detector_distance_m=_bounded("detector_distance_m",
                                     _number(section, "detector_distance_m")),
        detector_pixel_m=_bounded("detector_pixel_m", _number(section, "detector_pixel_m")),
        object_pixel_m=_bounded("object_pixel_m", _number(section, "object_pixel_m")),
        field_shape=field_shape,
        frame_shape=frame_shape,
        n_slices=_sizes("n_slices", (_int(section, "n_slices"),), SIZE_BOUNDS["slices"])[0],
        slice_spacing_m=slice_spacing,
        angles_deg=angles,
        frames_per_angle=_sizes("frames_per_angle",
                                _ints(section, "frames_per_angle", n_angles, minimum=0),
                                SIZE_BOUNDS["frames_per_angle"]),
        volume_shape_zyx=_sizes("volume_shape_zyx", _ints(section, "volume_shape_zyx", 3),
                                SIZE_BOUNDS["volume"]),
        probe_uri=_string(probe, "uri"),
        probe_dataset=_string(probe, "dataset"),
        probe_shape=probe_shape,
        run_dir=_string(section, "run_dir"),
        preset=preset,
        sample=str(section.get("sample", "")),
        data_keys=DataKeyMap.from_dict(section.get("data_keys", {})),
        streams={"frames": str(streams["frames"]), "angles": str(streams["angles"])},
    )
