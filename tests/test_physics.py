"""Physics core: propagator, multislice adjoint, the streaming engine and the Approximant."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from apt_stream.config import ProbeOptions, get_preset
from apt_stream.errors import InputError
from apt_stream.metrics import pcc
from apt_stream.physics import geometry
from apt_stream.physics.engine import (
    AngleState,
    ApproximantAccumulator,
    EngineOptions,
    approximant_from_scan,
    batch_reference,
    slices_to_sample_frame,
)
from apt_stream.physics.multislice import (
    FlatStart,
    PatchIndex,
    angular_spectrum_kernel,
    extract_patches,
    extract_windows,
    flat_start_loss_and_gradient,
    forward_far_field,
    loss_and_gradient,
    propagate,
    shift_ramps,
    shifted_probes,
    simulate_intensity,
)
from apt_stream.sim.acquire import simulate_scan
from apt_stream.sim.probe import make_probe

VOXEL, LAM = 14e-9, 1.409e-10


@pytest.fixture(scope="module")
def tiny_scan():
    return simulate_scan(get_preset("tiny"), seed=3)


def _probe(frame=16, modes=2, fwhm=5.0):
    opts = ProbeOptions(
        frame_px=frame, n_modes=modes, mode_power_decay=0.4, beam_fwhm_px=fwhm,
        photons_per_frame=1e6,
    )
    return torch.from_numpy(make_probe(opts, pixel_size_m=VOXEL, wavelength_m=LAM))


# ------------------------------------------------------------------------------- propagation


def test_propagation_is_unitary_and_invertible():
    field = torch.randn(3, 32, 32, dtype=torch.complex64)
    k = angular_spectrum_kernel((32, 32), pixel_size_m=VOXEL, wavelength_m=LAM, distance_m=3e-6)
    out = propagate(field, k)
    assert torch.allclose(out.abs().square().sum(), field.abs().square().sum(), rtol=1e-5)
    back = propagate(out, k.conj())
    assert torch.allclose(back, field, atol=1e-5)


def test_propagation_sign_follows_fresnel_convention():
    # exp(i(kz − ωt)): a plane wave tilted by f acquires phase −π λ f² Δz relative to the axis.
    k = angular_spectrum_kernel((64, 64), pixel_size_m=VOXEL, wavelength_m=LAM, distance_m=1e-6)
    f = 1 / (64 * VOXEL)
    expected = -math.pi * LAM * f**2 * 1e-6
    assert float(torch.angle(k[0, 1])) == pytest.approx(expected, rel=1e-3)
    assert float(torch.angle(k[0, 0])) == 0.0


def test_probe_modes_orthogonal_with_decaying_power():
    p = _probe(modes=4).numpy().reshape(4, -1)
    gram = p.conj() @ p.T
    powers = np.real(np.diag(gram))
    assert np.all(np.diff(powers) < 0)
    assert powers.sum() == pytest.approx(1e6, rel=2e-4)
    off = np.abs(gram - np.diag(np.diag(gram)))
    assert off.max() < 1e-3 * powers.max()


# ------------------------------------------------------------------------------- gradient


@pytest.mark.parametrize("n_modes,n_slices", [(1, 1), (2, 3), (3, 5)])
def test_hand_adjoint_matches_autograd(n_modes, n_slices):
    torch.manual_seed(0)
    b, h = 3, 16
    kernel = angular_spectrum_kernel((h, h), pixel_size_m=VOXEL, wavelength_m=LAM, distance_m=2e-6)
    obj = torch.polar(torch.exp(-0.1 * torch.rand(n_slices, b, h, h)),
                      0.5 * torch.randn(n_slices, b, h, h))
    probes = torch.randn(b, n_modes, h, h, dtype=torch.complex64)
    sqrt_i = torch.rand(b, h, h) * 3
    loss, grad = loss_and_gradient(obj.clone(), probes, sqrt_i, kernel)
    leaf = obj.clone().requires_grad_(True)
    far, _ = forward_far_field(leaf, probes, kernel, keep_waves=False)
    ref_loss = ((far.abs().square().sum(1).sqrt() - sqrt_i) ** 2).sum()
    ref_loss.backward()
    assert loss == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    rel = (leaf.grad / 2 - grad).abs().max() / grad.abs().max()
    assert float(rel) < 2e-4


@pytest.mark.parametrize("n_modes,n_slices", [(1, 1), (2, 3), (3, 5)])
def test_flat_start_gradient_equals_the_general_one_at_sub_pixel_positions(n_modes, n_slices):
    """Pass 1's cheap form (no object, 2ML FFTs) is the general adjoint at O = 1, not an approximation."""
    torch.manual_seed(2)
    b, h = 4, 16
    kernel = angular_spectrum_kernel((h, h), pixel_size_m=VOXEL, wavelength_m=LAM, distance_m=4e-6)
    probe = _probe(frame=h, modes=n_modes)
    frac = torch.rand(b, 2)  # sub-pixel remainders: the case a shifted product would get wrong
    sqrt_i = torch.rand(b, h, h) * 30
    probes = shifted_probes(probe, frac).contiguous()
    ones = torch.ones(n_slices, b, h, h, dtype=torch.complex64)
    loss, grad = loss_and_gradient(ones, probes, sqrt_i.clone(), kernel, eps=0.1)
    flat = FlatStart.build(probe, kernel, n_slices)
    ramps = shift_ramps(frac, (h, h), device="cpu")
    flat_loss, flat_grad, flat_probes = flat_start_loss_and_gradient(flat, ramps, sqrt_i.clone(), eps=0.1)
    assert flat_loss == pytest.approx(loss, rel=1e-5)
    assert float((flat_grad - grad).abs().max() / grad.abs().max()) < 1e-4
    assert float((flat_probes - probes).abs().max() / probes.abs().max()) < 1e-5


