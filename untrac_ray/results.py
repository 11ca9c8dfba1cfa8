"""Influence results as a tidy table (method, step, train set, test set, influence) and matrices."""

from __future__ import annotations

import numpy as np
import pandas as pd

from untrac_ray.workbench import TaskResult, UnlearnTask

COLUMNS = ["method", "step", "train_set", "test_set", "influence", "loss_before", "loss_after"]


def influence_rows(result: TaskResult, base_losses: dict[str, float]) -> list[dict]:
    """The cells of one unlearning task: loss after minus loss before, for every eval step.

    UnTrac forgets a training set and measures test sets; UnTrac-Inv forgets a test set and
    measures training sets. Either way a cell is indexed by (train set, test set).
    """
    task = result.task
    assert isinstance(task, UnlearnTask)
    rows = []
    for step, losses in sorted(result.losses.items()):
        for evaluated, loss in losses.items():
            train, test = (
                (task.forget, evaluated) if task.method == "untrac" else (evaluated, task.forget)
            )
            before = base_losses[evaluated]
            rows.append({
                "method": task.method, "step": step, "train_set": train, "test_set": test,
                "influence": loss - before, "loss_before": before, "loss_after": loss,
            })
    return rows


def influence_table(rows: list[dict], train: list[str], test: list[str]) -> pd.DataFrame:
    """Rows sorted by method, step, then the spec's order of training and test sets."""
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["train_set"] = pd.Categorical(df["train_set"], categories=train, ordered=True)
    df["test_set"] = pd.Categorical(df["test_set"], categories=test, ordered=True)
    df = df.sort_values(["method", "step", "train_set", "test_set"]).reset_index(drop=True)
    df["train_set"] = df["train_set"].astype(str)
    df["test_set"] = df["test_set"].astype(str)
    df["step"] = df["step"].astype(int)
    return df


def matrix(
    table: pd.DataFrame, method: str, step: int | None = None,
    train: list[str] | None = None, test: list[str] | None = None,
) -> pd.DataFrame:
    """The train x test influence matrix of a method at a step (default: its last step)."""
    rows = table[table["method"] == method]
    if rows.empty:
        raise KeyError(f"no results for method {method!r}")
    step = int(rows["step"].max()) if step is None else step
    rows = rows[rows["step"] == step]
    if rows.empty:
        raise KeyError(f"method {method!r} has no step {step}")
    out = rows.pivot(index="train_set", columns="test_set", values="influence")
    if train is not None:
        out = out.reindex(index=train)
    if test is not None:
        out = out.reindex(columns=test)
    out.attrs["step"] = step
    return out


def top_examples(
    base_rows: dict[str, np.ndarray],
    after_rows: dict[str, dict[str, np.ndarray]],
    indices: dict[str, np.ndarray],
    decode,
    top: int,
    method: str = "untrac_inv",
) -> pd.DataFrame:
    """The drill-down of UnTrac-Inv: per (training set, test set), the training rows whose loss
    rose most when the test set was unlearned.

    base_rows[train] and after_rows[test][train] hold per-row losses of the evaluated rows
    `indices[train]`; `decode(train, row)` gives a row's text.
    """
    out = []
    for test_set, by_train in after_rows.items():
        for train_set, after in by_train.items():
            change = after - base_rows[train_set]
            order = np.argsort(-change, kind="stable")[:top]
            for rank, i in enumerate(order, start=1):
                row = int(indices[train_set][i])
                out.append({"method": method, "train_set": train_set, "test_set": test_set,
                            "rank": rank, "row": row, "text": decode(train_set, row),
                            "loss_change": float(change[i])})
    return pd.DataFrame(out, columns=["method", "train_set", "test_set", "rank", "row", "text",
                                      "loss_change"])
