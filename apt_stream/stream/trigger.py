"""When to run the APT network on a live scan: N ≥ N* finished angles covering ±θ*.

The rule (paper: N* = 29 angles within ±17°) fires when

* at least ``n_star`` distinct angles are finished, and
* the finished angles reach both ends of the range: ``min ≤ −θ* + tol`` and ``max ≥ θ* − tol``.

``tol`` forgives a planned grid whose end points sit a little inside ±θ* (or a stage readback a
hair off its setpoint): by default it is half the nominal angular step of the planned scan, or
0.5° when the step is unknown; ``tol_deg`` overrides both. Angles may finish in any order; only
the set matters. A run fires once; previews (every ``preview_every`` finished angles) are
optional and separate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from apt_stream.errors import ConfigError, InputError

DEFAULT_TOL_DEG = 0.5
Decision = Literal["fire", "preview"] | None


def _distinct(angles_deg: Iterable[float]) -> list[float]:
    values = []
    for a in angles_deg:
        a = float(a)
        if not math.isfinite(a):
            raise InputError(f"finished angles must be finite, got {a!r}")
        values.append(a)
    # Angles equal to 1e-6 degrees are the same angle measured twice.
    return sorted({round(a, 6) for a in values})


@dataclass(frozen=True)
class TriggerPolicy:
    """The inference trigger rule (immutable, shared by all runs).

    Parameters
    ----------
    n_star
        N*, the minimum number of distinct finished angles.
    theta_star_deg
        θ*, the half-range the finished angles must cover.
    preview_every
        Also reconstruct a preview every this many finished angles (None: no previews).
    tol_deg
        Coverage tolerance; None uses half the nominal step, else 0.5°.
    """

    n_star: int = 29
    theta_star_deg: float = 17.0
    preview_every: int | None = None
    tol_deg: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.n_star, bool) or not isinstance(self.n_star, int) or self.n_star < 1:
            raise ConfigError(f"n_star must be an integer >= 1, got {self.n_star!r}")
        if not (math.isfinite(self.theta_star_deg) and 0 <= self.theta_star_deg <= 90):
            raise ConfigError(f"theta_star_deg must be within [0, 90], got {self.theta_star_deg!r}")
        if self.preview_every is not None and (
            not isinstance(self.preview_every, int) or self.preview_every < 1
        ):
            raise ConfigError(f"preview_every must be None or >= 1, got {self.preview_every!r}")
        if self.tol_deg is not None and not (math.isfinite(self.tol_deg) and self.tol_deg >= 0):
            raise ConfigError(f"tol_deg must be >= 0, got {self.tol_deg!r}")

    def tolerance_deg(self, nominal_step_deg: float | None = None) -> float:
        """The coverage tolerance for a scan with this nominal angular step."""
        if self.tol_deg is not None:
            return float(self.tol_deg)
        if nominal_step_deg is not None and math.isfinite(nominal_step_deg) and nominal_step_deg > 0:
            return 0.5 * float(nominal_step_deg)
        return DEFAULT_TOL_DEG

    def should_fire(
        self, finished_angles_deg: Iterable[float], *, nominal_step_deg: float | None = None
    ) -> bool:
        """True when the finished angles satisfy N ≥ N* and cover ±θ* (within the tolerance)."""
        angles = _distinct(finished_angles_deg)
        if len(angles) < self.n_star:
            return False
        tol = self.tolerance_deg(nominal_step_deg)
        return angles[0] <= -self.theta_star_deg + tol and angles[-1] >= self.theta_star_deg - tol

    def should_preview(self, n_finished: int) -> bool:
        """True every ``preview_every`` finished angles."""
        return bool(self.preview_every) and n_finished > 0 and n_finished % self.preview_every == 0

    def new_run(self, *, nominal_step_deg: float | None = None) -> TriggerState:
        """Per-run state that fires at most once."""
        return TriggerState(self, nominal_step_deg=nominal_step_deg)


@dataclass
class TriggerState:
    """One run's trigger: :meth:`update` after each finished angle says what to do."""

    policy: TriggerPolicy
    nominal_step_deg: float | None = None
    fired: bool = False
    fired_at_n: int | None = None
    _last_preview_n: int = field(default=0, repr=False)

    def update(self, finished_angles_deg: Iterable[float]) -> Decision:
        """``"fire"`` once when the rule is first met, ``"preview"`` on preview steps, else None."""
        angles = _distinct(finished_angles_deg)
        n = len(angles)
        if not self.fired and self.policy.should_fire(angles, nominal_step_deg=self.nominal_step_deg):
            self.fired = True
            self.fired_at_n = n
            return "fire"
        if self.policy.should_preview(n) and n != self._last_preview_n:
            self._last_preview_n = n
            return "preview"
        return None