def test_window_copies_factored_ramps_and_the_adjoint_leave_the_engine_inputs_as_they_were():
    """The engine's fast paths: window copies equal the flat-index gather bit for bit, the
    factored shift ramps equal the direct ones to rounding, and the in-place products of the
    adjoint never touch the caller's probes or object patches."""
    torch.manual_seed(3)
    n_slices, b, h = 3, 5, 16
    slices = torch.randn(n_slices, 40, 37, dtype=torch.complex64)
    positions = torch.rand(b, 2) * torch.tensor([40 - h, 37 - h])
    index = PatchIndex.from_positions(positions, (h, h), (40, 37))
    gathered = extract_patches(slices, index.flat(37), (h, h))
    assert torch.equal(extract_windows(slices, index.origins(), (h, h)), gathered)
    direct = shift_ramps(index.frac, (h, h), device="cpu")
    factored = shift_ramps(index.frac, (h, h), device="cpu", factored=True)
    assert factored.shape == direct.shape == (b, 1, h, h)
    assert float((factored - direct).abs().max()) < 1e-5
    probes = shifted_probes(_probe(frame=h, modes=2), index.frac).contiguous()
    kept_probes, kept_patches = probes.clone(), gathered.clone()
    kernel = angular_spectrum_kernel((h, h), pixel_size_m=VOXEL, wavelength_m=LAM, distance_m=2e-6)
    loss_and_gradient(gathered, probes, torch.rand(b, h, h) * 3, kernel, eps=0.1)
    assert torch.equal(probes, kept_probes) and torch.equal(gathered, kept_patches)


def test_gradient_finite_difference():
    """Directional derivative of the loss equals 2 Re<∂L/∂O*, dO> (Wirtinger calculus)."""
    torch.manual_seed(1)
    b, h, n_slices = 2, 8, 2
    kernel = angular_spectrum_kernel((h, h), pixel_size_m=VOXEL, wavelength_m=LAM, distance_m=1e-6)
    obj = torch.polar(torch.ones(n_slices, b, h, h, dtype=torch.float64),
                      0.3 * torch.randn(n_slices, b, h, h, dtype=torch.float64))
    probes = torch.randn(b, 2, h, h, dtype=torch.complex128)
    sqrt_i = torch.rand(b, h, h, dtype=torch.float64) * 3
    _, grad = loss_and_gradient(obj.clone(), probes, sqrt_i, kernel.to(torch.complex128))
    direction = torch.randn_like(obj)
    eps = 1e-6

    def loss_at(o):
        far, _ = forward_far_field(o, probes, kernel.to(torch.complex128), keep_waves=False)
        return float(((far.abs().square().sum(1).sqrt() - sqrt_i) ** 2).sum())

    numeric = (loss_at(obj + eps * direction) - loss_at(obj - eps * direction)) / (2 * eps)
    analytic = 2 * float((grad.conj() * direction).real.sum())
    assert numeric == pytest.approx(analytic, rel=1e-5)


