"""Interleaved timing: A, B, A, B, … so that both sides of a ratio see the same machine load.

This machine is shared and noisy: timing A's repeats and then B's lets a burst of load land on
one side only (the Approximant benchmark once reported an engine 1.8× *faster* than its FFT
floor). Here every round times each side once, in turn, and the ratio is taken of the medians;
its spread over the rounds' own ratios is reported beside it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def spread(samples: list[float]) -> dict[str, float]:
    """Median, min and max of ``samples``."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def interleaved(sides: dict[str, Callable[[], object]], *, rounds: int) -> dict[str, list[float]]:
    """Seconds of each side over ``rounds`` rounds, the sides called in turn in every round."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t0)
    return seconds


def ratio(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """median(numerator) / median(denominator), and the spread of the per-round ratios."""
    per_round = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return {"value": statistics.median(numerator) / statistics.median(denominator),
            **{f"round_{k}": v for k, v in spread(per_round).items()}}
