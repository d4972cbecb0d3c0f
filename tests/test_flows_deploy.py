"""deploy/prefect.yaml, the flight check against real services, and the overhead probe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

PREFECT_YAML = Path(__file__).resolve().parents[1] / "deploy" / "prefect.yaml"


def deployments() -> list[dict]:
    return yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


def test_prefect_yaml_entrypoints_load_and_parameters_validate():
    from prefect.flows import load_flow_from_entrypoint

    names = {d["name"]: d for d in deployments()}
    assert {"beamline-listen", "beamline-listen-cluster", "flight-check", "end-of-run"} <= set(names)
    assert names["beamline-listen-cluster"]["parameters"]["config"]["dask_address"].startswith(
        "tcp://")
    for deployment in names.values():
        flow_ = load_flow_from_entrypoint(deployment["entrypoint"], use_placeholder_flow=False)
        # The flow's own parameter validation: what a worker will do with these values.
        # The end-of-run deployment gets its run's address per flow run.
        example = {"uri": "tiled://127.0.0.1:8000/raw/uid"} if deployment["name"] == "end-of-run" else {}
        validated = flow_.validate_parameters({**example, **deployment["parameters"]})
        assert validated["config"].model_dump(exclude_unset=True) == deployment["parameters"]["config"]
    (schedule,) = names["flight-check"]["schedules"]
    assert schedule["cron"]
    assert "schedules" not in names["beamline-listen"]
    env = names["beamline-listen"]["work_pool"]["job_variables"]["env"]
    assert env["DO_NOT_TRACK"] == "1"
    assert "API_KEY" not in PREFECT_YAML.read_text().replace("APT_STREAM_TILED_API_KEY", "")


def test_flight_check_passes_on_live_services(prefect_harness, tiled_server, tmp_path,
                                              monkeypatch):
    from apt_stream.flows.flight_check import FlightCheckConfig, flight_check
    from apt_stream.model import create_model, save_checkpoint
    from apt_stream.plugins.bluesky import start_proxy

    monkeypatch.setenv("APT_STREAM_TILED_URI", tiled_server.uri)
    monkeypatch.setenv("APT_STREAM_TILED_API_KEY", tiled_server.api_key)
    checkpoint = save_checkpoint(tmp_path / "apt.safetensors", create_model("cpu"))
    with start_proxy() as proxy:
        state = flight_check(FlightCheckConfig(
            proxy_in_address=proxy.in_address, proxy_out_address=proxy.out_address,
            checkpoint=str(checkpoint), timeout_s=10,
        ), return_state=True)
    assert state.is_completed(), state.message
    results = state.result()
    assert {name: r["ok"] for name, r in results.items()} == {"tiled": True, "proxy": True,
                                                              "model": True}
    assert results["proxy"]["detail"]["probes_sent"] >= 1
    assert results["model"]["detail"]["parameters"] > 0


def test_flight_check_fails_when_the_proxy_is_down(prefect_harness, tmp_path, monkeypatch):
    from apt_stream.flows.flight_check import FlightCheckConfig, flight_check

    monkeypatch.delenv("APT_STREAM_TILED_URI", raising=False)
    state = flight_check(FlightCheckConfig(
        proxy_in_address="tcp://127.0.0.1:9", proxy_out_address="tcp://127.0.0.1:9",
        checkpoint=str(tmp_path / "missing.safetensors"), timeout_s=0.5,
    ), return_state=True)
    assert state.is_failed()
    results = state.result(raise_on_failure=False)
    assert results["tiled"]["ok"] is None  # not configured: skipped, not failed
    assert results["proxy"]["ok"] is False and "link probe" in results["proxy"]["detail"]
    assert results["model"]["ok"] is False and "ModelError" in results["model"]["detail"]


def test_overhead_probe_reports_per_task_seconds(prefect_harness):
    from apt_stream.errors import InputError
    from apt_stream.flows.overhead import measure_task_overhead

    result = measure_task_overhead(5)
    assert result["n_tasks"] == 5
    assert 0 < result["task_median_s"] <= result["per_angle_s"]
    with pytest.raises(InputError):
        measure_task_overhead.fn(0)
