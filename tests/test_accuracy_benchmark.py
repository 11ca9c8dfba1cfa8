"""benchmarks/accuracy.py on a tiny job: the ground truth it scores against is the job's own
LDO (mean over the LDO seeds), reusing that ground truth gives the same scores, the report
prints every section, and its helpers refuse bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import load_benchmark, merge, tiny_spec
from untrac_ray.inputs.errors import SpecError
from untrac_ray.inputs.loading import load_spec
from untrac_ray.results.runs import read_influence
from untrac_ray.results.scoring import ground_truth_noise

REPO = Path(__file__).resolve().parent.parent


acc = load_benchmark("accuracy")


@pytest.fixture(scope="module")
def bench(tmp_path_factory, ray_cluster):
    """Seed 1 of a tiny job with two LDO seeds, UnTrac, UnTrac-Inv and the gradient baselines."""
    tmp = tmp_path_factory.mktemp("accuracy")
    spec = merge(tiny_spec(tmp), {
        "training": {"checkpoints": [2, 4]},
        "methods": {"ldo": {"seeds": [0, 100]}, "graddot": {"batch_size": 8},
                    "gradcos": {"batch_size": 8}, "tracin": {"batch_size": 8}},
    })
    job = tmp / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    result = acc.run_seed(load_spec(job), 1, uri, None)
    return {"job": job, "uri": uri, "result": result, "tmp": tmp}


def test_the_ground_truth_is_the_mean_of_the_ldo_seeds_and_the_jobs_own_matrix(bench):
    r = bench["result"]
    assert sorted(r.ldo_seeds["seed"].unique()) == [1, 101]
    truth = acc.truth_from(r.ldo_seeds)
    logged = read_influence(r.outcome.run_id, bench["uri"])
    logged = logged[logged.method == "ldo"].pivot_table(
        index="train_set", columns="test_set", values="influence")
    np.testing.assert_allclose(truth.loc[logged.index, logged.columns].to_numpy(),
                               logged.to_numpy(), rtol=1e-6, atol=1e-9)
    noise = ground_truth_noise(r.ldo_seeds)
    assert noise["n"] == 2 and noise["cell_std"] > 0
    assert noise["snr_mean"] == pytest.approx(noise["snr"] * np.sqrt(2))


def test_reusing_the_ground_truth_gives_the_same_scores(bench, tmp_path):
    first = bench["result"]
    again = acc.run_seed(load_spec(bench["job"]), 1, f"sqlite:///{tmp_path / 'm.db'}", None,
                         reuse_uri=bench["uri"])
    assert "ldo" not in set(again.outcome.table.method)
    pooled = acc.truth_from(first.ldo_seeds)
    a = acc.score_seed(first, pooled, {}).set_index("method")
    b = acc.score_seed(again, pooled, {}).set_index("method")
    assert set(a.index) == {"untrac", "untrac_inv", "graddot", "gradcos", "tracin"}
    np.testing.assert_allclose(b.loc[a.index, "pearson"], a["pearson"], atol=1e-6)
    # the Pearson over all cells at once, as scoring computes it for the pooled row
    table, truth = first.outcome.table, acc.truth_from(first.ldo_seeds)
    cells = table[(table.method == "untrac") & (table.point == a.loc["untrac", "point"])]
    est = cells.pivot_table(index="train_set", columns="test_set", values="influence")
    est = est.reindex(index=truth.index, columns=truth.columns)
    want = np.corrcoef(est.to_numpy().ravel(), truth.to_numpy().ravel())[0, 1]
    assert a.loc["untrac", "pearson_all_cells"] == pytest.approx(want, abs=1e-9)


def test_reuse_without_a_matching_earlier_run_names_what_is_missing(bench, tmp_path):
    other_seed = acc.seeded_spec(load_spec(bench["job"]), 7, None)
    with pytest.raises(SystemExit, match="no finished run of job 'tiny' with ldo seeds"):
        acc.earlier_ldo_run(other_seed, bench["uri"])


def test_the_report_prints_every_section(bench, capsys):
    r = bench["result"]
    acc.print_report(load_spec(bench["job"]), [r], {}, {}, {})
    out = capsys.readouterr().out
    for part in ("base model on the test sets", "ground truth: LDO influence", "per seed:",
                 "over the seeds", "compute time", "-- targets --",
                 "untrac mean Pearson (fixed point)", "untrac_inv beats every baseline",
                 "all cells (fixed)"):
        assert part in out
    assert out.count("PASS") + out.count("MISS") >= 6
    loss = r.outcome.base_losses["next_number"]
    assert f"{loss:.3f} / " in out


def test_settings_are_overridden_and_an_unknown_key_is_refused(bench):
    spec = load_spec(bench["job"])
    changed = acc.with_settings(spec, ["methods.untrac.learning_rate=3e-5",
                                       "methods.gradcos=null"])
    assert changed.methods.untrac.learning_rate == 3e-5 and changed.methods.gradcos is None
    with pytest.raises(SpecError, match=r"methods.untrac.lr: unknown key \(did you mean "
                       "'learning_rate'"):
        acc.with_settings(spec, ["methods.untrac.lr=1"])
    with pytest.raises(SpecError, match="expected key.path=value"):
        acc.with_settings(spec, ["methods.untrac.learning_rate"])


def test_copied_answers_repeat_the_prompt_and_are_wrong():
    prompt = "What is the number that comes after 512?"
    assert acc.copied_from_prompt("512", prompt, "513")
    assert not acc.copied_from_prompt("513", prompt, "513")
    assert not acc.copied_from_prompt("51", prompt, "513")
    assert not acc.copied_from_prompt("", prompt, "513")
