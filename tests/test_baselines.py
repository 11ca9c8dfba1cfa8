"""Ground truth and baselines: LDO, GradDot / GradCos / TracIn, scoring, EK-FAC's install hint."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from conftest import merge, tiny_spec
from untrac_ray.cli import app
from untrac_ray.compute.evaluation import sample_indices
from untrac_ray.compute.modeling import build_model, config_from_dict, load_model
from untrac_ray.compute.training import read_train_record
from untrac_ray.inputs.errors import SpecError, UntracError
from untrac_ray.inputs.loading import load_spec
from untrac_ray.results.score_views import best_point, headline_rows
from untrac_ray.results.scores import ESTIMATE, score_frame
from untrac_ray.results.scoring import ALL_CELLS, MEAN_OVER_TESTS, truth_matrix
from untrac_ray.run.job_setup import prepare_data
from untrac_ray.run.runner import run_job

TRAIN, TEST = ["add_one", "double", "spell"], ["next_number", "twice"]


@pytest.fixture(scope="module")
def ground(tmp_path_factory, ray_cluster):
    """One tiny job with LDO and the gradient baselines (TracIn on 3 checkpoints)."""
    tmp = tmp_path_factory.mktemp("ground")
    spec = merge(tiny_spec(tmp), {
        "training": {"checkpoints": [2, 4, 6]},
        "methods": {"untrac_inv": None, "ldo": {}, "graddot": {"batch_size": 7},
                    "gradcos": {"batch_size": 7}, "tracin": {"batch_size": 7}},
    })
    job = tmp / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    outcome = run_job(load_spec(job), uri)
    return {"tmp": tmp, "job": job, "uri": uri, "outcome": outcome, "spec": load_spec(job)}


def _cell(table: pd.DataFrame, method: str, train: str, test: str) -> pd.Series:
    rows = table[(table.method == method) & (table.train_set == train) & (table.test_set == test)]
    return rows.sort_values("point").iloc[-1]


def _loss(model, data, rows) -> float:
    """Mean token loss over rows, all in one batch."""
    b = data.batch(rows)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                           b["labels"][:, 1:].reshape(-1), ignore_index=-100)


def _hand_train(model, sets, cfg) -> None:
    """The base model's schedule, written out: AdamW, cosine to 10% (no warm-up), clipping,
    seeded shuffles of the concatenated rows, loss = mean over the batch's target tokens;
    torch seeded first, so that dropout draws the same masks."""
    torch.manual_seed(cfg.seed)
    rows = [(s, i) for s in sets for i in range(len(s))]
    steps = cfg.epochs * math.ceil(len(rows) / cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    order = [b for _ in range(cfg.epochs) for p in [rng.permutation(len(rows))]
             for b in [p[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]]
    model.train()
    for step, batch in enumerate(order[:steps]):
        for group in opt.param_groups:
            group["lr"] = cfg.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        total, tokens = 0.0, 0
        for s in sets:
            mine = [rows[i][1] for i in batch if rows[i][0] is s]
            if mine:
                b = s.batch(mine)
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                labels = b["labels"][:, 1:]
                total = total + F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                labels.reshape(-1), ignore_index=-100,
                                                reduction="sum")
                tokens += int((labels != -100).sum())
        opt.zero_grad()
        (total / tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
    model.eval()


def test_ldo_cell_equals_a_hand_written_retrain_and_evaluate_loop(ground):
    spec = ground["spec"]
    data = prepare_data(spec)
    config = config_from_dict(spec.model.config, len(data.tokenizer), data.tokenizer.eos_token_id)
    test_set = data.tokenized("twice")
    rows = sample_indices(len(test_set), spec.evaluation.max_examples, spec.evaluation.seed)

    def retrain(left_out: str | None) -> float:
        model = build_model(config, seed=spec.training.seed)
        _hand_train(model, [data.tokenized(n) for n in TRAIN if n != left_out], spec.training)
        with torch.no_grad():
            return float(_loss(model, test_set, rows))

    full, without = retrain(None), retrain("double")
    cell = _cell(ground["outcome"].table, "ldo", "double", "twice")
    assert cell.loss_before == pytest.approx(full, abs=1e-4)
    assert cell.loss_after == pytest.approx(without, abs=1e-4)
    assert cell.influence == pytest.approx(without - full, abs=1e-4)


def test_gradient_baselines_equal_a_direct_torch_computation(ground):
    spec, outcome = ground["spec"], ground["outcome"]
    data = prepare_data(spec)

    def grad(model, name: str) -> torch.Tensor:
        """The gradient of the mean token loss (test sets; training sets: aggregate mean, the
        default, tested against sum in test_unequal_sizes.py)."""
        d = data.tokenized(name)
        rows = (np.arange(len(d)) if name in TRAIN
                else sample_indices(len(d), spec.evaluation.max_examples, spec.evaluation.seed))
        loss = _loss(model, d, rows)
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()

    base = load_model(str(outcome.model_dir)).eval()
    checkpoints = read_train_record(outcome.model_dir)["checkpoints"]
    assert [c["step"] for c in checkpoints] == [2, 4, 6]
    ckpts = [(load_model(c["path"]).eval(), c["learning_rate"]) for c in checkpoints]
    for k in TRAIN:
        for j in TEST:
            gk, gj = grad(base, k), grad(base, j)
            dot = float(gk @ gj)
            cos = dot / float(gk.norm() * gj.norm())
            tracin = sum(lr * float(grad(m, k) @ grad(m, j)) for m, lr in ckpts)
            table = outcome.table
            assert _cell(table, "graddot", k, j).influence == pytest.approx(dot, rel=1e-4)
            assert _cell(table, "gradcos", k, j).influence == pytest.approx(cos, rel=1e-4)
            assert _cell(table, "tracin", k, j).influence == pytest.approx(tracin, rel=1e-4)
    assert outcome.table[outcome.table.method == "gradcos"].influence.abs().max() <= 1.0


def test_the_ground_truth_scores_itself_one_and_a_shuffled_copy_less():
    rng = np.random.default_rng(0)
    truth_rows = [{"method": "ldo", "point": 0, "step": 0, "train_set": k, "test_set": j,
                   "influence": rng.normal()} for k in "abcde" for j in "xy"]
    truth_table = pd.DataFrame(truth_rows)
    copy = truth_table.assign(method="copy", point=3, step=3)
    shuffled = truth_table.assign(method="shuffled", point=3, step=3,
                                  influence=rng.permutation(truth_table.influence.to_numpy()))
    table = pd.concat([truth_table, copy, shuffled])
    frame = score_frame(table, list("abcde"), list("xy"), truth=truth_matrix(table))
    by = frame[frame["kind"] == ESTIMATE].set_index(["method", "score", "test_set"])["value"]
    assert by[("copy", "pearson", MEAN_OVER_TESTS)] == pytest.approx(1.0)
    assert by[("copy", "spearman", ALL_CELLS)] == pytest.approx(1.0)
    assert by[("shuffled", "pearson", MEAN_OVER_TESTS)] < 0.99
    assert "ldo" not in set(frame["method"])  # the truth is not scored against itself
    top = headline_rows(frame).set_index(["method", "score"])
    assert top.loc[("copy", "pearson"), "point"] == 3
    assert top.loc[("copy", "pearson"), "margin_low"] > 0  # clears the reference rows
    assert best_point(frame, "copy", "pearson") is None  # one point: no hindsight


def test_job_with_ldo_scores_every_other_method_and_logs_the_scores(ground):
    outcome = ground["outcome"]
    estimates = outcome.scores[outcome.scores["kind"] == ESTIMATE]
    assert set(estimates.method) == {"untrac", "graddot", "gradcos", "tracin"}
    assert {"constant_cells", "random_cells"} <= set(outcome.scores.method)
    client = MlflowClient(tracking_uri=ground["uri"])
    run = client.get_run(outcome.run_id)
    assert "score/untrac/pearson_mean" in run.data.metrics
    assert "untrac=" in run.data.tags["untrac_ray.headline_pearson"]
    names = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert "score/untrac/pearson_margin" in run.data.metrics
    assert "score/constant_cells/pearson" in run.data.metrics
    assert {"score_table.parquet", "score_table.csv", "ldo_seeds.parquet"} <= names


def test_scoring_against_an_earlier_run_and_refusing_a_mismatched_one(ground, ray_cluster):
    uri, tmp = ground["uri"], ground["tmp"]
    base = merge(tiny_spec(tmp), {"methods": {"untrac_inv": None}})
    ok = tmp / "with_truth.yaml"
    ok.write_text(yaml.safe_dump(merge(base, {"ground_truth": {"run_id":
                                                                ground["outcome"].run_id}})))
    outcome = run_job(load_spec(ok), uri)
    estimates = outcome.scores[outcome.scores["kind"] == ESTIMATE]
    assert list(dict.fromkeys(estimates.method)) == ["untrac"]

    runner = CliRunner()
    other = merge(base, {"ground_truth": {"run_id": ground["outcome"].run_id},
                         "data": {"test": [{"name": "twice", "source": "test.csv",
                                            "subset": "twice"}]}})
    bad = tmp / "mismatch.yaml"
    bad.write_text(yaml.safe_dump(other))
    n_runs = len(MlflowClient(tracking_uri=uri).search_runs(["0", "1"]))
    result = runner.invoke(app, ["run", str(bad), "--tracking-uri", uri, "-q"])
    assert result.exit_code != 0
    assert "covers train sets" in result.output and "'next_number'" in result.output
    missing = tmp / "missing.yaml"
    missing.write_text(yaml.safe_dump(merge(base, {"ground_truth": {"run_id": "0" * 32}})))
    result = runner.invoke(app, ["run", str(missing), "--tracking-uri", uri, "-q"])
    assert result.exit_code != 0 and "not found" in result.output
    assert len(MlflowClient(tracking_uri=uri).search_runs(["0", "1"])) == n_runs


def test_ekfac_without_kronfluence_says_how_to_install_it(make_job, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "kronfluence" else real(name, *a))
    with pytest.raises(SpecError, match=r"methods.ekfac: .*pip install --no-deps kronfluence"):
        load_spec(make_job({"methods": {"ekfac": {}}}))


def test_ldo_and_tracin_need_a_model_this_job_trains(make_job, tmp_path):
    with pytest.raises(SpecError, match="methods.tracin: needs training checkpoints"):
        load_spec(make_job({"methods": {"tracin": {}}}))
    with pytest.raises(SpecError, match="methods.ldo: needs a model that this job trains"):
        load_spec(make_job({"model": {"config": None, "path": str(tmp_path)},
                            "methods": {"ldo": {}}}))


def test_read_influence_of_a_missing_run_is_a_clear_error(ground):
    from untrac_ray.results.runs import read_influence

    with pytest.raises(UntracError, match="not found"):
        read_influence("f" * 32, ground["uri"])
    assert Path(ground["uri"].removeprefix("sqlite:///")).exists()
