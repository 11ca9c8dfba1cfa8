"""The linear datamodeling score at the level of datasets (methods.lds) and the one score
table (results/scores.py): subsets of one size, the prediction of a linear datamodel, a ruler
that a constant or random estimate does not pass (reference rows, paired intervals), undefined
test sets named, the ceiling, the verdict; then a job with LDS through the CLI, killed with
SIGKILL and resumed like LDO, its scores in run, show, compare, the report and MLflow."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from conftest import merge, tiny_spec, with_four_train_sets
from untrac_ray.cli import app
from untrac_ray.inputs.spec_sections import KEPT_SEPARATOR
from untrac_ray.methods.plans import draw_subsets
from untrac_ray.results.lds import ceiling, predictions
from untrac_ray.results.score_views import headline_rows
from untrac_ray.results.scores import (
    CONSTANT,
    RANDOM,
    paired_difference,
    score_frame,
)
from untrac_ray.results.scoring import MEAN_OVER_TESTS, pearson_rows, spearman_rows

TRAIN = ["a", "b", "c, d", "e", "f", "g"]  # a name may hold a comma
TEST = ["x", "y"]


def test_subsets_are_distinct_of_one_size_and_seeded():
    subsets = draw_subsets(TRAIN, 32, 0.5, seed=0)
    assert len(subsets) == math.comb(6, 3) == len(set(subsets))  # all 20, fewer than asked
    assert {len(s) for s in subsets} == {3}  # exactly round(0.5 x 6) sets kept
    assert subsets == draw_subsets(TRAIN, 32, 0.5, seed=0)  # a resumed job draws the same
    assert subsets != draw_subsets(TRAIN, 32, 0.5, seed=1)  # another order
    assert all(list(s) == [n for n in TRAIN if n in s] for s in subsets)  # the spec's order
    many = [f"s{i}" for i in range(16)]
    for keep, size in ((0.2, 3), (0.5, 8), (0.8, 13)):
        drawn = draw_subsets(many, 300, keep, seed=0)
        assert len(drawn) == len(set(drawn)) == 300 and {len(s) for s in drawn} == {size}
    assert {len(s) for s in draw_subsets(["a", "b", "c", "d", "e"], 9, 0.5, 0)} == {3}


def _additive(effects: np.ndarray, subsets: list[tuple[str, ...]], noise: float = 0.0,
              seed: int = 0, role: str = "truth", train: list[str] = TRAIN,
              test: list[str] = TEST) -> pd.DataFrame:
    """Subset rows (plan_lds's) whose losses are exactly a linear datamodel: the full
    model's loss plus the effects of the sets left out (and Gaussian noise)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, kept in enumerate(subsets):
        for j, t in enumerate(test):
            left = [k for k, name in enumerate(train) if name not in kept]
            loss = 2.0 + effects[left, j].sum() + noise * rng.standard_normal()
            rows.append({"subset": i, "seed": seed, "role": role,
                         "kept": KEPT_SEPARATOR.join(kept), "test_set": t, "loss": loss})
    return pd.DataFrame(rows)


def _cells(method: str, effects: np.ndarray, train: list[str] = TRAIN,
           test: list[str] = TEST) -> list[dict]:
    return [{"method": method, "point": 0, "step": 0, "train_set": k, "test_set": t,
             "influence": float(effects[i, j])} for i, k in enumerate(train)
            for j, t in enumerate(test)]


def _means(frame: pd.DataFrame, score: str = "lds") -> pd.DataFrame:
    top = headline_rows(frame)
    return top[top["score"] == score].set_index("method")


def test_a_constant_or_random_estimate_does_not_pass_the_ruler():
    """The review's simulation: 6 training sets, 4 test sets, each test set taught by its own
    set (+0.2) on top of a positive effect every set shares (here unequal, about 0.05), noise
    0.01. With subsets of mixed sizes, a constant estimate scored +0.79 and one pointing at
    the wrong teacher +0.66; on subsets of one size, with the reference rows and paired
    intervals, neither passes."""
    train, test = [f"set{i}" for i in range(6)], [f"test{j}" for j in range(4)]
    rng = np.random.default_rng(0)
    effects = 0.05 + rng.uniform(0, 0.05, size=(6, 4))
    for j in range(4):
        effects[j, j] += 0.2
    wrong = effects.copy()
    for j in range(4):  # the same effects with each test set's teacher moved to another set
        wrong[[j, (j + 1) % 6], j] = wrong[[(j + 1) % 6, j], j]
    subsets = draw_subsets(train, 32, 0.5, seed=0)
    truth = _additive(effects, subsets, noise=0.01, train=train, test=test)
    table = pd.DataFrame(_cells("truth", effects, train, test)
                         + _cells("constant", np.ones((6, 4)), train, test)
                         + _cells("wrong", wrong, train, test))
    frame = score_frame(table, train, test, subsets=truth, resamples=500)
    mean = _means(frame)
    assert mean.loc["truth", "value"] > 0.9
    assert mean.loc["truth", "margin_low"] > 0.5  # above both references, paired
    assert mean.loc[CONSTANT, "value"] == 0.0 == mean.loc["constant", "value"]
    low, high = mean.loc[RANDOM, ["low", "high"]]
    assert low < 0 < high and abs(mean.loc[RANDOM, "value"]) < 0.1
    assert mean.loc["constant", "margin_low"] <= 0  # does not clear the references
    diff, d_low, _ = paired_difference(table, "truth", "wrong", "lds", train, test,
                                       subsets=truth, resamples=500)
    assert d_low > 0 and diff > 0.3, (diff, d_low)  # below the truth beyond the interval
    assert mean.loc["wrong", "value"] < mean.loc["truth", "low"]


def test_a_linear_datamodel_is_scored_by_the_sum_of_the_cells_left_out():
    effects = np.random.default_rng(3).normal(size=(len(TRAIN), len(TEST)))
    subsets = draw_subsets(TRAIN, 24, 0.5, seed=0)
    truth = _additive(effects, subsets)
    other = np.random.default_rng(4).normal(size=effects.shape)
    table = pd.DataFrame(_cells("exact", effects) + _cells("reversed", -effects)
                         + _cells("other", other) + _cells("scaled", 5 * effects))
    # the prediction of subset 0 by hand: the effects of the sets it leaves out
    left_out = np.array([[n not in s for n in TRAIN] for s in subsets])
    est = pd.DataFrame(effects, index=TRAIN, columns=TEST)
    manual = effects[[k for k, n in enumerate(TRAIN) if n not in subsets[0]]].sum(axis=0)
    np.testing.assert_allclose(predictions(est, left_out, TRAIN, TEST)[0], manual)

    frame = score_frame(table, TRAIN, TEST, subsets=truth, resamples=500)
    mean = _means(frame)
    assert mean.loc["exact", "value"] == pytest.approx(1.0)
    assert mean.loc["reversed", "value"] == pytest.approx(-1.0)
    assert mean.loc["reversed", "margin_high"] < 0  # below the references: backwards
    assert mean.loc["scaled", "value"] == pytest.approx(1.0)  # a rank score: scale is free
    assert abs(mean.loc["other", "value"]) < 0.9
    assert set(frame.loc[frame["score"] == "lds", "n"]) == {20}
    assert mean.loc["exact", "low"] == pytest.approx(1.0)
    low, high = mean.loc["other", ["low", "high"]]
    assert low <= mean.loc["other", "value"] <= high and high - low > 0.1
    assert "ceiling" not in mean.index  # no repeated subsets: no ceiling


def test_undefined_test_sets_are_counted_and_named_and_a_flat_one_scores_zero():
    effects = np.random.default_rng(3).normal(size=(len(TRAIN), len(TEST)))
    truth = _additive(effects, draw_subsets(TRAIN, 20, 0.5, seed=0))
    half = effects.copy()
    half[:, 1] = 0.0  # right on x, all zeros on y: ranks nothing there
    table = pd.DataFrame(_cells("half", half) + _cells("missing", effects)[:-1])
    mean = _means(score_frame(table, TRAIN, TEST, subsets=truth, resamples=200))
    assert mean.loc["half", "value"] == pytest.approx(0.5)  # (+1 + 0) / 2, not +1
    assert mean.loc["half", "undefined"] == ""
    assert mean.loc["missing", "undefined"] == "y"  # a missing cell: y undefined, named
    assert mean.loc["missing", "value"] == pytest.approx(1.0)  # the mean of the others


def test_the_ceiling_follows_the_seed_noise_of_the_truth():
    rng = np.random.default_rng(0)
    effects = rng.normal(size=(len(TRAIN), len(TEST)))
    subsets = draw_subsets(TRAIN, 63, 0.5, seed=0)
    # the spread of the losses over the subsets, per test set (the signal's variance)
    spread = _additive(effects, subsets).groupby("test_set")["loss"].var(ddof=1)
    sigma = float(np.sqrt(spread.mean() / 3))  # noise variance a third of the signal's
    repeats = []
    for seed in range(40):  # the ceiling is an estimate: its mean over draws of the noise
        truth = _additive(effects, subsets, noise=sigma, seed=seed)
        noise = _additive(effects, subsets, noise=sigma, seed=seed + 100, role="noise")
        repeats.append(ceiling(pd.concat([truth, noise]))[0])
    expected = np.sqrt(1 - (1 / 3) / (1 + 1 / 3))  # attenuation by the noise: 0.87
    assert np.mean(repeats) == pytest.approx(expected, abs=0.04)
    clean = pd.concat([_additive(effects, subsets), _additive(effects, subsets, role="noise")])
    assert ceiling(clean)[0] == pytest.approx(1.0)


def test_row_correlations_match_numpy_and_say_nan_where_undefined():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(5, 9)), rng.normal(size=(5, 9))
    np.testing.assert_allclose(pearson_rows(x, y), [np.corrcoef(a, b)[0, 1]
                                                    for a, b in zip(x, y, strict=True)])
    ranks = pd.DataFrame(x).rank(axis=1).to_numpy(), pd.DataFrame(y).rank(axis=1).to_numpy()
    np.testing.assert_allclose(spearman_rows(x, y), pearson_rows(*ranks))
    x[0] = 1.0  # constant
    y[1, 3] = np.nan
    r = spearman_rows(x, y)
    assert np.isnan(r[0]) and np.isnan(r[1]) and np.isfinite(r[2:]).all()


