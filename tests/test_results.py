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


def test_the_verdict_says_no_more_than_the_run_shows():
    from untrac_ray.results.verdict import HOW_TO_CHECK, pearson_interval, verdict

    # Fisher's interval by hand: r = 0.9 over 6 points: tanh(atanh(0.9) -/+ 1.96 / sqrt(3))
    low, high = pearson_interval(0.9, 6)
    assert (round(low, 3), round(high, 3)) == (0.328, 0.989)
    assert pearson_interval(0.9, 3) is None  # too few points for an interval
    summary = pd.DataFrame({"method": ["untrac", "untrac_inv", "graddot"],
                            "point": [3, 2, 0], "pearson_mean": [0.9, 0.99, 0.1]})
    wide, tracks, not_at_all = verdict({}, summary, 6)[:2] + verdict({}, summary, 6)[2:]
    assert "[+0.33, +0.99] over 6 training sets" in wide and "interval is wide" in wide
    assert "tracks retraining on this job" in tracks  # 0.99 over 6: lower bound 0.91
    assert "does not track retraining here" in not_at_all
    assert "too few training sets to tell" in verdict({}, summary, 3)[0]
    # without a ground truth: agreement (never called proof), and how to get one
    lines = verdict({"untrac_vs_untrac_inv": 0.2, "untrac_seeds": 0.95}, None, 6)
    assert lines[0].startswith("UnTrac and UnTrac-Inv disagree (Pearson +0.20")
    assert "agreement alone does not show they are right" in lines[1]
    assert lines[-1] == HOW_TO_CHECK and "ldo" in HOW_TO_CHECK and "compare" in HOW_TO_CHECK
    # what is drawn as a warning: every line that says not to rely on the answer as it is
    assert [line.warning for line in (wide, tracks, not_at_all)] == [True, False, True]
    assert [line.warning for line in lines] == [True, False, False]
