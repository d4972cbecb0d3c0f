"""APT's metal mask: the δ volume cut at a threshold calibrated once per model, not per volume.

Why not the paper's rule: DSC and BER binarise every volume by an EM fit of two Gaussians to its
own histogram, with the class fractions fixed at the truth's. That works for a volume whose
histogram has two humps. The network's output ranks voxels well but has one smooth hump (NPCC
does not reward a second one; docs/network.md, *Loss*). On such a histogram the fixed-fraction
fit calls about the truth's metal fraction metal, and the voxels it cannot tell apart land on the
metal side: out of family it calls 17–22 % of the voxels metal where the fewest errors come from
calling 4–9 %. Measured on the three out-of-family phantoms, the *best* single threshold gives
APT 0.133 / 0.186 / 0.203 errors per voxel against SART's 0.164 / 0.189 / 0.204, while the EM rule
gives APT 0.179 / 0.260 / 0.237. The information is in the output; the rule reads it badly.

So the model carries its own rule (``io_config["metal_mask"]``): metal where the volume,
standardised over itself, is above ``z_threshold``. The threshold is the one with the fewest
errors per voxel on in-family calibration scans (:func:`calibrate`, run by
``apt-stream model calibrate-metal``); the out-of-family set never enters it. The spread used
for standardising is at least ``min_spread`` (a tenth of the weakest calibration volume's δ
spread, in δ units), so a volume with next to no contrast, such as a vacuum scan, has no metal
instead of its noise's top 7 %.

What it cannot do: a chip with far more or far less metal than the calibration chips is cut at
the same standard score, so its mask is biased towards their metal fraction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from apt_stream.errors import ConfigError, InputError

#: candidate thresholds (standard scores) searched by :func:`calibrate`
Z_GRID = np.round(np.arange(-0.5, 3.5001, 0.05), 2)
#: the floor of the standardising spread, as a fraction of the weakest calibration spread
MIN_SPREAD_FRACTION = 0.1


@dataclass(frozen=True)
class MetalRule:
    """Where a model's δ volume counts as metal: ``(v − mean v) / max(std v, min_spread) > z``."""

    z_threshold: float
    min_spread: float

    def __post_init__(self) -> None:
        if not np.isfinite(self.z_threshold):
            raise ConfigError(f"metal_mask z_threshold must be finite, got {self.z_threshold}")
        if not (np.isfinite(self.min_spread) and self.min_spread >= 0):
            raise ConfigError(f"metal_mask min_spread must be finite and >= 0, got {self.min_spread}")

    @classmethod
    def of_model(cls, model) -> MetalRule | None:
        """The rule a model's ``io_config["metal_mask"]`` records, or None when it has none."""
        cfg = getattr(model, "io_config", {}).get("metal_mask")
        if not cfg:
            return None
        try:
            return cls(z_threshold=float(cfg["z_threshold"]), min_spread=float(cfg["min_spread"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"the model's io_config['metal_mask'] is malformed ({exc!r}): "
                              "re-run `apt-stream model calibrate-metal`") from exc

    def mask(self, volume: np.ndarray) -> np.ndarray:
        """uint8 (z, y, x): 1 where ``volume`` is metal by this rule."""
        return metal_mask(volume, self.z_threshold, min_spread=self.min_spread)


def standard_scores(volume: np.ndarray, *, min_spread: float = 0.0) -> np.ndarray:
    """``(v − mean) / max(std, min_spread)`` over the whole volume, float64."""
    v = np.asarray(volume, dtype=np.float64)
    if v.size == 0 or not np.isfinite(v).all():
        raise InputError("the volume to cut into a metal mask is empty or holds NaN/Inf")
    spread = max(float(v.std()), float(min_spread))
    if spread == 0.0:
        return np.zeros_like(v)
    return (v - v.mean()) / spread


def metal_mask(volume: np.ndarray, z_threshold: float, *, min_spread: float = 0.0) -> np.ndarray:
    """uint8 mask of the voxels whose standard score is above ``z_threshold``."""
    return (standard_scores(volume, min_spread=min_spread) > z_threshold).astype(np.uint8)


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate` found: the rule, and the error curve it was read from."""

    rule: MetalRule
    z_grid: np.ndarray
    mean_errors: np.ndarray  # mean over volumes of the error rate at each z
    per_volume_best_z: list[float]

    def to_io_config(self, *, calibrated_on: str) -> dict:
        return {"z_threshold": self.rule.z_threshold, "min_spread": self.rule.min_spread,
                "mean_error_rate": round(float(self.mean_errors.min()), 4),
                "calibrated_on": calibrated_on}


def calibrate(pairs: Iterable[tuple[np.ndarray, np.ndarray]], *, z_grid: np.ndarray = Z_GRID) -> Calibration:
    """The z threshold with the fewest errors per voxel, averaged over (volume, metal labels) pairs.

    Every volume counts the same (a mean of error rates, as the evaluation's BER averages over
    phantoms). ``min_spread`` is :data:`MIN_SPREAD_FRACTION` × the smallest volume spread.
    """
    curves, spreads, best = [], [], []
    for volume, metal in pairs:
        v = np.asarray(volume, dtype=np.float64)
        m = np.asarray(metal).astype(bool)
        if v.shape != m.shape:
            raise InputError(f"volume {v.shape} and metal labels {m.shape} differ in shape")
        if m.all() or not m.any():
            continue  # a single-class truth has no threshold to learn
        z = standard_scores(v)
        # errors(t) = metal voxels at or below t + non-metal voxels above t, for all t at once
        order = np.sort(z.ravel())
        metal_sorted = np.sort(z[m])
        n = order.size
        below_all = np.searchsorted(order, z_grid, side="right")
        below_metal = np.searchsorted(metal_sorted, z_grid, side="right")
        false_neg = below_metal
        false_pos = (n - below_all) - (metal_sorted.size - below_metal)
        curve = (false_neg + false_pos) / n
        curves.append(curve)
        spreads.append(float(v.std()))
        best.append(float(z_grid[int(np.argmin(curve))]))
    if not curves:
        raise InputError("no calibration volume holds both metal and non-metal voxels")
    mean = np.mean(curves, axis=0)
    rule = MetalRule(z_threshold=float(z_grid[int(np.argmin(mean))]),
                     min_spread=MIN_SPREAD_FRACTION * min(spreads))
    return Calibration(rule=rule, z_grid=np.asarray(z_grid), mean_errors=mean, per_volume_best_z=best)


def mask_scores(mask: np.ndarray, metal: np.ndarray, *, exclude_z=None) -> dict[str, float]:
    """DSC and BER of a ready-made mask against the true metal labels (no re-binarisation)."""
    from apt_stream.metrics import _keep_z, ber, dsc

    mask = np.asarray(mask).astype(bool)
    metal = np.asarray(metal).astype(bool)
    if mask.shape != metal.shape:
        raise InputError(f"mask {mask.shape} and metal labels {metal.shape} differ in shape")
    keep = _keep_z(mask.shape[0], exclude_z)
    return {"dsc": float(dsc(mask[keep], metal[keep])), "ber": float(ber(mask[keep], metal[keep]))}


def describe(rule_cfg: Mapping | None) -> str:
    """One line for logs and the model card."""
    if not rule_cfg:
        return "no metal mask (the model has no calibrated rule)"
    return (f"metal where the δ standard score > {rule_cfg['z_threshold']:g} "
            f"(calibrated on {rule_cfg.get('calibrated_on', '?')})")
