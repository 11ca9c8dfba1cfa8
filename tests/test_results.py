"""The tidy influence table, its matrices and the figures drawn from it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from untrac_ray.inputs.spec_methods import UnlearnSpec
from untrac_ray.methods.cells import influence_rows
from untrac_ray.methods.tasks import TaskResult, UnlearnTask
from untrac_ray.results import plots
from untrac_ray.results.tables import influence_table, matrix

TRAIN, TEST = ["a", "b", "c"], ["x", "y"]
BASE = {"a": 1.0, "b": 2.0, "c": 3.0, "x": 10.0, "y": 20.0}


def _table():
    s = UnlearnSpec()
    rows = []
    for k, name in enumerate(TRAIN):  # UnTrac: forget a training set, evaluate test sets
        losses = {step: {"x": 10.0 + k + step, "y": 20.0 - k * step} for step in (1, 2)}
        rows += influence_rows(
            TaskResult(UnlearnTask("untrac", name, tuple(TEST), s, (1, 2)), losses), BASE)
    for j, name in enumerate(TEST):  # UnTrac-Inv: forget a test set, evaluate training sets
        losses = {5: {t: BASE[t] + 0.1 * (i + 1) * (j + 1) for i, t in enumerate(TRAIN)}}
        rows += influence_rows(
            TaskResult(UnlearnTask("untrac_inv", name, tuple(TRAIN), s, (5,)), losses), BASE)
    return influence_table(rows, TRAIN, TEST)


def test_cells_are_indexed_by_train_and_test_set_for_both_methods():
    table = _table()
    untrac = matrix(table, "untrac", 2, TRAIN, TEST)
    assert untrac.loc["c", "x"] == pytest.approx(2 + 2) and untrac.loc["c", "y"] == -4
    inv = matrix(table, "untrac_inv", None, TRAIN, TEST)
    assert inv.attrs["point"] == 1 and inv.attrs["steps"] == [5]
    assert inv.loc["b", "y"] == pytest.approx(0.1 * 2 * 2)
    assert list(inv.index) == TRAIN and list(inv.columns) == TEST
    with pytest.raises(KeyError, match="no point 7"):
        matrix(table, "untrac", 7)


def test_heatmap_draws_exactly_the_matrix_and_trajectory_a_line_per_training_set():
    table = _table()
    fig = plots.heatmap(table, "untrac", TRAIN, TEST)
    want = matrix(table, "untrac", 2, TRAIN, TEST)
    want = want.loc[want.mean(axis=1).sort_values(ascending=False, kind="stable").index]
    assert fig.heatmap_rows == list(want.index)  # largest mean influence first, as show
    assert np.array_equal(fig.heatmap_values, want.to_numpy())
    assert np.array_equal(fig.axes[0].images[0].get_array(), fig.heatmap_values)
    fig = plots.trajectory(table, "untrac", TRAIN, TEST)
    panels = [ax for ax in fig.axes if ax.lines]
    assert len(panels) == len(TEST)
    first = panels[0].get_lines()[: len(TRAIN)]
    assert [list(line.get_xdata()) for line in first] == [[0, 1, 2]] * 3


def _headline(method, score, value, low, high, margin_low, n=6, kind="estimate"):
    """One headline row of the score table (results/scores.py), as the runner writes it."""
    from untrac_ray.results.scores import COLUMNS

    row = {"method": method, "kind": kind, "point": 3, "headline": True, "score": score,
           "test_set": "__mean__", "value": value, "low": low, "high": high,
           "margin": value, "margin_low": margin_low, "margin_high": value + 0.1, "n": n,
           "undefined": ""}
    return pd.DataFrame([row], columns=COLUMNS)


def test_the_verdict_says_no_more_than_the_run_shows():
    from untrac_ray.results.scoring import pearson_interval
    from untrac_ray.results.verdict import HOW_TO_CHECK, verdict

    # Fisher's interval by hand: r = 0.9 over 6 points: tanh(atanh(0.9) -/+ 1.96 / sqrt(3))
    low, high = pearson_interval(0.9, 6)
    assert (round(low, 3), round(high, 3)) == (0.328, 0.989)
    assert pearson_interval(0.9, 3) is None  # too few points for an interval
    scores = pd.concat([
        _headline("untrac", "pearson", 0.9, low, high, 0.2),  # above the floor, wide
        _headline("untrac_inv", "pearson", 0.99, *pearson_interval(0.99, 6), 0.6),
        _headline("graddot", "pearson", 0.1, *pearson_interval(0.1, 6), -0.7),  # the floor's
    ])
    wide, tracks, not_at_all = verdict({}, scores)
    assert "[+0.33, +0.99] over 6 training sets" in wide and "only weakly" in wide
    assert "tracks leave-dataset-out on this job" in tracks  # 0.99 over 6: lower bound 0.91
    assert "no better than constant or random cells" in not_at_all
    few = _headline("untrac", "pearson", 0.9, float("nan"), float("nan"), 0.1, n=3)
    assert "too few training sets to tell" in verdict({}, few)[0]
    # a ceiling below the score, or below 0.5: the ground truth is too noisy to judge it
    noisy = pd.concat([scores.iloc[:1], _headline("ceiling", "pearson", 0.4, float("nan"),
                                                  float("nan"), float("nan"), kind="ceiling")])
    (line,) = verdict({}, noisy)
    assert "too noisy to judge" in line and "methods.ldo.seeds" in line and line.warning
    # without a ground truth: agreement (never called proof), and how to get one
    lines = verdict({"untrac_vs_untrac_inv": 0.2, "untrac_seeds": 0.95}, None)
    assert lines[0].startswith("UnTrac and UnTrac-Inv disagree (Pearson +0.20")
    assert "agreement alone does not show they are right" in lines[1]
    assert lines[-1] == HOW_TO_CHECK and "ldo" in HOW_TO_CHECK and "calibrate" in HOW_TO_CHECK
    # what is drawn as a warning: every line that says not to rely on the answer as it is
    assert [line.warning for line in (wide, tracks, not_at_all)] == [True, False, True]
    assert [line.warning for line in lines] == [True, False, False]
