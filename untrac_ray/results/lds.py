"""The linear datamodeling score (LDS) at the level of datasets: how well a method's cells
predict the test losses of models retrained on random subsets of the training sets.

methods/plans.plan_lds retrains the base model on M random subsets (each training set kept
with probability alpha) and records every retrained model's loss on every test set. An
estimate's cells are read as a linear datamodel: the loss of test set j after training on
subset S moves from the full model's by the sum of the cells of the sets S leaves out,

    predicted_j(S) = sum over k not in S of influence[k, j]

(a cell is "loss without k minus loss with k", so leaving k out adds it). The score of test
set j is the Spearman correlation between predicted_j(S) and the measured loss over the M
subsets (the constant full-model loss drops out of a rank correlation); the headline is the
mean over test sets (the subsets of a test set averaged first, as scoring.group_mean does),
with a 95% bootstrap interval over the subsets. LDO's own cells are scored too: the best a
"one set at a time" predictor does, which shows how additive the influences are.

The ceiling: `noise_subsets` subsets are retrained once more under another seed. Half the
mean squared difference of their losses is one seed's noise variance; the truth is a mean over
n seeds, so a predictor that knew each subset's expected loss exactly would reach at most
sqrt(1 - noise / (n * variance over subsets)) (Pearson's attenuation; Spearman follows it
closely). With a few repeated subsets this is rough; it says whether an LDS gap is signal.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from untrac_ray.methods.plans import KEPT_SEPARATOR
from untrac_ray.results.scoring import (
    MEAN_OVER_TESTS,
    SUMMARY_COLUMNS,
    group_mean,
    spearman_rows,
)

LDS_SCORE_COLUMNS = ["method", "point", "test_set", "lds", "n"]
LDS_SUMMARY_COLUMNS = ["method", "point", "lds", "lds_low", "lds_high", "lds_ceiling", "lds_n"]


def subset_truth(subsets: pd.DataFrame, train: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """The measured losses (subset x test set, the mean over the truth's seeds) and which
    training sets each subset left out (subset x train, bool), from plan_lds's rows."""
    truth_rows = subsets[subsets["role"] == "truth"]
    losses = truth_rows.pivot_table(index="subset", columns="test_set", values="loss",
                                    aggfunc="mean").sort_index()
    kept = truth_rows.groupby("subset")["kept"].first().reindex(losses.index)
    left_out = np.array([[name not in str(k).split(KEPT_SEPARATOR) for name in train]
                         for k in kept])
    return losses, left_out


def predictions(estimate: pd.DataFrame, left_out: np.ndarray, train: list[str],
                test: list[str]) -> np.ndarray:
    """predicted[s, j]: the sum of the estimate's cells (train x test) of the training sets
    subset s leaves out (a cell missing from the estimate counts as NaN)."""
    cells = estimate.reindex(index=train, columns=test).to_numpy(dtype=float)
    return left_out.astype(float) @ cells


def _mean_over_tests(per_test: np.ndarray, test: list[str],
                     groups: Mapping[str, str] | None) -> np.ndarray:
    """group_mean over the last axis of per_test (one column per test set), for each row."""
    return np.array([group_mean(dict(zip(test, row, strict=True)), groups)
                     for row in np.atleast_2d(per_test)])


def lds_scores(table: pd.DataFrame, subsets: pd.DataFrame, train: list[str],
               groups: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The LDS of every method in `table` (estimates and LDO) at every point it recorded: per
    test set and their mean (`MEAN_OVER_TESTS`)."""
    losses, left_out = subset_truth(subsets, train)
    test = [str(c) for c in losses.columns]
    measured = losses.to_numpy(dtype=float)
    out = []
    for (method, point), rows in table.groupby(["method", "point"], sort=False):
        est = rows.pivot_table(index="train_set", columns="test_set", values="influence")
        pred = predictions(est, left_out, train, test)
        per_test = spearman_rows(pred.T, measured.T)
        for j, name in enumerate(test):
            out.append([method, int(point), name, float(per_test[j]), len(measured)])
        out.append([method, int(point), MEAN_OVER_TESTS,
                    float(_mean_over_tests(per_test, test, groups)[0]), len(measured)])
    return pd.DataFrame(out, columns=LDS_SCORE_COLUMNS)


def bootstrap_interval(pred: np.ndarray, measured: np.ndarray, test: list[str],
                       groups: Mapping[str, str] | None, resamples: int = 1000,
                       seed: int = 0) -> tuple[float, float]:
    """The 95% interval of the mean LDS over test sets, resampling the subsets with
    replacement (percentiles of `resamples` draws; resamples where it is undefined dropped)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(measured), size=(resamples, len(measured)))
    per_test = np.stack([spearman_rows(pred[picks, j], measured[picks, j])
                         for j in range(len(test))], axis=1)  # resamples x test sets
    means = _mean_over_tests(per_test, test, groups)
    means = means[~np.isnan(means)]
    if not len(means):
        return float("nan"), float("nan")
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def ceiling(subsets: pd.DataFrame, groups: Mapping[str, str] | None = None
            ) -> tuple[float, dict[str, float]]:
    """The highest LDS a perfect predictor could reach given the seed noise of the truth
    (the module's docstring), the mean over test sets and per test set; NaN without
    repeated subsets."""
    truth_rows = subsets[subsets["role"] == "truth"]
    noise_rows = subsets[subsets["role"] == "noise"]
    if noise_rows.empty:
        return float("nan"), {}
    first = truth_rows["seed"].iloc[0]
    n_seeds = truth_rows["seed"].nunique()
    losses = truth_rows.pivot_table(index="subset", columns="test_set", values="loss",
                                    aggfunc="mean")
    a = truth_rows[truth_rows["seed"] == first].pivot_table(index="subset",
                                                            columns="test_set", values="loss")
    b = noise_rows.pivot_table(index="subset", columns="test_set", values="loss")
    a = a.reindex(index=b.index, columns=b.columns)
    per_test = {}
    for name in b.columns:
        noise = float(np.mean((a[name] - b[name]) ** 2) / 2)
        spread = float(losses[name].var(ddof=1))
        per_test[str(name)] = (float(np.sqrt(max(0.0, 1 - noise / (n_seeds * spread))))
                               if spread > 0 else float("nan"))
    return group_mean(per_test, groups), per_test


def lds_summary(table: pd.DataFrame, subsets: pd.DataFrame, train: list[str],
                headline: Mapping[str, int] | None = None,
                groups: Mapping[str, str] | None = None, resamples: int = 1000
                ) -> pd.DataFrame:
    """Per method: its LDS (mean over test sets) at its point fixed in advance (`headline`,
    default its last), the bootstrap interval, and the ceiling (the same for every method)."""
    headline = headline or {}
    losses, left_out = subset_truth(subsets, train)
    test = [str(c) for c in losses.columns]
    measured = losses.to_numpy(dtype=float)
    top, _ = ceiling(subsets, groups)
    scores = lds_scores(table, subsets, train, groups)
    rows = []
    for method in dict.fromkeys(table["method"]):
        points = table.loc[table["method"] == method, "point"]
        point = int(headline.get(str(method), points.max()))
        rows_at = table[(table["method"] == method) & (table["point"] == point)]
        est = rows_at.pivot_table(index="train_set", columns="test_set", values="influence")
        pred = predictions(est, left_out, train, test)
        low, high = bootstrap_interval(pred, measured, test, groups, resamples)
        mine = scores[(scores["method"] == method) & (scores["point"] == point)
                      & (scores["test_set"] == MEAN_OVER_TESTS)]
        rows.append([method, point, float(mine["lds"].iloc[0]), low, high, top,
                     len(measured)])
    return pd.DataFrame(rows, columns=LDS_SUMMARY_COLUMNS)


def with_lds(summary: pd.DataFrame | None, lds: pd.DataFrame) -> pd.DataFrame:
    """The score summary (scoring.summary) with each method's LDS columns; a job with LDS
    and no LDO gets a summary of the LDS columns alone (LDO's own LDS row is kept apart:
    it is a ground truth, not an estimate)."""
    estimates = lds[lds["method"] != "ldo"].reset_index(drop=True)
    if summary is None:
        summary = pd.DataFrame({c: estimates[c] if c in ("method", "point") else np.nan
                                for c in SUMMARY_COLUMNS})
        summary["undefined"] = ""
    return summary.merge(estimates.drop(columns="point"), on="method", how="left")