@dataclass(frozen=True)
class StopPolicy:
    """When more angles are unlikely to change the result: the **stop advice** rule (opt-in).

    After each live convergence estimate (:mod:`apt_stream.physics.convergence`) the advice is
    "stop" once

    * at least ``min_angles`` distinct angles are finished,
    * the finished angles cover ±θ* (the trigger's coverage rule, unless ``require_coverage``
      is False): stopping never gives up the range,
    * the reconstruction moved less than ``change_tol`` (relative L2, ``change``) at each of the
      last ``patience`` estimates, and
    * the two half-set reconstructions agree (``frc_half`` ≥ ``min_frc``, unless None).

    ``act``: also fire the final reconstruction at once (before N* if need be) and tell the
    beamline (LiveReconstructor's ``on_advice``) so acquisition can end. The advice is given
    once per run.
    """

    change_tol: float = 0.03
    patience: int = 2
    min_angles: int = 9
    min_frc: float | None = 0.5
    require_coverage: bool = True
    act: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.change_tol) and self.change_tol > 0):
            raise ConfigError(f"change_tol must be > 0, got {self.change_tol!r}")
        if not isinstance(self.patience, int) or self.patience < 1:
            raise ConfigError(f"patience must be an integer >= 1, got {self.patience!r}")
        if not isinstance(self.min_angles, int) or self.min_angles < 2:
            raise ConfigError(f"min_angles must be an integer >= 2, got {self.min_angles!r}")
        if self.min_frc is not None and not (-1 <= self.min_frc <= 1):
            raise ConfigError(f"min_frc must be in [-1, 1] or None, got {self.min_frc!r}")

    def new_run(self, trigger: TriggerPolicy, *, nominal_step_deg: float | None = None) -> StopState:
        return StopState(self, trigger, nominal_step_deg=nominal_step_deg)


@dataclass
class StopState:
    """One run's stop rule: :meth:`update` with each convergence row; the advice once."""

    policy: StopPolicy
    trigger: TriggerPolicy
    nominal_step_deg: float | None = None
    advised: bool = False
    advised_at_n: int | None = None
    _calm: int = field(default=0, repr=False)

    def update(self, row: dict, finished_angles_deg: Iterable[float]) -> dict | None:
        """The advice ``{"stop": True, "n_angles", "reason", ...}`` when first due, else None."""
        p = self.policy
        change = row.get("change")
        calm = change is not None and math.isfinite(change) and change < p.change_tol
        self._calm = self._calm + 1 if calm else 0
        if self.advised:
            return None
        angles = _distinct(finished_angles_deg)
        n = len(angles)
        if n < p.min_angles or self._calm < p.patience:
            return None
        if p.min_frc is not None and not row.get("frc_half", -math.inf) >= p.min_frc:
            return None
        if p.require_coverage:
            tol = self.trigger.tolerance_deg(self.nominal_step_deg)
            th = self.trigger.theta_star_deg
            if not (angles[0] <= -th + tol and angles[-1] >= th - tol):
                return None
        self.advised, self.advised_at_n = True, n
        return {
            "stop": True, "n_angles": n,
            "reason": (f"the reconstruction moved < {p.change_tol:g} (relative) at each of the "
                       f"last {p.patience} estimates; halves agree (FRC {row.get('frc_half', 0):.3f})"),
            "change": float(change), "frc_half": float(row.get("frc_half", math.nan)),
        }
