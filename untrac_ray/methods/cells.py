"""A method's results as cells of the influence table: one row per (method, evaluation point,
training set, test set) with the influence and the losses before and after. Every method yields
such rows; results/tables.py sorts them into the table and its matrices.
"""

from __future__ import annotations

import numpy as np

from untrac_ray.methods.tasks import TaskResult

COLUMNS = ["method", "point", "step", "train_set", "test_set", "influence", "loss_before",
           "loss_after"]
# `point` lines trajectories up (methods/schedule.py): the same progress through every set's
# schedule. `step` is the absolute step of the unlearned set at that point. Methods without a
# trajectory (LDO and the gradient baselines) have point 0 and step 0.


def unlearning_cells(method: str, forget: str, point: int, step: int, losses: dict[str, float],
                     base_losses: dict[str, float]) -> list[dict]:
    """The cells of one evaluation point of one unlearning trajectory: loss after minus loss
    before, for every evaluated set.

    UnTrac forgets a training set and measures test sets; UnTrac-Inv forgets a test set and
    measures training sets. Either way a cell is indexed by (train set, test set).
    """
    rows = []
    for evaluated, loss in losses.items():
        train, test = (forget, evaluated) if method == "untrac" else (evaluated, forget)
        before = base_losses[evaluated]
        rows.append({
            "method": method, "point": point, "step": step, "train_set": train,
            "test_set": test, "influence": loss - before, "loss_before": before,
            "loss_after": loss,
        })
    return rows


def influence_rows(result: TaskResult, base_losses: dict[str, float]) -> list[dict]:
    """The cells of one unlearning task at every evaluation point of its schedule."""
    task = result.task  # an UnlearnTask
    stopped = result.payload.get("stopped_at") if isinstance(result.payload, dict) else None
    rows = []
    for point, step in enumerate(task.schedule, start=1):
        # a run stopped by its loss rise has one point, at the step where it stopped
        rows += unlearning_cells(task.method, task.forget, point, int(stopped or step),
                                 result.losses[step], base_losses)
    return rows


def cell(method, train, test, influence, before=np.nan, after=np.nan) -> dict:
    """A cell of a method without a trajectory (point 0, step 0)."""
    return {"method": method, "point": 0, "step": 0, "train_set": train, "test_set": test,
            "influence": float(influence), "loss_before": float(before),
            "loss_after": float(after)}


def average_members(rows: list[dict]) -> list[dict]:
    """The cells of an ensemble's members averaged per (method, point, train set, test set):
    influence, loss after and (for runs stopped by their loss) the step."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["point"], row["train_set"], row["test_set"]),
                          []).append(row)
    out = []
    for cells in groups.values():
        cell = dict(cells[0])
        for name in ("influence", "loss_after"):
            cell[name] = float(np.mean([c[name] for c in cells]))
        cell["step"] = int(round(np.mean([c["step"] for c in cells])))
        out.append(cell)
    return out
