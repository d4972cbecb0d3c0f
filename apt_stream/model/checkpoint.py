"""Safe checkpoints: safetensors weights + a JSON sidecar with config, provenance and checksum.

A checkpoint ``best.safetensors`` comes with ``best.json``::

    {"format": "apt-stream-checkpoint", "format_version": 1,
     "preset": "cpu", "overrides": {...}, "network": {NetworkConfig fields},
     "io": {"input_norm": "standardize", "output_affine": [a, b] | null},
     "config": {training / inference options given by the caller},
     "provenance": {"data_seeds": ..., "code_version": ..., "metrics": ..., "created_utc": ...},
     "weights_file": "best.safetensors", "sha256": "<hex digest of the weights file>"}

The same metadata (without the checksum, which cannot sit inside the file it hashes) is also
embedded in the safetensors header, so a weights file alone is self-describing.

Nothing here unpickles arbitrary objects: ``.pt``/``.pth`` files are read only with
``torch.load(weights_only=True)``, and anything that needs more is refused with ModelError.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from apt_stream.errors import ConfigError, ModelError
from apt_stream.model.network import APTNet, NetworkConfig

FORMAT = "apt-stream-checkpoint"
FORMAT_VERSION = 1
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def sha256_file(path: str | os.PathLike, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def verify_checksum(path: str | os.PathLike, expected_sha256: str) -> None:
    """Raise ModelError if ``path``'s SHA-256 differs from ``expected_sha256``."""
    actual = sha256_file(path)
    if actual != expected_sha256.lower():
        raise ModelError(
            f"checksum mismatch for {path}: expected sha256 {expected_sha256}, file has {actual}"
        )


def sidecar_path(weights_path: str | os.PathLike) -> Path:
    """The JSON sidecar next to a weights file (``x.safetensors`` -> ``x.json``)."""
    return Path(weights_path).with_suffix(".json")


def _jsonable(obj: Any, where: str) -> Any:
    try:
        return json.loads(json.dumps(obj, default=_json_default))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where} must be JSON-serialisable: {exc}") from None


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays and paths turn up in metrics and provenance.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _code_version() -> str:
    from apt_stream import __version__

    return __version__


