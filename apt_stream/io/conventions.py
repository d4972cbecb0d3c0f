"""Conventions a scan file can declare, and the conversions to apt-stream's own.

A file (or an importer) states how its data were recorded with five attributes; each has a
default, the convention of docs/conventions.md, so a file without them reads as before:

=========================================  ==============  =====================================
attribute                                  default         other values
=========================================  ==============  =====================================
``/entry/instrument/probe/modes@phase_sign``  ``-1``       ``+1``: transmission exp(+ikδt), i.e.
                                                           waves exp(−i(kz − ωt)); every complex
                                                           field is the conjugate of ours
``/entry/instrument/probe/modes@fft_norm``    ``ortho``    ``backward``: the far field is an
                                                           unnormalised FFT (numpy's/torch's
                                                           default, pty-chi), Σ_q I = h·w·Σ|P|²
``/entry/instrument/probe/modes@plane``       ``entrance`` ``axis``: the probe is given in the lab
                                                           plane through the rotation axis (z′ = 0)
``/entry/data/frames@fft_centring``           ``centred``  ``corner``: zero frequency at [0, 0]
``/entry/data/positions@reference``           ``corner``   ``centre``: the probe window's centre
                                                           ((h−1)/2, (w−1)/2); ``centre_pixel``:
                                                           its pixel (h//2, w//2)
``/entry/data/positions@relative_to``         ``field``    ``centre``: measured from the field
                                                           centre ((Ny−1)/2, (Nx−1)/2), the
                                                           rotation axis
=========================================  ==============  =====================================

The reader converts frames, probe and positions to ours (:func:`frames_to_ours`,
:func:`probe_to_ours`, :func:`positions_to_ours`); the probe plane cannot be converted once for
all angles (the entrance face moves with θ), so it travels as ``ScanData.probe_plane`` and the
engine propagates the probe to each angle's entrance face.

Why a phase-sign flip also flips the frames: a code with waves exp(−i(kz − ωt)) holds the complex
conjugate ψ* of our field. The far field of a conjugate is FFT(ψ*)(q) = FFT(ψ)(−q)*, so the
pattern that code predicts at frequency q is ours at −q. Converting therefore conjugates the probe
and mirrors the frames through the zero frequency: I_ours(q) = I_theirs(−q).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from apt_stream.errors import ScanFormatError

PROBE_PATH = "/entry/instrument/probe/modes"
FRAMES_PATH = "/entry/data/frames"
POSITIONS_PATH = "/entry/data/positions"

PHASE_SIGNS = (-1, 1)
FFT_NORMS = ("ortho", "backward")
PROBE_PLANES = ("entrance", "axis")
FFT_CENTRINGS = ("centred", "corner")
POSITION_REFERENCES = ("corner", "centre", "centre_pixel")
RELATIVE_TO = ("field", "centre")

#: (dataset path, attribute, Conventions field) for every convention attribute.
ATTRIBUTES = (
    (PROBE_PATH, "phase_sign", "phase_sign"),
    (PROBE_PATH, "fft_norm", "fft_norm"),
    (PROBE_PATH, "plane", "probe_plane"),
    (FRAMES_PATH, "fft_centring", "fft_centring"),
    (POSITIONS_PATH, "reference", "position_reference"),
    (POSITIONS_PATH, "relative_to", "positions_relative_to"),
)


@dataclass(frozen=True)
class Conventions:
    """How a scan's data were recorded (defaults: apt-stream's own, docs/conventions.md)."""

    phase_sign: int = -1
    fft_norm: str = "ortho"
    probe_plane: str = "entrance"
    fft_centring: str = "centred"
    position_reference: str = "corner"
    positions_relative_to: str = "field"

    def __post_init__(self) -> None:
        allowed = {
            "phase_sign": PHASE_SIGNS, "fft_norm": FFT_NORMS, "probe_plane": PROBE_PLANES,
            "fft_centring": FFT_CENTRINGS, "position_reference": POSITION_REFERENCES,
            "positions_relative_to": RELATIVE_TO,
        }
        for path, attr, name in ATTRIBUTES:
            if getattr(self, name) not in allowed[name]:
                choices = ", ".join(repr(v) for v in allowed[name])
                raise ScanFormatError(
                    f"{path}: attribute {attr!r} is {getattr(self, name)!r}; expected one of {choices}"
                )

    @property
    def is_default(self) -> bool:
        return self == Conventions()

    def differences(self) -> dict:
        """The fields that differ from apt-stream's conventions (for provenance)."""
        ours = asdict(Conventions())
        return {k: v for k, v in asdict(self).items() if ours[k] != v}


def _text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.size == 1:
        return _text(value.reshape(()).item())
    return str(value)


