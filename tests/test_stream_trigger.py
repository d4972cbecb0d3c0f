"""The inference trigger: N >= N* finished angles covering ±θ*, in any order, once per run."""

from __future__ import annotations

import numpy as np
import pytest

from apt_stream.errors import ConfigError, InputError
from apt_stream.stream.trigger import DEFAULT_TOL_DEG, TriggerPolicy

PAPER = np.linspace(-17, 17, 29)  # N* = 29 over ±17°: step 34/28 ≈ 1.214°
STEP = 34 / 28
rng = np.random.default_rng(3)


@pytest.mark.parametrize(
    ("angles", "step", "fires"),
    [
        (PAPER, STEP, True),
        (PAPER[::-1], STEP, True),  # order does not matter
        (rng.permutation(PAPER), STEP, True),
        (PAPER[:-1], STEP, False),  # 28 angles
        (np.concatenate([PAPER[:-1], PAPER[:1]]), STEP, False),  # 29 entries, 28 distinct
        (np.linspace(-16.5, 16.5, 29), STEP, True),  # ends within half a step (0.607°)
        (np.linspace(-16.3, 16.3, 29), STEP, False),  # 0.7° short of the ends
        (np.linspace(-16.3, 16.3, 29), None, False),  # unknown step: tol 0.5°
        (np.linspace(-16.6, 16.6, 29), None, True),
        (np.linspace(-17, 10, 40), STEP, False),  # many angles, one side uncovered
        (np.linspace(-70, 70, 117), 140 / 116, True),  # wider scan covers ±17° too
    ],
)
def test_should_fire_table(angles, step, fires):
    assert TriggerPolicy().should_fire(angles, nominal_step_deg=step) is fires


def test_tolerance_rules():
    policy = TriggerPolicy()
    assert policy.tolerance_deg(None) == DEFAULT_TOL_DEG
    assert policy.tolerance_deg(2.0) == 1.0
    assert TriggerPolicy(tol_deg=0.0).tolerance_deg(2.0) == 0.0
    assert not TriggerPolicy(tol_deg=0.0).should_fire(np.linspace(-16.9, 17, 29))


def test_small_policy_and_fires_once_in_any_order():
    policy = TriggerPolicy(n_star=3, theta_star_deg=10.0)
    state = policy.new_run(nominal_step_deg=10.0)
    finished = []
    decisions = []
    for angle in [0.0, 10.0, 5.0, -10.0, -5.0]:
        finished.append(angle)
        decisions.append(state.update(finished))
    # 3 angles after the third, but -10 is missing until the fourth.
    assert decisions == [None, None, None, "fire", None]
    assert state.fired and state.fired_at_n == 4


def test_previews_every_k_angles_and_still_fire_once():
    state = TriggerPolicy(n_star=4, theta_star_deg=1.0, preview_every=2).new_run()
    angles = [-1.0, 1.0, 0.0, 0.5, 0.25, -0.5]
    decisions = [state.update(angles[: i + 1]) for i in range(len(angles))]
    assert decisions == [None, "preview", None, "fire", None, "preview"]


@pytest.mark.parametrize(
    "kwargs",
    [{"n_star": 0}, {"n_star": 2.5}, {"theta_star_deg": -1}, {"theta_star_deg": 91},
     {"preview_every": 0}, {"tol_deg": -0.1}],
)
def test_bad_policies_are_refused(kwargs):
    with pytest.raises(ConfigError):
        TriggerPolicy(**kwargs)


def test_non_finite_angles_are_refused():
    with pytest.raises(InputError, match="finite"):
        TriggerPolicy().should_fire([0.0, float("nan")])
