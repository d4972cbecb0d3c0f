"""The engine's fused C loops against the torch expressions they replace, and the fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apt_stream.physics import fused
from apt_stream.physics.engine import AngleState
from apt_stream.physics.multislice import (
    PatchIndex,
    RampFactors,
    add_illumination,
    add_windows,
    amplitude_residual,
    extract_windows,
    loss_and_gradient,
    probe_illumination,
    scatter_patches,
    window_loss_and_gradient,
)

needs_loops = pytest.mark.skipif(fused.library() is None, reason="no C compiler for the fused loops")


def _c(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(*shape, generator=g), torch.randn(*shape, generator=g))


def _windows(b, hw, field, seed=0):
    """Origins of b windows that overlap one another, and their PatchIndex."""
    rng = np.random.default_rng(seed)
    pos = rng.uniform(0, [field[0] - hw[0], field[1] - hw[1]], size=(b, 2))
    pos[1] = pos[0] + 0.5  # two windows that overlap almost entirely
    index = PatchIndex.from_positions(torch.from_numpy(pos), hw, field)
    return index, index.origin_tensor()


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@needs_loops
@pytest.mark.parametrize("modes", [1, 3])
def test_each_loop_equals_its_torch_expression(threads, modes):
    b, hw, field = 5, (6, 7), (15, 17)
    index, origins = _windows(b, hw, field)
    slices = _c(3, *field, seed=1)
    psi, eta = _c(b, modes, *hw, seed=2), _c(b, modes, *hw, seed=3)
    windows = extract_windows(slices, index.origins(), hw)  # (L, B, h, w)

    out = torch.empty_like(psi)
    fused.forward_exit(psi, slices[1], origins, out)
    torch.testing.assert_close(out, psi * windows[1].unsqueeze(1), rtol=1e-6, atol=1e-6)

    far = _c(b, modes, *hw, seed=4)
    sqrt_i = torch.rand(b, *hw) * 3
    expected = far.clone()
    expected_loss, _ = amplitude_residual(expected, sqrt_i, eps=0.1)
    got = far.clone()
    loss = fused.residual_conj(got, sqrt_i, 0.1)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    torch.testing.assert_close(got, expected.conj(), rtol=1e-5, atol=1e-6)

    grad = torch.empty(b, *hw, dtype=torch.complex64)
    moved = eta.clone()
    fused.adjoint_slab(psi, moved, slices[2], origins, grad)
    torch.testing.assert_close(grad, (psi * eta).sum(1).conj(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moved, eta * windows[2].unsqueeze(1), rtol=1e-6, atol=1e-6)
    untouched = eta.clone()
    fused.adjoint_slab(psi, untouched, None, origins, grad)  # the first slab: no object step
    assert torch.equal(untouched, eta)

    fused.mode_sum_conj(psi, eta, grad)
    torch.testing.assert_close(grad, (psi * eta).sum(1).conj(), rtol=1e-5, atol=1e-5)

    ramps = RampFactors.of(index.frac, hw, device="cpu")
    table, scale = _c(modes, *hw, seed=5), torch.rand(b, *hw)
    spectrum = torch.empty_like(psi)
    fused.ramp_product(table, ramps.rows, ramps.cols, None, spectrum)
    torch.testing.assert_close(spectrum, table * ramps.full(), rtol=1e-5, atol=1e-6)
    fused.ramp_product(table, ramps.rows, ramps.cols, scale, spectrum)
    torch.testing.assert_close(spectrum, table * (ramps.full().conj() * scale.unsqueeze(1)),
                               rtol=1e-5, atol=1e-6)


@needs_loops
def test_scatters_accumulate_overlapping_windows(threads):
    b, hw, field = 9, (6, 7), (15, 17)
    index, origins = _windows(b, hw, field, seed=3)
    patches = _c(3, b, *hw, seed=6)
    expected = _c(3, *field, seed=7)
    got = expected.clone()
    scatter_patches(expected, patches, index.flat(field[1]))
    fused.scatter_add(got, patches, origins)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    probes = _c(b, 2, *hw, seed=8)
    expected = torch.zeros(1, *field)
    scatter_patches(expected, probe_illumination(probes)[None], index.flat(field[1]))
    got = torch.zeros(1, *field)
    fused.scatter_illumination(got[0], probes, origins)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_loops
def test_fused_gradient_equals_the_torch_path(threads):
    b, modes, hw, field, n_slices = 4, 3, (8, 8), (20, 21), 3
    index, origins = _windows(b, hw, field, seed=4)
    slices = torch.polar(torch.ones(n_slices, *field), torch.randn(n_slices, *field) * 0.3)
    probes, sqrt_i = _c(b, modes, *hw, seed=9), torch.rand(b, *hw) * 4
    kernel = torch.polar(torch.ones(hw), torch.randn(hw))
    loss, grad = window_loss_and_gradient(slices, origins, probes, sqrt_i, kernel, eps=0.1)
    windows = extract_windows(slices, index.origins(), hw)
    ref_loss, ref_grad = loss_and_gradient(windows, probes.clone(), sqrt_i.clone(), kernel,
                                           eps=0.1)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4)
    # the caller's probes (the incident wave at slab 0) are read, never written
    assert torch.equal(probes, _c(b, modes, *hw, seed=9))


def _angle(frames, positions, probe, **geometry):
    state = AngleState(probe, **geometry)
    state.add_frames(frames, positions)
    return state.finish().clone()


def _case():
    rng = np.random.default_rng(0)
    probe = _c(2, 16, 16, seed=10).numpy() * 0.1
    positions = rng.uniform(0, [24, 25], size=(21, 2))
    frames = rng.poisson(5.0, size=(21, 16, 16)).astype(np.float32)
    geometry = dict(field_shape=(40, 41), n_slices=3, slice_spacing_m=2e-7,
                    wavelength_m=1e-10, pixel_size_m=1e-8)
    return frames, positions, probe, geometry


@needs_loops
def test_engine_with_and_without_the_loops_agree():
    frames, positions, probe, geometry = _case()
    with_loops = _angle(frames, positions, probe, **geometry)
    with fused.torch_ops_only():
        assert not fused.usable(torch.zeros(1))
        without = _angle(frames, positions, probe, **geometry)
    assert fused.usable(torch.zeros(1))
    # float32 rounding in a different order: the same slices to ~1e-6 of their largest value
    assert float((with_loops - without).abs().max() / without.abs().max()) < 1e-5


def test_a_failed_build_falls_back_to_torch(monkeypatch, tmp_path):
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\necho 'cc: error: no such thing' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    monkeypatch.setenv("APT_STREAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delitem(fused._STATE, "lib", raising=False)
    assert fused.library() is None
    assert fused.status().startswith("torch ops (")
    assert "failed" in fused.status()
    frames, positions, probe, geometry = _case()
    slices = _angle(frames, positions, probe, **geometry)  # the torch path runs
    assert torch.isfinite(slices).all()
    monkeypatch.delitem(fused._STATE, "lib")


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("APT_STREAM_FUSED", "0")
    monkeypatch.delitem(fused._STATE, "lib", raising=False)
    assert fused.library() is None
    assert fused.status() == "torch ops (APT_STREAM_FUSED=0)"
    monkeypatch.delitem(fused._STATE, "lib")


@needs_loops
def test_build_is_cached_per_source(monkeypatch, tmp_path):
    monkeypatch.setenv("APT_STREAM_CACHE", str(tmp_path))
    monkeypatch.delitem(fused._STATE, "lib", raising=False)
    assert fused.library() is not None
    built = list((tmp_path / "fused").glob("apt_fused-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.delitem(fused._STATE, "lib")
    assert fused.library() is not None  # loaded again, not rebuilt
    assert built[0].stat().st_mtime_ns == stamp
    assert not list((tmp_path / "fused").glob("*.so.*")) and len(list((tmp_path / "fused").iterdir())) == 1
    monkeypatch.delitem(fused._STATE, "lib")


def test_loops_refuse_what_they_cannot_read():
    assert not fused.usable(torch.zeros(2, 3, dtype=torch.complex128))
    assert not fused.usable(torch.zeros(4, 4, dtype=torch.complex64).t())  # not contiguous
    if not torch.cuda.is_available():
        return
    assert not fused.usable(torch.zeros(2, device="cuda"))


@needs_loops
def test_add_windows_takes_either_path(monkeypatch):
    b, hw, field = 6, (5, 5), (12, 13)
    index, origins = _windows(b, hw, field, seed=5)
    patches, probes = _c(2, b, *hw, seed=11), _c(b, 2, *hw, seed=12)
    results = []
    for lib in (fused.library(), None):
        monkeypatch.setitem(fused._STATE, "lib", lib)
        grad, illum = torch.zeros(2, *field, dtype=torch.complex64), torch.zeros(1, *field)
        add_windows(grad, patches, origins)
        add_illumination(illum, probes, origins)
        results.append((grad, illum))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-5)
