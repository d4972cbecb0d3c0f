"""``apt-stream reconstruct tiled://HOST[:PORT]/PATH/<uid>``: a run stored in Tiled, reconstructed
like a live one (:func:`apt_stream.flows.stored.reconstruct_tiled_run`), without Prefect."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apt_stream.errors import InputError


def reconstruct_tiled(uri: str, *, data_roots: Sequence[str | os.PathLike] | None,
                      api_key: str | None, n_star: int | None, theta_star_deg: float | None,
                      checkpoint: str | os.PathLike | None, output: Path | None = None,
                      baselines: bool = False, png: Path | None = None,
                      device: str = "cpu") -> dict[str, Any]:
    """Reconstruct the stored run ``uri``; the key from ``api_key`` or $APT_STREAM_TILED_API_KEY."""
    from apt_stream.flows.settings import apply_offline_env
    from apt_stream.publish.server import API_KEY_ENV
    from apt_stream.stream.tiled_source import parse_tiled_uri

    address = parse_tiled_uri(uri)  # a wrong address fails before anything is imported
    unsupported = [flag for flag, given in (("-o/--output", output), ("--baselines", baselines),
                                            ("--png", png)) if given]
    if unsupported:
        raise InputError(f"{', '.join(unsupported)}: for scan files only; a tiled:// run's "
                         "results go to Tiled (docs/querying.md)")
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    if not data_roots:
        from apt_stream.stream.tiled_source import open_tiled_run

        source = open_tiled_run(address, api_key=key)
        run_dir = source.info.run_dir or "its run folder"
        raise InputError(
            f"run {source.run_uid}'s probe and frames are files in {run_dir}: name the folder "
            "they may be read from with --data-root (e.g. --data-root "
            f"{Path(run_dir).parent if source.info.run_dir else 'DIR'})")
    apply_offline_env()
    from apt_stream.flows.stored import StoredRunConfig, reconstruct_tiled_run

    config = StoredRunConfig(
        data_roots=[str(p) for p in data_roots],
        checkpoint=str(checkpoint) if checkpoint else None, device=device,
        **({"n_star": n_star} if n_star is not None else {}),
        **({"theta_star_deg": theta_star_deg} if theta_star_deg is not None else {}),
    )
    return reconstruct_tiled_run(address.uri, config, api_key=key)
