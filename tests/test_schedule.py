"""Evaluation points (schedule.py) and scoring at them (results/scores.py): hand-checkable
cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from untrac_ray.inputs.spec_methods import UnlearnSpec
from untrac_ray.methods.schedule import eval_schedules, headline_point
from untrac_ray.results.score_views import best_point, headline_rows
from untrac_ray.results.scores import score_frame
from untrac_ray.results.scoring import (
    MEAN_OVER_TESTS,
    group_mean,
    largest_cells,
    pearson,
    signs_right,
    spearman,
)
from untrac_ray.results.tables import influence_table, matrix, with_points

# The case: dataset A's training sets cut to 256, 64, 128 and 32 rows, batch 8.
SIZES = {"SimSame": 256, "SimDiff": 64, "DisSame": 128, "DisDiff": 32}


def test_eval_points_are_progress_through_each_sets_own_schedule():
    s = UnlearnSpec(batch_size=8, epochs=1, eval_points=4)
    assert eval_schedules(s, SIZES) == {
        "SimSame": (8, 16, 24, 32), "SimDiff": (2, 4, 6, 8),
        "DisSame": (4, 8, 12, 16), "DisDiff": (1, 2, 3, 4),
    }


def test_a_set_shorter_than_the_points_repeats_steps_but_ends_at_its_last():
    s = UnlearnSpec(batch_size=1, epochs=1, eval_points=8)
    assert eval_schedules(s, {"tiny": 3, "big": 16}) == {
        "tiny": (1, 1, 2, 2, 2, 3, 3, 3), "big": (2, 4, 6, 8, 10, 12, 14, 16)}


def test_absolute_steps_are_read_on_the_longest_set_and_scaled_for_the_others():
    every = UnlearnSpec(batch_size=8, epochs=1, eval_every=8)
    assert eval_schedules(every, SIZES) == {
        "SimSame": (8, 16, 24, 32), "SimDiff": (2, 4, 6, 8),
        "DisSame": (4, 8, 12, 16), "DisDiff": (1, 2, 3, 4),
    }
    # equal sizes: exactly the steps named, and the last step always
    named = UnlearnSpec(batch_size=8, epochs=1, eval_steps=[3, 5])
    assert eval_schedules(named, {"a": 64, "b": 64}) == {"a": (3, 5, 8), "b": (3, 5, 8)}
    # max_steps makes every trajectory equally long whatever the sizes
    fixed = UnlearnSpec(batch_size=8, max_steps=6, eval_every=2)
    assert set(eval_schedules(fixed, SIZES).values()) == {(2, 4, 6)}


def test_headline_point_is_the_last_unless_the_spec_names_one():
    assert headline_point(UnlearnSpec(eval_points=8), 8) == 8
    assert headline_point(UnlearnSpec(eval_points=8, score_point=3), 8) == 3
    with pytest.raises(ValueError, match="score_point: 9 is beyond"):
        headline_point(UnlearnSpec(eval_every=1, score_point=9), 4)


def test_tables_of_older_runs_get_points_from_their_steps():
    old = pd.DataFrame({"method": ["untrac"] * 4 + ["ldo"], "step": [8, 8, 16, 16, 0],
                        "influence": [1.0, 2.0, 3.0, 4.0, 5.0]})
    assert with_points(old)["point"].tolist() == [1, 1, 2, 2, 0]


def _cells(method, point, values, steps):
    return [{"method": method, "point": point, "step": steps[k], "train_set": k,
             "test_set": t, "influence": v, "loss_before": 0.0, "loss_after": v}
            for (k, t), v in values.items()]


TRAIN, TEST = ["a", "b", "c"], ["x", "y"]
TRUTH = pd.DataFrame({"x": [3.0, 2.0, 1.0], "y": [1.0, 2.0, 4.0]}, index=TRAIN)
STEPS = {"a": 32, "b": 8, "c": 4}


def _table():
    rows = []
    # point 1: agrees with the truth on x, is constant on y (no ranking there: 0)
    rows += _cells("untrac", 1, {("a", "x"): 0.3, ("b", "x"): 0.2, ("c", "x"): 0.1,
                                 ("a", "y"): 0.5, ("b", "y"): 0.5, ("c", "y"): 0.5},
                   {k: v // 2 for k, v in STEPS.items()})
    # point 2 (the last): reversed on x, right on y
    rows += _cells("untrac", 2, {("a", "x"): 0.1, ("b", "x"): 0.2, ("c", "x"): 0.3,
                                 ("a", "y"): 0.1, ("b", "y"): 0.2, ("c", "y"): 0.4}, STEPS)
    return influence_table(rows, TRAIN, TEST)


def test_the_final_matrix_lines_up_sets_of_different_lengths():
    mat = matrix(_table(), "untrac", None, TRAIN, TEST)
    assert mat.attrs["point"] == 2 and mat.attrs["steps"] == [4, 8, 32]
    assert not mat.isna().any().any()


def _means(frame):
    """The mean Pearson over test sets per point, with the test sets undefined there."""
    mean = frame[(frame["score"] == "pearson") & (frame["test_set"] == MEAN_OVER_TESTS)
                 & (frame["method"] == "untrac")]
    return mean.set_index("point")


def test_a_constant_estimate_scores_zero_and_a_constant_truth_is_named_undefined():
    frame = score_frame(_table(), TRAIN, TEST, truth=TRUTH, intervals=False)
    mean = _means(frame)
    # point 1: x is +1, y is constant: no ranking, 0, not dropped from the mean
    assert mean.loc[1, "value"] == pytest.approx(0.5) and mean.loc[1, "undefined"] == ""
    # point 2: x is -1, y is exactly linear in the truth: +1
    assert mean.loc[2, "value"] == pytest.approx(0.0) and mean.loc[2, "undefined"] == ""
    # a truth that is constant on y leaves y undefined: counted and named, the mean over x
    flat = TRUTH.assign(y=1.0)
    mean = _means(score_frame(_table(), TRAIN, TEST, truth=flat, intervals=False))
    assert mean.loc[1, "undefined"] == "y" and mean.loc[1, "value"] == pytest.approx(1.0)


def test_the_headline_is_the_fixed_point_and_the_best_point_is_hindsight():
    frame = score_frame(_table(), TRAIN, TEST, truth=TRUTH, intervals=False)
    top = headline_rows(frame)
    last = top[(top["method"] == "untrac") & (top["score"] == "pearson")].iloc[0]
    assert last["point"] == 2 and last["value"] == pytest.approx(0.0)
    assert best_point(frame, "untrac", "pearson") == (1, pytest.approx(0.5))
    named = headline_rows(score_frame(_table(), TRAIN, TEST, {"untrac": 1}, truth=TRUTH,
                                      intervals=False))
    named = named[(named["method"] == "untrac") & (named["score"] == "pearson")].iloc[0]
    assert named["point"] == 1 and named["value"] == pytest.approx(0.5)


def test_one_correlation_nan_in_nan_out():
    assert pearson(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 7.0])) == pytest.approx(
        np.corrcoef([1, 2, 3], [2, 4, 7])[0, 1])
    assert math.isnan(pearson(np.array([1.0, 2.0]), np.array([3.0, 3.0])))
    assert math.isnan(pearson(np.array([1.0, np.nan, 3.0]), np.array([1.0, 2.0, 3.0])))
    assert spearman(np.array([1.0, 5.0, 3.0]), np.array([10.0, 30.0, 20.0])) == 1.0


def test_the_mean_over_test_sets_averages_a_test_sets_subsets_first():
    per_test = {"a1": 1.0, "a2": 1.0, "b": 0.0}
    assert group_mean(per_test, None) == pytest.approx(2 / 3)  # three test sets
    assert group_mean(per_test, {"a1": "A", "a2": "A"}) == pytest.approx(0.5)  # (1 + 0) / 2
    # an undefined subset is left out of its group's mean, not counted as zero
    assert group_mean({"a1": np.nan, "a2": 1.0, "b": 0.0}, {"a1": "A", "a2": "A"}) == 0.5
    assert math.isnan(group_mean({"a1": np.nan}, {"a1": "A"}))


def test_score_table_uses_the_groups_for_its_mean():
    train = ["p", "q", "r"]
    truth = pd.DataFrame({"a1": [1.0, 2.0, 3.0], "a2": [3.0, 1.0, 2.0], "b": [1.0, 2.0, 3.0]},
                         index=train)
    estimate = truth.copy()
    estimate["b"] = -truth["b"]  # a1, a2 right (+1), b reversed (-1)
    rows = [{"method": "untrac", "point": 1, "train_set": t, "test_set": s,
             "influence": estimate.loc[t, s]} for t in train for s in truth.columns]
    table = pd.DataFrame(rows)

    def mean(groups):
        frame = score_frame(table, train, list(truth.columns), groups=groups, truth=truth,
                            intervals=False)
        return _means(frame)["value"].item()

    assert mean(None) == pytest.approx(1 / 3)  # (1 + 1 - 1) / 3
    assert mean({"a1": "A", "a2": "A"}) == pytest.approx(0.0)  # (1 - 1) / 2


def test_the_largest_cells_are_the_top_helper_and_harmer_of_each_test_beyond_the_floor():
    truth = pd.DataFrame({"t": [0.5, -0.2, 0.01], "u": [0.03, 0.02, 0.3]},
                         index=["help", "harm", "none"])
    assert largest_cells(truth) == [("help", "t"), ("harm", "t"), ("none", "u")]
    # test u has no negative cell: only its top one counts
    assert largest_cells(truth, 0.25) == [("help", "t"), ("none", "u")]  # -0.2 is within 0.25
    floor = pd.DataFrame({"t": [0.1, 0.1, 0.1], "u": [0.1, 0.1, 0.5]}, index=truth.index)
    assert largest_cells(truth, floor) == [("help", "t"), ("harm", "t")]  # u's 0.3 < 0.5
    estimate = pd.DataFrame({"t": [0.9, 0.4, 0.0], "u": [0.0, 0.0, 0.1]}, index=truth.index)
    # UnTrac's typical miss: every cell positive, so the harmful set gets the wrong sign
    assert signs_right(estimate, truth, largest_cells(truth)) == (2, 3)
    assert signs_right(estimate, truth, []) == (0, 0)
