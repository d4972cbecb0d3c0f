"""Previews a scientist can read: one δ colour scale with units, scale bars in nm, each panel's
metric against the truth, a note when a baseline beats APT, titles that fit on `tiny`.
The live flow's previews (the state at each angle count): tests/test_flows_previews.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from apt_stream.figures import baseline_note, cross_sections_figure, nice_scale_bar, preview_png

TINY = (12, 24, 32)  # the tiny preset's volume (z, y, x)


def phantom(shape=TINY, seed=0) -> np.ndarray:
    """A δ-like volume: dielectric 6e-6 with copper lines 1.9e-5."""
    rng = np.random.default_rng(seed)
    vol = np.full(shape, 5.95e-6, np.float32)
    for _ in range(6):
        z, y = rng.integers(0, shape[0]), rng.integers(0, shape[1] - 2)
        vol[z, y:y + 2, :] = 1.919e-5
    return vol


def noisy(truth: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    return (truth + np.random.default_rng(seed).normal(0, sigma, truth.shape)).astype(np.float32)


def row_images(fig) -> list[list]:
    """The figure's section images, grouped by row (three per row), in drawing order."""
    images = [ax.get_images()[0] for ax in fig.axes if ax.get_images()]
    return [images[i:i + 3] for i in range(0, len(images), 3)]


def texts(fig) -> str:
    parts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]
    return "\n".join(p for p in parts if isinstance(p, str))


def test_png_is_written_with_one_delta_scale_for_every_method(tmp_path):
    truth = phantom()
    volumes = {"approximant": 0.3 * truth + 2e-6, "apt": noisy(truth, 2e-6, 1),
               "sart": noisy(truth, 4e-6, 2), "fbp": noisy(truth, 6e-6, 3) - 5e-6}
    fig, info = cross_sections_figure(volumes, truth=truth, voxel_size_m=14e-9)
    rows = row_images(fig)
    assert len(rows) == 5 and info.names[-1] == "ground truth"  # truth appended as the last row
    clims = {im.get_clim() for row in rows for im in row}
    assert len(clims) == 1, clims  # same vmin/vmax for APT, baselines and the truth
    (lo, hi), = clims
    assert info.scale == pytest.approx(1e-6)
    # The colour bar reads δ in units of 1e-6 and spans the shared limits.
    assert (lo, hi) == pytest.approx(tuple(v / info.scale for v in info.clim["apt"]))
    assert set(info.shared) == set(info.names)
    assert info.clim["apt"][0] <= 0.0 < 1.9e-5 <= info.clim["apt"][1] * 1.001
    colour_bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colour_bars) == 1
    assert "δ (×10⁻⁶)" in colour_bars[0].get_ylabel()
    import matplotlib.pyplot as plt

    plt.close(fig)
    written = preview_png(volumes, tmp_path / "sub" / "p.png", truth=truth, voxel_size_m=14e-9)
    data = written.path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_a_volume_off_the_delta_scale_gets_its_own_colour_bar():
    truth = phantom()
    counts = np.random.default_rng(0).integers(1, 8, TINY).astype(np.float32)  # angles per voxel
    fig, info = cross_sections_figure({"apt": noisy(truth, 2e-6, 1), "count": counts}, truth=truth)
    rows = dict(zip(info.names, row_images(fig), strict=True))
    assert "count" not in info.shared and {"apt", "ground truth"} <= set(info.shared)
    assert rows["count"][0].get_clim() != rows["apt"][0].get_clim()
    assert rows["apt"][0].get_clim() == rows["ground truth"][0].get_clim()
    assert "own scale" in texts(fig)
    assert len([ax for ax in fig.axes if ax.get_label() == "<colorbar>"]) == 2


@pytest.mark.parametrize("voxel_nm, nx, bar_nm", [(14.0, 32, 100.0), (14.0, 64, 200.0),
                                                   (10.0, 64, 100.0), (3.0, 32, 20.0)])
def test_scale_bar_length_in_pixels_matches_the_voxel_size(voxel_nm, nx, bar_nm):
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    assert nice_scale_bar(nx, voxel_nm) == pytest.approx((bar_nm, bar_nm / voxel_nm))
    truth = phantom((8, 16, nx))
    fig, info = cross_sections_figure({"apt": truth}, voxel_size_m=voxel_nm * 1e-9)
    bars = [a for ax in fig.axes for a in ax.artists if isinstance(a, AnchoredSizeBar)]
    assert len(bars) == 1  # on the xy section of the one row
    (rect,) = bars[0].size_bar.get_children()
    assert rect.get_width() == pytest.approx(bar_nm / voxel_nm)  # data units = voxels
    assert info.scale_bar_nm == bar_nm and info.scale_bar_px == pytest.approx(bar_nm / voxel_nm)
    assert f"{bar_nm:g} nm" in texts(fig)
    fig_without, info_without = cross_sections_figure({"apt": truth})
    assert info_without.scale_bar_nm is None
    assert not [a for ax in fig_without.axes for a in ax.artists if isinstance(a, AnchoredSizeBar)]


