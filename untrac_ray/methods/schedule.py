"""Evaluation points: how unlearning trajectories of different lengths line up.

One epoch of gradient ascent over a set takes as many steps as the set has batches, so the
trajectories of a job's sets differ in length (256 rows at batch 8: 32 steps; 32 rows: 4).
Every trajectory of a method is therefore evaluated at the same P *points*, point p standing
for the same progress through each set's own schedule; the absolute step of each set is kept
beside it. A matrix, a score or a figure "at point p" takes every set at its own step for p, so
the final matrix (point P, every set at its last step) is always complete.

Where the points lie:
- `eval_points: P`: point p at ceil(p/P * T) for a set of T steps.
- `eval_steps` / `eval_every` (absolute): read on the longest trajectory (T_max steps), whose
  named steps s_1 < ... < s_P (its last step always included) become the points; a set of T
  steps is evaluated at ceil(s_p/T_max * T). Equal-size sets: exactly the steps named.
- neither: one point, the last step.

A set shorter than P steps is evaluated at the same step for several points (it is measured
once there); its matrix cells repeat, which is what its trajectory is.
"""

from __future__ import annotations

from collections.abc import Mapping

from untrac_ray.inputs.spec_methods import UnlearnSpec


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def reference_points(settings: UnlearnSpec, longest: int) -> tuple[list[int], int]:
    """The points as fractions num/den of a schedule: (numerators, denominator)."""
    if settings.eval_points is not None:
        return list(range(1, settings.eval_points + 1)), settings.eval_points
    steps = {longest}
    if settings.eval_steps:
        steps.update(s for s in settings.eval_steps if s <= longest)
    if settings.eval_every:
        steps.update(range(settings.eval_every, longest + 1, settings.eval_every))
    return sorted(steps), longest


def eval_schedules(settings: UnlearnSpec, n_rows: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Per unlearned set, the step at which each point 1..P is evaluated (P is the same for
    every set; steps never decrease and the last one is the set's final step)."""
    totals = {name: settings.total_steps(n) for name, n in n_rows.items()}
    nums, den = reference_points(settings, max(totals.values()))
    return {name: tuple(max(1, _ceil_div(num * total, den)) for num in nums)
            for name, total in totals.items()}


def headline_point(settings: UnlearnSpec, points: int) -> int:
    """The point whose scores are reported as the headline: fixed in advance by the spec
    (score_point), else the last one. Raises ValueError when the spec names a missing point."""
    if settings.score_point is None:
        return points
    if settings.score_point > points:
        raise ValueError(f"score_point: {settings.score_point} is beyond the last of the "
                         f"{points} evaluation points")
    return settings.score_point