def checkpoint_metadata(
    model: APTNet, *, config: Mapping[str, Any] | None = None, provenance: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The metadata :func:`save_checkpoint` writes (without file name and checksum)."""
    if not isinstance(model, APTNet):
        raise ModelError(f"can only checkpoint an APTNet, got {type(model).__name__}")
    prov = {
        "code_version": _code_version(),
        "torch_version": torch.__version__,
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **_jsonable(dict(provenance or {}), "provenance"),
    }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "preset": model.preset_name,
        "overrides": _jsonable(model.preset_overrides, "preset overrides"),
        "network": model.config.to_dict(),
        "io": _jsonable(model.io_config, "model.io_config"),
        "config": _jsonable(dict(config or {}), "config"),
        "provenance": prov,
    }


def save_checkpoint(
    path: str | os.PathLike,
    model: APTNet,
    *,
    config: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights (safetensors) and its JSON sidecar; return the weights path.

    Parameters
    ----------
    path : path
        Weights file; ``.safetensors`` is appended when the suffix is missing. The sidecar is
        the same path with suffix ``.json``.
    model : APTNet
    config : mapping, optional
        Training/inference options to keep with the weights (JSON-serialisable).
    provenance : mapping, optional
        Where the weights came from: data seeds, metrics, ... (JSON-serialisable). The code
        version, torch version and creation time are added.

    Both files are written to temporary names and renamed, so a crash never leaves a
    half-written checkpoint under the final name.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    meta = checkpoint_metadata(model, config=config, provenance=provenance)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"apt_stream": json.dumps(meta)})
    meta["weights_file"] = path.name
    meta["sha256"] = sha256_file(tmp)
    os.replace(tmp, path)
    side = sidecar_path(path)
    tmp_side = side.with_name(side.name + ".tmp")
    tmp_side.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp_side, side)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Checkpoint metadata without loading weights (sidecar first, else the safetensors header)."""
    path = Path(path)
    if path.suffix == ".json":
        return _read_json(path)
    side = sidecar_path(path)
    if side.exists():
        return _read_json(side)
    if path.suffix == ".safetensors":
        return _header_metadata(path)
    raise ModelError(f"no metadata for {path}: expected a sidecar {side.name}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"checkpoint metadata {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"checkpoint metadata {path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelError(f"{path} is not an apt-stream checkpoint sidecar (format != {FORMAT!r})")
    return meta


def _header_metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ModelError(f"cannot read safetensors header of {path}: {exc}") from None
    if "apt_stream" not in header:
        raise ModelError(f"{path} carries no apt-stream metadata and has no JSON sidecar")
    return json.loads(header["apt_stream"])


def _load_pickle_weights(path: Path, map_location: Any) -> tuple[dict[str, torch.Tensor], dict | None]:
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as exc:
        raise ModelError(
            f"refusing to load {path}: it is not a plain tensor file "
            f"(torch.load(weights_only=True) rejected it: {str(exc).splitlines()[0]})"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj:
        meta = obj.get("meta")
        return obj["state_dict"], meta if isinstance(meta, dict) else None
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    raise ModelError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")


def model_from_metadata(meta: Mapping[str, Any]) -> APTNet:
    """An untrained :class:`APTNet` built from checkpoint metadata (network config + io)."""
    try:
        cfg = NetworkConfig.from_dict(meta["network"])
    except KeyError:
        raise ModelError("checkpoint metadata has no 'network' section") from None
    except ConfigError as exc:
        raise ModelError(f"checkpoint network config is invalid: {exc}") from None
    model = APTNet(cfg)
    model.preset_name = meta.get("preset")
    model.preset_overrides = dict(meta.get("overrides") or {})
    model.io_config.update(meta.get("io") or {})
    return model


def load_checkpoint(
    path: str | os.PathLike, *, map_location: str | torch.device = "cpu", verify: bool = True
) -> tuple[APTNet, dict[str, Any]]:
    """Load a checkpoint into a fresh :class:`APTNet` (in eval mode).

    Parameters
    ----------
    path : path
        ``x.safetensors``, its sidecar ``x.json``, or a ``.pt``/``.pth`` tensor file (read only
        with ``torch.load(weights_only=True)``; its config comes from ``{"state_dict", "meta"}``
        inside it or from a sidecar).
    map_location : str or torch.device
        Device for the weights and the model.
    verify : bool
        Check the sidecar's SHA-256 of the weights file (when there is a sidecar).

    Returns
    -------
    (model, meta)

    Raises
    ------
    ModelError
        Missing or corrupt files, a checksum mismatch, a pickle that needs code to load, or
        weights that do not fit the configured network.
    """
    path = Path(path)
    if path.suffix == ".json":
        meta = _read_json(path)
        weights = path.with_name(meta.get("weights_file") or path.with_suffix(".safetensors").name)
    else:
        weights, meta = path, None
    if not weights.exists():
        raise ModelError(f"checkpoint weights {weights} do not exist")
    side = sidecar_path(weights)
    if meta is None and side.exists():
        meta = _read_json(side)
    if meta is not None and verify and meta.get("sha256"):
        verify_checksum(weights, meta["sha256"])

    if weights.suffix in _PICKLE_SUFFIXES:
        state, inner_meta = _load_pickle_weights(weights, map_location)
        meta = meta or inner_meta
        if meta is None:
            raise ModelError(f"{weights} has no config: add a sidecar {side.name} or save 'meta'")
    else:
        from safetensors.torch import load_file

        if meta is None:
            meta = _header_metadata(weights)
        try:
            state = load_file(str(weights), device=str(map_location))
        except Exception as exc:  # SafetensorError for truncated/corrupt files
            raise ModelError(f"cannot read weights {weights}: {exc}") from None

    model = model_from_metadata(meta)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"weights in {weights} do not match the configured network: {exc}") from None
    model.to(map_location).eval()
    return model, dict(meta)


def save_optimizer_state(
    path: str | os.PathLike, optimizer: torch.optim.Optimizer, *, extra: Mapping[str, Any] | None = None
) -> Path:
    """Save an optimiser's state as safetensors (tensors) + header JSON (everything else).

    ``extra`` (JSON-serialisable, e.g. epoch and history) is stored in the header too.
    """
    from safetensors.torch import save_file

    path = Path(path)
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    header = {
        "param_groups": _jsonable(sd["param_groups"], "optimizer param_groups"),
        "scalars": _jsonable(scalars, "optimizer state"),
        "extra": _jsonable(dict(extra or {}), "extra"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"apt_stream_optimizer": json.dumps(header)})
    os.replace(tmp, path)
    return path


def load_optimizer_state(
    path: str | os.PathLike, optimizer: torch.optim.Optimizer, *, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Restore an optimiser saved by :func:`save_optimizer_state`; return its ``extra`` dict."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise ModelError(f"optimizer state {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as fh:
            header = json.loads((fh.metadata() or {})["apt_stream_optimizer"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no iterator
    except (KeyError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} is not an apt-stream optimizer state: {exc}") from None
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in header["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    groups = header["param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as exc:
        raise ModelError(f"optimizer state {path} does not fit this optimizer: {exc}") from None
    return header.get("extra", {})
