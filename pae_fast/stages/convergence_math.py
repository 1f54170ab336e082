"""The arithmetic of a convergence comparison (docs/method.md § Convergence): pure functions, no I/O.

- :func:`log_spaced_steps`: the evaluation steps (the last step, halved repeatedly);
- :func:`crossing_step`: the step at which a curve first reaches a target value, read off the log–log curve by
  linear interpolation of ``log(value)`` against ``log(step)`` between the two evaluated points around the first
  crossing (exact for a power law ``value = a · step^(-b)``); ``None`` when the curve never reaches it — a crossing
  is never extrapolated;
- :func:`speedup_summary`: per seed, the steps each space needs to reach the baseline's final value (same seed),
  the speed-up ``baseline steps / space steps``, and their mean and spread over the seeds;
- :func:`gpu_hours`: steps priced with a predicted step time.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["log_spaced_steps", "crossing_step", "spread", "speedup_summary", "gpu_hours"]


def log_spaced_steps(total: int, points: int) -> list[int]:
    """``points`` evaluation steps ending at ``total``, each about half the next: ``round(total / 2^k)`` for
    ``k = points-1 .. 0``, duplicates and steps below 1 dropped (so fewer than ``points`` for a short run)."""
    if total < 1 or points < 1:
        raise ValueError(f"total steps and points must be >= 1, got {total} and {points}")
    steps = {max(1, round(total / 2**k)) for k in range(points)}
    return sorted(steps)


def _check_curve(steps: Sequence[float], values: Sequence[float]) -> None:
    if len(steps) != len(values) or not steps:
        raise ValueError(f"a curve needs as many steps as values (>= 1), got {len(steps)} and {len(values)}")
    if any(s <= 0 for s in steps) or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"steps must be positive and increasing, got {list(steps)}")
    if any(not (math.isfinite(v) and v > 0) for v in values):
        raise ValueError(f"values must be finite and > 0 for log-log axes, got {list(values)}")


def crossing_step(steps: Sequence[float], values: Sequence[float], target: float) -> float | None:
    """The first step at which the curve ``values`` (lower is better) reaches ``target``.

    Between the last point above ``target`` and the first point at or below it, ``log(value)`` is taken as linear
    in ``log(step)``; a curve already at or below ``target`` at its first point returns that first step (the
    crossing happened at or before it: nothing earlier was measured). A tie (a point exactly at ``target``) returns
    that point's step.

    Returns:
        the crossing step, or None when no evaluated point reaches ``target``.
    """
    _check_curve(steps, values)
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target must be finite and > 0, got {target}")
    for i, v in enumerate(values):
        if v <= target:
            if i == 0 or v == target:  # at or before the first evaluation; or a tie: that point's step
                return float(steps[i])
            lv0, lv1, lt = math.log(values[i - 1]), math.log(v), math.log(target)
            frac = (lv0 - lt) / (lv0 - lv1)  # values[i-1] > target >= v, so lv0 > lv1
            ls0, ls1 = math.log(steps[i - 1]), math.log(steps[i])
            return math.exp(ls0 + frac * (ls1 - ls0))
    return None


def spread(xs: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min and max of ``xs`` (all None for no value)."""
    xs = [float(x) for x in xs]
    if not xs:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(xs), "mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs)}


def speedup_summary(curves: Mapping[str, Mapping[int, tuple[Sequence[float], Sequence[float]]]], baseline: str
                    ) -> dict[str, Any]:
    """The steps to reach the baseline's final value, and the speed-ups, per seed and over seeds.

    Args:
        curves: ``{space: {seed: (steps, values)}}``, lower values better.
        baseline: the space whose final value (per seed) is the target.

    Returns:
        ``{"baseline", "seeds", "target": {seed: value}, "spaces": {space: {"steps": {seed: step | None},
        "speedup": {seed: x | None}, "steps_spread", "speedup_spread", "never_reached": [seeds]}}}``. The baseline's
        own steps are its first crossing of its final value (its last step unless its curve dipped below earlier).
        A seed without a baseline curve is skipped; a space that never reaches the target has ``None`` there and
        is left out of the spread (``never_reached`` lists those seeds).
    """
    if baseline not in curves:
        raise ValueError(f"baseline {baseline!r} is not one of the spaces {sorted(curves)}")
    seeds = sorted(curves[baseline])
    target = {s: float(curves[baseline][s][1][-1]) for s in seeds}
    base_steps = {s: crossing_step(*curves[baseline][s], target[s]) for s in seeds}
    out: dict[str, Any] = {"baseline": baseline, "seeds": seeds, "target": target, "spaces": {}}
    for name, per_seed in curves.items():
        steps: dict[int, float | None] = {}
        speed: dict[int, float | None] = {}
        for s in seeds:
            if s not in per_seed:
                continue
            steps[s] = crossing_step(*per_seed[s], target[s])
            b = base_steps[s]
            speed[s] = b / steps[s] if steps[s] is not None and b is not None else None
        out["spaces"][name] = {
            "steps": steps, "speedup": speed,
            "steps_spread": spread([v for v in steps.values() if v is not None]),
            "speedup_spread": spread([v for v in speed.values() if v is not None]),
            "never_reached": [s for s, v in steps.items() if v is None],
        }
    return out


def gpu_hours(steps: float, step_seconds: float, global_batch: int, roofline_batch: int = 32) -> float:
    """Device-hours of ``steps`` optimizer steps of ``global_batch`` samples, from a predicted step time at
    ``roofline_batch`` samples, taken as proportional to the batch (docs/method.md § Convergence)."""
    return steps * step_seconds * (global_batch / roofline_batch) / 3600.0
