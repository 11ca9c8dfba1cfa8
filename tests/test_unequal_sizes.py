"""Training sets of very different sizes (24, 6, 12 and 3 rows), dropout on, every method,
through the CLI: every final matrix is complete and every score is a number.

Before evaluation points (schedule.py), each set's trajectory ended at its own step and the
final matrix took one step label for all of them: +nan for every shorter set."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from conftest import TRAIN_GROUPS, merge, run_through_cli, tiny_spec, write_rows
from untrac_ray.cli import app
from untrac_ray.compute.evaluation import sample_indices
from untrac_ray.compute.modeling import SharedWeights, build_model, config_from_dict
from untrac_ray.inputs.loading import load_spec
from untrac_ray.inputs.spec_sections import CELL_METHODS
from untrac_ray.methods.tasks import GradientTask
from untrac_ray.methods.workbench import Workbench
from untrac_ray.results.runs import read_influence, read_run_table
from untrac_ray.results.tables import matrix, points_of
from untrac_ray.run.job_setup import prepare_data

runner = CliRunner()
GROUPS = {**TRAIN_GROUPS, "negate": lambda i: (f"What is minus {i}?", str(-i))}
SIZES = {"add_one": 24, "double": 6, "spell": 12, "negate": 3}
TRAIN, TEST = list(SIZES), ["next_number", "twice"]
TOTAL_STEPS = {"add_one": 3, "double": 1, "spell": 2, "negate": 1}  # one epoch at batch 8


def unequal_spec(tmp) -> dict:
    write_rows(tmp / "train4.csv", GROUPS, SIZES)
    return merge(tiny_spec(tmp), {
        "data": {"train": [{"name": g, "source": "train4.csv", "subset": g} for g in SIZES]},
        "training": {"checkpoint_every": 3},
        "methods": {
            # the case: one epoch, absolute eval steps (read on the longest set)
            "untrac": {"optimizer": "adam", "learning_rate": 1e-3, "batch_size": 8,
                       "epochs": 1, "eval_every": 1},
            "untrac_inv": {"optimizer": "sgd", "learning_rate": 0.05, "batch_size": 4,
                           "epochs": 1, "max_steps": None, "eval_steps": None,
                           "eval_points": 4},
            "ldo": {}, "graddot": {}, "gradcos": {}, "tracin": {},
            "ekfac": {"strategy": "ekfac", "batch_size": 8},
        },
    })


@pytest.fixture(scope="module")
def unequal(tmp_path_factory, ray_cluster):
    tmp = tmp_path_factory.mktemp("unequal")
    return run_through_cli(tmp, unequal_spec(tmp))


def test_every_methods_final_matrix_is_complete(unequal):
    table = unequal["table"]
    assert set(table["method"]) == set(CELL_METHODS)
    for method in CELL_METHODS:
        mat = matrix(table, method, None, TRAIN, TEST)
        assert mat.shape == (4, 2), method
        assert np.isfinite(mat.to_numpy()).all(), (method, mat)
    assert "nan" not in unequal["output"].lower()


def test_trajectories_line_up_by_point_and_end_at_each_sets_own_last_step(unequal):
    table = unequal["table"]
    untrac = table[table["method"] == "untrac"]
    assert points_of(table, "untrac") == [1, 2, 3]  # eval_every 1 on the longest set (3 steps)
    last = untrac[untrac["point"] == 3].groupby("train_set")["step"].max().to_dict()
    assert last == TOTAL_STEPS
    # a set shorter than the points is measured once per step and repeats: same cells
    negate = untrac[untrac["train_set"] == "negate"].sort_values(["test_set", "point"])
    assert negate["step"].tolist() == [1, 1, 1] * 2
    assert np.allclose(negate.groupby("test_set")["influence"].std(), 0.0)
    inv = table[table["method"] == "untrac_inv"]
    assert points_of(table, "untrac_inv") == [1, 2, 3, 4]
    # test sets of 16 and 10 rows at batch 4: 4 and 3 steps, each ending at its own last
    assert inv.groupby("test_set")["step"].max().to_dict() == {"next_number": 4, "twice": 3}


def test_scores_are_numbers_at_the_fixed_point_with_hindsight_beside(unequal):
    run, uri = unequal["run"], unequal["uri"]
    scores = read_run_table(run.info.run_id, uri, "score_table")
    top = scores[scores["headline"] & (scores["kind"] == "estimate")
                 & (scores["score"] == "pearson")]
    assert set(top["method"]) == set(CELL_METHODS) - {"ldo"}
    for r in top.itertuples():
        assert math.isfinite(r.value), r  # the mean over test sets and all cells pooled
    by_method = top[top["test_set"] == "__mean__"].set_index("method")
    assert by_method.loc["untrac", "point"] == 3 and by_method.loc["untrac_inv", "point"] == 4
    headline = dict(part.split("=") for part in
                    run.data.tags["untrac_ray.headline_pearson"].split(","))
    assert float(headline["untrac"]) == pytest.approx(by_method.loc["untrac", "value"],
                                                      abs=1e-3)
    words = " ".join(unequal["output"].split())  # the table wraps at the terminal's width
    assert "at the point fixed in advance" in words and "chosen on the ground truth" in words


def test_mlflow_metrics_and_show_use_the_points(unequal):
    client, run = unequal["client"], unequal["run"]
    history = client.get_metric_history(run.info.run_id, "influence/untrac/negate/twice")
    assert sorted(m.step for m in history) == [1, 2, 3]
    result = runner.invoke(app, ["show", run.info.run_id, "--tracking-uri", unequal["uri"],
                                 "--method", "untrac", "--point", "2"])
    assert result.exit_code == 0, result.output
    assert "point 2/3 (steps 1-2)" in result.output
    result = runner.invoke(app, ["show", run.info.run_id, "--tracking-uri", unequal["uri"],
                                 "--method", "untrac", "--point", "9"])
    assert result.exit_code == 2 and "no point 9" in result.output


def test_sum_aggregate_weighs_a_training_set_by_its_tokens(tmp_path):
    """GradDot's `sum` is the gradient of the summed token loss: exactly the mean's gradient
    times the set's labelled tokens (the test side stays a mean in both)."""
    spec = load_spec(_write(tmp_path, unequal_spec(tmp_path)))
    data = prepare_data(spec)
    config = config_from_dict(spec.model.config, len(data.tokenizer), data.tokenizer.eos_token_id)
    sets = {n: data.tokenized(n) for n in data.sets}
    bench = Workbench({"base": SharedWeights.from_model(build_model(config, seed=0))}, sets,
                      {n: sample_indices(len(s), None, 0) for n, s in sets.items()}, 16)
    for name in ("add_one", "negate"):
        mean = bench.run(GradientTask("base", name, True, 8, "mean")).payload
        total = bench.run(GradientTask("base", name, True, 8, "sum")).payload
        tokens = sum(int((sets[name].batch([i])["labels"][:, 1:] != -100).sum())
                     for i in range(len(sets[name])))
        assert np.allclose(total, mean * tokens, rtol=1e-4, atol=1e-7)