# ------------------------------------------------------------------------------- the engine


def _synthetic_angle(n_slices=2, spacing=10e-6, seed=0):
    """Random smooth phase slices, noiseless frames from the same model (for convergence)."""
    rng = np.random.default_rng(seed)
    field = (40, 40)
    phases = np.stack([gaussian_filter(rng.normal(size=field), 1.5) for _ in range(n_slices)])
    phases *= 0.3 / np.abs(phases).max()
    obj = torch.from_numpy(np.exp(1j * phases).astype(np.complex64))
    probe = _probe(modes=1)
    kernel = angular_spectrum_kernel((16, 16), pixel_size_m=VOXEL, wavelength_m=LAM,
                                     distance_m=spacing)
    pos = geometry.raster_positions(field, 16, step_px=2, jitter_px=0.3, rng=rng)
    frames = simulate_intensity(obj, probe, torch.from_numpy(pos), kernel).numpy()
    frames = np.fft.fftshift(frames, axes=(-2, -1))
    return dict(frames=frames, pos=pos, probe=probe, field=field, phases=phases, spacing=spacing)


def _state(case, n_slices, options=None):
    return AngleState(
        case["probe"], field_shape=case["field"], n_slices=n_slices,
        slice_spacing_m=case["spacing"], wavelength_m=LAM, pixel_size_m=VOXEL, options=options,
    )


def test_noiseless_single_angle_more_iterations_recover_slice_phases():
    """Thick sample (slice spacing 3.5x the depth of field): slices become separable."""
    case = _synthetic_angle()
    roi = (slice(8, 32), slice(8, 32))

    def fidelity(state):
        p = state.phases().numpy()
        return [pcc(p[i][roi], case["phases"][i][roi]) for i in range(2)]

    state = _state(case, 2)
    state.add_frames(case["frames"], case["pos"])
    state.finish()
    two = fidelity(state)
    state.refine(298)
    many = fidelity(state)
    assert min(many) > 0.9, many
    assert all(m > t + 0.15 for m, t in zip(many, two, strict=True)), (two, many)
    assert state.losses[-1] < 0.01 * state.losses[0]


def test_streaming_one_batch_equals_autograd_batch_reference(tiny_scan):
    frames, pos = tiny_scan.frames_of(2)
    kwargs = dict(
        field_shape=tiny_scan.field_shape, n_slices=tiny_scan.n_slices,
        slice_spacing_m=float(tiny_scan.slice_spacing_m[2]), wavelength_m=tiny_scan.wavelength_m,
        pixel_size_m=tiny_scan.object_pixel_m,
    )
    state = AngleState(tiny_scan.probe, options=EngineOptions(chunk_frames=7), **kwargs)
    state.add_frames(frames, pos)
    streamed = state.finish()
    reference = batch_reference(frames, pos, tiny_scan.probe, **kwargs)
    err = (streamed - reference).abs().max() / (reference - 1).abs().max()
    assert float(err) < 2e-4


@pytest.mark.parametrize("batch_size", [1, 5, 16])
def test_streaming_any_batching_equals_one_batch(tiny_scan, batch_size):
    """Pass 1 accumulates gradients at the flat start, so batching changes nothing but rounding."""
    one = approximant_from_scan(tiny_scan, keep_slices=True)
    small = approximant_from_scan(tiny_scan, batch_size=batch_size, keep_slices=True)
    for n in range(tiny_scan.n_angles):
        a, b = one.summaries[n].slices, small.summaries[n].slices
        assert float((a - b).abs().max() / (a - 1).abs().max()) < 2e-4
    assert np.allclose(one.volume(), small.volume(), rtol=1e-3, atol=1e-9)


