"""Leave-dataset-out and the LDS's subsets with the steps held (methods.ldo.steps,
methods.lds.steps): on training sets of unequal size, `epochs` (the default, the paper's)
retrains without a set for training.epochs over the rows that remain, so for fewer optimizer
steps than the full training; `same` retrains for exactly the full training's steps. Each
retraining's steps are read back from the rows the run stored (ldo_seeds, lds_subsets). A
task or run stored for `epochs` keeps the key it had before the setting existed, and is never
reused for `same`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import merge, run_through_cli, tiny_spec, with_four_train_sets
from untrac_ray.cli import app
from untrac_ray.inputs.errors import SpecError
from untrac_ray.inputs.fingerprints import results_key, results_key_material, spec_hash
from untrac_ray.inputs.loading import parse_spec
from untrac_ray.inputs.spec_sections import KEPT_SEPARATOR, TrainingSpec
from untrac_ray.methods.tasks import LdoTask, SubsetTask
from untrac_ray.results.runs import read_run_table
from untrac_ray.results.task_store import task_key, task_settings

runner = CliRunner()
# tiny_spec's training sets (24, 6, 12 rows) and with_four_train_sets' fourth (10 rows)
ROWS = {"add_one": 24, "double": 6, "spell": 12, "teach_twice": 10}
BATCH, EPOCHS = 8, 2
FULL_STEPS = EPOCHS * math.ceil(sum(ROWS.values()) / BATCH)  # 14


def epoch_steps(kept: list[str]) -> int:
    """Optimizer steps of training.epochs over the rows of `kept` (batch 8)."""
    return EPOCHS * math.ceil(sum(ROWS[k] for k in kept) / BATCH)


def steps_job(tmp: Path, steps: str | None) -> dict:
    """Four training sets of unequal size, LDO and LDS (6 subsets of 2 sets) with `steps`
    (None: the key left out, its default), GradDot as the estimate scored."""
    chosen = {} if steps is None else {"steps": steps}
    return merge(with_four_train_sets(tiny_spec(tmp)), {
        "training": {"batch_size": BATCH, "epochs": EPOCHS},
        "methods": {"untrac": None, "untrac_inv": None, "graddot": {"batch_size": 16},
                    "ldo": {"seeds": [0], **chosen},
                    "lds": {"subsets": 6, "noise_subsets": 0, **chosen}},
        "resources": {"local_cpus": 2, "num_actors": 1},
    })


@pytest.fixture(scope="module")
def epochs_run(tmp_path_factory, ray_cluster):
    tmp = tmp_path_factory.mktemp("steps_epochs")
    return run_through_cli(tmp, steps_job(tmp, None))


def test_the_default_retrains_for_the_epochs_over_the_remaining_rows(epochs_run):
    run, uri = epochs_run["run"], epochs_run["uri"]
    ldo = read_run_table(run.info.run_id, uri, "ldo_seeds")
    assert set(ldo["steps_full"]) == {FULL_STEPS}
    took = ldo.groupby("train_set")["steps"].unique().to_dict()
    for left_out, steps in took.items():
        kept = [k for k in ROWS if k != left_out]
        assert list(steps) == [epoch_steps(kept)], left_out
        assert steps[0] < FULL_STEPS, left_out  # every set here adds steps
    subsets = read_run_table(run.info.run_id, uri, "lds_subsets")
    assert len(subsets) == 6 * 2
    for r in subsets.itertuples():
        assert r.steps == epoch_steps(r.kept.split(KEPT_SEPARATOR)) < FULL_STEPS, r


def test_same_retrains_every_complement_and_subset_for_the_full_steps(epochs_run):
    """The `same` job in the store of the `epochs` one: its run is not the `epochs` run
    resumed (another results key), and every retraining took the full run's steps; the test
    losses differ from the `epochs` retrainings'. Killed and resumed, the restored tasks
    still say how many steps they took."""
    uri = epochs_run["uri"]
    client = epochs_run["client"]
    job = epochs_run["job"].parent / "same.yaml"  # beside it: the same data files
    # the epochs job's data and cache, the same base model: only methods.*.steps differs
    spec = yaml.safe_load(epochs_run["job"].read_text())
    for method in ("ldo", "lds"):
        spec["methods"][method]["steps"] = "same"
    job.write_text(yaml.safe_dump(spec, sort_keys=False))
    client.set_terminated(epochs_run["run"].info.run_id, "KILLED")  # resumable, for its key
    refused = runner.invoke(app, ["run", str(job), "--tracking-uri", uri, "--resume"])
    assert refused.exit_code != 0
    assert "made by a different spec" in " ".join(refused.output.split()), refused.output
    client.set_terminated(epochs_run["run"].info.run_id, "FINISHED")

    result = runner.invoke(app, ["run", str(job), "--tracking-uri", uri, "--quiet"])
    assert result.exit_code == 0, result.output
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                              order_by=["attributes.start_time DESC"])
    same_run = runs[0]
    assert same_run.info.run_id != epochs_run["run"].info.run_id
    ldo = read_run_table(same_run.info.run_id, uri, "ldo_seeds")
    assert set(ldo["steps"]) == set(ldo["steps_full"]) == {FULL_STEPS}
    assert len(ldo) == len(ROWS) * 2
    subsets = read_run_table(same_run.info.run_id, uri, "lds_subsets")
    assert len(subsets) == 6 * 2 and set(subsets["steps"]) == {FULL_STEPS}
    before = read_run_table(epochs_run["run"].info.run_id, uri, "ldo_seeds")
    both = ldo.merge(before, on=["train_set", "test_set"], suffixes=("", "_epochs"))
    assert (both["loss_full"] - both["loss_full_epochs"]).abs().max() < 1e-5  # same training
    assert (both["loss_without"] - both["loss_without_epochs"]).abs().min() > 1e-6

    # a resumed `same` run: restored tasks keep their steps
    tasks = Path(same_run.info.artifact_uri.removeprefix("file://")) / "tasks"
    stored = sorted(p.name for p in tasks.glob("*.npz"))
    lost = [n for n in stored if n.startswith(("ldo-", "subset-"))][:2]
    for name in lost:
        (tasks / name).unlink()
    client.set_terminated(same_run.info.run_id, "KILLED")
    resumed = runner.invoke(app, ["run", str(job), "--tracking-uri", uri, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"restored {len(stored) - len(lost)} of {len(stored)} tasks" in \
        " ".join(resumed.output.split()), resumed.output
    again = read_run_table(same_run.info.run_id, uri, "ldo_seeds")
    assert set(again["steps"]) == {FULL_STEPS}
    assert set(read_run_table(same_run.info.run_id, uri, "lds_subsets")["steps"]) == {FULL_STEPS}


def test_a_stored_epochs_task_keeps_its_key_and_is_not_a_same_task():
    """`epochs` tasks hash as before the setting existed (no `steps` among their settings);
    a `same` task, which carries the full run's steps, hashes otherwise."""
    training = TrainingSpec(batch_size=BATCH, epochs=EPOCHS)
    for kind, make in (("LdoTask", lambda s: LdoTask("double", ("add_one", "double"), ("x",),
                                                     training, 0, s)),
                       ("SubsetTask", lambda s: SubsetTask(0, ("add_one",), ("x",), training,
                                                           0, s))):
        epochs, same = make(None), make(FULL_STEPS)
        settings = task_settings(epochs)
        assert settings["kind"] == kind and "steps" not in settings
        assert task_settings(same)["steps"] == FULL_STEPS
        label = task_key(epochs, "job").rsplit("-", 1)[0]
        assert task_key(epochs, "job") == f"{label}-{spec_hash(settings, 'job')}"
        assert task_key(same, "job") != task_key(epochs, "job")


def test_the_results_key_changes_only_with_same(tmp_path):
    default = parse_spec(steps_job(tmp_path, None))
    assert default.methods.ldo.steps == default.methods.lds.steps == "epochs"
    material = results_key_material(default)
    assert "steps" not in material["methods"]["ldo"] and "steps" not in material["methods"]["lds"]
    assert results_key(parse_spec(steps_job(tmp_path, "epochs"))) == results_key(default)
    for method in ("ldo", "lds"):
        one = merge(steps_job(tmp_path, None), {"methods": {method: {"steps": "same"}}})
        assert results_key(parse_spec(one)) != results_key(default), method


@pytest.mark.parametrize("method", ["ldo", "lds"])
def test_an_unknown_steps_value_is_one_line_naming_the_key(tmp_path, method):
    job = merge(steps_job(tmp_path, None), {"methods": {method: {"steps": "fixed"}}})
    with pytest.raises(SpecError) as err:
        parse_spec(job)
    message = str(err.value)
    assert "\n" not in message and f"methods.{method}.steps" in message
    assert "'epochs' or 'same'" in message and "fixed" in message
