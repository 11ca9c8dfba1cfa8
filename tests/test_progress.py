"""Progress a log can show: `untrac-ray run` with stderr to a file writes plain lines as the
job goes (tokenizing, training, then one per finished task), whole, never a live bar cut at
80 columns."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import tiny_spec

DATA_LINE = re.compile(r"^tokenizing (\S+) done: [\d,]+/[\d,]+ rows, [\d,]+ tokens, "
                       r"[\d,]+ rows/s, [\d,]+ tokens/s$")
TASK_LINE = re.compile(r"^task (\d+)/(\d+) done: (\S+) in [\d.]+s \(cells \d+/\d+, eta [^)]+\)$")


def test_a_run_logging_to_a_file_writes_whole_lines_as_it_goes(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_spec(tmp_path)))
    log = tmp_path / "stderr.log"
    root = str(Path(__file__).resolve().parent.parent)  # this checkout's package
    env = {**os.environ, "COLUMNS": "80", "UNTRAC_RAY_PROGRESS_S": "0.5",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "untrac_ray.cli", "run", str(job), "--tracking-uri",
             f"sqlite:///{tmp_path / 'mlflow.db'}"], cwd=tmp_path, env=env, stderr=err,
            stdout=subprocess.PIPE, text=True)
        first_seen: dict[str, float] = {}  # each line: when the log first held it
        while proc.poll() is None:
            for line in log.read_text().splitlines():
                first_seen.setdefault(line, time.monotonic())
            time.sleep(0.1)
        ended = time.monotonic()
        out, _ = proc.communicate()
    assert proc.returncode == 0, log.read_text()[-3000:]
    lines = log.read_text().splitlines()
    tasks = [m for line in lines if (m := TASK_LINE.match(line))]
    total = int(tasks[0][2])
    assert [int(m[1]) for m in tasks] == list(range(1, total + 1))  # one line per task
    assert {m[3].split(":")[0] for m in tasks} == {"untrac", "untrac_inv"}
    # every line was in the log while the job ran, in the order things happened: training
    # first, then each task as it finished (not all at the end)
    task_lines = [line for line in lines if TASK_LINE.match(line)]
    assert all(line in first_seen for line in task_lines)
    training = [line for line in lines if line.startswith("training: step ")]
    assert first_seen[training[0]] < first_seen[task_lines[0]] < ended
    assert training and "tokens/s" in training[-1] and training[-1].split()[2].endswith(
        training[-1].split()[2].split("/")[1])  # its last step, with its rate
    assert any(line.startswith("> ") for line in lines)  # the stages
    # the data stage, each set tokenized: rows, tokens and their rates, before training
    data = [line for line in lines if DATA_LINE.match(line)]
    assert {DATA_LINE.match(line)[1] for line in data} == {"add_one", "double", "spell",
                                                          "next_number", "twice"}
    assert first_seen[data[-1]] <= first_seen[training[0]]
    assert not any("━" in line or "…" in line for line in lines)  # no bar, nothing cut
    assert "untrac: influence at point" in out and "MLflow run" in out


def _cli(tmp_path, *args: str, progress_s: str) -> subprocess.CompletedProcess:
    root = str(Path(__file__).resolve().parent.parent)  # this checkout's package
    env = {**os.environ, "UNTRAC_RAY_PROGRESS_S": progress_s,
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "untrac_ray", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_malformed_progress_interval_is_one_clear_line_not_a_crash_at_import(tmp_path):
    """UNTRAC_RAY_PROGRESS_S is read where the progress display is made: --help works with it
    malformed, and a run ends with one line naming the variable and its value (exit 2)."""
    helped = _cli(tmp_path, "--help", progress_s="thirty")
    assert helped.returncode == 0 and "Traceback" not in helped.stderr, helped.stderr
    assert "Usage" in helped.stdout
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_spec(tmp_path)))
    for bad in ("thirty", "-1", "nan"):
        ran = _cli(tmp_path, "run", str(job), "--tracking-uri",
                   f"sqlite:///{tmp_path / 'mlflow.db'}", progress_s=bad)
        lines = ran.stderr.strip().splitlines()
        assert ran.returncode == 2 and len(lines) == 1, ran.stderr[-3000:]
        assert "UNTRAC_RAY_PROGRESS_S" in lines[0] and repr(bad) in lines[0], lines
        assert "Traceback" not in ran.stderr
    assert not (tmp_path / "mlflow.db").exists()  # refused before anything ran