def test_every_ldo_score_has_fishers_interval_and_a_ceiling_from_the_seeds():
    from untrac_ray.results.scoring import pearson_interval

    rng = np.random.default_rng(5)
    effects = rng.normal(size=(len(TRAIN), len(TEST)))
    table = pd.DataFrame(_cells("ldo", effects) + _cells("untrac", effects + rng.normal(
        scale=0.5, size=effects.shape)))
    truth = pd.DataFrame(effects, index=TRAIN, columns=TEST)
    seeds = pd.DataFrame([{"seed": s, "train_set": k, "test_set": t,
                           "influence": effects[i, j] + 0.1 * rng.standard_normal()}
                          for s in (0, 1) for i, k in enumerate(TRAIN)
                          for j, t in enumerate(TEST)])
    mean = _means(score_frame(table, TRAIN, TEST, truth=truth, ldo_seeds=seeds,
                              resamples=200), "pearson")
    row = mean.loc["untrac"]
    assert (row["low"], row["high"]) == pytest.approx(pearson_interval(row["value"],
                                                                       len(TRAIN)))
    assert row["low"] < row["value"] < row["high"] and row["margin_low"] > 0
    assert 0.9 < mean.loc["ceiling", "value"] < 1.0  # seed noise a tenth of the signal


def _verdict_of(table: pd.DataFrame, truth: pd.DataFrame) -> list:
    from untrac_ray.results.verdict import verdict

    return verdict({}, score_frame(table, TRAIN, TEST, subsets=truth, resamples=200))


