"""What scoring stands on: the project's one Pearson and Spearman (row-wise, for the
bootstraps of results/scores.py, and of two vectors), Fisher's interval of a Pearson, the
ground truth's matrix and its seed noise, the mean over test sets (a test set's subsets
first), and the cell-level checks beside the correlations (the largest cells and their
signs, agreement between methods).

The score table itself, every score of every estimate with its reference rows, intervals and
ceilings, is results/scores.py's; this module computes no table of scores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from untrac_ray.inputs.errors import InputError
from untrac_ray.inputs.spec_sections import GROUND_TRUTH

ALL_CELLS = "__all__"
MEAN_OVER_TESTS = "__mean__"


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
