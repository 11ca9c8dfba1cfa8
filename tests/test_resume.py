"""Durable jobs: a driver killed with SIGKILL mid-job leaves a run that `runs` marks stale and
`run --resume` continues: it restores the finished tasks, runs only the missing ones, and ends
the same MLflow run FINISHED with the cells of an undisturbed run. A resume against a changed
spec or changed data refuses in one line. Real processes, a real signal, a real store."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from conftest import merge, tiny_spec
from untrac_ray.cli import app
from untrac_ray.results.runs import read_influence


def _stored_tasks(tmp: Path) -> dict[str, float]:
    """The finished tasks stored in the store's runs so far: file name -> mtime."""
    return {p.name: p.stat().st_mtime_ns
            for p in tmp.glob("mlartifacts/**/tasks/*.npz")}


def _job(tmp: Path) -> dict:
    return merge(tiny_spec(tmp), {
        "methods": {"untrac": {"epochs": 20, "eval_every": None, "eval_points": 2},
                    "ldo": {"seeds": [0]}},
        "resources": {"local_cpus": 2, "num_actors": 1},
    })


def _cli(*args: str):
    return CliRunner().invoke(app, [*args, "--quiet"])


def _driver_midway(tmp: Path, spec: dict, heartbeat_s: int) -> tuple[subprocess.Popen, Path,
                                                                     str]:
    """`untrac-ray run` of the job as a process, returned once 7 of its tasks are stored
    (it is still running), with the job file and the store's URI."""
    job = tmp / "job.yaml"
    job.write_text(yaml.safe_dump(spec, sort_keys=False))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = {**os.environ, "UNTRAC_RAY_HEARTBEAT_S": str(heartbeat_s)}
    proc = subprocess.Popen([sys.executable, "-m", "untrac_ray.cli", "run", str(job),
                             "--tracking-uri", uri, "--quiet"], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while (len(_stored_tasks(tmp)) < 7 and proc.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.2)
    if proc.poll() is not None:
        raise AssertionError(f"the job ended before it could be stopped: {proc.communicate()}")
    return proc, job, uri


def killed_midway(tmp: Path, spec: dict) -> tuple[Path, str, dict[str, float]]:
    """The job's driver killed with SIGKILL once 7 of its tasks are stored: the job file, the
    store's URI and the stored tasks (a task killed between its spool file and its upload is
    not among them: `spooled` names it, and a resume restores it from the spool)."""
    proc, job, uri = _driver_midway(tmp, spec, heartbeat_s=2)
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    time.sleep(1)  # a task file being uploaded at the kill may land a moment later
    return job, uri, _stored_tasks(tmp)


def spooled(tmp: Path) -> set[str]:
    """The finished tasks kept only in the job's local spool (cache_dir/runs/<run>/tasks)."""
    return {p.name for p in (tmp / "cache" / "runs").glob("*/tasks/*.npz")}


def restored_count(output: str, n_tasks: int) -> int:
    """N of the resumed run's "restored N of n_tasks tasks" line."""
    return int(re.search(rf"restored (\d+) of {n_tasks} tasks", output).group(1))


def test_a_killed_driver_resumes_the_same_run_and_runs_only_missing_tasks(tmp_path):
    spec = _job(tmp_path)
    job, uri, before = killed_midway(tmp_path, spec)
    assert len(before) >= 7
    local = spooled(tmp_path)

    client = MlflowClient(tracking_uri=uri)
    (killed,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert killed.info.status == "RUNNING"  # nobody closed it
    listed = CliRunner().invoke(app, ["runs", "--tracking-uri", uri, "--format", "csv"])
    assert listed.exit_code == 0 and ",STALE," in listed.output, listed.output

    # a changed spec or changed data refuses in one line, before any work
    changed = merge(spec, {"methods": {"untrac": {"learning_rate": 2e-3}}})
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    refused = _cli("run", str(tmp_path / "changed.yaml"), "--tracking-uri", uri, "--resume")
    assert refused.exit_code == 2
    assert "different spec" in refused.output and len(refused.output.strip().splitlines()) == 1
    data = tmp_path / "train.csv"
    original = data.read_bytes()
    data.write_bytes(original + b"What comes after 99?,100,add_one\n")
    refused = _cli("run", str(job), "--tracking-uri", uri, "--resume")
    data.write_bytes(original)
    assert refused.exit_code == 2, refused.output
    assert "the data changed" in refused.output, refused.output
    assert len(refused.output.strip().splitlines()) == 1, refused.output

    started = time.perf_counter()
    resumed = CliRunner().invoke(app, ["run", str(job), "--tracking-uri", uri, "--resume"])
    resume_s = time.perf_counter() - started
    assert resumed.exit_code == 0, resumed.output
    after = _stored_tasks(tmp_path)
    n_tasks = 5 + 4 + 3 + 2  # base losses, ldo (all sets + one without each), untrac, inverse
    assert len(after) == n_tasks
    restored = restored_count(resumed.output, n_tasks)
    assert len(before) <= restored <= len(set(before) | local), resumed.output
    # only the missing tasks ran: what was stored before was neither redone nor rewritten
    assert {k: after[k] for k in before} == before

    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["untrac_ray.restored_tasks"] == str(restored)
    table = read_influence(run.info.run_id, uri)

    # an undisturbed run of the same job (the base model is reused from the cache)
    other = f"sqlite:///{tmp_path / 'undisturbed.db'}"
    started = time.perf_counter()
    fresh = _cli("run", str(job), "--tracking-uri", other)
    fresh_s = time.perf_counter() - started
    assert fresh.exit_code == 0, fresh.output
    oc = MlflowClient(tracking_uri=other)
    (ref,) = oc.search_runs([oc.get_experiment_by_name("tests").experiment_id])
    expected = read_influence(ref.info.run_id, other)
    keys = ["method", "point", "train_set", "test_set"]
    merged = pd.merge(table, expected, on=keys, suffixes=("", "_ref"), validate="1:1")
    assert len(merged) == len(expected) == len(table)
    np.testing.assert_allclose(merged["influence"], merged["influence_ref"], rtol=1e-5,
                               atol=1e-6)
    print(f"\nresume: restored {restored} of {n_tasks} tasks, {resume_s:.1f} s; "
          f"undisturbed run {fresh_s:.1f} s")


def test_resume_with_nothing_to_resume_says_so_and_resume_if_any_starts_anew(
        make_job, tracking_uri):
    job = make_job({"methods": {"untrac_inv": None}})
    result = _cli("run", str(job), "--tracking-uri", tracking_uri, "--resume")
    assert result.exit_code == 2
    assert "nothing to resume" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    started = CliRunner().invoke(app, ["run", str(job), "--tracking-uri", tracking_uri,
                                       "--resume-if-any"])  # what a retried cluster job runs
    assert started.exit_code == 0, started.output
    assert "nothing to resume" in started.output and "starting a new run" in started.output
    assert "resumed: restored" not in started.output
    client = MlflowClient(tracking_uri=tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FINISHED"


def test_a_running_run_is_stale_when_its_driver_is_gone_or_silent():
    import socket

    from untrac_ray.results.runs import driver_is_gone

    here, now = socket.gethostname(), 1_000_000.0
    alive = {"untrac_ray.driver": f"{here}:{os.getpid()}", "untrac_ray.heartbeat_s": "30",
             "untrac_ray.heartbeat": str(now - 10)}
    assert not driver_is_gone(alive, now)
    assert driver_is_gone({**alive, "untrac_ray.heartbeat": str(now - 100)}, now)  # silent
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert driver_is_gone({**alive, "untrac_ray.driver": f"{here}:{dead}"}, now)  # gone
    elsewhere = {**alive, "untrac_ray.driver": "another-host:1"}
    assert not driver_is_gone(elsewhere, now)  # another host's process: the heartbeat decides
    assert driver_is_gone({**elsewhere, "untrac_ray.heartbeat": str(now - 91)}, now)
    assert not driver_is_gone({}, now)  # runs from before heartbeats


def test_a_store_failing_while_a_run_opens_leaves_it_closed_with_its_driver_tags(
        tmp_path, monkeypatch):
    """The run is created with its driver, heartbeat and owner tags at once; a store error
    while it opens (here: its params refused) closes it FAILED, never a RUNNING run that no
    heartbeat ever marks stale."""
    from untrac_ray.inputs.loading import load_spec
    from untrac_ray.results.store import RedactingClient
    from untrac_ray.results.tracking import JobRun

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_spec(tmp_path), sort_keys=False))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    real = RedactingClient.log_batch

    def refuse_params(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        if params:
            raise RuntimeError("the store went away")
        return real(self, run_id, metrics=metrics, params=params, tags=tags,
                    synchronous=synchronous)

    monkeypatch.setattr(RedactingClient, "log_batch", refuse_params)
    with pytest.raises(RuntimeError, match="went away"), JobRun(load_spec(job), uri):
        pass
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FAILED"
    assert {"untrac_ray.driver", "untrac_ray.heartbeat", "untrac_ray.owner"} <= set(
        run.data.tags)
    assert "went away" in run.data.tags["untrac_ray.error"]


def test_an_interrupt_stays_an_interrupt_when_the_partial_table_cannot_be_stored(
        tmp_path, monkeypatch, ray_cluster):
    """Ctrl-C while the store refuses the partial table: the job still ends KILLED with
    KeyboardInterrupt (the store's error used to replace it and end the run FAILED)."""
    from untrac_ray.inputs.loading import load_spec
    from untrac_ray.results.tracking import JobRun
    from untrac_ray.run.job_setup import Reporter
    from untrac_ray.run.runner import run_job

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(merge(tiny_spec(tmp_path), {
        "methods": {"untrac_inv": None}}), sort_keys=False))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    class CtrlC(Reporter):
        def task_done(self, result, cells: int) -> None:
            if cells:  # an unlearning task's cells are in the partial table
                raise KeyboardInterrupt

    real = JobRun.log_table

    def refuse_partial(self, table, stem):
        if stem == "influence_partial":
            raise RuntimeError("the store went away")
        return real(self, table, stem)

    monkeypatch.setattr(JobRun, "log_table", refuse_partial)
    with pytest.raises(KeyboardInterrupt):
        run_job(load_spec(job), uri, reporter=CtrlC())
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "KILLED"


def test_a_driver_whose_run_was_adopted_stops_and_leaves_it_to_the_new_one(tmp_path):
    """A live driver that stopped beating (here: stopped with SIGSTOP) looks stale; `run
    --resume` adopts its run and finishes it. The old driver, continued, finds another owner
    before its next write and stops with one line, without writing or closing the run."""
    old, job, uri = _driver_midway(tmp_path, _job(tmp_path), heartbeat_s=1)
    try:
        old.send_signal(signal.SIGSTOP)  # alive, but silent: no heartbeat, no write
        time.sleep(5)  # three heartbeats missed: stale
        adopted = CliRunner().invoke(app, ["run", str(job), "--tracking-uri", uri, "--resume",
                                           "--quiet"], env={"UNTRAC_RAY_HEARTBEAT_S": "1"})
        assert adopted.exit_code == 0, adopted.output
        client = MlflowClient(tracking_uri=uri)
        (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
        assert run.info.status == "FINISHED"
        finished = dict(run.data.tags)
        old.send_signal(signal.SIGCONT)
        out, err = old.communicate(timeout=300)
    finally:
        old.kill()
    assert old.returncode != 0
    assert "was taken over by another driver" in err and "Traceback" not in err, err[-2000:]
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FINISHED"  # the old driver neither wrote nor closed it
    assert run.data.tags["untrac_ray.owner"] == finished["untrac_ray.owner"]
    assert run.data.tags["untrac_ray.heartbeat"] == finished["untrac_ray.heartbeat"]
