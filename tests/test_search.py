"""Hyperparameter searches on real Ray Tune with a real MLflow SQLite store and a tiny model:
a 4-trial search, the ground truth computed once, ASHA, resuming a killed search, bad spaces,
and segmented unlearning equal to one unlearning run."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from conftest import merge, tiny_spec, with_four_train_sets
from untrac_ray.cli import app
from untrac_ray.compute.evaluation import sample_indices
from untrac_ray.compute.modeling import SharedWeights, build_model, config_from_dict
from untrac_ray.inputs.errors import SpecError
from untrac_ray.inputs.loading import load_spec, parse_spec
from untrac_ray.methods.schedule import eval_schedules
from untrac_ray.methods.segments import SegmentTask
from untrac_ray.methods.tasks import BASE, UnlearnTask
from untrac_ray.methods.workbench import Workbench
from untrac_ray.results.runs import read_influence, read_run_text
from untrac_ray.run.job_setup import prepare_data
from untrac_ray.run.runner import run_job
from untrac_ray.search.driver import run_search, tune_space
from untrac_ray.search.reporting import result_status

TRAIN, TEST = ["add_one", "double", "spell"], ["next_number", "twice"]
PARENT = "mlflow.parentRunId"


def _children(uri: str, parent: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], f"tags.`{PARENT}` = '{parent}'")


def _write(tmp: Path, spec: dict, name: str = "job.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ------------------------------------------------------------------ the search spec


@pytest.mark.parametrize("space, message", [
    ({"untrac.learning_rate": {"loguniform": [-1e-3, 1e-2]}},
     r"search\.space\.untrac\.learning_rate: loguniform bounds must be positive"),
    ({"untrac.learning_rate": {"uniform": [-1e-3, 1e-2]}},
     r"search\.space\.untrac\.learning_rate: value -0\.001 is refused"),
    ({"untrac.learning_rate": {"loguniform": [1e-2, 1e-4]}},
     r"search\.space\.untrac\.learning_rate: loguniform needs low < high"),
    ({"untrac.optimizer": ["adam", "adamw"]},
     r"search\.space\.untrac\.optimizer: value 'adamw' is refused: .*'adam', 'sgd' or"),
    ({"untrac.batch_size": []}, r"search\.space\.untrac\.batch_size: choice is empty"),
    ({"untrac.batch_size": {"uniform": [1, 8]}},
     r"search\.space\.untrac\.batch_size: batch_size is an integer"),
    ({"untrac.lr": [1e-3]}, r"search\.space\.untrac\.lr: unknown setting 'lr'"),
    ({"learning_rate": [1e-3]}, r"search\.space\.learning_rate: name the method"),
    ({"ekfac.damping": [1e-3]}, r"search\.space\.ekfac\.damping: 'ekfac' is not an unlearning"),
])
def test_a_bad_search_space_is_refused_naming_the_key(tmp_path, space, message):
    spec = merge(tiny_spec(tmp_path), {"methods": {"ldo": {}}, "search": {"space": space}})
    with pytest.raises(SpecError, match=message):
        parse_spec(spec)


def test_search_spec_other_checks_and_the_tune_space(tmp_path):
    base = merge(tiny_spec(tmp_path), {"methods": {"ldo": {}}})
    with pytest.raises(SpecError, match=r"search\.objective: pearson_mean scores against the "
                                        "ground truth; add methods.ldo"):
        parse_spec(merge(tiny_spec(tmp_path), {"search": {"space": {
            "untrac.learning_rate": [1e-3]}}}))
    with pytest.raises(SpecError, match=r"a grid search takes lists of values"):
        parse_spec(merge(base, {"search": {"algorithm": "grid", "space": {
            "untrac.learning_rate": {"loguniform": [1e-4, 1e-2]}}}}))
    with pytest.raises(SpecError, match=r"search\.foo: unknown key"):
        parse_spec(merge(base, {"search": {"foo": 1, "space": {"untrac.batch_size": [4]}}}))
    spec = parse_spec(merge(base, {"search": {"algorithm": "grid", "space": {
        "untrac.batch_size": [4, 8], "untrac_inv.learning_rate": [0.01, 0.1, 1.0]}}}))
    assert spec.search.num_trials() == 6
    space = tune_space(spec.search)
    assert space["untrac"]["batch_size"] == {"grid_search": [4, 8]}
    ranged = parse_spec(merge(base, {"search": {"space": {
        "untrac.max_steps": {"randint": [2, 4]},
        "untrac.learning_rate": {"loguniform": [1e-4, 1e-2]}}}}))
    domain = tune_space(ranged.search)["untrac"]["max_steps"]
    assert (domain.lower, domain.upper) == (2, 5)  # inclusive in the spec, exclusive in Tune


def test_a_bad_space_stops_tune_before_any_trial_or_run(make_job, tracking_uri):
    job = make_job({"methods": {"ldo": {}}, "search": {"space": {
        "untrac.learning_rate": {"loguniform": [0, 1e-2]}}}})
    result = CliRunner().invoke(app, ["tune", str(job), "--tracking-uri", tracking_uri, "-q"])
    assert result.exit_code == 2
    assert "search.space.untrac.learning_rate: loguniform bounds must be positive" in (
        result.output)
    assert not Path(tracking_uri.removeprefix("sqlite:///")).exists()
    assert not (job.parent / "cache" / "tune").exists()


# ------------------------------------------------------------------ segments


def test_segments_interleaved_equal_one_unlearning_run_and_recompute_when_state_is_lost(
        tmp_path):
    spec = parse_spec(merge(tiny_spec(tmp_path), {"model": {"config": {"resid_pdrop": 0.1}}}),
                      base_dir=tmp_path)  # dropout: the torch RNG must be kept per trajectory
    data = prepare_data(spec)
    config = config_from_dict(spec.model.config, len(data.tokenizer), data.tokenizer.eos_token_id)
    weights = {BASE: SharedWeights.from_model(build_model(config, seed=0))}
    sets = {n: data.tokenized(n) for n in TRAIN + TEST}
    rows = {n: sample_indices(len(s), 20, 0) for n, s in sets.items()}
    bench = Workbench(weights, sets, rows, 16)
    settings = spec.methods.untrac.model_copy(update={"batch_size": 4, "eval_every": 2})
    names = ("add_one", "double")  # 24 and 6 rows: 6 and 2 steps
    schedules = eval_schedules(settings, {n: len(sets[n]) for n in names})
    assert schedules == {"add_one": (2, 4, 6), "double": (1, 2, 2)}
    whole = {n: UnlearnTask("untrac", n, tuple(TEST), settings, schedules[n]).run(bench).losses
             for n in names}
    pieces: dict[str, dict] = {"add_one": {}, "double": {}}
    for i in range(3):
        for name in names:  # two trajectories interleaved on one model
            out = SegmentTask(f"t/{name}", "untrac", name, tuple(TEST), settings,
                              schedules[name][i], last=i == 2).run(bench)
            pieces[name].update(out.losses)
    assert pieces == whole
    fresh = SegmentTask("other/add_one", "untrac", "add_one", tuple(TEST), settings, 4,
                        last=True).run(bench)  # nothing kept for this key: from the base
    assert fresh.losses == {4: whole["add_one"][4]}


# ------------------------------------------------------------------ a whole search


@pytest.fixture(scope="module")
def searched(tmp_path_factory, ray_cluster):
    """A 4-trial random search over both methods' settings, LDO as the ground truth."""
    tmp = tmp_path_factory.mktemp("search")
    spec = merge(tiny_spec(tmp), {
        "methods": {"ldo": {}},
        "search": {"space": {"untrac.learning_rate": {"loguniform": [3e-4, 3e-2]},
                             "untrac.batch_size": [8, 12],
                             "untrac_inv.batch_size": [8, 16]},
                   "trials": 4, "seed": 1},
    })
    job = _write(tmp, spec)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    outcome = run_search(load_spec(job), uri)
    return {"tmp": tmp, "job": job, "uri": uri, "outcome": outcome}


