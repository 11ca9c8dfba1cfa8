"""SIGTERM (what Kubernetes, Slurm and `timeout` send) stops `untrac-ray run` as Ctrl-C does:
a real CLI process, a real signal, the MLflow run KILLED with the cells that finished, exit
code 143, and no crash dump from Ray."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from conftest import merge, tiny_spec


def _finished_cells(db: Path) -> int:
    """UnTrac cells logged so far, read from the SQLite file read-only (an MLflow client here
    would race the job's driver creating the store)."""
    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            row = con.execute("SELECT COUNT(*) FROM metrics WHERE key LIKE "
                              "'influence/untrac/%'").fetchone()
    except sqlite3.Error:
        return 0
    return int(row[0])


def test_sigterm_ends_the_run_killed_with_the_partial_table_and_exit_143(tmp_path):
    # "double" (6 rows) finishes its ascent long before "add_one" (24 rows) does
    spec = merge(tiny_spec(tmp_path), {
        "methods": {"untrac": {"epochs": 120, "eval_every": None, "eval_points": 2},
                    "untrac_inv": None},
        "resources": {"local_cpus": 2},
    })
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    db = tmp_path / "mlflow.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "untrac_ray.cli", "run", str(job), "--tracking-uri",
         f"sqlite:///{db}", "--quiet"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while _finished_cells(db) == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, "the job ended before it could be terminated"
        assert _finished_cells(db) > 0, "no cell finished within 300 s"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stdout + stderr
    assert "SIGTERM received" not in stderr and "Traceback" not in stderr, stderr
    assert "terminated (SIGTERM)" in stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "KILLED"
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "influence_partial.parquet" in names and "influence.parquet" not in names
