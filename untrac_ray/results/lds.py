"""The linear datamodeling score (LDS) at the level of datasets, its ground-truth side: the
losses of the models retrained on subsets of the training sets, what an estimate predicts for
them, and the ceiling their seed noise leaves. results/scores.py scores every estimate with it.

methods/plans.plan_lds retrains the base model on M distinct subsets of the training sets,
each of exactly round(alpha x K) sets (plans.draw_subsets; subsets of one size, so that a
prediction cannot track the truth by counting the sets left out), and records every retrained
model's loss on every test set. An estimate's cells are read as a linear datamodel: the loss
of test set j after training on subset S moves from the full model's by the sum of the cells
of the sets S leaves out,

    predicted_j(S) = sum over k not in S of influence[k, j]

(a cell is "loss without k minus loss with k", so leaving k out adds it). The score of test
set j is the Spearman correlation between predicted_j(S) and the measured loss over the M
subsets (the constant full-model loss drops out of a rank correlation).

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

from untrac_ray.inputs.spec_sections import KEPT_SEPARATOR
from untrac_ray.results.scoring import group_mean


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
