"""Whole jobs on a real local Ray cluster, logged to a real MLflow SQLite store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from conftest import run_through_cli, tiny_spec
from untrac_ray.cli import app
from untrac_ray.compute.evaluation import sample_indices
from untrac_ray.compute.modeling import SharedWeights, load_model
from untrac_ray.inputs.fingerprints import model_key
from untrac_ray.inputs.loading import load_spec
from untrac_ray.results.runs import read_influence
from untrac_ray.results.tables import matrix
from untrac_ray.run.job_setup import Reporter, prepare_data
from untrac_ray.run.runner import run_job

runner = CliRunner()


@pytest.fixture(scope="module")
def demo(tmp_path_factory, ray_cluster):
    """One tiny job run through the CLI; everything is read back from the MLflow store."""
    tmp = tmp_path_factory.mktemp("job")
    return run_through_cli(tmp, tiny_spec(tmp))


def test_matrix_has_a_row_per_training_set_and_a_column_per_test_set_at_every_point(demo):
    table = demo["table"]
    train, test = ["add_one", "double", "spell"], ["next_number", "twice"]
    expected_points = {"untrac": [1, 2, 3], "untrac_inv": [1, 2]}
    for method, points in expected_points.items():
        assert sorted(table[table.method == method].point.unique()) == points
        for point in points:
            mat = matrix(table, method, point, train, test)
            assert mat.shape == (3, 2) and not mat.isna().any().any()
    # 24, 6 and 12 rows at batch 8: each set ends at its own last step
    last = table[(table.method == "untrac") & (table.point == 3)]
    assert last.groupby("train_set").step.max().to_dict() == {"add_one": 3, "double": 1,
                                                              "spell": 2}
    assert np.allclose(table.influence, table.loss_after - table.loss_before)
    assert "untrac: influence at point 3/3 (steps 1-3)" in demo["output"]  # as `show` draws it
    assert "add_one" in demo["output"]


def test_mlflow_run_holds_params_metrics_and_artifacts(demo):
    client, run = demo["client"], demo["run"]
    assert run.info.status == "FINISHED"
    assert run.data.params["methods.untrac.optimizer"] == "adam"
    assert run.data.params["data.train.0.name"] == "add_one"
    assert run.data.tags["untrac_ray.job"] == "tiny"
    metrics = run.data.metrics
    assert {"base_loss/next_number", "base_loss/add_one"} <= set(metrics)
    history = client.get_metric_history(run.info.run_id, "influence/untrac/double/twice")
    table = demo["table"]
    cells = table[(table.method == "untrac") & (table.train_set == "double")
                  & (table.test_set == "twice")]
    assert [m.step for m in history] == cells.point.tolist()  # MLflow steps are points
    assert np.allclose([m.value for m in history], cells.influence)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"influence.parquet", "influence.csv", "job.yaml", "figures"} <= names
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert figures == {f"figures/{kind}_{m}.png" for kind in ("heatmap", "trajectory")
                       for m in ("untrac", "untrac_inv")}
    local = client.download_artifacts(run.info.run_id, "influence.csv")
    assert pd.read_csv(local).shape == table.shape
    spec_yaml = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "job.yaml"))
                               .read_text())
    assert spec_yaml["name"] == "tiny" and spec_yaml["methods"]["untrac"]["batch_size"] == 8


def _plain_loss(model, data, rows) -> float:
    """Mean target-token cross-entropy, computed directly (in eval mode: no dropout)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in rows:
            b = data.batch([i])
            logits = model(input_ids=b["input_ids"]).logits[0, :-1]
            labels = b["labels"][0, 1:]
            keep = labels != -100
            total += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