def test_the_verdict_calls_an_estimate_informative_only_above_the_references():
    effects = np.random.default_rng(3).normal(size=(len(TRAIN), len(TEST)))
    truth = _additive(effects, draw_subsets(TRAIN, 20, 0.5, seed=0))
    lines = _verdict_of(pd.DataFrame(_cells("untrac", effects + 0.3)), truth)
    (line,) = [x for x in lines if x.startswith("UnTrac: LDS +")]
    assert "predicts retraining on subsets" in line and not line.warning, line
    assert not any("leave-dataset-out" in x for x in lines), lines
    # a constant estimate predicts nothing, whatever the shared effect
    (flat,) = [x for x in _verdict_of(pd.DataFrame(_cells("untrac", np.ones((6, 2)))), truth)
               if x.startswith("UnTrac:")]
    assert flat.warning and "no better than constant or random cells" in flat, flat
    assert "predicts retraining" not in flat.split(": no better")[0]
    # true effects under noise the ceiling says is too much to judge by
    noisy = pd.concat([_additive(effects, draw_subsets(TRAIN, 20, 0.5, 0), noise=5.0),
                       _additive(effects, draw_subsets(TRAIN, 20, 0.5, 0), noise=5.0, seed=9,
                                 role="noise")])
    (judged,) = [x for x in _verdict_of(pd.DataFrame(_cells("untrac", effects)), noisy)
                 if x.startswith("UnTrac:")]
    assert "too noisy to judge" in judged and "methods.lds.subsets" in judged, judged