def test_each_panel_shows_its_pcc_against_the_truth():
    from apt_stream.metrics import pcc

    truth = phantom()
    volumes = {"apt": noisy(truth, 2e-6, 1), "sart": noisy(truth, 5e-6, 2)}
    fig, info = cross_sections_figure(volumes, truth=truth)
    for name in volumes:
        assert info.metrics[name] == pytest.approx(pcc(volumes[name], truth))
        assert f"PCC {info.metrics[name]:.3f}" in texts(fig)
    assert "ground truth" not in info.metrics
    # Precomputed metrics (the demo's table) are shown as given.
    _, given = cross_sections_figure(volumes, truth=truth,
                                     metrics={"apt": {"pcc": 0.5}, "sart": {"pcc": 0.25}})
    assert given.metrics == {"apt": 0.5, "sart": 0.25}


def test_note_when_a_baseline_beats_apt_and_not_otherwise():
    truth = phantom()
    good, bad = noisy(truth, 1e-6, 1), noisy(truth, 8e-6, 2)
    fig, info = cross_sections_figure({"apt": bad, "baselines/sart": good, "fbp": bad * 0.5},
                                      truth=truth)
    assert info.note is not None and "SART" in info.note and "beats APT" in info.note
    assert "FBP" not in info.note  # FBP does not beat APT
    assert info.note.split(" on ")[0] in fig._supxlabel.get_text().replace("\n", " ")

    fig, info = cross_sections_figure({"apt": good, "sart": bad, "approximant": bad}, truth=truth)
    assert info.note is None
    assert "beat" not in texts(fig)
    # No truth: no metric, no note.
    _, info = cross_sections_figure({"apt": bad, "sart": good})
    assert info.metrics == {} and info.note is None


def test_baseline_note_wording_and_direction():
    assert baseline_note({"apt": 0.42, "approximant": 0.45, "sart": 0.47}) == (
        "Note: SART (0.470) and Approximant (0.450) beat APT (0.420) on PCC against the ground truth.")
    assert baseline_note({"apt": 0.74, "sart": 0.50}) is None
    assert baseline_note({"sart": 0.50}) is None  # no APT panel
    # BER: lower is better.
    assert baseline_note({"apt": 0.10, "sart": 0.05}, "ber").startswith("Note: SART (0.050) beats")
    assert baseline_note({"apt": 0.05, "sart": 0.10}, "ber") is None


def test_titles_and_labels_do_not_overlap_on_the_tiny_preset():
    truth = phantom()
    volumes = {"approximant": truth * 0.4, "apt": noisy(truth, 2e-6, 1),
               "fbp": noisy(truth, 6e-6, 2), "sirt": noisy(truth, 5e-6, 3),
               "sart": noisy(truth, 4e-6, 4)}
    title = ("0123abcd: live, 7 of N* = 7 angles — approximant, apt, fbp, sirt, sart and the ground "
             "truth at the moment the trigger fired, a deliberately long title")
    fig, info = cross_sections_figure(volumes, truth=truth, voxel_size_m=14e-9, title=title)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    shown = [t for t in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_window_extent"))
             if isinstance(t.get_text(), str) and t.get_text().strip() and t.get_visible()
             and t.figure is fig and t.get_gid() is None]
    # Titles, row labels, the note and the colour-bar label: not the tick labels or the bars.
    labels = [t for t in shown if t in {fig._suptitle, fig._supxlabel}
              or any(t in (ax.title, ax.yaxis.label) for ax in fig.axes)]
    assert len(labels) >= 3 + 6 + 2
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in labels]
    page = fig.bbox
    for text, box in boxes:
        assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1, f"{text!r} leaves the figure"
        assert page.y0 - 1 <= box.y0 and box.y1 <= page.y1 + 1, f"{text!r} leaves the figure"
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        assert not box_a.overlaps(box_b), f"{a!r} overlaps {b!r}"


def test_shapes_must_match():
    with pytest.raises(ValueError, match="one shape"):
        cross_sections_figure({"apt": np.zeros((4, 4, 4)), "sart": np.zeros((4, 4, 5))})
    with pytest.raises(ValueError, match="no volumes"):
        cross_sections_figure({})


def test_convergence_plot_of_the_first_estimate_says_what_is_missing_and_warns_nothing(tmp_path):
    """One estimate has no change and no held-out residual yet: the lower panel says so instead
    of an empty log axis with an empty legend (which matplotlib warned about in every live run)."""
    import warnings

    from apt_stream.figures import convergence_png

    first = {"n_angles": 5, "frc_half": 0.4, "resolution": 0.3, "change": None,
             "heldout_residual": None}
    second = {"n_angles": 7, "frc_half": 0.5, "resolution": 0.4, "change": 0.1,
              "heldout_residual": 0.2, "stop": True}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = convergence_png([first], tmp_path / "one.png", n_star=29)
        two = convergence_png([first, second], tmp_path / "two.png", n_star=29)
    assert one.stat().st_size > 5_000 and two.stat().st_size > 5_000
