"""The linear datamodeling score at the level of datasets (methods.lds): the subsets drawn,
the prediction of a linear datamodel, the Spearman over the subsets with its bootstrap
interval and ceiling, checked on truths built by hand; then a job with LDS through the CLI,
killed with SIGKILL and resumed like LDO, logging score/<method>/lds for every estimate."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from conftest import merge, tiny_spec
from untrac_ray.cli import app
from untrac_ray.methods.plans import KEPT_SEPARATOR, draw_subsets
from untrac_ray.results.lds import ceiling, lds_scores, lds_summary, predictions, with_lds
from untrac_ray.results.scoring import MEAN_OVER_TESTS, pearson_rows, spearman_rows

TRAIN = ["a", "b", "c, d", "e", "f", "g"]  # a name may hold a comma
TEST = ["x", "y"]


def test_subsets_are_distinct_non_empty_seeded_and_kept_with_probability_keep():
    subsets = draw_subsets(TRAIN, 32, 0.5, seed=0)
    assert len(subsets) == 32 and len(set(subsets)) == 32 and all(subsets)
    assert subsets == draw_subsets(TRAIN, 32, 0.5, seed=0)  # a resumed job draws the same
    assert subsets != draw_subsets(TRAIN, 32, 0.5, seed=1)
    assert all(list(s) == [n for n in TRAIN if n in s] for s in subsets)  # the spec's order
    assert len(draw_subsets(["a", "b", "c"], 32, 0.5, seed=0)) == 7  # every non-empty one
    many = [f"s{i}" for i in range(16)]  # 65,535 subsets: repeats are rare at 300 draws
    for keep in (0.2, 0.5, 0.8):
        share = np.mean([len(s) / 16 for s in draw_subsets(many, 300, keep, seed=0)])
        assert abs(share - keep) < 0.03, (keep, share)


def _additive(effects: np.ndarray, subsets: list[tuple[str, ...]], noise: float = 0.0,
              seed: int = 0, role: str = "truth") -> pd.DataFrame:
    """Subset rows (plan_lds's) whose losses are exactly a linear datamodel: the full
    model's loss plus the effects of the sets left out (and Gaussian noise)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, kept in enumerate(subsets):
        for j, t in enumerate(TEST):
            left = [k for k, name in enumerate(TRAIN) if name not in kept]
            loss = 2.0 + effects[left, j].sum() + noise * rng.standard_normal()
            rows.append({"subset": i, "seed": seed, "role": role, "kept": KEPT_SEPARATOR.join(kept),
                         "test_set": t, "loss": loss})
    return pd.DataFrame(rows)


def _cells(method: str, effects: np.ndarray) -> list[dict]:
    return [{"method": method, "point": 0, "step": 0, "train_set": k, "test_set": t,
             "influence": float(effects[i, j])} for i, k in enumerate(TRAIN)
            for j, t in enumerate(TEST)]


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

    scores = lds_scores(table, truth, TRAIN)
    mean = scores[scores["test_set"] == MEAN_OVER_TESTS].set_index("method")["lds"]
    assert mean["exact"] == pytest.approx(1.0)
    assert mean["reversed"] == pytest.approx(-1.0)
    assert mean["scaled"] == pytest.approx(1.0)  # a rank score: the scale is free
    assert abs(mean["other"]) < 0.9
    assert set(scores["n"]) == {24}

    summary = lds_summary(table, truth, TRAIN, resamples=500).set_index("method")
    assert summary.loc["exact", "lds_low"] == pytest.approx(1.0)
    low, high = summary.loc["other", ["lds_low", "lds_high"]]
    assert low <= mean["other"] <= high and high - low > 0.1
    assert np.isnan(summary.loc["exact", "lds_ceiling"])  # no repeated subsets: no ceiling


def test_the_ceiling_follows_the_seed_noise_of_the_truth():
    rng = np.random.default_rng(0)
    effects = rng.normal(size=(len(TRAIN), len(TEST)))
    subsets = draw_subsets(TRAIN, 63, 0.5, seed=0)
    # the spread of the losses over the subsets, per test set (the signal's variance)
    spread = _additive(effects, subsets).groupby("test_set")["loss"].var(ddof=1)
    sigma = float(np.sqrt(spread.mean() / 3))  # noise variance a third of the signal's
    repeats = []
    for seed in range(20):  # the ceiling is an estimate: its mean over draws of the noise
        truth = _additive(effects, subsets, noise=sigma, seed=seed)
        noise = _additive(effects, subsets, noise=sigma, seed=seed + 100, role="noise")
        repeats.append(ceiling(pd.concat([truth, noise]))[0])
    expected = np.sqrt(1 - (1 / 3) / (1 + 1 / 3))  # attenuation by the noise: 0.87
    assert np.mean(repeats) == pytest.approx(expected, abs=0.03)
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


def test_every_ldo_score_has_fishers_interval():
    from untrac_ray.results.scoring import pearson_interval, score_table, summary

    rng = np.random.default_rng(5)
    effects = rng.normal(size=(len(TRAIN), len(TEST)))
    table = pd.DataFrame(_cells("ldo", effects) + _cells("untrac", effects + rng.normal(
        scale=0.5, size=effects.shape)))
    truth = table[table["method"] == "ldo"].pivot_table(index="train_set", columns="test_set",
                                                        values="influence")
    row = summary(score_table(table, truth)).iloc[0]
    assert (row["pearson_low"], row["pearson_high"]) == pytest.approx(
        pearson_interval(row["pearson_mean"], len(TRAIN)))
    assert row["pearson_low"] < row["pearson_mean"] < row["pearson_high"]


def test_a_job_scored_by_lds_alone_has_a_verdict_of_lds(tmp_path):
    from untrac_ray.inputs.spec_methods import MethodsSpec
    from untrac_ray.results.verdict import verdict

    effects = np.random.default_rng(3).normal(size=(len(TRAIN), len(TEST)))
    truth = _additive(effects, draw_subsets(TRAIN, 16, 0.5, seed=0))
    table = pd.DataFrame(_cells("untrac", effects + 0.3))
    summary = with_lds(None, lds_summary(table, truth, TRAIN, resamples=200))
    lines = verdict({}, summary, len(TRAIN))
    assert any(line.startswith("UnTrac: LDS +") for line in lines), lines
    assert not any("leave-dataset-out" in line for line in lines), lines

    with pytest.raises(ValueError, match="noise_seed: 5 is one of the seeds"):
        MethodsSpec.model_validate({"lds": {"seeds": [0, 5], "noise_seed": 5}})
    with pytest.raises(ValueError, match="noise_subsets: 9 is more than the 8 subsets"):
        MethodsSpec.model_validate({"lds": {"subsets": 8, "noise_subsets": 9}})
    spec = MethodsSpec.model_validate({"ldo": {"seeds": [0, 100]}, "lds": {}})
    assert spec.retraining_seeds(0) == [0, 100, 101]  # LDS takes LDO's seeds, noise: 101


def test_a_job_with_lds_resumes_after_sigkill_and_logs_the_score_of_every_estimate(tmp_path):
    from test_resume import _stored_tasks, killed_midway, restored_count, spooled

    from untrac_ray.results.runs import read_run_table

    spec = merge(tiny_spec(tmp_path), {
        "methods": {"untrac": {"epochs": 20, "eval_every": None, "eval_points": 2},
                    "untrac_inv": None, "graddot": {"batch_size": 16},
                    "ldo": {"seeds": [0]}, "lds": {"subsets": 6, "noise_subsets": 2}},
        "resources": {"local_cpus": 2, "num_actors": 1},
    })
    job, uri, before = killed_midway(tmp_path, spec)
    local = spooled(tmp_path)
    resumed = CliRunner().invoke(app, ["run", str(job), "--tracking-uri", uri, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    n_tasks = 2 + 4 + (6 + 2) + 3 + 3  # base, ldo, lds (+ noise), graddot, untrac
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
        assert f"score/{method}/pearson_low" not in metrics  # 3 training sets: no interval
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

    # show, compare and the report show it
    run_id = run.info.run_id
    shown = CliRunner().invoke(app, ["show", run_id, "--tracking-uri", uri, "--format", "json"])
    assert shown.exit_code == 0, shown.output
    lds_scores_logged = read_run_table(run_id, uri, "lds_scores")
    (untrac,) = [m for m in json.loads(shown.stdout)["matrices"] if m["method"] == "untrac"]
    for row in untrac["scores"]:
        want = lds_scores_logged.query("method == 'untrac' and point == @untrac['point'] "
                                       "and test_set == @row['test_set']")["lds"]
        if want.empty:  # the Pearson pooled over all cells has no LDS beside it
            assert row["lds"] is None or row["lds"] != row["lds"], row
            continue
        assert row["lds"] == pytest.approx(float(want.iloc[0])), row
    text = CliRunner().invoke(app, ["show", run_id, "--tracking-uri", uri, "-m", "untrac"])
    assert "LDS over retrained subsets" in text.output, text.output
    compared = CliRunner().invoke(app, ["compare", run_id, run_id, "--tracking-uri", uri,
                                        "--method-a", "untrac", "--method-b", "graddot"])
    assert compared.exit_code == 0, compared.output
    assert "A against retraining on random subsets: LDS" in compared.output
    assert "B against retraining on random subsets: LDS" in compared.output
    page = tmp_path / "report.html"
    made = CliRunner().invoke(app, ["report", run_id, "--tracking-uri", uri, "-o", str(page)])
    assert made.exit_code == 0, made.output
    assert "Linear datamodeling score" in page.read_text()