def _plain_ascent(model, data, optimizer, batch_size, steps, seed) -> None:
    """Gradient ascent with a hand-written loop: seeded shuffle, mean token loss, one step
    (torch seeded too: the same dropout masks)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    batches = []
    while len(batches) < steps:  # a fresh shuffle per epoch
        order = rng.permutation(len(data))
        batches += [order[i : i + batch_size] for i in range(0, len(data), batch_size)]
    model.train()
    for rows in batches[:steps]:
        b = data.batch(rows)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                               b["labels"][:, 1:].reshape(-1), ignore_index=-100)
        optimizer.zero_grad()
        (-loss).backward()
        optimizer.step()
    model.eval()


def test_untrac_and_untrac_inv_cells_equal_a_plain_single_process_computation(demo):
    spec = load_spec(demo["job"])
    data = prepare_data(spec)
    model_dir = demo["run"].data.tags["untrac_ray.model_dir"]
    weights = SharedWeights.from_model(load_model(model_dir))
    table = demo["table"]

    def sets(name):
        d = data.tokenized(name)
        return d, sample_indices(len(d), spec.evaluation.max_examples, spec.evaluation.seed)

    # UnTrac: unlearn "add_one" (24 rows, 3 Adam steps of 8), measure "twice".
    test_set, rows = sets("twice")
    model = weights.build()
    before = _plain_loss(model, test_set, rows)
    _plain_ascent(model, data.tokenized("add_one"),
                  torch.optim.Adam(model.parameters(), lr=1e-3), 8, 3, seed=0)
    expected = _plain_loss(model, test_set, rows) - before
    got = table.query("method == 'untrac' and step == 3 and train_set == 'add_one' "
                      "and test_set == 'twice'").influence.item()
    assert got == pytest.approx(expected, abs=1e-5)

    # UnTrac-Inv: unlearn "next_number" (SGD, 2 steps of 16), measure "double".
    train_set, rows = sets("double")
    model = weights.build()
    before = _plain_loss(model, train_set, rows)
    _plain_ascent(model, data.tokenized("next_number"),
                  torch.optim.SGD(model.parameters(), lr=0.05), 16, 2, seed=0)
    expected = _plain_loss(model, train_set, rows) - before
    got = table.query("method == 'untrac_inv' and step == 2 and train_set == 'double' "
                      "and test_set == 'next_number'").influence.item()
    assert got == pytest.approx(expected, abs=1e-5)


class CountingReporter(Reporter):
    def __init__(self) -> None:
        self.tasks: list[str] = []

    def task_done(self, result, cells) -> None:
        self.tasks.append(f"{result.task.method}:{result.task.forget}")


def test_untrac_inv_with_one_test_set_runs_one_unlearning_task(make_job, tracking_uri,
                                                                ray_cluster):
    spec = load_spec(make_job({"methods": {"untrac": None}}))
    spec.data.test = spec.data.test[:1]
    reporter = CountingReporter()
    outcome = run_job(spec, tracking_uri, reporter=reporter)
    assert reporter.tasks == ["untrac_inv:next_number"]
    assert matrix(outcome.table, "untrac_inv").shape == (3, 1)


def test_zero_learning_rate_gives_exactly_zero_influence(make_job, tracking_uri, ray_cluster):
    zero = {"learning_rate": 0.0}
    spec = load_spec(make_job({"methods": {"untrac": zero, "untrac_inv": zero}}))
    outcome = run_job(spec, tracking_uri)
    assert len(outcome.table) == 3 * 2 * 3 + 3 * 2 * 2
    assert (outcome.table.influence == 0.0).all()


def test_train_command_saves_a_model_that_run_reuses(make_job, tracking_uri, ray_cluster,
                                                     tmp_path):
    out = tmp_path / "trained"
    job = make_job({"training": {"output_dir": str(out)}, "methods": {"untrac_inv": None}})
    result = runner.invoke(app, ["train", str(job), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    result = runner.invoke(app, ["run", str(job), "--tracking-uri", tracking_uri, "--quiet"])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained

    # A job given the trained folder as its model gets the same matrix.
    by_path = make_job({"methods": {"untrac_inv": None},
                        "model": {"config": None, "path": str(out)}}, name="p.yaml")
    result = runner.invoke(app, ["run", str(by_path), "--tracking-uri", tracking_uri, "-q"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    first, second = (read_influence(r.info.run_id, tracking_uri) for r in runs)
    assert np.allclose(first.influence, second.influence, atol=1e-6)


def test_finetune_trains_the_given_folder_further_and_tracin_finds_its_checkpoints(
        make_job, tracking_uri, ray_cluster, tmp_path):
    start = tmp_path / "pretrained"
    job = make_job({"training": {"output_dir": str(start)}, "methods": {"untrac_inv": None}})
    assert runner.invoke(app, ["train", str(job), "--quiet"]).exit_code == 0
    tuned = make_job({"model": {"config": None, "path": str(start), "finetune": True},
                      "training": {"epochs": 1, "checkpoint_every": 1},
                      "methods": {"untrac_inv": None, "ldo": {}, "tracin": {}}},
                     name="finetune.yaml")
    result = runner.invoke(app, ["run", str(tuned), "--tracking-uri", tracking_uri, "-q"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=tracking_uri)
    (run,) = [r for r in client.search_runs(
        [client.get_experiment_by_name("tests").experiment_id])
        if r.data.params.get("model.finetune") == "True"]
    studied = Path(run.data.tags["untrac_ray.model_dir"])
    assert studied != start and studied.is_dir()
    before = SharedWeights.from_model(load_model(str(start))).arrays
    after = SharedWeights.from_model(load_model(str(studied))).arrays
    assert set(before) == set(after)
    assert any(not np.allclose(before[n], after[n]) for n in before)  # trained further
    table = read_influence(run.info.run_id, tracking_uri)
    assert {"untrac", "ldo", "tracin"} <= set(table.method)
    assert np.isfinite(matrix(table, "tracin").to_numpy()).all()
    # the folder's weights are part of the key: other weights, another fine-tuned model
    spec = load_spec(tuned)
    key = model_key(spec)
    torch.manual_seed(1)
    model = load_model(str(start))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(start)
    assert model_key(load_spec(tuned)) != key
