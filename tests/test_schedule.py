"""Evaluation points (schedule.py) and scoring at them (scoring.py): hand-checkable cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from untrac_ray.results import influence_table, matrix, with_points
from untrac_ray.schedule import eval_schedules, headline_point
from untrac_ray.scoring import MEAN_OVER_TESTS, pearson, score_table, spearman, summary
from untrac_ray.spec import UnlearnSpec

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
    # point 1: agrees with the truth on x, is constant on y (undefined correlation there)
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


def test_scores_per_point_flag_an_undefined_test_set_instead_of_dropping_it():
    scores = score_table(_table(), TRUTH)
    mean = scores[scores["test_set"] == MEAN_OVER_TESTS].set_index("point")
    # point 1: x is +1, y undefined (constant estimate): the mean is over x, flagged
    assert mean.loc[1, "pearson"] == pytest.approx(1.0) and mean.loc[1, "n_undefined"] == 1
    # point 2: x is -1, y is exactly linear in the truth: +1
    assert mean.loc[2, "pearson"] == pytest.approx(0.0) and mean.loc[2, "n_undefined"] == 0


def test_the_headline_is_the_fixed_point_and_the_best_point_is_hindsight():
    scores = score_table(_table(), TRUTH)
    last = summary(scores).iloc[0]
    assert last["point"] == 2 and last["pearson_mean"] == pytest.approx(0.0)
    assert last["best_point"] == 1 and last["pearson_mean_best"] == pytest.approx(1.0)
    assert last["undefined"] == ""
    named = summary(scores, {"untrac": 1}).iloc[0]
    assert named["point"] == 1 and named["undefined"] == "y"


def test_one_correlation_nan_in_nan_out():
    assert pearson(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 7.0])) == pytest.approx(
        np.corrcoef([1, 2, 3], [2, 4, 7])[0, 1])
    assert math.isnan(pearson(np.array([1.0, 2.0]), np.array([3.0, 3.0])))
    assert math.isnan(pearson(np.array([1.0, np.nan, 3.0]), np.array([1.0, 2.0, 3.0])))
    assert spearman(np.array([1.0, 5.0, 3.0]), np.array([10.0, 30.0, 20.0])) == 1.0