def test_minibatch_pass1_is_a_working_alternative(tiny_scan):
    """The stochastic variant (a step per batch) stays close to the exact scheme for batches of 16:
    per-angle phases correlate > 0.85 and the Approximant's PCC is within 0.05."""
    exact = approximant_from_scan(tiny_scan, keep_slices=True)
    mini = approximant_from_scan(
        tiny_scan, batch_size=16, keep_slices=True, options=EngineOptions(pass1="minibatch")
    )
    rows = slice(8, 8 + tiny_scan.volume_shape_zyx[1])
    for n in range(tiny_scan.n_angles):
        a = torch.angle(exact.summaries[n].slices).numpy()[:, rows]
        b = torch.angle(mini.summaries[n].slices).numpy()[:, rows]
        assert pcc(a, b) > 0.85
    truth = tiny_scan.truth.delta
    assert abs(pcc(mini.volume(), truth) - pcc(exact.volume(), truth)) < 0.05
    with pytest.raises(InputError, match="pass1"):
        EngineOptions(pass1="sometimes")


def test_approximant_correlates_with_truth_tiny(tiny_scan):
    engine = approximant_from_scan(tiny_scan)
    vol = engine.volume()
    assert vol.shape == tiny_scan.volume_shape_zyx
    assert np.isfinite(vol).all()
    score = pcc(vol, tiny_scan.truth.delta)
    # Measured 0.44 at seed 3 (docs/approximant.md); the floor leaves room for seeds and noise.
    assert score > 0.3, score
    # Units of δ and the sign convention: matter reads positive. (Two iterations from a flat start
    # recover only part of the phase, so the scale is not the truth's; the network learns it.)
    assert vol.mean() > 0


def test_back_rotation_of_a_uniform_slab_is_uniform():
    shape = (8, 10, 12)
    field = geometry.field_shape(shape, 8, [30.0])
    slabs = torch.full((4, *field), 2.0)
    vol, cover = slices_to_sample_frame(slabs, shape_zyx=shape, frame_px=8, angle_deg=30.0)
    assert torch.allclose(vol, torch.full(shape, 2.0))
    assert bool((cover == 1).all())


def test_back_rotation_puts_slab_values_at_the_right_depth():
    """At θ=0 slab l covers sample z in [l*nz/L, (l+1)*nz/L): z order is beam order."""
    shape = (8, 4, 6)
    field = geometry.field_shape(shape, 4, [0.0])
    slabs = torch.arange(4, dtype=torch.float32)[:, None, None].expand(4, *field).contiguous()
    vol, _ = slices_to_sample_frame(slabs, shape_zyx=shape, frame_px=4, angle_deg=0.0)
    assert vol[:, 0, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_accumulator_averages_angles():
    shape = (4, 4, 4)
    field = geometry.field_shape(shape, 4, [0.0, 10.0])
    acc = ApproximantAccumulator(shape_zyx=shape, frame_px=4, wavelength_m=LAM)
    k = 2 * math.pi / LAM
    spacing = 1e-7
    for angle, delta in [(0.0, 1e-5), (10.0, 3e-5)]:
        slices = torch.polar(torch.ones(2, *field), torch.full((2, *field), -k * delta * spacing))
        acc.add_angle(angle, slices, spacing)
    assert np.allclose(acc.volume(), 2e-5, rtol=1e-3)
    assert acc.n_angles == 2


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda f, p: (f[:, :8], p), "frames must have shape"),
        (lambda f, p: (f, p[:-1]), "lengths must match"),
        (lambda f, p: (np.where(np.arange(f.size).reshape(f.shape) == 5, np.nan, f), p), "NaN"),
        (lambda f, p: (np.where(np.arange(f.size).reshape(f.shape) == 5, np.inf, f), p), "NaN or Inf"),
        (lambda f, p: (f - 1e9, p), "negative"),
        (lambda f, p: (f, p + 1000), "outside"),
        (lambda f, p: (f, p * np.nan), "NaN"),
        (lambda f, p: (f, p[:, :1]), "shape"),
    ],
)
def test_engine_rejects_bad_frames(tiny_scan, mutate, match):
    frames, pos = tiny_scan.frames_of(0)
    state = AngleState(
        tiny_scan.probe, field_shape=tiny_scan.field_shape, n_slices=3,
        slice_spacing_m=1e-7, wavelength_m=LAM, pixel_size_m=VOXEL,
    )
    bad_frames, bad_pos = mutate(frames.astype(np.float32), pos)
    with pytest.raises(InputError, match=match):
        state.add_frames(bad_frames, bad_pos)
    # The state is untouched: good frames still go in afterwards.
    state.add_frames(frames, pos)
    assert state.n_frames == len(frames)


