"""Interleaved rounds and paired ratios: timings on a shared 2-core machine
drift by more than the effects measured, so every variant runs once per
round (the order rotating), and a comparison is the median of the per-round
ratios with their spread."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass


def rounds(fns: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Call every function once per round, rotating the order each round;
    return each one's results (e.g. tokens/s) in round order."""
    keys = list(fns)
    out: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(reps):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            out[k].append(fns[k]())
    return out


@dataclass(frozen=True)
class Ratio:
    median: float
    lo: float
    hi: float

    def __str__(self) -> str:
        return f"{self.median:.3f} ({self.lo:.3f}-{self.hi:.3f})"


def ratio(results: dict[str, list[float]], num: str, den: str) -> Ratio:
    """Median and range of results[num][i] / results[den][i] over rounds i."""
    r = [a / b for a, b in zip(results[num], results[den], strict=True)]
    return Ratio(statistics.median(r), min(r), max(r))


def median(results: dict[str, list[float]], key: str) -> float:
    return statistics.median(results[key])


def rate_line(
    label: str, results: dict[str, list[float]], key: str, base: str | None = None, target: float | None = None
) -> str:
    """One row of a tokens/s table: ``key``'s median and, given ``base``,
    the paired ratio to it (and the target it is held to)."""
    line = f"{label:<31}{median(results, key):7.1f} tok/s"
    if base is not None:
        line += f"   ratio {ratio(results, key, base)}"
    if target is not None:
        line += f"  (target >= {target:g})"
    return line