def test_the_noise_seed_must_differ_from_every_seed_of_the_truth(tmp_path):
    from untrac_ray.inputs.errors import SpecError
    from untrac_ray.inputs.loading import parse_spec
    from untrac_ray.inputs.spec_methods import MethodsSpec

    with pytest.raises(ValueError, match="noise_seed: 5 is one of the seeds"):
        MethodsSpec.model_validate({"lds": {"seeds": [0, 5], "noise_seed": 5}})
    with pytest.raises(ValueError, match="noise_subsets: 9 is more than the 8 subsets"):
        MethodsSpec.model_validate({"lds": {"subsets": 8, "noise_subsets": 9}})
    spec = MethodsSpec.model_validate({"ldo": {"seeds": [0, 100]}, "lds": {}})
    assert spec.retraining_seeds(0) == [0, 100, 101]  # LDS takes LDO's seeds, noise: 101
    # no seeds given: the truth is retrained with training.seed, which the noise must avoid
    job = merge(with_four_train_sets(tiny_spec(tmp_path)),
                {"training": {"seed": 3}, "methods": {"lds": {"noise_seed": 3}}})
    with pytest.raises(SpecError, match=r"methods.lds.noise_seed: 3 is one of the seeds"):
        parse_spec(job, base_dir=tmp_path)


