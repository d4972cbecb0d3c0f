"""``--device``: names checked before any work, GPUs shared among Dask workers, the CUDA path.

The CUDA tests run wherever torch sees a GPU and are skipped cleanly here (CPU only); the CPU
side of every check runs everywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from apt_stream.cli import app
from apt_stream.devices import host_to_device, resolve_device, worker_device
from apt_stream.errors import InputError

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
cpu_only = pytest.mark.skipif(HAS_CUDA, reason="checks the message of a machine without a GPU")
runner = CliRunner()


def test_cpu_and_auto_resolve_to_what_the_machine_has():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")
    assert resolve_device(None) == resolve_device("auto")


@pytest.mark.parametrize("name, says", [
    ("gpu", "is not a device: use cpu, cuda, cuda:N or auto"),
    ("cuda:x", "is not a device"),
    ("mps", "apt-stream computes on cpu, cuda, cuda:N or auto"),
    ("meta", "apt-stream computes on"),
])
def test_a_wrong_device_name_is_an_error_that_says_what_works(name, says):
    with pytest.raises(InputError, match=says):
        resolve_device(name)


@cpu_only
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_on_a_machine_without_a_gpu_says_so_and_what_to_use(name):
    with pytest.raises(InputError) as err:
        resolve_device(name)
    message = str(err.value)
    assert "no usable CUDA GPU" in message and "--device cpu or auto" in message
    assert torch.__version__ in message


@needs_cuda
def test_a_gpu_index_past_the_last_names_how_many_there_are():
    count = torch.cuda.device_count()
    assert resolve_device(f"cuda:{count - 1}") == torch.device(f"cuda:{count - 1}")
    with pytest.raises(InputError, match=f"has {count} CUDA GPU"):
        resolve_device(f"cuda:{count}")


def test_dask_workers_spread_over_the_gpus_one_model_each():
    # plain cuda: worker k on GPU k mod n
    assert [str(worker_device("cuda", k, gpu_count=2)) for k in range(5)] == [
        "cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    # an explicit GPU, or the CPU, stays as given
    assert worker_device("cuda:1", 0, gpu_count=4) == torch.device("cuda:1")
    assert worker_device("cpu", 7, gpu_count=4) == torch.device("cpu")
    # no GPU count known (0): left to torch to refuse
    assert worker_device("cuda", 3, gpu_count=0) == torch.device("cuda")


def test_outside_a_dask_worker_the_engine_keeps_the_device_it_was_given():
    from apt_stream.cluster.on_worker import _this_workers

    assert _this_workers("cpu") == torch.device("cpu")
    assert _this_workers("cuda:0") == torch.device("cuda:0")


def test_frames_reach_the_cpu_unchanged_as_float32():
    frames = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    t = host_to_device(frames, torch.device("cpu"))
    assert t.dtype == torch.float32 and t.device.type == "cpu"
    np.testing.assert_array_equal(t.numpy(), frames.astype(np.float32))


@pytest.fixture(scope="module")
def tiny_scan(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("devices") / "tiny.h5"
    result = runner.invoke(app, ["simulate", str(path), "--preset", "tiny", "--seed", "2"])
    assert result.exit_code == 0, result.output
    return path


@cpu_only
@pytest.mark.parametrize("command", [
    ["approximant", "{scan}", "-o", "{out}"],
    ["reconstruct", "{scan}", "-o", "{out}"],
    ["demo", "--offline", "--preset", "tiny", "--workdir", "{work}"],
    ["train", "--banks", "{work}", "--out", "{out}"],
    ["evaluate", "--out", "{work}", "--phantoms", "1", "--no-sweeps"],
])
def test_device_cuda_without_a_gpu_stops_every_command_before_it_works(command, tiny_scan,
                                                                      tmp_path):
    out, work = tmp_path / "out.h5", tmp_path / "work"
    args = [a.format(scan=tiny_scan, out=out, work=work) for a in command] + ["--device", "cuda"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "no usable CUDA GPU" in result.output and "Traceback" not in result.output
    assert not out.exists() and not work.exists()


def test_device_cpu_is_recorded_with_the_result(tiny_scan, tmp_path):
    from apt_stream.io import read_volumes

    out = tmp_path / "apx.h5"
    result = runner.invoke(app, ["approximant", str(tiny_scan), "-o", str(out), "--angles", "3",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    _volumes, attrs = read_volumes(out)
    assert attrs["device"] == "cpu"


@cpu_only
def test_listen_with_a_missing_gpu_exits_at_once_with_one_line(tmp_path):
    """Before Prefect, 0MQ or the model: a wrong --device costs the operator seconds."""
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", PREFECT_HOME=str(tmp_path / "prefect"))
    script = Path(sys.executable).with_name("apt-stream")
    command = ([str(script)] if script.exists()
               else [sys.executable, "-c", "from apt_stream.cli import main; main()"])
    done = subprocess.run(
        [*command, "listen", "--zmq", "tcp://127.0.0.1:1", "--data-root", str(tmp_path),
         "--device", "cuda"], capture_output=True, text=True, timeout=120, env=env,
        stdin=subprocess.DEVNULL)
    text = done.stdout + done.stderr
    assert done.returncode == 1, text
    assert "no usable CUDA GPU" in text and "Traceback" not in text
    # refused before "starting: ..." (the line printed before Prefect boots)
    assert "starting:" not in text and "ready: listening" not in text


# --- on a GPU machine -------------------------------------------------------------------------


@needs_cuda
def test_engine_on_cuda_matches_the_cpu_engine():
    from apt_stream.physics.engine import AngleState
    from benchmarks.benchmark_approximant import N_SLICES, make_case

    case = make_case(64, 3)

    def slices(device: str) -> np.ndarray:
        state = AngleState(case["probe"], field_shape=case["field"], n_slices=N_SLICES,
                           slice_spacing_m=case["spacing"], wavelength_m=case["wavelength_m"],
                           pixel_size_m=case["pixel_m"], device=device)
        for start in range(0, len(case["frames"]), 32):
            state.add_frames(case["frames"][start:start + 32], case["positions"][start:start + 32])
        return state.finish().cpu().numpy()

    cpu, gpu = slices("cpu"), slices("cuda")
    assert np.abs(gpu - cpu).max() <= 1e-4 * np.abs(cpu).max()


@needs_cuda
def test_reconstruct_on_cuda_matches_the_cpu_engine_network_dc_and_baselines(tiny_scan):
    """The whole offline path (engine, network, data consistency, FBP/SIRT/SART) on the GPU."""
    from apt_stream.io import read_scan
    from apt_stream.reconstruct import reconstruct_scan

    scan = read_scan(tiny_scan)
    cpu = reconstruct_scan(scan, with_baselines=True, device="cpu").volumes
    gpu = reconstruct_scan(scan, with_baselines=True, device="cuda").volumes
    assert set(gpu) == set(cpu)
    for name, volume in cpu.items():
        if volume.dtype == np.uint8:  # a metal mask: a voxel at the cut may flip
            assert np.mean(gpu[name] != volume) <= 0.01, name
            continue
        scale = float(np.abs(volume).max()) or 1.0
        assert np.abs(gpu[name].astype(np.float64) - volume).max() <= 2e-3 * scale, name