def _write(tmp, spec: dict):
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_killed_run_of_every_method_resumes_with_the_same_cells(unequal):
    """Gradients (GradDot, GradCos, TracIn's checkpoints), EK-FAC, LDO and the trajectories are
    all restored by `run --resume`: the run is marked KILLED with some finished tasks taken
    away (as if the driver died before them); only those run again, and every cell of every
    method equals the undisturbed run's. (Last in this file: it continues the shared run.)"""
    client, run, uri = unequal["client"], unequal["run"], unequal["uri"]
    tasks = Path(run.info.artifact_uri.removeprefix("file://")) / "tasks"
    stored = sorted(p.name for p in tasks.glob("*.npz"))
    lost = [next(n for n in stored if n.startswith(prefix)) for prefix in
            ("gradient-base-", "gradient-ckpt", "ekfac-", "ldo-", "unlearn-untrac-",
             "unlearn-untrac_inv-")]
    for name in lost:
        (tasks / name).unlink()
    client.set_terminated(run.info.run_id, "KILLED")
    result = runner.invoke(app, ["run", str(unequal["job"]), "--tracking-uri", uri, "--resume"])
    assert result.exit_code == 0, result.output
    assert f"resumed: restored {len(stored) - len(lost)} of {len(stored)} tasks" in \
        " ".join(result.output.split()), result.output
    again = client.get_run(run.info.run_id)
    assert again.info.status == "FINISHED"
    assert sorted(p.name for p in tasks.glob("*.npz")) == stored  # the lost ones, redone
    keys = ["method", "point", "train_set", "test_set"]
    both = pd.merge(unequal["table"], read_influence(run.info.run_id, uri), on=keys,
                    suffixes=("", "_resumed"), validate="1:1")
    assert len(both) == len(unequal["table"]) and set(both["method"]) == set(CELL_METHODS)
    np.testing.assert_allclose(both["influence_resumed"], both["influence"], rtol=1e-5,
                               atol=1e-7)