def test_engine_rejects_bad_probe_and_finished_angle(tiny_scan):
    with pytest.raises(InputError, match="complex"):
        AngleState(np.ones((2, 16, 16), np.float32), field_shape=(40, 40), n_slices=2,
                   slice_spacing_m=1e-7, wavelength_m=LAM, pixel_size_m=VOXEL)
    state = AngleState(tiny_scan.probe, field_shape=tiny_scan.field_shape, n_slices=2,
                       slice_spacing_m=1e-7, wavelength_m=LAM, pixel_size_m=VOXEL)
    with pytest.raises(InputError, match="no frames"):
        state.finish()
    frames, pos = tiny_scan.frames_of(0)
    state.add_frames(frames, pos)
    state.finish()
    with pytest.raises(InputError, match="finished"):
        state.add_frames(frames, pos)


def test_geometry_field_holds_every_angle():
    shape = (12, 24, 32)
    angles = geometry.uniform_angles(9, 70.0)
    ny, nx = geometry.field_shape(shape, 16, angles)
    assert ny == 24 + 16
    assert nx >= max(geometry.lateral_extent_px(shape, a) for a in angles) + 16
    pos = geometry.raster_positions((ny, nx), 16, step_px=3, jitter_px=0.5,
                                    rng=np.random.default_rng(0))
    assert pos.min() >= 0 and (pos[:, 0] <= ny - 16).all() and (pos[:, 1] <= nx - 16).all()
    spiral = geometry.spiral_positions((ny, nx), 16, step_px=3)
    assert len(spiral) > 10 and (spiral[:, 1] <= nx - 16).all()


def test_paper_preset_is_constructible_without_simulating_frames():
    """The paper geometry builds (phantom, probe, field, slicing) — the frames need a GPU budget."""
    from apt_stream.sim.phantom import make_ic_phantom

    p = get_preset("paper")
    d = p.describe()
    assert d["volume_zyx"] == [280, 128, 128] and d["frame_px"] == 128 and d["modes"] == 12
    assert d["slices"] == 5 and d["gold_angles"] == 349 and d["gold_range_deg"] == 70.4
    assert d["thickness_over_dof"] == pytest.approx(1.41, abs=0.01)
    assert d["detector_pixel_um"] == pytest.approx(151, rel=0.01)  # the paper's 2x-binned Eiger
    phantom = make_ic_phantom(p.phantom, seed=0)
    assert phantom.labels.shape == (280, 128, 128)
    probe = make_probe(p.probe, pixel_size_m=p.phantom.voxel_size_m, wavelength_m=p.wavelength_m)
    assert probe.shape == (12, 128, 128)
    angles = geometry.uniform_angles(p.gold_scan.n_angles, p.gold_scan.angle_range_deg)
    assert angles[1] - angles[0] == pytest.approx(0.4045, abs=1e-3)
    ny, nx = geometry.field_shape(phantom.labels.shape, 128, angles)
    assert ny == 256 and nx > 128 + 128


def test_projection_iterations_refine_projections_not_the_approximant(tiny_scan):
    from apt_stream.physics import tomo

    plain = approximant_from_scan(tiny_scan)
    refined = approximant_from_scan(tiny_scan, projection_iterations=10)
    assert np.allclose(plain.volume(), refined.volume(), rtol=1e-4, atol=1e-10)
    angles, p2 = plain.projections()
    _, p10 = refined.projections()
    truth = tomo.project(tiny_scan.truth.delta, angles, det_width_px=p2.shape[-1])
    assert pcc(p10, truth) > pcc(p2, truth)
