"""SIGTERM (what Kubernetes, Slurm and `timeout` send) stops `untrac-ray run` as Ctrl-C does:
a real CLI process, a real signal, the MLflow run KILLED with the cells that finished, exit
code 143, and no crash dump from Ray."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
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


def _lose_the_interrupt(sig: signal.Signals) -> None:
    """Send sig to this process and swallow the exception its handler raises, as a finalizer
    or a library that catches everything would."""
    try:
        os.kill(os.getpid(), sig)
        time.sleep(1)  # the handler runs here
    except KeyboardInterrupt:
        pass


def test_a_stop_whose_interrupt_was_lost_still_ends_the_engines_wait(ray_cluster):
    from untrac_ray.engine.pool import STOP_POLL_S, wait_first
    from untrac_ray.engine.signals import Terminated, raise_if_stopped, sigterm_as_interrupt

    @ray.remote(num_cpus=0)
    def never() -> None:
        time.sleep(600)

    ref = never.remote()
    handler = signal.getsignal(signal.SIGINT)
    try:
        # a process started by `cmd &` in a script (a Ray head, and so its jobs' drivers)
        # inherits SIGINT ignored; `stop` sends SIGINT: inside the block it is handled anyway
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for sig, raised in ((signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)):
            with sigterm_as_interrupt():
                assert wait_first([ref], timeout=0.2) == []  # no stop: an ordinary timeout
                _lose_the_interrupt(sig)
                started = time.monotonic()
                with pytest.raises(raised):
                    wait_first([ref], timeout=None)  # would block for ever without the record
                assert time.monotonic() - started <= STOP_POLL_S + 1
            raise_if_stopped()  # the record ends with the block
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # put back
    finally:
        signal.signal(signal.SIGINT, handler)
        ray.cancel(ref, force=True)