def test_a_four_trial_search_logs_a_parent_with_four_nested_trial_runs(searched):
    outcome, uri = searched["outcome"], searched["uri"]
    assert len(outcome.trials) == 4 and set(outcome.trials.status) == {"completed"}
    children = _children(uri, outcome.parent_run_id)
    assert len(children) == 4
    assert {r.info.status for r in children} == {"FINISHED"}
    client = MlflowClient(tracking_uri=uri)
    for child in children:
        assert {"untrac.learning_rate", "untrac.batch_size", "untrac_inv.batch_size"} <= set(
            child.data.params)
        history = client.get_metric_history(child.info.run_id, "objective")
        rounds = 3 if child.data.params["untrac.batch_size"] == "8" else 2  # 24 rows
        assert [m.step for m in history] == list(range(1, rounds + 1))  # one per eval point
        names = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"influence.parquet", "score_table.parquet"} <= names
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.tags["untrac_ray.kind"] == "search"
    names = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"best_job.yaml", "trials.parquet", "search.json", "influence.parquet"} <= names
    figures = {a.path for a in client.list_artifacts(outcome.parent_run_id, "figures")}
    assert figures == {"figures/objective_vs_settings.png"}


def test_the_best_trial_objective_is_its_child_runs_metric(searched):
    outcome, uri = searched["outcome"], searched["uri"]
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(outcome.parent_run_id)
    best = outcome.best
    assert best["objective"] == pytest.approx(outcome.trials.objective.max())
    assert parent.data.metrics["best_objective"] == best["objective"]
    assert parent.data.tags["untrac_ray.best_run_id"] == best["run_id"]
    child = client.get_run(best["run_id"])
    assert child.data.metrics["objective"] == best["objective"]
    assert child.data.tags["untrac_ray.trial_id"] == best["trial_id"]