def parse_phase_sign(value, *, where: str = f"{PROBE_PATH}: attribute 'phase_sign'") -> int:
    """-1 / +1 from an attribute or option value (ints, "-1", "+1", "-", "+", "−")."""
    text = _text(value)
    if text is None:
        return -1
    t = text.strip().replace("−", "-")
    table = {"-1": -1, "-": -1, "1": 1, "+1": 1, "+": 1}
    if t not in table:
        raise ScanFormatError(f"{where} is {text!r}; expected -1 (ours) or +1")
    return table[t]


def conventions_from_attrs(attrs_of) -> Conventions:
    """Read the convention attributes; ``attrs_of(path)`` returns that dataset's attrs mapping.

    A missing attribute takes its default. The descriptive ``fft_centring`` text apt-stream 1.0
    wrote ("zero frequency at pixel (h//2, w//2) ...") reads as ``centred``.
    """
    values: dict = {}
    for path, attr, name in ATTRIBUTES:
        raw = attrs_of(path).get(attr)
        if raw is None:
            continue
        if name == "phase_sign":
            values[name] = parse_phase_sign(raw)
            continue
        text = _text(raw)
        if name == "fft_centring" and text.startswith("zero frequency at pixel (h//2, w//2)"):
            text = "centred"
        values[name] = text
    return Conventions(**values)


def flip_frequencies(frames: np.ndarray) -> np.ndarray:
    """Mirror centred frames (..., h, w) through the zero frequency: out[q] = in[−q].

    With the zero frequency at (h//2, w//2), frequency q sits at index h//2 + q; −q at
    h//2 − q (mod h). For even h the Nyquist row (index 0) maps onto itself.
    """
    h, w = frames.shape[-2:]
    iy = (2 * (h // 2) - np.arange(h)) % h
    ix = (2 * (w // 2) - np.arange(w)) % w
    return np.asarray(frames)[..., iy[:, None], ix[None, :]]


def frames_to_ours(frames: np.ndarray, conv: Conventions) -> np.ndarray:
    """Frames (..., h, w) in ``conv``'s layout → zero frequency at (h//2, w//2), our sign."""
    out = np.asarray(frames)
    if conv.fft_centring == "corner":
        out = np.fft.fftshift(out, axes=(-2, -1))
    if conv.phase_sign == 1:
        out = flip_frequencies(out)
    return out


def frames_from_ours(frames: np.ndarray, conv: Conventions) -> np.ndarray:
    """The inverse of :func:`frames_to_ours` (to write data in another convention)."""
    out = np.asarray(frames)
    if conv.phase_sign == 1:
        out = flip_frequencies(out)
    if conv.fft_centring == "corner":
        out = np.fft.ifftshift(out, axes=(-2, -1))
    return out


def probe_to_ours(probe: np.ndarray, conv: Conventions) -> np.ndarray:
    """Probe modes (M, h, w): conjugated for phase sign +1, scaled by √(h·w) for ``backward``."""
    out = np.asarray(probe)
    if conv.fft_norm == "backward":
        h, w = out.shape[-2:]
        out = out * np.sqrt(h * w)
    if conv.phase_sign == 1:
        out = np.conj(out)
    return out


def probe_from_ours(probe: np.ndarray, conv: Conventions) -> np.ndarray:
    out = np.asarray(probe)
    if conv.phase_sign == 1:
        out = np.conj(out)
    if conv.fft_norm == "backward":
        h, w = out.shape[-2:]
        out = out / np.sqrt(h * w)
    return out


def _offsets(conv: Conventions, field_shape, frame_shape) -> np.ndarray:
    """What to add to ``conv``'s positions (pixels) to get our window corners in the field."""
    h, w = frame_shape
    off = np.zeros(2)
    if conv.positions_relative_to == "centre":
        off += [(field_shape[0] - 1) / 2, (field_shape[1] - 1) / 2]
    if conv.position_reference == "centre":
        off -= [(h - 1) / 2, (w - 1) / 2]
    elif conv.position_reference == "centre_pixel":
        off -= [h // 2, w // 2]
    return off


def positions_to_ours(positions_px, conv: Conventions, field_shape, frame_shape) -> np.ndarray:
    """(K, 2) (y, x) pixels in ``conv``'s reference → our top-left corners in the field."""
    pos = np.asarray(positions_px, dtype=np.float64)
    return pos + _offsets(conv, field_shape, frame_shape) if pos.size else pos


def positions_from_ours(positions_px, conv: Conventions, field_shape, frame_shape) -> np.ndarray:
    pos = np.asarray(positions_px, dtype=np.float64)
    return pos - _offsets(conv, field_shape, frame_shape) if pos.size else pos