def test_a_job_with_lds_resumes_after_sigkill_and_logs_the_score_of_every_estimate(tmp_path):
    from test_resume import _stored_tasks, killed_midway, restored_count, spooled

    from untrac_ray.results.runs import read_run_table

    spec = merge(with_four_train_sets(tiny_spec(tmp_path)), {
        "methods": {"untrac": {"epochs": 20, "eval_every": None, "eval_points": 2},
                    "untrac_inv": None, "graddot": {"batch_size": 16},
                    "ldo": {"seeds": [0]}, "lds": {"subsets": 6, "noise_subsets": 2}},
        "resources": {"local_cpus": 2, "num_actors": 1},
    })
    job, uri, before = killed_midway(tmp_path, spec)
    local = spooled(tmp_path)
    resumed = CliRunner().invoke(app, ["run", str(job), "--tracking-uri", uri, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    n_tasks = 2 + 5 + (6 + 2) + 4 + 4  # base, ldo, lds (+ noise), graddot, untrac
    restored = restored_count(resumed.output, n_tasks)
    assert len(before) <= restored <= len(set(before) | local), resumed.output
    assert len(_stored_tasks(tmp_path)) == n_tasks
    assert "UnTrac: LDS " in resumed.output and "GradDot: LDS " in resumed.output

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for method in ("untrac", "graddot", "ldo"):
        assert -1 <= metrics[f"score/{method}/lds"] <= 1
    for method in ("untrac", "graddot"):
        assert metrics[f"score/{method}/lds_low"] <= metrics[f"score/{method}/lds_high"]
        assert f"score/{method}/pearson_low" in metrics and f"score/{method}/lds_margin_low" \
            in metrics
    for reference in ("constant_cells", "random_cells"):  # the floor, from the one table
        assert f"score/{reference}/lds" in metrics and f"score/{reference}/pearson" in metrics
    # the headline's value, not the last point's: untrac's headline is its last point here
    history = client.get_metric_history(run.info.run_id, "score/untrac/lds")
    assert len(history) == 1
    subsets = read_run_table(run.info.run_id, uri, "lds_subsets")
    assert len(subsets) == (6 + 2) * 2 and set(subsets["role"]) == {"truth", "noise"}

    # the same numbers as a run that was never interrupted
    other = f"sqlite:///{tmp_path / 'undisturbed.db'}"
    fresh = CliRunner().invoke(app, ["run", str(job), "--tracking-uri", other, "--quiet"])
    assert fresh.exit_code == 0, fresh.output
    oc = MlflowClient(tracking_uri=other)
    (ref,) = oc.search_runs([oc.get_experiment_by_name("tests").experiment_id])
    expected = read_run_table(ref.info.run_id, other, "lds_subsets")
    keys = ["subset", "seed", "test_set"]
    merged = subsets.merge(expected, on=keys, suffixes=("", "_ref"), validate="1:1")
    np.testing.assert_allclose(merged["loss"], merged["loss_ref"], rtol=1e-5)
    for method in ("untrac", "graddot"):
        assert metrics[f"score/{method}/lds"] == pytest.approx(
            ref.data.metrics[f"score/{method}/lds"], abs=1e-6)

    # show, compare and the report show it, reference rows included, from the one table
    run_id = run.info.run_id
    shown = CliRunner().invoke(app, ["show", run_id, "--tracking-uri", uri, "--format", "json"])
    assert shown.exit_code == 0, shown.output
    logged = read_run_table(run_id, uri, "score_table")
    (untrac,) = [m for m in json.loads(shown.stdout)["matrices"] if m["method"] == "untrac"]
    for row in untrac["scores"]:
        test_set = {"mean over test sets": MEAN_OVER_TESTS,
                    "all cells pooled": "__all__"}.get(row["test set"], row["test set"])
        want = logged[(logged.method == "untrac") & (logged.point == untrac["point"])
                      & (logged.score == "lds") & (logged.test_set == test_set)]["value"]
        if want.empty:  # the Pearson pooled over all cells has no LDS beside it
            assert row["LDS"] is None or row["LDS"] != row["LDS"], row
            continue
        assert row["LDS"] == pytest.approx(float(want.iloc[0])), row
    methods = [r["method"] for r in json.loads(shown.stdout)["scores"]]
    assert {"constant cells", "random cells", "ceiling (seed noise)"} <= set(methods), methods
    text = CliRunner().invoke(app, ["show", run_id, "--tracking-uri", uri, "-m", "untrac"])
    assert "retraining on subsets" in text.output and "random cells" in text.output
    compared = CliRunner().invoke(app, ["compare", run_id, run_id, "--tracking-uri", uri,
                                        "--method-a", "untrac", "--method-b", "graddot"])
    assert compared.exit_code == 0, compared.output
    said = " ".join(compared.output.split())
    assert "A against its run's ground truth: Pearson" in said and "; LDS " in said, said
    assert "B against its run's ground truth: Pearson" in said
    page = tmp_path / "report.html"
    made = CliRunner().invoke(app, ["report", run_id, "--tracking-uri", uri, "-o", str(page)])
    assert made.exit_code == 0, made.output
    html = page.read_text(encoding="utf-8")
    assert "LDS" in html and "random cells" in html and "constant cells" in html
