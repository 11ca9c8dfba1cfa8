"""Scoring estimates against the ground truth (leave-dataset-out): Pearson and Spearman
correlation per test set (over the training sets), their mean, and pooled over all cells, at
every evaluation point of every method (methods/schedule.py: points line trajectories up).

The headline score of a method is the one at a point fixed in advance (the last, or the spec's
score_point), never the best point in hindsight: that is chosen against the very ground truth
it is scored on. The best point is kept beside it, labelled as hindsight. A test set whose
correlation is undefined (a constant estimate or truth) is counted in `n_undefined` and named
in the summary, not dropped silently.

This module holds the project's one Pearson and Spearman implementation (row-wise, for the
bootstrap of results/lds.py, and of two vectors), and the interval of a Pearson.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from untrac_ray.inputs.errors import InputError, UntracError
from untrac_ray.inputs.spec_sections import GROUND_TRUTH

ALL_CELLS = "__all__"
MEAN_OVER_TESTS = "__mean__"
SCORE_COLUMNS = ["method", "point", "test_set", "pearson", "spearman", "n", "n_undefined"]


def pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of x with the same row of y (2-D arrays of one shape):
    NaN for a row that is constant on either side, has a NaN, or has fewer than 2 points."""
    x, y = np.atleast_2d(np.asarray(x, dtype=float)), np.atleast_2d(np.asarray(y, dtype=float))
    if x.shape[1] < 2:
        return np.full(x.shape[0], np.nan)
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    constant = (np.ptp(x, axis=1) == 0) | (np.ptp(y, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):  # one sqrt: equal rows give exactly 1
        r = (xc * yc).sum(axis=1) / np.sqrt((xc**2).sum(axis=1) * (yc**2).sum(axis=1))
    return np.where(constant, np.nan, np.clip(r, -1.0, 1.0))


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each row of x with the same row of y (average ranks for
    ties; a row with a NaN gives NaN)."""
    from scipy.stats import rankdata

    x, y = np.atleast_2d(np.asarray(x, dtype=float)), np.atleast_2d(np.asarray(y, dtype=float))
    bad = np.isnan(x).any(axis=1) | np.isnan(y).any(axis=1)
    r = pearson_rows(rankdata(x, axis=1), rankdata(y, axis=1))
    return np.where(bad, np.nan, r)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant or there are fewer than 2 points
    (a NaN value on either side gives NaN: nothing is dropped)."""
    return float(pearson_rows(np.ravel(x)[None], np.ravel(y)[None])[0])


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    return float(spearman_rows(np.ravel(x)[None], np.ravel(y)[None])[0])


def pearson_interval(r: float, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The 95% interval of a Pearson correlation over n points (Fisher's z); None for n < 4
    or an undefined r."""
    if n < 4 or r != r:
        return None
    center = math.atanh(max(min(r, 0.999999), -0.999999))
    half = z / math.sqrt(n - 3)
    return math.tanh(center - half), math.tanh(center + half)


def truth_matrix(table: pd.DataFrame) -> pd.DataFrame:
    """The ground-truth matrix (train x test) from a tidy table holding `ldo` rows."""
    rows = table[table["method"] == GROUND_TRUTH]
    if rows.empty:
        raise InputError("no leave-dataset-out (ldo) results to score against")
    return rows.pivot_table(index="train_set", columns="test_set", values="influence")


def ground_truth_noise(ldo_seeds: pd.DataFrame) -> dict[str, float]:
    """How far a ground truth averaged over LDO seeds stands above its seed noise.

    `ldo_seeds` has one row per (seed, train_set, test_set) and an `influence` column.
    signal: the spread of the mean LDO vector over the training sets (std per test set,
    averaged); cell_std: the typical per-cell std over the seeds (root mean square);
    snr = signal / cell_std (one seed's noise); snr_mean = snr * sqrt(seeds) (the noise of the
    mean over the seeds, the ground truth actually scored against); n: the number of seeds.
    """
    truth = ldo_seeds.pivot_table(index="train_set", columns="test_set", values="influence",
                                  aggfunc="mean")
    n = int(ldo_seeds["seed"].nunique())
    signal = float(truth.std(axis=0, ddof=1).mean())
    if n < 2:
        return {"signal": signal, "cell_std": np.nan, "snr": np.nan, "snr_mean": np.nan, "n": n}
    cell_std = ldo_seeds.groupby(["train_set", "test_set"])["influence"].std(ddof=1)
    typical = float(np.sqrt(np.mean(cell_std.to_numpy() ** 2)))
    snr = signal / typical if typical > 0 else float("inf")
    return {"signal": signal, "cell_std": typical, "snr": snr, "snr_mean": snr * float(np.sqrt(n)),
            "n": n}


def check_truth_matches(truth: pd.DataFrame, train: list[str], test: list[str],
                        origin: str) -> None:
    """Raise when a ground truth covers other training or test sets than the job."""
    if sorted(truth.index) != sorted(train) or sorted(truth.columns) != sorted(test):
        raise InputError(
            f"{origin}: its ground truth covers train sets {sorted(truth.index)} and test sets "
            f"{sorted(truth.columns)}, but this job has {sorted(train)} and {sorted(test)}"
        )


def group_mean(per_test: Mapping[str, float], groups: Mapping[str, str] | None) -> float:
    """The mean over test sets, as the paper averages: the subsets of one test set (`groups`:
    subset -> its test set) are averaged first, then the test sets; a test set without a group
    is its own. NaN values are left out (counted apart by the caller); NaN when all are."""
    groups = groups or {}
    by_group: dict[str, list[float]] = {}
    for test_set, value in per_test.items():
        if not np.isnan(value):
            by_group.setdefault(groups.get(test_set, test_set), []).append(float(value))
    if not by_group:
        return float("nan")
    return float(np.mean([np.mean(values) for values in by_group.values()]))


def score_table(table: pd.DataFrame, truth: pd.DataFrame,
                groups: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Scores of every method other than the ground truth, at every point it recorded. The
    mean over test sets averages the subsets of a test set first (`groups`, see group_mean)."""
    out = []
    estimates = table[table["method"] != GROUND_TRUTH]
    for (method, point), rows in estimates.groupby(["method", "point"], sort=False):
        est = rows.pivot_table(index="train_set", columns="test_set", values="influence")
        est = est.reindex(index=truth.index, columns=truth.columns)
        ps, ss = {}, {}
        for test_set in truth.columns:
            x, y = est[test_set].to_numpy(), truth[test_set].to_numpy()
            ps[test_set], ss[test_set] = pearson(x, y), spearman(x, y)
            out.append([method, int(point), test_set, ps[test_set], ss[test_set], len(x),
                        int(np.isnan(ps[test_set]))])
        out.append([method, int(point), MEAN_OVER_TESTS, group_mean(ps, groups),
                    group_mean(ss, groups), len(truth.columns),
                    int(np.isnan(list(ps.values())).sum())])
        x, y = est.to_numpy().ravel(), truth.to_numpy().ravel()
        p = pearson(x, y)
        out.append([method, int(point), ALL_CELLS, p, spearman(x, y), x.size, int(np.isnan(p))])
    return pd.DataFrame(out, columns=SCORE_COLUMNS)


def largest_cells(truth: pd.DataFrame, floor: float | pd.DataFrame = 0.0
                  ) -> list[tuple[str, str]]:
    """The cells whose sign matters most: per test set, the training set whose removal costs
    most (the largest ground-truth cell, a set that helps) and the one whose removal helps
    most (the smallest, a set that harms), each only where it stands beyond `floor` (a
    scalar, or one value per cell such as twice its standard error over LDO seeds)."""
    floors = (floor.reindex(index=truth.index, columns=truth.columns)
              if isinstance(floor, pd.DataFrame) else
              pd.DataFrame(float(floor), index=truth.index, columns=truth.columns))
    cells = []
    for test_set in truth.columns:
        column = truth[test_set].dropna()
        if column.empty:
            continue
        top, bottom = column.idxmax(), column.idxmin()
        if column[top] > floors.loc[top, test_set]:
            cells.append((top, test_set))
        if column[bottom] < -floors.loc[bottom, test_set]:
            cells.append((bottom, test_set))
    return cells


def signs_right(estimate: pd.DataFrame, truth: pd.DataFrame,
                cells: list[tuple[str, str]]) -> tuple[int, int]:
    """How many of `cells` the estimate gives the ground truth's sign (right, of all)."""
    right = sum(int(np.sign(estimate.loc[c]) == np.sign(truth.loc[c])) for c in cells)
    return right, len(cells)


SUMMARY_COLUMNS = ["method", "point", "pearson_mean", "pearson_low", "pearson_high",
                   "spearman_mean", "pearson_all_cells", "undefined", "best_point",
                   "pearson_mean_best"]


AGREEMENT_LOW = 0.5  # below this, two estimates of the same influences are called uncertain


def cells_at(table: pd.DataFrame, method: str, point: int | None = None) -> pd.Series:
    """A method's influence per (train set, test set) at `point` (default: its last)."""
    rows = table[table["method"] == method]
    point = int(rows["point"].max()) if point is None else point
    rows = rows[rows["point"] == point]
    return rows.set_index(["train_set", "test_set"])["influence"].sort_index()


def agreement_of(vectors: list[pd.Series]) -> float:
    """How well estimates of the same cells agree: the mean Pearson over every pair, taken
    over the cells all of them have (NaN with fewer than two)."""
    if len(vectors) < 2:
        return float("nan")
    frame = pd.concat(vectors, axis=1, join="inner").to_numpy(dtype=float)
    pairs = [pearson(frame[:, i], frame[:, j])
             for i in range(frame.shape[1]) for j in range(i + 1, frame.shape[1])]
    return float(np.mean(pairs))


def agreement(table: pd.DataFrame, headline: Mapping[str, int] | None = None) -> dict[str, float]:
    """The trust signal of a run without a ground truth: UnTrac against UnTrac-Inv, Pearson
    over all cells, each at its point fixed in advance (`headline`, default the last). Two
    methods that estimate the same influences and disagree make both uncertain."""
    headline = headline or {}
    methods = set(table["method"])
    if not {"untrac", "untrac_inv"} <= methods:
        return {}
    pair = [cells_at(table, m, headline.get(m)) for m in ("untrac", "untrac_inv")]
    return {"untrac_vs_untrac_inv": agreement_of(pair)}


def ensemble_agreement(members: list[list[dict]], method: str, point: int) -> float:
    """The trust signal of an ensemble (a method unlearned under several seeds): how well its
    members' cells agree at `point` (agreement_of over the members)."""
    return agreement_of([cells_at(pd.DataFrame(rows), method, point) for rows in members])


def summary(scores: pd.DataFrame, headline: Mapping[str, int] | None = None) -> pd.DataFrame:
    """Per method: the scores at the headline point (fixed in advance: `headline[method]`,
    default the method's last point), the test sets whose Pearson is undefined there, and the
    best point by mean Pearson with its score (hindsight: chosen on the ground truth).
    pearson_low/high: the 95% interval of the mean Pearson, Fisher's for a correlation over
    the training sets (pearson_interval; NaN with fewer than 4)."""
    rows = []
    headline = headline or {}
    mean = scores[scores["test_set"] == MEAN_OVER_TESTS]
    pooled = scores[scores["test_set"] == ALL_CELLS].set_index(["method", "point"])
    per_test = scores[~scores["test_set"].isin([MEAN_OVER_TESTS, ALL_CELLS])]
    for method, part in mean.groupby("method", sort=False):
        part = part.sort_values("point").set_index("point", drop=False)
        point = int(headline.get(str(method), part["point"].iloc[-1]))
        if point not in part.index:
            raise UntracError(f"{method}: no scores at point {point} (points: "
                              f"{', '.join(map(str, part.index))})")
        at = part.loc[point]
        valid = part.dropna(subset=["pearson"])
        best = valid.loc[valid["pearson"].idxmax()] if not valid.empty else at
        bad = per_test[(per_test["method"] == method) & (per_test["point"] == point)
                       & per_test["pearson"].isna()]
        n_train = int(per_test.loc[(per_test["method"] == method)
                                   & (per_test["point"] == point), "n"].max())
        low, high = pearson_interval(float(at["pearson"]), n_train) or (np.nan, np.nan)
        rows.append({
            "method": method,
            "point": point,
            "pearson_mean": at["pearson"],
            "pearson_low": low,
            "pearson_high": high,
            "spearman_mean": at["spearman"],
            "pearson_all_cells": pooled.loc[(method, point), "pearson"],
            "undefined": ",".join(map(str, bad["test_set"])),
            "best_point": int(best["point"]),
            "pearson_mean_best": best["pearson"],
        })
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
