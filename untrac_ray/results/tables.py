"""The tidy influence table (every method's cells, methods/cells.py) in the spec's order of
sets, its matrices at an evaluation point, how a point is named, and the drill-down table."""

from __future__ import annotations

import numpy as np
import pandas as pd

from untrac_ray.methods.cells import COLUMNS


def influence_table(rows: list[dict], train: list[str], test: list[str]) -> pd.DataFrame:
    """Rows sorted by method, point, then the spec's order of training and test sets."""
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["train_set"] = pd.Categorical(df["train_set"], categories=train, ordered=True)
    df["test_set"] = pd.Categorical(df["test_set"], categories=test, ordered=True)
    df = df.sort_values(["method", "point", "train_set", "test_set"]).reset_index(drop=True)
    df["train_set"] = df["train_set"].astype(str)
    df["test_set"] = df["test_set"].astype(str)
    df["point"] = df["point"].astype(int)
    df["step"] = df["step"].astype(int)
    return df


def with_points(table: pd.DataFrame) -> pd.DataFrame:
    """A table read back from a run: runs logged before evaluation points existed (equal-size
    sets, aligned by step) get point = the rank of the step within its method (0 stays 0)."""
    if "point" in table.columns:
        return table
    table = table.copy()
    ranks = table.groupby("method")["step"].rank(method="dense").astype(int)
    has_zero = table.groupby("method")["step"].transform("min") == 0
    table.insert(1, "point", ranks - has_zero.astype(int))
    return table


def points_of(table: pd.DataFrame, method: str) -> list[int]:
    """The evaluation points a method recorded, in order."""
    return sorted(int(p) for p in table.loc[table["method"] == method, "point"].unique())


def matrix(
    table: pd.DataFrame, method: str, point: int | None = None,
    train: list[str] | None = None, test: list[str] | None = None,
) -> pd.DataFrame:
    """The train x test influence matrix of a method at a point (default: its last point).

    attrs hold the point and the absolute steps of its cells (one number when they agree)."""
    rows = table[table["method"] == method]
    if rows.empty:
        raise KeyError(f"no results for method {method!r}")
    point = int(rows["point"].max()) if point is None else point
    rows = rows[rows["point"] == point]
    if rows.empty:
        raise KeyError(f"method {method!r} has no point {point}")
    out = rows.pivot(index="train_set", columns="test_set", values="influence")
    if train is not None:
        out = out.reindex(index=train)
    if test is not None:
        out = out.reindex(columns=test)
    out.attrs["point"] = point
    out.attrs["steps"] = sorted(int(s) for s in rows["step"].unique())
    return out


METHOD_TITLES = {  # how a method is named to people: figures, the verdict, the report
    "untrac": "UnTrac", "untrac_inv": "UnTrac-Inv", "ldo": "Leave-dataset-out",
    "graddot": "GradDot", "gradcos": "GradCos", "tracin": "TracIn", "ekfac": "EK-FAC",
}


def method_title(method: str) -> str:
    """A method's name for people (UnTrac-Inv for untrac_inv; the score table's reference and
    ceiling rows by scores.ROW_TITLES; a calibration's variant untrac+kl as UnTrac + kl); an
    unknown one as it is."""
    from untrac_ray.results.scores import ROW_TITLES

    base, plus, variant = method.partition("+")
    if plus and base in METHOD_TITLES:
        return f"{METHOD_TITLES[base]} + {variant.replace('+', ' + ')}"
    return METHOD_TITLES.get(method, ROW_TITLES.get(method, method))


def by_mean_influence(mat: pd.DataFrame) -> pd.DataFrame:
    """A train x test matrix with its training sets from the largest mean influence over the
    test sets to the smallest (ties in their order): the order `show`, `run`, the heatmaps
    and the report all draw them in."""
    order = mat.mean(axis=1).sort_values(ascending=False, kind="stable").index
    return mat.loc[order]


def point_label(point: int, steps: list[int], points: int | None = None) -> str:
    """How a point is named to people: 'point 3/8 (step 24)', 'point 8/8 (steps 4-32)', or ''
    for a method without a trajectory."""
    if point == 0:
        return ""
    of = f"/{points}" if points else ""
    if len(steps) == 1:
        return f"point {point}{of} (step {steps[0]})"
    return f"point {point}{of} (steps {min(steps)}-{max(steps)})"


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
