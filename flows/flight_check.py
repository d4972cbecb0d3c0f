"""``flight_check``: prove the plumbing works before beam time (run on a schedule).

Three checks, each a task: Tiled answers and the key may write (a fixed container's metadata is
stamped), the 0MQ proxy forwards (link probes sent into its input come out of its output), and
the network checkpoint loads (checksum verified). A check that is not configured is skipped; a
failed one makes the flow run Failed. A markdown artifact ``flight-check`` shows the table.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed, Failed
from pydantic import BaseModel, ConfigDict, Field

from apt_stream.publish.server import API_KEY_ENV, URI_ENV, TiledEndpoint

from . import tasks


class FlightCheckConfig(BaseModel):
    """What to check (None skips that check)."""

    model_config = ConfigDict(extra="forbid")

    tiled_uri: str | None = Field(None, description=f"Tiled API address; None: ${URI_ENV}")
    tiled_api_key_env: str = Field(API_KEY_ENV, description="environment variable with the key")
    proxy_in_address: str | None = Field(None, description="where publishers connect")
    proxy_out_address: str | None = Field(None, description="where the listener subscribes")
    checkpoint: str | None = Field(None, description="APT network checkpoint")
    device: str = "cpu"
    timeout_s: float = Field(10.0, gt=0)


def _outcome(state: Any) -> dict[str, Any]:
    if state.is_completed():
        return {"ok": True, "detail": state.result()}
    error = state.result(raise_on_failure=False)
    return {"ok": False, "detail": f"{type(error).__name__}: {error}"}


def _markdown(results: dict[str, dict]) -> str:
    mark = {True: "pass", False: "**FAIL**", None: "skipped"}
    lines = ["## Flight check", "", "| check | result | detail |", "|---|---|---|"]
    for name, r in results.items():
        detail = str(r["detail"]).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {name} | {mark[r['ok']]} | {detail} |")
    return "\n".join(lines) + "\n"


@flow(name="flight-check", log_prints=False, persist_result=False)
def flight_check(config: FlightCheckConfig | None = None) -> Any:
    """Check Tiled, the proxy and the model; returns ``{check: {"ok", "detail"}}``."""
    config = config or FlightCheckConfig()
    log = get_run_logger()
    results: dict[str, dict[str, Any]] = {}

    uri = config.tiled_uri or os.environ.get(URI_ENV)
    if uri:
        endpoint = TiledEndpoint(uri=uri, api_key=os.environ.get(config.tiled_api_key_env) or None)
        results["tiled"] = _outcome(tasks.check_tiled(endpoint, return_state=True))
    else:
        results["tiled"] = {"ok": None, "detail": f"no tiled_uri and no ${URI_ENV}"}

    if config.proxy_in_address and config.proxy_out_address:
        results["proxy"] = _outcome(tasks.check_proxy(
            config.proxy_in_address, config.proxy_out_address, timeout_s=config.timeout_s,
            return_state=True,
        ))
    else:
        results["proxy"] = {"ok": None, "detail": "proxy_in_address / proxy_out_address not set"}

    if config.checkpoint:
        results["model"] = _outcome(tasks.check_model(config.checkpoint, config.device,
                                                      return_state=True))
    else:
        results["model"] = {"ok": None, "detail": "no checkpoint configured"}

    create_markdown_artifact(_markdown(results), key="flight-check",
                             description="Tiled, 0MQ proxy and model checks")
    failed = [name for name, r in results.items() if r["ok"] is False]
    for name, r in results.items():
        log.info("%s: %s", name, {True: "pass", False: "FAIL", None: "skipped"}[r["ok"]])
    if failed:
        return Failed(message=f"flight check failed: {', '.join(failed)}", data=results)
    return Completed(message="flight check passed", data=results)
