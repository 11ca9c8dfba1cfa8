"""Jobs started together on one SQLite MLflow store (issue 11): real processes, no mocks.

MLflow creates a new SQLite file's schema (tables, then every migration, each statement
committed apart) on first use, unlocked; two processes doing it at once fail with `table ...
already exists`. tracking._prepare_store (JobRun) and check_store create or check it under an
exclusive file lock beside the database. An existing store takes several writers at once
(SQLite's locking, MLflow's busy_timeout): many small writes from several processes pass."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import merge, tiny_spec
from untrac_ray.results.runs import read_influence

# A tiny job: UnTrac only, one epoch, one actor on a 1-CPU embedded Ray per process.
SMALL = {
    "methods": {"untrac": {"epochs": 1, "eval_every": None, "eval_points": 1},
                "untrac_inv": None},
    "training": {"epochs": 1},
    "resources": {"local_cpus": 1, "num_actors": 1, "cpus_per_actor": 1,
                  "object_store_memory_mb": 100},
}


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout
    out = []
    try:
        for proc in procs:
            stdout, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((proc.returncode, stdout))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return out


@pytest.mark.slow  # two whole jobs (30-90 s); the processes test below covers the lock
def test_two_jobs_started_together_on_a_new_sqlite_store_both_finish(tmp_path):
    db = tmp_path / "new" / "mlflow.db"  # neither the file nor its folder exists yet
    uri = f"sqlite:///{db}"
    jobs = []
    for name in ("a", "b"):
        folder = tmp_path / name  # own data and cache: only the store is shared
        folder.mkdir()
        spec = merge(tiny_spec(folder), {**SMALL, "name": f"job_{name}"})
        job = folder / "job.yaml"
        job.write_text(yaml.safe_dump(spec, sort_keys=False))
        jobs.append(job)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "untrac_ray.cli", "run", str(job), "--tracking-uri", uri,
             "--quiet"],
            cwd=job.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for job in jobs
    ]
    for code, output in _wait_all(procs, timeout=400):
        assert code == 0, output[-3000:]

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert sorted(r.data.tags["untrac_ray.job"] for r in runs) == ["job_a", "job_b"]
    for run in runs:
        assert run.info.status == "FINISHED"
        table = read_influence(run.info.run_id, uri)
        cells = set(zip(table["train_set"], table["test_set"], strict=True))
        assert cells == {(tr, te) for tr in ("add_one", "double", "spell")
                         for te in ("next_number", "twice")}
        assert table["influence"].notna().all()


WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path

    from untrac_ray.inputs.loading import load_spec
    from untrac_ray.results.store import check_store
    from untrac_ray.results.tracking import JobRun

    job, uri, gate, index, writes = sys.argv[1:]
    spec = load_spec(job)
    spec.tracking.experiment = f"worker{index}"
    Path(gate, f"ready{index}").touch()  # imports done: wait for the others
    while not Path(gate, "go").exists():
        time.sleep(0.002)
    check_store(uri)
    with JobRun(spec, uri) as run:
        for step in range(int(writes)):  # many small writes, as a job's progress logging
            run.log_metrics({"progress": step, "loss": 1.0 / (step + 1)}, step=step)
            if step % 10 == 0:
                run.set_tag("step", str(step))
    print("done", run.run_id)
""")


def test_processes_opening_a_new_sqlite_store_at_once_all_succeed(tmp_path):
    n, writes = 3, 20  # the race is at creation: 3 clients lost it 11 times in 11 without the lock
    db = tmp_path / "store" / "mlflow.db"
    uri = f"sqlite:///{db}"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_spec(tmp_path), sort_keys=False))
    gate = tmp_path / "gate"
    gate.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(job), uri, str(gate), str(i),
                          str(writes)],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        for i in range(n)
    ]
    deadline = time.monotonic() + 300
    while (len(list(gate.glob("ready*"))) < n and time.monotonic() < deadline
           and all(p.poll() is None for p in procs)):
        time.sleep(0.05)
    (gate / "go").touch()  # all at once, on a store that does not exist yet
    for code, output in _wait_all(procs, timeout=300):
        assert code == 0, output[-3000:]

    client = MlflowClient(tracking_uri=uri)
    for i in range(n):
        (run,) = client.search_runs([client.get_experiment_by_name(f"worker{i}").experiment_id])
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "progress")) == writes
    assert Path(f"{db}.lock").is_file()