def test_the_best_configuration_job_file_loads_and_runs_to_the_same_numbers(searched):
    outcome, uri, tmp = searched["outcome"], searched["uri"], searched["tmp"]
    text = read_run_text(outcome.parent_run_id, uri, "best_job.yaml")
    assert text == Path(outcome.best_job_path).read_text()
    spec = load_spec(_write(tmp, yaml.safe_load(text), "best.yaml"))
    for key, value in outcome.best["config"].items():
        method, setting = key.split(".")
        assert getattr(getattr(spec.methods, method), setting) == value
    assert spec.search is None and spec.methods.ldo is None
    assert spec.ground_truth.run_id == outcome.parent_run_id  # LDO reused, not retrained
    job = run_job(spec, uri)
    top = job.scores[job.scores.headline & (job.scores.kind == "estimate")
                     & (job.scores.score == "pearson") & (job.scores.test_set == "__mean__")]
    last = top.set_index("method")["value"]  # at the last point
    assert float(last.mean()) == pytest.approx(outcome.best["objective"], abs=1e-9)
    trial = read_influence(outcome.best["run_id"], uri)
    ours = job.table[job.table.method.isin(["untrac", "untrac_inv"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(ours, trial.reset_index(drop=True), check_exact=False,
                                  atol=1e-9)


def test_the_ground_truth_is_computed_once_per_search(searched):
    outcome = searched["outcome"]
    assert outcome.ground_truth_tasks == len(TRAIN) + 1  # one LDO, by the driver
    ldo = read_influence(outcome.parent_run_id, searched["uri"])
    assert set(ldo.method) == {"ldo"} and len(ldo) == len(TRAIN) * len(TEST)
    # Every task a trial ran was an unlearning segment: rounds x sets, nothing else.
    exp = Path(outcome.experiment_path)
    for result in exp.glob("run_trial_*/result.json"):
        reports = [json.loads(line) for line in result.read_text().splitlines()]
        spec = load_spec(searched["job"])
        bs = reports[0]["config"]["untrac"]["batch_size"]
        settings = spec.methods.untrac.model_copy(update={"batch_size": bs})
        untrac_rounds = len(eval_schedules(settings, {"add_one": 24})["add_one"])
        expected = len(TRAIN) * untrac_rounds + len(TEST) * 2  # every set, every round
        assert sum(r["tasks"] for r in reports) == expected
        assert all(math.isfinite(r["objective"]) for r in reports)


def test_a_trial_with_two_actors_in_its_placement_group_gives_the_same_objective(
        searched, ray_cluster):
    outcome, tmp = searched["outcome"], searched["tmp"]
    spec = yaml.safe_load(searched["job"].read_text())
    spec["methods"].pop("ldo")
    spec["ground_truth"] = {"run_id": outcome.parent_run_id}  # a search's LDO as the truth
    spec["search"] = {"algorithm": "grid", "actors_per_trial": 2,
                      "space": {k: [v] for k, v in outcome.best["config"].items()}}
    again = run_search(load_spec(_write(tmp, spec, "two_actors.yaml")), searched["uri"])
    assert again.ground_truth_tasks == 0
    assert again.best["objective"] == pytest.approx(outcome.best["objective"], abs=1e-12)


# ------------------------------------------------------------------ early stopping


def test_asha_stops_a_poor_trial_early_and_a_diverging_trial_fails_alone(tmp_path,
                                                                         ray_cluster):
    (tmp_path / "metric.py").write_text(
        "def moved(table, truth):\n"
        "    return float(table['influence'].abs().mean())\n")
    spec = merge(tiny_spec(tmp_path), {
        "methods": {"untrac_inv": None,  # SGD, 6 evaluation rounds
                    "untrac": {"optimizer": "sgd", "batch_size": 4, "eval_every": 1}},
        "search": {"algorithm": "grid", "max_concurrent": 1,  # in this order, one at a time
                   "space": {"untrac.learning_rate": [1e-2, 1e-8, 1e30]},
                   "objective": {"function": "metric.py:moved"},
                   "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2}},
    })
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = run_search(load_spec(_write(tmp_path, spec)), uri)
    trials = outcome.trials.set_index("untrac.learning_rate")
    assert trials.loc[1e-2, "status"] == "completed" and trials.loc[1e-2, "rounds_run"] == 6
    assert trials.loc[1e-8, "status"] == "stopped early"
    assert trials.loc[1e-8, "rounds_run"] == 1  # stopped at its first rung
    client = MlflowClient(tracking_uri=uri)
    stopped = client.get_run(trials.loc[1e-8, "run_id"])
    assert stopped.data.tags["untrac_ray.trial_status"] == "stopped early"
    assert len(client.get_metric_history(stopped.info.run_id, "objective")) == 1
    assert trials.loc[1e30, "status"] == "failed"
    assert "while unlearning dataset 'add_one' at step 1" in trials.loc[1e30, "error"]
    failed = client.get_run(trials.loc[1e30, "run_id"])
    assert failed.info.status == "FAILED" and "at step 1" in failed.data.tags["untrac_ray.error"]
    assert outcome.best["config"]["untrac.learning_rate"] == 1e-2
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_failed"] == 1
    assert parent.data.metrics["trials_stopped_early"] == 1


def test_optuna_tpe_searches_the_space_when_optuna_is_installed(tmp_path, ray_cluster):
    pytest.importorskip("optuna")
    (tmp_path / "metric.py").write_text(
        "def moved(table, truth):\n    return float(table['influence'].abs().mean())\n")
    spec = merge(tiny_spec(tmp_path), {
        "methods": {"untrac_inv": None},
        "search": {"algorithm": "optuna", "trials": 3, "seed": 3,
                   "space": {"untrac.learning_rate": {"loguniform": [1e-4, 1e-2]},
                             "untrac.optimizer": ["adam", "sgd"]},
                   "objective": {"function": "metric.py:moved"}},
    })
    outcome = run_search(load_spec(_write(tmp_path, spec)), f"sqlite:///{tmp_path / 'm.db'}")
    assert len(outcome.trials) == 3 and set(outcome.trials.status) == {"completed"}
    assert outcome.trials["untrac.learning_rate"].between(1e-4, 1e-2).all()
    assert set(outcome.trials["untrac.optimizer"]) <= {"adam", "sgd"}


# ------------------------------------------------------------------ resume


def _finished_children(uri: str) -> dict[str, str]:
    """Trial id -> run id of the FINISHED trial runs in the store."""
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.`untrac_ray.kind` = 'trial'")
    return {r.data.tags["untrac_ray.trial_id"]: r.info.run_id for r in runs
            if r.info.status == "FINISHED"}


def _trials_done(storage: Path) -> int:
    """Trials whose last round Tune has logged (read from its files, not the busy store)."""
    done = 0
    for result in storage.glob("*/run_trial_*/result.json"):
        lines = result.read_text().splitlines()
        with contextlib.suppress(ValueError, IndexError):
            last = json.loads(lines[-1])
            done += last["round"] == last["rounds"]
    return done


def test_resume_after_a_killed_driver_runs_only_the_missing_trials(tmp_path, ray_cluster):
    (tmp_path / "metric.py").write_text(  # slow rounds, so that the kill lands mid-search
        "import time\n"
        "from untrac_ray.results.scoring import pearson\n"
        "def slow_pearson(table, truth):\n"
        "    time.sleep(1.0)\n"
        "    est = table[table.method == 'untrac'].pivot_table(\n"
        "        index='train_set', columns='test_set', values='influence')\n"
        "    est = est.reindex(index=truth.index, columns=truth.columns)\n"
        "    return float(pearson(est.to_numpy().ravel(), truth.to_numpy().ravel()))\n")
    spec = merge(tiny_spec(tmp_path), {
        "methods": {"untrac_inv": None, "ldo": {}},
        "resources": {"local_cpus": 2},
        "search": {"space": {"untrac.learning_rate": {"loguniform": [1e-4, 1e-2]}},
                   "objective": {"function": "metric.py:slow_pearson"},
                   "trials": 4, "max_concurrent": 1},
    })
    job = _write(tmp_path, spec)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "untrac_ray.cli", "tune", str(job), "--tracking-uri", uri],
            cwd=tmp_path, env=env, start_new_session=True, stdout=out, stderr=out)
    # its log (stderr to a file) gets one whole line per trial's news as the search goes
    trial_line = re.compile(r"^trial \d \(untrac\.learning_rate=[0-9.e-]+\): completed, "
                            r"point (\d)/\1, objective -?[0-9.]+ \[[1-4]/4 ended\]$", re.M)
    try:
        deadline = time.time() + 300
        while _trials_done(tmp_path / "cache" / "tune") < 1 or not trial_line.search(
                log.read_text()):
            assert driver.poll() is None, f"the search ended early: {log.read_text()[-2000:]}"
            assert time.time() < deadline, f"no trial finished in time: {log.read_text()[-2000:]}"
            time.sleep(0.3)
        time.sleep(1.5)  # its run is closed, and Tune saves its state every second
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything it started
        driver.wait()
    before = _finished_children(uri)
    assert 1 <= len(before) < 4

    result = CliRunner().invoke(app, ["tune", str(job), "--resume", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    # the driver's tasks (base losses, LDO) were stored in the parent run: restored, not rerun
    assert re.search(r"restored (\d+) of \1 tasks of the search's driver", result.output)
    assert "leave-dataset-out" not in result.output  # LDO not run again
    after = _finished_children(uri)
    assert len(after) == 4
    assert {k: after[k] for k in before} == before  # finished trials were not run again
    client = MlflowClient(tracking_uri=uri)
    parent = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                "tags.`untrac_ray.kind` = 'search'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert len(_children(uri, parent[0].info.run_id)) == 4  # no stale or duplicated runs
    again = CliRunner().invoke(app, ["tune", str(job), "--resume", "--tracking-uri", uri])
    assert again.exit_code == 2 and "nothing to resume" in again.output


def test_submit_can_run_a_search_on_a_cluster(tmp_path):
    from untrac_ray.submit.staging import entrypoint, stage_job

    assert entrypoint("python", "http://mlflow:5000", command="tune").startswith(
        "python -m untrac_ray.cli tune job.yaml --address auto")
    assert " tune --resume job.yaml " in entrypoint("python", "http://m", command="tune --resume")
    (tmp_path / "metric.py").write_text("def f(table, truth):\n    return 0.0\n")
    spec = merge(tiny_spec(tmp_path), {"search": {
        "space": {"untrac.batch_size": [4, 8]}, "objective": {"function": "metric.py:f"},
        "storage_path": str(tmp_path / "tune")}})
    staged = stage_job(_write(tmp_path, spec))
    try:
        out = yaml.safe_load((staged.folder / "job.yaml").read_text())
        where, name = out["search"]["objective"]["function"].split(":")
        assert (staged.folder / where).read_text().startswith("def f") and name == "f"
        assert out["search"]["storage_path"] is None  # local and not shared: the cluster's
    finally:
        staged.cleanup()


def test_the_search_demo_job_validates_and_searches_six_settings_against_ldo():
    from untrac_ray.inputs.preflight import check_job

    spec = load_spec(Path(__file__).resolve().parents[1] / "jobs" / "search_demo.yaml")
    check_job(spec)  # its data, columns and subsets, as `validate` checks them
    assert spec.search is not None and "ldo" in spec.methods.enabled()
    assert spec.search.num_trials() == 6
    space = tune_space(spec.search)
    assert set(space["untrac"]) == {"learning_rate", "optimizer"}


def test_a_trial_that_reported_its_last_round_is_finished_with_or_without_tunes_done_flag():
    last = {"round": 3, "rounds": 3}
    assert result_status({**last, "done": True}, None) == "completed"
    # a driver killed within a second of the trial's end: Tune's saved state lacks `done`
    assert result_status(last, None) == "completed"
    assert result_status({"round": 1, "rounds": 3, "done": True}, None) == "stopped early"
    assert result_status({"round": 1, "rounds": 3}, None) == "pending"  # cut off: runs again
    assert result_status({}, None) == "pending"
    assert result_status(last, "ValueError: boom") == "failed"


def test_a_search_can_maximise_the_lds_computed_once_before_the_trials(tmp_path, ray_cluster):
    """objective metric lds: the subsets are retrained once by the driver (stored in the
    parent run), and each trial's objective is the LDS of its cells against them."""
    from untrac_ray.results.runs import read_run_table
    from untrac_ray.results.scores import score_frame
    from untrac_ray.results.scoring import MEAN_OVER_TESTS

    with pytest.raises(SpecError, match="lds scores against retraining on random subsets"):
        parse_spec(merge(tiny_spec(tmp_path), {"search": {
            "space": {"untrac.learning_rate": [1e-3]}, "objective": {"metric": "lds"}}}),
            base_dir=tmp_path)
    spec = merge(with_four_train_sets(tiny_spec(tmp_path)), {  # C(4, 2) = 6 subsets
        "methods": {"untrac_inv": None, "lds": {"subsets": 6, "noise_subsets": 0}},
        "search": {"algorithm": "grid", "space": {"untrac.learning_rate": [1e-3, 1e-2]},
                   "objective": {"metric": "lds"}},
    })
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    outcome = run_search(load_spec(_write(tmp_path, spec)), uri)
    assert len(outcome.trials) == 2 and set(outcome.trials.status) == {"completed"}
    assert outcome.ground_truth_tasks == 6
    subsets = read_run_table(outcome.parent_run_id, uri, "lds_subsets")
    assert len(subsets) == 6 * len(TEST)
    for child in _children(uri, outcome.parent_run_id):
        table = read_influence(child.info.run_id, uri)
        last = table[table["point"] == table["point"].max()]
        scores = score_frame(last, [*TRAIN, "teach_twice"], TEST, subsets=subsets,
                             intervals=False)
        want = float(scores.loc[(scores["test_set"] == MEAN_OVER_TESTS)
                                & (scores["score"] == "lds"), "value"].iloc[0])
        assert child.data.metrics["objective"] == pytest.approx(want)
